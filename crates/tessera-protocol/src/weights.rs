//! Model weights as bytes: the hub's content-addressed checkpoints.
//!
//! A checkpoint is a safetensors file of f32 tensors with `{"format": "pt"}` metadata, exactly the
//! `model.safetensors` a Hugging Face checkpoint holds. Its address is the BLAKE3 of its bytes.
//! Encoding is deterministic (the same tensors always give the same bytes), so a contributor
//! that applies a published update to its cached weights can check it now holds the checkpoint
//! the hub published, by hash, without downloading it.

use std::collections::HashMap;

use safetensors::{Dtype, SafeTensors};

use crate::api::TensorSpec;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    #[error("not a valid safetensors file: {0}")]
    Format(String),
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("checkpoint lacks tensor {0}")]
    Missing(String),
    #[error("checkpoint has a tensor the run does not: {0}")]
    Unexpected(String),
    #[error("{0} values for {1} tensors")]
    Count(usize, usize),
}

/// Serialises `values` (one flat buffer per entry of `table`, in order) to checkpoint bytes.
pub fn encode_weights<V: AsRef<[f32]>>(table: &[TensorSpec], values: &[V]) -> Result<Vec<u8>, WeightsError> {
    if table.len() != values.len() {
        return Err(WeightsError::Count(values.len(), table.len()));
    }
    let mut views = Vec::with_capacity(table.len());
    for (spec, v) in table.iter().zip(values) {
        let v = v.as_ref();
        if spec.numel() != v.len() as u64 {
            return Err(WeightsError::Tensor {
                name: spec.name.clone(),
                message: format!("shape {:?} holds {} values, got {}", spec.shape, spec.numel(), v.len()),
            });
        }
        let shape = spec.shape.iter().map(|&d| d as usize).collect();
        views.push((spec.name.clone(), F32View { values: v, shape }));
    }
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| WeightsError::Format(e.to_string()))
}

/// Where [`encode_weights`] puts each tensor of `table`: the file is `header` then the
/// tensors' little-endian f32 bytes, each at `data[i]` (relative to the end of the header, in
/// the order safetensors sorts them, not the table's). Lets a checkpoint be written, or one
/// tensor of it read, a tensor at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsLayout {
    pub header: Vec<u8>,
    pub data: Vec<std::ops::Range<u64>>,
}

impl WeightsLayout {
    pub fn of(table: &[TensorSpec]) -> Result<WeightsLayout, WeightsError> {
        // safetensors' own header, made as `safetensors::serialize` makes it (every tensor
        // f32, so sorted by name; offsets in that order; the JSON padded with spaces to a
        // multiple of 8 bytes after its length) without the buffer for the data that
        // `serialize` would allocate. A test holds it to `encode_weights`' bytes.
        let format = |e: String| WeightsError::Format(format!("header of the layout: {e}"));
        let mut order: Vec<usize> = (0..table.len()).collect();
        order.sort_by(|&a, &b| table[a].name.cmp(&table[b].name));
        let mut data = vec![0..0; table.len()];
        let mut infos = Vec::with_capacity(table.len());
        let mut at = 0u64;
        for i in order {
            let t = &table[i];
            let n = 4 * t.numel();
            data[i] = at..at + n;
            let shape = t.shape.iter().map(|&d| d as usize).collect();
            let info = safetensors::tensor::TensorInfo {
                dtype: Dtype::F32,
                shape,
                data_offsets: (at as usize, (at + n) as usize),
            };
            infos.push((t.name.clone(), info));
            at += n;
        }
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let metadata = safetensors::tensor::Metadata::new(Some(metadata), infos).map_err(|e| format(e.to_string()))?;
        let mut json = serde_json::to_string(&metadata).map_err(|e| format(e.to_string()))?.into_bytes();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut header = (json.len() as u64).to_le_bytes().to_vec();
        header.extend_from_slice(&json);
        Ok(WeightsLayout { header, data })
    }

    /// Where tensor `i`'s bytes lie in the whole file.
    pub fn file_range(&self, i: usize) -> std::ops::Range<u64> {
        let at = self.header.len() as u64;
        self.data[i].start + at..self.data[i].end + at
    }

    /// The tensors' indices in the order their bytes follow one another in the file.
    pub fn file_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.data.len()).collect();
        order.sort_by_key(|&i| self.data[i].start);
        order
    }
}

/// An f32 tensor as safetensors sees it, its little-endian bytes made only when the file is
/// written, one tensor at a time: encoding holds the output and one tensor's bytes, not a
/// second copy of every tensor.
struct F32View<'a> {
    values: &'a [f32],
    shape: Vec<usize>,
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Owned(self.values.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        4 * self.values.len()
    }
}

/// Parses checkpoint bytes that must hold exactly the tensors of `table`, f32, finite.
pub fn decode_weights(bytes: &[u8], table: &[TensorSpec]) -> Result<Vec<Vec<f32>>, WeightsError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Format(e.to_string()))?;
    for name in st.names() {
        if !table.iter().any(|s| s.name == name) {
            return Err(WeightsError::Unexpected(name.to_string()));
        }
    }
    let mut out = Vec::with_capacity(table.len());
    for spec in table {
        let bad = |m: String| WeightsError::Tensor { name: spec.name.clone(), message: m };
        let view = st.tensor(&spec.name).map_err(|_| WeightsError::Missing(spec.name.clone()))?;
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("dtype {:?}, f32 expected", view.dtype())));
        }
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        if shape != spec.shape {
            return Err(bad(format!("shape {shape:?}, {:?} expected", spec.shape)));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("non-finite value at {i}")));
        }
        out.push(values);
    }
    Ok(out)
}

/// The content address of checkpoint bytes.
pub fn weights_hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The layout is where encode_weights put every tensor, and its header is the file's.
    #[test]
    fn the_layout_places_every_tensor_where_encoding_does() {
        let table = vec![
            TensorSpec { name: "z.last".into(), shape: vec![3] },
            TensorSpec { name: "a.first".into(), shape: vec![2, 2] },
            TensorSpec { name: "m".into(), shape: vec![1] },
        ];
        let values: Vec<Vec<f32>> = table
            .iter()
            .enumerate()
            .map(|(k, t)| (0..t.numel()).map(|j| (10 * k) as f32 + j as f32).collect())
            .collect();
        let bytes = encode_weights(&table, &values).unwrap();
        let layout = WeightsLayout::of(&table).unwrap();
        assert_eq!(&bytes[..layout.header.len()], &layout.header[..]);
        let mut rebuilt = layout.header.clone();
        for i in layout.file_order() {
            let r = layout.file_range(i);
            let le: Vec<u8> = values[i].iter().flat_map(|v| v.to_le_bytes()).collect();
            assert_eq!(&bytes[r.start as usize..r.end as usize], &le[..], "{}", table[i].name);
            rebuilt.extend_from_slice(&le);
        }
        assert_eq!(rebuilt, bytes);
    }

    fn table() -> Vec<TensorSpec> {
        vec![TensorSpec { name: "a.weight".into(), shape: vec![2, 3] }, TensorSpec { name: "b".into(), shape: vec![4] }]
    }

    #[test]
    fn round_trip_is_exact_and_deterministic() {
        let values = vec![vec![1.0, -2.0, 3.5, 0.0, 1e-30, 7.0], vec![0.25; 4]];
        let a = encode_weights(&table(), &values).unwrap();
        let b = encode_weights(&table(), &values).unwrap();
        assert_eq!(a, b);
        assert_eq!(decode_weights(&a, &table()).unwrap(), values);
    }

    #[test]
    fn wrong_table_is_refused() {
        let values = vec![vec![0.0; 6], vec![0.0; 4]];
        let bytes = encode_weights(&table(), &values).unwrap();
        let mut other = table();
        other[1].shape = vec![2, 2];
        assert!(matches!(decode_weights(&bytes, &other), Err(WeightsError::Tensor { .. })));
        assert!(matches!(decode_weights(&bytes, &table()[..1]), Err(WeightsError::Unexpected(_))));
        let mut more = table();
        more.push(TensorSpec { name: "c".into(), shape: vec![1] });
        assert!(matches!(decode_weights(&bytes, &more), Err(WeightsError::Missing(_))));
        let nan = encode_weights(&table(), &[vec![f32::NAN; 6], vec![0.0; 4]]).unwrap();
        assert!(matches!(decode_weights(&nan, &table()), Err(WeightsError::Tensor { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_weights(&bytes, &table());
        }

        #[test]
        fn mangled_checkpoints_never_panic(pos in 0usize..200, byte in any::<u8>(), cut in 0usize..200) {
            let mut bytes = encode_weights(&table(), &[vec![1.0; 6], vec![2.0; 4]]).unwrap();
            let p = pos % bytes.len();
            bytes[p] = byte;
            bytes.truncate(bytes.len() - cut % bytes.len());
            let _ = decode_weights(&bytes, &table());
        }
    }
}
