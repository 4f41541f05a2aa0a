//! The pseudo-gradient message a contributor uploads after its inner steps:
//! Δ = θ_base − θ_local for every tensor, each encoded with the round's codec.
//!
//! ```text
//! offset  field
//!      0  magic "TESSPGRD" (8 bytes)
//!      8  version u16 LE = 1
//!     10  codec: id u8 (0 f32, 1 bf16, 2 int8, 3 int4, 4 top-k), param_a u32 LE, param_b u32 LE
//!     19  run id (16 bytes)
//!     35  round u64 LE
//!     43  base checkpoint hash (32 bytes, BLAKE3)
//!     75  tensor count u32 LE, then per tensor:
//!           name length u16 LE, name (UTF-8), rank u8, dims u64 LE × rank, encoded length u64 LE
//!      …  body: the encoded tensors, concatenated in table order
//!      …  BLAKE3 of everything before it (32 bytes)
//! ```
//!
//! `param_a`/`param_b` are the block size (int8, int4) or chunk and k (top-k), zero otherwise.
//! The trailing hash covers header, table and body, so a flipped bit anywhere is caught before
//! any tensor is decoded. Limits bound what a header can make the decoder allocate.

use crate::codec::{Codec, CodecError};

pub const MAGIC: &[u8; 8] = b"TESSPGRD";
pub const VERSION: u16 = 1;
pub const TENSORS_MAX: u32 = 1 << 16;
pub const NAME_BYTES_MAX: usize = 256;
pub const RANK_MAX: u8 = 8;
/// At most 2^38 values in one message (a 256-GiB f32 Δ): larger models split per layer.
pub const VALUES_MAX: u64 = 1 << 38;
const HASH_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message ends early: needed {needed} more bytes at offset {offset}")]
    Truncated { offset: usize, needed: usize },
    #[error("not a pseudo-gradient message (bad magic)")]
    BadMagic,
    #[error("unsupported message version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u16),
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("checksum mismatch: the message is corrupt")]
    ChecksumMismatch,
    #[error("{count} tensors exceeds the limit of {TENSORS_MAX}")]
    TooManyTensors { count: u32 },
    #[error("tensor {index}: {message}")]
    BadTensor { index: u32, message: String },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("message holds more than {VALUES_MAX} values")]
    TooManyValues,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// One tensor's entry: its name, shape and encoded bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<u64>,
    pub encoded: Vec<u8>,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A decoded pseudo-gradient message. Tensor values stay encoded until [`PseudoGradient::decode_tensor`].
#[derive(Debug, Clone, PartialEq)]
pub struct PseudoGradient {
    pub codec: Codec,
    pub run_id: [u8; 16],
    pub round: u64,
    pub base_checkpoint: [u8; 32],
    pub tensors: Vec<TensorEntry>,
}

fn codec_to_wire(codec: &Codec) -> (u8, u32, u32) {
    match *codec {
        Codec::F32 => (0, 0, 0),
        Codec::Bf16 => (1, 0, 0),
        Codec::Int8 { block } => (2, block, 0),
        Codec::Int4 { block } => (3, block, 0),
        Codec::TopK { chunk, k } => (4, chunk, k),
    }
}

fn codec_from_wire(id: u8, a: u32, b: u32) -> Result<Codec, WireError> {
    let codec = match id {
        0 => Codec::F32,
        1 => Codec::Bf16,
        2 => Codec::Int8 { block: a },
        3 => Codec::Int4 { block: a },
        4 => Codec::TopK { chunk: a, k: b },
        other => return Err(WireError::UnknownCodec(other)),
    };
    codec.validate()?;
    Ok(codec)
}

impl PseudoGradient {
    /// Encodes `tensors` (name, shape, values) with `codec` into a message.
    pub fn build<'a>(
        codec: Codec,
        run_id: [u8; 16],
        round: u64,
        base_checkpoint: [u8; 32],
        tensors: impl IntoIterator<Item = (&'a str, &'a [u64], &'a [f32])>,
    ) -> Result<PseudoGradient, WireError> {
        let mut entries = Vec::new();
        for (name, shape, values) in tensors {
            let index = entries.len() as u32;
            let numel: u64 = shape.iter().product();
            if numel != values.len() as u64 {
                return Err(WireError::BadTensor {
                    index,
                    message: format!("shape {shape:?} holds {numel} values, got {}", values.len()),
                });
            }
            entries.push(TensorEntry { name: name.to_owned(), shape: shape.to_vec(), encoded: codec.encode(values)? });
        }
        let message = PseudoGradient { codec, run_id, round, base_checkpoint, tensors: entries };
        message.check_table()?;
        Ok(message)
    }

    fn check_table(&self) -> Result<(), WireError> {
        if self.tensors.len() as u64 > u64::from(TENSORS_MAX) {
            return Err(WireError::TooManyTensors { count: self.tensors.len() as u32 });
        }
        let mut total = 0u64;
        for (i, t) in self.tensors.iter().enumerate() {
            let bad = |m: String| WireError::BadTensor { index: i as u32, message: m };
            if t.name.is_empty() || t.name.len() > NAME_BYTES_MAX {
                return Err(bad(format!("name must be 1..={NAME_BYTES_MAX} bytes")));
            }
            if t.shape.len() > usize::from(RANK_MAX) {
                return Err(bad(format!("rank {} exceeds {RANK_MAX}", t.shape.len())));
            }
            let numel = t.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or(WireError::TooManyValues)?;
            total = total.checked_add(numel).ok_or(WireError::TooManyValues)?;
            if total > VALUES_MAX {
                return Err(WireError::TooManyValues);
            }
            let expected = self.codec.encoded_len(numel);
            if t.encoded.len() as u64 != expected {
                return Err(bad(format!("{} encoded bytes, codec needs {expected}", t.encoded.len())));
            }
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let table: Vec<(&str, &[u64], u64)> =
            self.tensors.iter().map(|t| (t.name.as_str(), &t.shape[..], t.encoded.len() as u64)).collect();
        let mut out = header_bytes(&self.codec, self.run_id, self.round, self.base_checkpoint, &table);
        for t in &self.tensors {
            out.extend_from_slice(&t.encoded);
        }
        let digest = hash(&out);
        out.extend_from_slice(digest.as_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<PseudoGradient, WireError> {
        let view = MessageView::parse(bytes)?;
        Ok(PseudoGradient {
            codec: view.codec,
            run_id: view.run_id,
            round: view.round,
            base_checkpoint: view.base_checkpoint,
            tensors: view
                .tensors
                .into_iter()
                .map(|t| TensorEntry { name: t.name.to_owned(), shape: t.shape, encoded: t.encoded.to_vec() })
                .collect(),
        })
    }

    /// The message as a borrowed view, the form the hub aggregates from.
    pub fn view(&self) -> MessageView<'_> {
        MessageView {
            codec: self.codec,
            run_id: self.run_id,
            round: self.round,
            base_checkpoint: self.base_checkpoint,
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorView { name: &t.name, shape: t.shape.clone(), encoded: &t.encoded })
                .collect(),
        }
    }

    /// Decodes tensor `index` to f32 values.
    pub fn decode_tensor(&self, index: usize) -> Result<Vec<f32>, WireError> {
        let t = self
            .tensors
            .get(index)
            .ok_or(WireError::BadTensor { index: index as u32, message: "no such tensor".into() })?;
        Ok(self.codec.decode(&t.encoded, t.numel())?)
    }

    /// Bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.to_bytes().len()
    }
}

/// A message's header and tensor table (everything before the body) for tensors of the given
/// names, shapes and encoded lengths: [`PseudoGradient::to_bytes`] is this, the encoded tensors
/// in table order, and the BLAKE3 of all of it. Lets a message be written a tensor at a time.
pub fn header_bytes(
    codec: &Codec,
    run_id: [u8; 16],
    round: u64,
    base: [u8; 32],
    table: &[(&str, &[u64], u64)],
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let (id, a, b) = codec_to_wire(codec);
    out.push(id);
    out.extend_from_slice(&a.to_le_bytes());
    out.extend_from_slice(&b.to_le_bytes());
    out.extend_from_slice(&run_id);
    out.extend_from_slice(&round.to_le_bytes());
    out.extend_from_slice(&base);
    out.extend_from_slice(&(table.len() as u32).to_le_bytes());
    for (name, shape, len) in table {
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(shape.len() as u8);
        shape.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

/// [`header_bytes`] of a message carrying every tensor of `tensors` encoded with `codec`.
pub fn header_bytes_for(
    codec: &Codec,
    run_id: [u8; 16],
    round: u64,
    base: [u8; 32],
    tensors: &[crate::api::TensorSpec],
) -> Vec<u8> {
    let table: Vec<(&str, &[u64], u64)> =
        tensors.iter().map(|t| (t.name.as_str(), &t.shape[..], codec.encoded_len(t.numel()))).collect();
    header_bytes(codec, run_id, round, base, &table)
}

/// Where each tensor's encoding lies in a stored message, read from its first bytes alone: what
/// a reader of a slice of tensors needs to fetch just their bytes (a range read). The table is
/// checked as [`MessageView::parse`] checks it, but not the trailing hash, which covers the
/// whole message: use this only on messages verified whole when they were stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub codec: Codec,
    /// Per tensor: its number of values and the byte range of its encoding in the message.
    pub tensors: Vec<(u64, std::ops::Range<u64>)>,
}

impl Layout {
    /// Reads the layout from a prefix of the message. [`WireError::Truncated`] says how far the
    /// table reaches when the prefix is too short: read `offset + needed` bytes and try again.
    pub fn read(prefix: &[u8]) -> Result<Layout, WireError> {
        if prefix.len() >= MAGIC.len() && &prefix[..MAGIC.len()] != MAGIC {
            return Err(WireError::BadMagic);
        }
        let mut r = Reader { bytes: prefix, at: MAGIC.len() };
        let (codec, _, _, _, table) = read_table(&mut r)?;
        let mut at = r.at as u64;
        let tensors = table
            .into_iter()
            .map(|(_, shape, len)| {
                let place = (shape.iter().product(), at..at + len);
                at += len;
                place
            })
            .collect();
        Ok(Layout { codec, tensors })
    }
}

type Table<'a> = Vec<(&'a str, Vec<u64>, u64)>;

/// The header and table after the magic: codec, run id, round, base, and per tensor its name,
/// shape and encoded length, each checked against the limits and the codec.
#[allow(clippy::type_complexity)]
fn read_table<'a>(r: &mut Reader<'a>) -> Result<(Codec, [u8; 16], u64, [u8; 32], Table<'a>), WireError> {
    let version = u16::from_le_bytes(r.array()?);
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let id = r.array::<1>()?[0];
    let a = u32::from_le_bytes(r.array()?);
    let b = u32::from_le_bytes(r.array()?);
    let codec = codec_from_wire(id, a, b)?;
    let run_id = r.array()?;
    let round = u64::from_le_bytes(r.array()?);
    let base_checkpoint = r.array()?;
    let count = u32::from_le_bytes(r.array()?);
    if count > TENSORS_MAX {
        return Err(WireError::TooManyTensors { count });
    }
    let mut table = Vec::with_capacity(count as usize);
    let mut total = 0u64;
    for index in 0..count {
        let bad = |m: String| WireError::BadTensor { index, message: m };
        let name_len = usize::from(u16::from_le_bytes(r.array()?));
        if name_len == 0 || name_len > NAME_BYTES_MAX {
            return Err(bad(format!("name length {name_len} outside 1..={NAME_BYTES_MAX}")));
        }
        let name = std::str::from_utf8(r.take(name_len)?).map_err(|_| bad("name is not UTF-8".into()))?;
        let rank = r.array::<1>()?[0];
        if rank > RANK_MAX {
            return Err(bad(format!("rank {rank} exceeds {RANK_MAX}")));
        }
        let shape = (0..rank).map(|_| r.array().map(u64::from_le_bytes)).collect::<Result<Vec<u64>, _>>()?;
        let numel = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or(WireError::TooManyValues)?;
        total = total.checked_add(numel).ok_or(WireError::TooManyValues)?;
        if total > VALUES_MAX {
            return Err(WireError::TooManyValues);
        }
        let len = u64::from_le_bytes(r.array()?);
        let expected = codec.encoded_len(numel);
        if len != expected {
            return Err(bad(format!("{len} encoded bytes, codec needs {expected}")));
        }
        table.push((name, shape, len));
    }
    Ok((codec, run_id, round, base_checkpoint, table))
}

/// A verified message borrowing its bytes: what the hub decodes from without copying.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageView<'a> {
    pub codec: Codec,
    pub run_id: [u8; 16],
    pub round: u64,
    pub base_checkpoint: [u8; 32],
    pub tensors: Vec<TensorView<'a>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub shape: Vec<u64>,
    pub encoded: &'a [u8],
}

impl TensorView<'_> {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Messages at least this large are hashed on all cores.
const PARALLEL_HASH_BYTES: usize = 1 << 20;

fn hash(content: &[u8]) -> blake3::Hash {
    if content.len() >= PARALLEL_HASH_BYTES {
        blake3::Hasher::new().update_rayon(content).finalize()
    } else {
        blake3::hash(content)
    }
}

impl<'a> MessageView<'a> {
    /// Applies a published weight update to `weights`: θ + decode(u), element-wise in f32.
    /// This defines the next round's weights (docs/protocol.md, "Published updates"), so every
    /// follower computes exactly the checkpoint the hub published.
    pub fn apply_to(&self, weights: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, WireError> {
        if weights.len() != self.tensors.len() {
            return Err(WireError::BadTensor {
                index: weights.len().min(self.tensors.len()) as u32,
                message: format!("update has {} tensors, the weights {}", self.tensors.len(), weights.len()),
            });
        }
        let mut out = Vec::with_capacity(weights.len());
        for (w, t) in weights.iter().zip(&self.tensors) {
            let d = self.codec.decode(t.encoded, w.len() as u64)?;
            out.push(w.iter().zip(d).map(|(a, b)| a + b).collect());
        }
        Ok(out)
    }

    /// Parses and verifies a message: magic, version, checksum, codec, table limits and exact
    /// lengths. Tensor bytes are borrowed, not copied.
    pub fn parse(bytes: &'a [u8]) -> Result<MessageView<'a>, WireError> {
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(if bytes.len() < MAGIC.len() {
                WireError::Truncated { offset: 0, needed: MAGIC.len() }
            } else {
                WireError::BadMagic
            });
        }
        if bytes.len() < HASH_BYTES + MAGIC.len() {
            return Err(WireError::Truncated { offset: bytes.len(), needed: HASH_BYTES });
        }
        let (content, digest) = bytes.split_at(bytes.len() - HASH_BYTES);
        // The version first: a message of another version may not even be hashed the same way.
        let Some(&[lo, hi]) = content.get(MAGIC.len()..MAGIC.len() + 2) else {
            return Err(WireError::Truncated { offset: content.len(), needed: 2 });
        };
        let version = u16::from_le_bytes([lo, hi]);
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        if hash(content).as_bytes() != digest {
            return Err(WireError::ChecksumMismatch);
        }
        let mut r = Reader { bytes: content, at: MAGIC.len() };
        let (codec, run_id, round, base_checkpoint, table) = read_table(&mut r)?;
        let mut tensors = Vec::with_capacity(table.len());
        for (name, shape, len) in table {
            let len = usize::try_from(len).map_err(|_| WireError::Truncated { offset: r.at, needed: usize::MAX })?;
            tensors.push(TensorView { name, shape, encoded: r.take(len)? });
        }
        if r.at != content.len() {
            return Err(WireError::TrailingBytes(content.len() - r.at));
        }
        Ok(MessageView { codec, run_id, round, base_checkpoint, tensors })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(WireError::Truncated { offset: self.at, needed: n });
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_update_applies_element_wise_and_must_cover_every_tensor() {
        let base = vec![vec![1.0f32, 2.0], vec![-1.0]];
        let u = PseudoGradient::build(
            Codec::F32,
            [0; 16],
            1,
            [0; 32],
            [("a", &[2u64][..], &[0.5f32, -2.0][..]), ("b", &[1u64][..], &[0.25f32][..])],
        )
        .unwrap();
        assert_eq!(u.view().apply_to(&base).unwrap(), vec![vec![1.5, 0.0], vec![-0.75]]);
        assert!(matches!(u.view().apply_to(&base[..1]), Err(WireError::BadTensor { .. })));
    }

    fn sample(codec: Codec) -> PseudoGradient {
        let a: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..10).map(|i| i as f32 - 5.0).collect();
        PseudoGradient::build(
            codec,
            [7; 16],
            42,
            [9; 32],
            [
                ("model.layers.0.mlp.up_proj.weight", &[8u64, 12][..], &a[..]),
                ("model.norm.weight", &[10u64][..], &b[..]),
            ],
        )
        .unwrap()
    }

    /// The layout read from a prefix finds every tensor's bytes where the full parse does, and
    /// says how much more to read when the prefix is short; the header written alone is the
    /// message's.
    #[test]
    fn the_layout_is_read_from_a_prefix() {
        for codec in [Codec::F32, Codec::Int8 { block: 32 }, Codec::TopK { chunk: 32, k: 4 }] {
            let m = sample(codec);
            let bytes = m.to_bytes();
            let view = MessageView::parse(&bytes).unwrap();
            let mut prefix = 1;
            let layout = loop {
                match Layout::read(&bytes[..prefix]) {
                    Ok(l) => break l,
                    Err(WireError::Truncated { offset, needed }) => {
                        assert!(offset + needed > prefix);
                        prefix = offset + needed;
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(layout.codec, codec);
            for (t, (numel, range)) in view.tensors.iter().zip(&layout.tensors) {
                assert_eq!((t.numel(), t.encoded), (*numel, &bytes[range.start as usize..range.end as usize]));
            }
            let table: Vec<(&str, &[u64], u64)> =
                m.tensors.iter().map(|t| (t.name.as_str(), &t.shape[..], t.encoded.len() as u64)).collect();
            let header = header_bytes(&codec, m.run_id, m.round, m.base_checkpoint, &table);
            assert_eq!(&bytes[..header.len()], &header[..]);
            assert_eq!(layout.tensors[0].1.start, header.len() as u64);
        }
        assert_eq!(Layout::read(b"NOTAMSG!xxxxxxxx"), Err(WireError::BadMagic));
    }

    #[test]
    fn round_trips_with_every_codec() {
        for codec in [
            Codec::F32,
            Codec::Bf16,
            Codec::Int8 { block: 32 },
            Codec::Int4 { block: 32 },
            Codec::TopK { chunk: 32, k: 4 },
        ] {
            let m = sample(codec);
            let back = PseudoGradient::from_bytes(&m.to_bytes()).unwrap();
            assert_eq!(back, m);
            assert_eq!(back.decode_tensor(1).unwrap().len(), 10);
        }
        let exact = sample(Codec::F32);
        assert_eq!(exact.decode_tensor(1).unwrap(), (0..10).map(|i| i as f32 - 5.0).collect::<Vec<_>>());
    }

    #[test]
    fn typed_errors_for_hostile_messages() {
        let bytes = sample(Codec::F32).to_bytes();
        let mut bad = bytes.clone();
        bad[100] ^= 1;
        assert_eq!(PseudoGradient::from_bytes(&bad), Err(WireError::ChecksumMismatch));
        let mut bad = bytes.clone();
        bad[8] = 9;
        assert_eq!(PseudoGradient::from_bytes(&bad), Err(WireError::UnsupportedVersion(9)));
        assert_eq!(
            PseudoGradient::from_bytes(b"NOTAPGRDxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
            Err(WireError::BadMagic)
        );
        assert!(matches!(
            PseudoGradient::from_bytes(&bytes[..40]),
            Err(WireError::ChecksumMismatch | WireError::Truncated { .. })
        ));
        let err =
            PseudoGradient::build(Codec::F32, [0; 16], 0, [0; 32], [("w", &[3u64][..], &[1.0f32][..])]).unwrap_err();
        assert!(matches!(err, WireError::BadTensor { index: 0, .. }));
    }

    /// Re-hashes a mangled message so the structural checks, not just the checksum, are tested.
    fn rehash(mut bytes: Vec<u8>) -> Vec<u8> {
        if bytes.len() >= 32 {
            let n = bytes.len() - 32;
            let digest = blake3::hash(&bytes[..n]);
            bytes[n..].copy_from_slice(digest.as_bytes());
        }
        bytes
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = PseudoGradient::from_bytes(&bytes);
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&[1, 0]);
            with_magic.extend_from_slice(&bytes);
            let _ = Layout::read(&with_magic);
            let _ = PseudoGradient::from_bytes(&rehash(with_magic));
            let _ = Layout::read(&bytes);
        }

        #[test]
        fn mangled_messages_with_valid_checksums_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in 0usize..40,
            codec_id in 0usize..5,
        ) {
            let codecs = [Codec::F32, Codec::Bf16, Codec::Int8 { block: 32 }, Codec::Int4 { block: 32 }, Codec::TopK { chunk: 32, k: 4 }];
            let mut bytes = sample(codecs[codec_id]).to_bytes();
            let n = bytes.len() - 32;
            for (i, v) in edits {
                bytes[10 + i.index(n - 10)] = v;
            }
            bytes.drain(n.saturating_sub(cut)..n);
            if let Ok(m) = PseudoGradient::from_bytes(&rehash(bytes)) {
                for i in 0..m.tensors.len() {
                    let _ = m.decode_tensor(i);
                }
            }
        }
    }
}
