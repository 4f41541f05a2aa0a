//! The token shard: Tessera's on-disk format for tokenized text.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "TESSHARD"
//!      8     4  version (u32 LE) = 1
//!     12     4  token width in bytes (u32 LE): 2 or 4
//!     16     4  vocabulary size (u32 LE): every token is < this
//!     20     4  flags (u32 LE), must be 0
//!     24     8  token count n (u64 LE)
//!     32    32  BLAKE3 of bytes 0..32 followed by the payload
//!     64  n*w  tokens, little-endian, w = token width
//! ```
//!
//! The checksum covers the header fields and the payload, so a flipped bit anywhere is caught.
//! A decoder of these bytes trusts nothing: every field is checked before it is used.

use std::path::Path;

pub const MAGIC: &[u8; 8] = b"TESSHARD";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;
/// A shard holds at most 2^32 tokens (16 GiB at 4 bytes each): bigger corpora use more shards.
pub const SHARD_TOKENS_MAX: u64 = 1 << 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardError {
    #[error("shard is {0} bytes, shorter than its {HEADER_BYTES}-byte header")]
    TooShort(usize),
    #[error("not a token shard (bad magic)")]
    BadMagic,
    #[error("unsupported shard version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("invalid token width {0} (must be 2 or 4)")]
    BadTokenWidth(u32),
    #[error("unknown flags {0:#x}")]
    BadFlags(u32),
    #[error("token count {0} exceeds the limit of {SHARD_TOKENS_MAX}")]
    TooManyTokens(u64),
    #[error("payload is {got} bytes, header promises {expected}")]
    LengthMismatch { expected: u64, got: u64 },
    #[error("checksum mismatch: the shard is corrupt")]
    ChecksumMismatch,
    #[error("token {token} at position {index} is outside the vocabulary of {vocab_size}")]
    TokenOutOfRange { index: u64, token: u32, vocab_size: u32 },
    #[error("vocabulary size {0} does not fit the token width")]
    VocabTooLarge(u32),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// Decoded, verified tokens and their vocabulary size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub vocab_size: u32,
    pub tokens: Vec<u32>,
}

impl Shard {
    pub fn new(vocab_size: u32, tokens: Vec<u32>) -> Result<Shard, ShardError> {
        if tokens.len() as u64 > SHARD_TOKENS_MAX {
            return Err(ShardError::TooManyTokens(tokens.len() as u64));
        }
        check_tokens(&tokens, vocab_size)?;
        Ok(Shard { vocab_size, tokens })
    }

    fn token_width(&self) -> u32 {
        if self.vocab_size <= 1 << 16 { 2 } else { 4 }
    }

    pub fn encode(&self) -> Vec<u8> {
        let width = self.token_width();
        let mut out = Vec::with_capacity(HEADER_BYTES + self.tokens.len() * width as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&width.to_le_bytes());
        out.extend_from_slice(&self.vocab_size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.tokens.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0u8; 32]);
        for &t in &self.tokens {
            if width == 2 {
                out.extend_from_slice(&(t as u16).to_le_bytes());
            } else {
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
        let digest = checksum(&out[..32], &out[HEADER_BYTES..]);
        out[32..64].copy_from_slice(&digest);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Shard, ShardError> {
        if bytes.len() < HEADER_BYTES {
            return Err(ShardError::TooShort(bytes.len()));
        }
        if &bytes[0..8] != MAGIC {
            return Err(ShardError::BadMagic);
        }
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let version = u32_at(8);
        if version != VERSION {
            return Err(ShardError::UnsupportedVersion(version));
        }
        let width = u32_at(12);
        if width != 2 && width != 4 {
            return Err(ShardError::BadTokenWidth(width));
        }
        let vocab_size = u32_at(16);
        if width == 2 && vocab_size > 1 << 16 {
            return Err(ShardError::VocabTooLarge(vocab_size));
        }
        let flags = u32_at(20);
        if flags != 0 {
            return Err(ShardError::BadFlags(flags));
        }
        let mut n_bytes = [0u8; 8];
        n_bytes.copy_from_slice(&bytes[24..32]);
        let n = u64::from_le_bytes(n_bytes);
        if n > SHARD_TOKENS_MAX {
            return Err(ShardError::TooManyTokens(n));
        }
        let payload = &bytes[HEADER_BYTES..];
        let expected = n * u64::from(width);
        if payload.len() as u64 != expected {
            return Err(ShardError::LengthMismatch { expected, got: payload.len() as u64 });
        }
        if checksum(&bytes[..32], payload) != bytes[32..64] {
            return Err(ShardError::ChecksumMismatch);
        }
        let tokens: Vec<u32> = if width == 2 {
            payload.chunks_exact(2).map(|c| u32::from(u16::from_le_bytes([c[0], c[1]]))).collect()
        } else {
            payload.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        check_tokens(&tokens, vocab_size)?;
        Ok(Shard { vocab_size, tokens })
    }

    pub fn write(&self, path: &Path) -> Result<(), ShardError> {
        std::fs::write(path, self.encode())
            .map_err(|e| ShardError::Io { path: path.display().to_string(), message: e.to_string() })
    }

    /// Reads and verifies a shard; errors name the file.
    pub fn read(path: &Path) -> Result<Shard, ShardError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ShardError::Io { path: path.display().to_string(), message: e.to_string() })?;
        Shard::decode(&bytes).map_err(|e| ShardError::Io { path: path.display().to_string(), message: e.to_string() })
    }
}

fn check_tokens(tokens: &[u32], vocab_size: u32) -> Result<(), ShardError> {
    match tokens.iter().position(|&t| t >= vocab_size) {
        Some(index) => Err(ShardError::TokenOutOfRange { index: index as u64, token: tokens[index], vocab_size }),
        None => Ok(()),
    }
}

fn checksum(header: &[u8], payload: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn shard_strategy() -> impl Strategy<Value = Shard> {
        (1u32..200_000).prop_flat_map(|vocab| {
            proptest::collection::vec(0..vocab, 0..300).prop_map(move |tokens| Shard { vocab_size: vocab, tokens })
        })
    }

    proptest! {
        #[test]
        fn round_trips(shard in shard_strategy()) {
            prop_assert_eq!(Shard::decode(&shard.encode()), Ok(shard));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Shard::decode(&bytes);
        }

        #[test]
        fn valid_header_random_body_never_panics(shard in shard_strategy(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = shard.encode();
            bytes.truncate(HEADER_BYTES);
            bytes.extend_from_slice(&tail);
            let _ = Shard::decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_rejected(shard in shard_strategy(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = shard.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(Shard::decode(&bytes).is_err());
        }

        #[test]
        fn truncation_is_rejected(shard in shard_strategy(), cut in 1usize..100) {
            let bytes = shard.encode();
            let keep = bytes.len().saturating_sub(cut);
            prop_assert!(Shard::decode(&bytes[..keep]).is_err());
        }
    }

    #[test]
    fn out_of_range_tokens_are_refused() {
        assert_eq!(
            Shard::new(10, vec![1, 10]),
            Err(ShardError::TokenOutOfRange { index: 1, token: 10, vocab_size: 10 })
        );
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-0000.tshard");
        std::fs::write(&path, b"TESSHARD").unwrap();
        let err = Shard::read(&path).unwrap_err().to_string();
        assert!(err.contains("train-0000.tshard") && err.contains("shorter"), "{err}");
    }
}
