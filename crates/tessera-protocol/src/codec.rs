//! Pseudo-gradient codecs. Each turns `n` f32 values into bytes and back; the hub decodes to f32
//! and aggregates in f32.
//!
//! | codec | bytes for n values | error |
//! |---|---|---|
//! | `F32` | 4n | none |
//! | `Bf16` | 2n | round-to-nearest-even to 8 mantissa bits |
//! | `Int8 { block }` | n + 4⌈n/block⌉ | ≤ max\|x\|_block / 254 per value |
//! | `Int4 { block }` | ⌈n/2⌉ + 4⌈n/block⌉ | ≤ max\|x\|_block / 14 per value |
//! | `TopK { chunk, k }` | ⌈n/chunk⌉·(4 + 3k) | all but the k largest \|x\| per chunk dropped; kept values int8 |
//!
//! Top-k is meant to be used through [`ErrorFeedback`], which carries what compression dropped
//! into the next round, so nothing is lost for good — only delayed.

/// Bytes per block scale (an f32).
const SCALE_BYTES: usize = 4;
/// Largest block or chunk accepted from the wire: bounds the work one header can ask for.
pub const BLOCK_MAX: u32 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    F32,
    Bf16,
    /// Symmetric int8 with one f32 scale per `block` values.
    Int8 {
        block: u32,
    },
    /// Symmetric 4-bit (−7..=7) with one f32 scale per `block` values, two values per byte.
    Int4 {
        block: u32,
    },
    /// In each `chunk` of values keep the `k` of largest magnitude: u16 index within the chunk
    /// and an int8 value against a per-chunk f32 scale. (4-bit values were tried: kept values
    /// span a wide range, and a 4-bit grid rounded the smaller ones to zero.)
    TopK {
        chunk: u32,
        k: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("codec parameters out of range: {0}")]
    BadParameters(String),
    #[error("encoded tensor is {got} bytes, {expected} expected for {n} values")]
    WrongLength { n: u64, expected: u64, got: u64 },
    #[error("non-finite scale in block {block}")]
    NonFiniteScale { block: u64 },
    #[error("top-k index {index} in chunk {chunk} is outside the chunk of {len} values")]
    IndexOutOfRange { chunk: u64, index: u32, len: u32 },
    #[error("top-k index {index} repeats in chunk {chunk}")]
    RepeatedIndex { chunk: u64, index: u32 },
    #[error("non-finite value in the input at position {0}")]
    NonFiniteInput(u64),
}

impl Codec {
    /// Checks parameters that may have come from the wire.
    pub fn validate(&self) -> Result<(), CodecError> {
        let bad = |m: String| Err(CodecError::BadParameters(m));
        match *self {
            Codec::F32 | Codec::Bf16 => Ok(()),
            Codec::Int8 { block } | Codec::Int4 { block } if block == 0 || block > BLOCK_MAX => {
                bad(format!("block {block} must be in 1..={BLOCK_MAX}"))
            }
            Codec::Int4 { block } if block % 2 != 0 => bad(format!("4-bit block {block} must be even")),
            Codec::TopK { chunk, k } if chunk == 0 || chunk > BLOCK_MAX || k == 0 || k > chunk => {
                bad(format!("top-k needs 1 ≤ k ({k}) ≤ chunk ({chunk}) ≤ {BLOCK_MAX}"))
            }
            _ => Ok(()),
        }
    }

    /// Values per independently encoded block (1 for f32 and bf16, the block or chunk
    /// otherwise). A range of values that starts at a multiple of this decodes on its own from
    /// `encoded[encoded_len(start)..encoded_len(end)]`.
    pub fn unit(&self) -> u32 {
        match *self {
            Codec::F32 | Codec::Bf16 => 1,
            Codec::Int8 { block } | Codec::Int4 { block } => block,
            Codec::TopK { chunk, .. } => chunk,
        }
    }

    /// Exact encoded size of `n` values.
    pub fn encoded_len(&self, n: u64) -> u64 {
        let blocks = |b: u32| n.div_ceil(u64::from(b));
        match *self {
            Codec::F32 => 4 * n,
            Codec::Bf16 => 2 * n,
            Codec::Int8 { block } => n + SCALE_BYTES as u64 * blocks(block),
            Codec::Int4 { block } => n.div_ceil(2) + SCALE_BYTES as u64 * blocks(block),
            Codec::TopK { chunk, k } => {
                let full = n / u64::from(chunk);
                let rest = n % u64::from(chunk);
                let per = |k: u64| SCALE_BYTES as u64 + 3 * k;
                full * per(u64::from(k)) + if rest > 0 { per(u64::from(k).min(rest)) } else { 0 }
            }
        }
    }

    /// Encodes `values`. Non-finite input is refused: a NaN must never reach the hub.
    pub fn encode(&self, values: &[f32]) -> Result<Vec<u8>, CodecError> {
        self.validate()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(CodecError::NonFiniteInput(i as u64));
        }
        let mut out = Vec::with_capacity(self.encoded_len(values.len() as u64) as usize);
        match *self {
            Codec::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Codec::Bf16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            Codec::Int8 { block } => {
                for chunk in values.chunks(block as usize) {
                    let scale = max_abs(chunk) / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    out.extend(chunk.iter().map(|&v| quantize(v, scale, 127) as u8));
                }
            }
            Codec::Int4 { block } => {
                for chunk in values.chunks(block as usize) {
                    let scale = max_abs(chunk) / 7.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    pack_nibbles(chunk.iter().map(|&v| quantize(v, scale, 7)), &mut out);
                }
            }
            Codec::TopK { chunk, k } => {
                for part in values.chunks(chunk as usize) {
                    let keep = top_k_indices(part, k as usize);
                    let kept: Vec<f32> = keep.iter().map(|&i| part[i as usize]).collect();
                    let scale = max_abs(&kept) / 127.0;
                    out.extend_from_slice(&scale.to_le_bytes());
                    keep.iter().for_each(|&i| out.extend_from_slice(&i.to_le_bytes()));
                    out.extend(kept.iter().map(|&v| quantize(v, scale, 127) as u8));
                }
            }
        }
        debug_assert_eq!(out.len() as u64, self.encoded_len(values.len() as u64));
        Ok(out)
    }

    /// Decodes `n` values from `bytes`, checking the length, every scale and every index.
    pub fn decode(&self, bytes: &[u8], n: u64) -> Result<Vec<f32>, CodecError> {
        self.validate()?;
        let expected = self.encoded_len(n);
        if bytes.len() as u64 != expected {
            return Err(CodecError::WrongLength { n, expected, got: bytes.len() as u64 });
        }
        // The length check above bounds n by the buffer we were handed, so this allocation is
        // at most a small multiple of the input.
        let mut out = vec![0.0; n as usize];
        self.decode_into(bytes, &mut out)?;
        Ok(out)
    }

    /// Decodes `out.len()` values into `out` without allocating (the hub's hot path), with the
    /// same checks as [`Codec::decode`]. On error `out` holds garbage.
    pub fn decode_into(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
        self.validate()?;
        let n = out.len();
        let expected = self.encoded_len(n as u64);
        if bytes.len() as u64 != expected {
            return Err(CodecError::WrongLength { n: n as u64, expected, got: bytes.len() as u64 });
        }
        match *self {
            Codec::F32 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Codec::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            Codec::Int8 { block } => {
                let mut at = 0;
                for (i, dst) in out.chunks_mut(block as usize).enumerate() {
                    let scale = read_scale(bytes, &mut at, i)?;
                    let len = dst.len();
                    for (o, &b) in dst.iter_mut().zip(&bytes[at..at + len]) {
                        *o = f32::from(b as i8) * scale;
                    }
                    at += len;
                }
            }
            Codec::Int4 { block } => {
                let mut at = 0;
                for (i, dst) in out.chunks_mut(block as usize).enumerate() {
                    let scale = read_scale(bytes, &mut at, i)?;
                    let len = dst.len();
                    let packed = len.div_ceil(2);
                    for (pair, &b) in dst.chunks_mut(2).zip(&bytes[at..at + packed]) {
                        pair[0] = f32::from(((b << 4) as i8) >> 4) * scale;
                        if let Some(hi) = pair.get_mut(1) {
                            *hi = f32::from((b as i8) >> 4) * scale;
                        }
                    }
                    at += packed;
                }
            }
            Codec::TopK { chunk, k } => {
                let mut at = 0;
                let mut seen = vec![false; (chunk as usize).min(n)];
                for (c, dst) in out.chunks_mut(chunk as usize).enumerate() {
                    let len = dst.len();
                    let kk = (k as usize).min(len);
                    let scale = read_scale(bytes, &mut at, c)?;
                    dst.fill(0.0);
                    seen[..len].fill(false);
                    let indices = &bytes[at..at + 2 * kk];
                    let values = &bytes[at + 2 * kk..at + 3 * kk];
                    for (ib, &q) in indices.chunks_exact(2).zip(values) {
                        let index = u16::from_le_bytes([ib[0], ib[1]]);
                        let i = usize::from(index);
                        if i >= len {
                            return Err(CodecError::IndexOutOfRange {
                                chunk: c as u64,
                                index: u32::from(index),
                                len: len as u32,
                            });
                        }
                        if std::mem::replace(&mut seen[i], true) {
                            return Err(CodecError::RepeatedIndex { chunk: c as u64, index: u32::from(index) });
                        }
                        dst[i] = f32::from(q as i8) * scale;
                    }
                    at += 3 * kk;
                }
            }
        }
        Ok(())
    }

    /// Compression ratio against f32 for `n` values.
    pub fn ratio_vs_f32(&self, n: u64) -> f64 {
        (4 * n) as f64 / self.encoded_len(n).max(1) as f64
    }
}

fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

fn quantize(v: f32, scale: f32, limit: i8) -> i8 {
    if scale == 0.0 {
        return 0;
    }
    (v / scale).round().clamp(-f32::from(limit), f32::from(limit)) as i8
}

/// Two signed 4-bit values per byte, low nibble first.
fn pack_nibbles(values: impl Iterator<Item = i8>, out: &mut Vec<u8>) {
    let mut pending: Option<u8> = None;
    for q in values {
        let nib = (q as u8) & 0x0f;
        pending = match pending {
            None => Some(nib),
            Some(lo) => {
                out.push(lo | (nib << 4));
                None
            }
        };
    }
    if let Some(lo) = pending {
        out.push(lo);
    }
}

fn read_scale(bytes: &[u8], at: &mut usize, block: usize) -> Result<f32, CodecError> {
    let b = &bytes[*at..*at + SCALE_BYTES];
    *at += SCALE_BYTES;
    let scale = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if !scale.is_finite() || scale < 0.0 {
        return Err(CodecError::NonFiniteScale { block: block as u64 });
    }
    Ok(scale)
}

/// Indices (ascending) of the `k` largest magnitudes; ties go to the lower index.
fn top_k_indices(values: &[f32], k: usize) -> Vec<u16> {
    let k = k.min(values.len());
    let mut order: Vec<u16> = (0..values.len() as u16).collect();
    if k < values.len() {
        order.select_nth_unstable_by(k, |&a, &b| {
            values[b as usize].abs().total_cmp(&values[a as usize].abs()).then(a.cmp(&b))
        });
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

/// Contributor-side error feedback: what a lossy codec dropped this round is added to the next
/// round's pseudo-gradient, so compression delays information instead of discarding it.
///
/// With a decay β < 1 the carried residual shrinks by β each round before the new Δ is added
/// (`e ← β·e + Δ`, send `C(e)`, keep `e − C(e)`): the residual then acts as a local momentum
/// (as in SparseLoCo), and what stays unsent for long fades instead of piling up.
#[derive(Debug, Clone)]
pub struct ErrorFeedback {
    residual: Vec<f32>,
    decay: f32,
}

impl ErrorFeedback {
    pub fn new(n: usize) -> ErrorFeedback {
        ErrorFeedback { residual: vec![0.0; n], decay: 1.0 }
    }

    /// Error feedback whose residual decays by `decay` (in (0, 1]) each round.
    pub fn with_decay(mut self, decay: f32) -> ErrorFeedback {
        self.decay = decay;
        self
    }

    /// Encodes `delta + decay · residual` and keeps what the encoding lost as the new residual.
    pub fn encode(&mut self, codec: &Codec, delta: &[f32]) -> Result<Vec<u8>, CodecError> {
        assert_eq!(delta.len(), self.residual.len(), "error feedback sized for another tensor");
        let decay = self.decay;
        let corrected: Vec<f32> = delta.iter().zip(&self.residual).map(|(d, r)| d + decay * r).collect();
        let bytes = codec.encode(&corrected)?;
        let sent = codec.decode(&bytes, corrected.len() as u64)?;
        for ((r, c), s) in self.residual.iter_mut().zip(&corrected).zip(&sent) {
            *r = c - s;
        }
        Ok(bytes)
    }

    /// Resumes error feedback from a saved [`ErrorFeedback::residual`].
    pub fn from_residual(residual: Vec<f32>) -> ErrorFeedback {
        ErrorFeedback { residual, decay: 1.0 }
    }

    pub fn residual(&self) -> &[f32] {
        &self.residual
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Codec; 5] = [
        Codec::F32,
        Codec::Bf16,
        Codec::Int8 { block: 64 },
        Codec::Int4 { block: 64 },
        Codec::TopK { chunk: 256, k: 8 },
    ];

    fn values() -> impl Strategy<Value = Vec<f32>> {
        proptest::collection::vec(-1e3f32..1e3, 0..700)
    }

    fn codec() -> impl Strategy<Value = Codec> {
        prop_oneof![
            Just(Codec::F32),
            Just(Codec::Bf16),
            (1u32..300).prop_map(|block| Codec::Int8 { block }),
            (1u32..150).prop_map(|b| Codec::Int4 { block: 2 * b }),
            (1u32..300).prop_flat_map(|chunk| (Just(chunk), 1..=chunk)).prop_map(|(chunk, k)| Codec::TopK { chunk, k }),
        ]
    }

    proptest! {
        #[test]
        fn encoded_len_is_exact_and_round_trip_is_bounded(codec in codec(), v in values()) {
            let bytes = codec.encode(&v).unwrap();
            prop_assert_eq!(bytes.len() as u64, codec.encoded_len(v.len() as u64));
            let back = codec.decode(&bytes, v.len() as u64).unwrap();
            prop_assert_eq!(back.len(), v.len());
            match codec {
                Codec::F32 => prop_assert_eq!(&back, &v),
                Codec::Bf16 => for (a, b) in v.iter().zip(&back) {
                    prop_assert!((a - b).abs() <= a.abs() / 128.0);
                },
                Codec::Int8 { block } | Codec::Int4 { block } => {
                    let levels = if matches!(codec, Codec::Int8 { .. }) { 127.0 } else { 7.0 };
                    for (i, chunk) in v.chunks(block as usize).enumerate() {
                        let bound = max_abs(chunk) / levels / 2.0 * 1.0001 + 1e-6;
                        for (j, a) in chunk.iter().enumerate() {
                            prop_assert!((a - back[i * block as usize + j]).abs() <= bound);
                        }
                    }
                }
                Codec::TopK { chunk, k } => {
                    for (c, part) in v.chunks(chunk as usize).enumerate() {
                        let got = &back[c * chunk as usize..c * chunk as usize + part.len()];
                        prop_assert!(got.iter().filter(|x| **x != 0.0).count() <= k as usize);
                    }
                }
            }
        }

        #[test]
        fn pieces_at_unit_boundaries_decode_alone(codec in codec(), v in values(), units in 1u32..5) {
            let bytes = codec.encode(&v).unwrap();
            let whole = codec.decode(&bytes, v.len() as u64).unwrap();
            let piece = (units * codec.unit()) as usize;
            let mut start = 0;
            while start < v.len() {
                let end = (start + piece).min(v.len());
                let part = &bytes[codec.encoded_len(start as u64) as usize..codec.encoded_len(end as u64) as usize];
                let got = codec.decode(part, (end - start) as u64).unwrap();
                prop_assert_eq!(&got[..], &whole[start..end]);
                start = end;
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(codec in codec(), bytes in proptest::collection::vec(any::<u8>(), 0..600), n in 0u64..1000) {
            let _ = codec.decode(&bytes, n);
        }

        #[test]
        fn mangled_encodings_never_panic(codec in codec(), v in values(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = codec.encode(&v).unwrap();
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            let _ = codec.decode(&bytes, v.len() as u64);
        }

        /// Over many rounds, error feedback transmits the sum of the deltas up to one residual:
        /// Σ sent = Σ delta − final residual, exactly (up to float rounding).
        #[test]
        fn error_feedback_loses_nothing(rounds in proptest::collection::vec(proptest::collection::vec(-1f32..1.0, 64), 1..12)) {
            let codec = Codec::TopK { chunk: 64, k: 4 };
            let mut ef = ErrorFeedback::new(64);
            let mut sent = [0f32; 64];
            let mut total = [0f32; 64];
            for delta in &rounds {
                let bytes = ef.encode(&codec, delta).unwrap();
                for (s, x) in sent.iter_mut().zip(codec.decode(&bytes, 64).unwrap()) { *s += x; }
                for (t, d) in total.iter_mut().zip(delta) { *t += d; }
            }
            for i in 0..64 {
                prop_assert!((sent[i] + ef.residual()[i] - total[i]).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn top_k_keeps_the_largest_and_compresses_a_hundredfold() {
        let v: Vec<f32> = (0..4096).map(|i| if i % 512 == 7 { 10.0 + i as f32 } else { 0.01 }).collect();
        let codec = Codec::TopK { chunk: 4096, k: 8 };
        let back = codec.decode(&codec.encode(&v).unwrap(), 4096).unwrap();
        for i in (7..4096).step_by(512) {
            assert!(back[i] > 5.0, "large value at {i} lost");
        }
        assert!(Codec::TopK { chunk: 4096, k: 16 }.ratio_vs_f32(1 << 20) > 100.0);
    }

    #[test]
    fn hostile_top_k_indices_and_scales_are_typed_errors() {
        let codec = Codec::TopK { chunk: 8, k: 2 };
        let mut bytes = codec.encode(&[1.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
        bytes[4..6].copy_from_slice(&9u16.to_le_bytes());
        assert!(matches!(codec.decode(&bytes, 8), Err(CodecError::IndexOutOfRange { index: 9, .. })));
        bytes[4..6].copy_from_slice(&3u16.to_le_bytes());
        assert!(matches!(codec.decode(&bytes, 8), Err(CodecError::RepeatedIndex { index: 3, .. })));
        bytes[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(codec.decode(&bytes, 8), Err(CodecError::NonFiniteScale { .. })));
        assert!(matches!(Codec::F32.encode(&[f32::INFINITY]), Err(CodecError::NonFiniteInput(0))));
        for codec in ALL {
            assert!(codec.decode(&[0u8; 3], 1000).is_err());
        }
    }
}
