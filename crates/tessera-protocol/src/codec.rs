//! Pseudo-gradient codecs. Each turns `n` f32 values into bytes and back; the hub decodes to f32
//! and aggregates in f32.
//!
//! | codec | bytes for n values | error |
//! |---|---|---|
//! | `F32` | 4n | none |
//! | `Bf16` | 2n | round-to-nearest-even to 8 mantissa bits |
//! | `Int8 { block }` | n + 4⌈n/block⌉ | ≤ max\|x\|_block / 254 per value |
//! | `Int4 { block }` | ⌈n/2⌉ + 4⌈n/block⌉ | ≤ max\|x\|_block / 14 per value |
//! | `TopK { chunk, k }` | per chunk 8 bytes + ≈ (l + 3)·k bits, l = ⌊log2(chunk/k)⌋ (`docs/protocol.md`) | all but the k largest \|x\| per chunk dropped; kept values 2-bit |
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
    /// In each `chunk` of values keep the `k` of largest magnitude: their positions as an
    /// Elias–Fano code (about 2 + log2(chunk/k) bits each) and each value in 2 bits, a sign and
    /// one of two magnitudes per chunk (the mean |x| of the smaller and of the larger half of
    /// the kept values). Meant for [`ErrorFeedback`], which carries the rounding into the next
    /// round.
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
    #[error("top-k indices in chunk {chunk} are not in ascending order")]
    IndicesOutOfOrder { chunk: u64 },
    #[error("top-k chunk {chunk} codes {got} indices, {expected} expected")]
    IndexCount { chunk: u64, expected: u32, got: u32 },
    #[error("feedback decay {0} must be in (0, 1]")]
    BadDecay(String),
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
                let per = |m: u64| top_k_chunk_len(m, u64::from(k).min(m));
                full * per(u64::from(chunk)) + if rest > 0 { per(rest) } else { 0 }
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
                    encode_top_k_chunk(part, k as usize, &mut out);
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
                // bf16 is the top half of an f32: widening is exact, a shift that vectorizes.
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
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
                for (c, dst) in out.chunks_mut(chunk as usize).enumerate() {
                    let m = dst.len() as u64;
                    let len = top_k_chunk_len(m, u64::from(k).min(m)) as usize;
                    decode_top_k_chunk(&bytes[at..at + len], k as usize, c as u64, dst)?;
                    at += len;
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

    /// Checks a decay that may have come from a run spec: it must be in (0, 1].
    pub fn check_decay(decay: f32) -> Result<(), CodecError> {
        if decay > 0.0 && decay <= 1.0 { Ok(()) } else { Err(CodecError::BadDecay(decay.to_string())) }
    }

    /// Error feedback whose residual decays by `decay` (in (0, 1], see
    /// [`ErrorFeedback::check_decay`]) each round.
    pub fn with_decay(mut self, decay: f32) -> ErrorFeedback {
        self.decay = decay;
        self
    }

    /// Encodes `delta + decay · residual` and keeps what the encoding lost as the new residual.
    pub fn encode(&mut self, codec: &Codec, delta: &[f32]) -> Result<Vec<u8>, CodecError> {
        Ok(self.encode_sent(codec, delta)?.0)
    }

    /// [`ErrorFeedback::encode`], also returning what the receiver will decode.
    pub fn encode_sent(&mut self, codec: &Codec, delta: &[f32]) -> Result<(Vec<u8>, Vec<f32>), CodecError> {
        assert_eq!(delta.len(), self.residual.len(), "error feedback sized for another tensor");
        let decay = self.decay;
        let corrected: Vec<f32> = delta.iter().zip(&self.residual).map(|(d, r)| d + decay * r).collect();
        let bytes = codec.encode(&corrected)?;
        let sent = codec.decode(&bytes, corrected.len() as u64)?;
        for ((r, c), s) in self.residual.iter_mut().zip(&corrected).zip(&sent) {
            *r = c - s;
        }
        Ok((bytes, sent))
    }

    /// Resumes error feedback from a saved [`ErrorFeedback::residual`].
    pub fn from_residual(residual: Vec<f32>) -> ErrorFeedback {
        ErrorFeedback { residual, decay: 1.0 }
    }

    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    pub fn into_residual(self) -> Vec<f32> {
        self.residual
    }
}

/// Elias–Fano low-bit width for `k` ascending indices below `m`.
fn ef_low_bits(m: u64, k: u64) -> u32 {
    if k == 0 || m <= k { 0 } else { (m / k).ilog2() }
}

/// Bits of the Elias–Fano upper part: one set bit per index, one clear bit per bucket.
fn ef_upper_bits(m: u64, k: u64) -> u64 {
    k + ((m - 1) >> ef_low_bits(m, k)) + 1
}

/// Encoded bytes of one top-k chunk of `m` ≥ 1 values keeping `k` ≤ m: two f32 magnitudes,
/// then one bit stream (least significant bit first) of k low parts, the upper bit vector and
/// k 2-bit values, padded with zero bits to a byte.
fn top_k_chunk_len(m: u64, k: u64) -> u64 {
    let bits = k * u64::from(ef_low_bits(m, k)) + ef_upper_bits(m, k) + 2 * k;
    2 * SCALE_BYTES as u64 + bits.div_ceil(8)
}

fn encode_top_k_chunk(part: &[f32], k: usize, out: &mut Vec<u8>) {
    let keep = top_k_indices(part, k);
    let kk = keep.len();
    // Two magnitudes: the mean |x| of the smaller half of the kept values and of the larger;
    // each value is sent as its sign and its half, so the chunk's total |x| is kept.
    let mut by_size: Vec<usize> = (0..kk).collect();
    by_size.sort_by(|&a, &b| part[keep[a] as usize].abs().total_cmp(&part[keep[b] as usize].abs()).then(a.cmp(&b)));
    let small = kk / 2;
    let mut large_half = vec![false; kk];
    by_size[small..].iter().for_each(|&j| large_half[j] = true);
    let mean = |js: &[usize]| -> f32 {
        if js.is_empty() {
            return 0.0;
        }
        (js.iter().map(|&j| f64::from(part[keep[j] as usize].abs())).sum::<f64>() / js.len() as f64) as f32
    };
    let (lo, hi) = (mean(&by_size[..small]), mean(&by_size[small..]));
    out.extend_from_slice(&lo.to_le_bytes());
    out.extend_from_slice(&hi.to_le_bytes());

    let (m, k64) = (part.len() as u64, kk as u64);
    let low_bits = ef_low_bits(m, k64);
    let mut bits = BitWriter::new(out);
    for &i in &keep {
        bits.write(u64::from(i) & ((1u64 << low_bits) - 1), low_bits);
    }
    // Upper part: index j's bucket (i >> low_bits) set at position bucket + j.
    let mut position = 0u64;
    for (j, &i) in keep.iter().enumerate() {
        let target = (u64::from(i) >> low_bits) + j as u64;
        while position < target {
            bits.write(0, 1);
            position += 1;
        }
        bits.write(1, 1);
        position += 1;
    }
    while position < ef_upper_bits(m, k64) {
        bits.write(0, 1);
        position += 1;
    }
    for (j, &i) in keep.iter().enumerate() {
        let negative = part[i as usize].is_sign_negative() && part[i as usize] != 0.0;
        bits.write(u64::from(negative) | u64::from(large_half[j]) << 1, 2);
    }
    bits.finish();
}

fn decode_top_k_chunk(bytes: &[u8], k: usize, chunk: u64, dst: &mut [f32]) -> Result<(), CodecError> {
    let m = dst.len() as u64;
    let kk = k.min(dst.len());
    let mut at = 0;
    let lo = read_scale(bytes, &mut at, chunk as usize)?;
    let hi = read_scale(bytes, &mut at, chunk as usize)?;
    let low_bits = ef_low_bits(m, kk as u64);
    let mut bits = BitReader { bytes: &bytes[at..], at: 0 };
    let mut indices: Vec<u64> = (0..kk).map(|_| bits.read(low_bits)).collect();
    let mut found = 0usize;
    for position in 0..ef_upper_bits(m, kk as u64) {
        if bits.read(1) == 1 {
            if found == kk {
                return Err(CodecError::IndexCount { chunk, expected: kk as u32, got: kk as u32 + 1 });
            }
            indices[found] |= (position - found as u64) << low_bits;
            found += 1;
        }
    }
    if found != kk {
        return Err(CodecError::IndexCount { chunk, expected: kk as u32, got: found as u32 });
    }
    dst.fill(0.0);
    let mut previous: Option<u64> = None;
    for &i in &indices {
        if i >= m {
            return Err(CodecError::IndexOutOfRange { chunk, index: i.min(u64::from(u32::MAX)) as u32, len: m as u32 });
        }
        match previous {
            Some(p) if p == i => return Err(CodecError::RepeatedIndex { chunk, index: i as u32 }),
            Some(p) if p > i => return Err(CodecError::IndicesOutOfOrder { chunk }),
            _ => {}
        }
        previous = Some(i);
        let code = bits.read(2);
        let magnitude = if code & 2 != 0 { hi } else { lo };
        dst[i as usize] = if code & 1 != 0 { -magnitude } else { magnitude };
    }
    Ok(())
}

/// Appends bits to a byte vector, least significant bit first.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    pending: u64,
    count: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter { out, pending: 0, count: 0 }
    }

    /// Writes the low `width` (≤ 32) bits of `value`.
    fn write(&mut self, value: u64, width: u32) {
        debug_assert!(width <= 32 && value >> width == 0);
        self.pending |= value << self.count;
        self.count += width;
        while self.count >= 8 {
            self.out.push(self.pending as u8);
            self.pending >>= 8;
            self.count -= 8;
        }
    }

    fn finish(self) {
        if self.count > 0 {
            self.out.push(self.pending as u8);
        }
    }
}

/// Reads bits written by [`BitWriter`]; the caller has checked the length, so reading past the
/// end (which a length check rules out) yields zero bits rather than a panic.
struct BitReader<'a> {
    bytes: &'a [u8],
    at: u64,
}

impl BitReader<'_> {
    fn read(&mut self, width: u32) -> u64 {
        let mut value = 0u64;
        for b in 0..width {
            let bit = self.at + u64::from(b);
            let byte = self.bytes.get((bit / 8) as usize).copied().unwrap_or(0);
            value |= u64::from((byte >> (bit % 8)) & 1) << b;
        }
        self.at += u64::from(width);
        value
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
        // 128 of every 4096 (3.1%) still fits in a hundredth of f32's bytes.
        assert_eq!(Codec::TopK { chunk: 4096, k: 128 }.encoded_len(4096), 152);
    }

    #[test]
    fn bf16_widening_matches_the_half_crate() {
        for bits in 0..=u16::MAX {
            let ours = Codec::Bf16.decode(&bits.to_le_bytes(), 1).unwrap()[0];
            let theirs = half::bf16::from_bits(bits).to_f32();
            assert!(ours.to_bits() == theirs.to_bits() || (ours.is_nan() && theirs.is_nan()), "{bits:#06x}");
        }
    }

    #[test]
    fn top_k_values_keep_sign_and_the_halves_means() {
        let v = [0.0, -4.0, 1.0, 0.0, 2.0, 0.0, -8.0, 0.5];
        let codec = Codec::TopK { chunk: 8, k: 4 };
        let back = codec.decode(&codec.encode(&v).unwrap(), 8).unwrap();
        // Kept: -8, -4, 2, 1. Smaller half {1, 2} → 1.5, larger half {4, 8} → 6.
        assert_eq!(back, vec![0.0, -6.0, 1.5, 0.0, 1.5, 0.0, -6.0, 0.0]);
    }

    #[test]
    fn hostile_top_k_indices_and_scales_are_typed_errors() {
        // Chunk 8, k 2: two f32 magnitudes, then 2 × 2 low bits, 4 upper bits, 2 × 2 value bits.
        let codec = Codec::TopK { chunk: 8, k: 2 };
        let mut bytes = codec.encode(&[1.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
        assert_eq!(bytes.len(), 10);
        let with = |bytes: &[u8], stream: [u8; 2]| [&bytes[..8], &stream[..]].concat();
        // Lows 0 and 1, upper bits 2 and 3 set: buckets 2 and 2, indices 8 and 9 of 8.
        let out_of_range = with(&bytes, [0b1100_0100, 0]);
        assert!(matches!(codec.decode(&out_of_range, 8), Err(CodecError::IndexOutOfRange { index: 8, .. })));
        // Lows 1 and 1, upper bits 0 and 1 set: index 1 twice.
        let repeated = with(&bytes, [0b0011_0101, 0]);
        assert!(matches!(codec.decode(&repeated, 8), Err(CodecError::RepeatedIndex { index: 1, .. })));
        // Lows 3 and 1 in the same bucket: 3 then 1.
        let unordered = with(&bytes, [0b0011_0111, 0]);
        assert!(matches!(codec.decode(&unordered, 8), Err(CodecError::IndicesOutOfOrder { .. })));
        // Three upper bits set for two indices, then only one.
        let three = with(&bytes, [0b0111_0000, 0]);
        assert!(matches!(codec.decode(&three, 8), Err(CodecError::IndexCount { expected: 2, got: 3, .. })));
        let one = with(&bytes, [0b0001_0000, 0]);
        assert!(matches!(codec.decode(&one, 8), Err(CodecError::IndexCount { expected: 2, got: 1, .. })));
        bytes[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(codec.decode(&bytes, 8), Err(CodecError::NonFiniteScale { .. })));
        assert!(matches!(Codec::F32.encode(&[f32::INFINITY]), Err(CodecError::NonFiniteInput(0))));
        for codec in ALL {
            assert!(codec.decode(&[0u8; 3], 1000).is_err());
        }
    }
}
