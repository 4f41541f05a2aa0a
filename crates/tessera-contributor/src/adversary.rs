//! Testing tool: what `tessera contribute --adversary KIND` does differently. The attacks are
//! defined in `tessera_contest::Adversary`; this carries out the parts that need the network
//! or the wire format. Never used by a normal contributor.

use tessera_protocol::Codec;

/// Writes NaN into an encoded tensor where its codec keeps a float: the first value (f32,
/// bf16) or the first block's scale (int8, 4-bit, top-k). The bytes still parse; decoding them
/// yields NaN or a non-finite scale, which the hub must refuse.
pub fn poison(codec: &Codec, encoded: &mut [u8]) {
    match codec {
        Codec::Bf16 => {
            if let Some(b) = encoded.get_mut(..2) {
                b.copy_from_slice(&0x7fc0u16.to_le_bytes());
            }
        }
        Codec::F32 | Codec::Int8 { .. } | Codec::Int4 { .. } | Codec::TopK { .. } => {
            if let Some(b) = encoded.get_mut(..4) {
                b.copy_from_slice(&f32::NAN.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisoned_tensors_do_not_decode_to_finite_values() {
        let values: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) * 1e-3).collect();
        for codec in [
            Codec::F32,
            Codec::Bf16,
            Codec::Int8 { block: 64 },
            Codec::Int4 { block: 64 },
            Codec::TopK { chunk: 128, k: 8 },
        ] {
            let mut bytes = codec.encode(&values).unwrap();
            poison(&codec, &mut bytes);
            let bad = match codec.decode(&bytes, values.len() as u64) {
                Err(_) => true,
                Ok(v) => v.iter().any(|x| !x.is_finite()),
            };
            assert!(bad, "{codec}");
        }
    }
}
