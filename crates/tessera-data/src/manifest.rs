//! A dataset as content-addressed shards: the **manifest** names the tokenizer (by hash), every
//! shard (by the BLAKE3 of its file), its split, token and document counts and provenance, and
//! the preparation's statistics. The BLAKE3 of the manifest's bytes is the dataset's identity; a
//! Merkle root (RFC 6962, SHA-256, through `ct-merkle`) over the shard hashes lets anyone prove
//! that one shard belongs to it without the others.
//!
//! A published dataset is a directory or object-store prefix holding:
//!
//! ```text
//! manifest.json          its BLAKE3 is the dataset id
//! tokenizer.json         BLAKE3 in manifest.tokenizer.hash
//! shards/<blake3>.tshard one per manifest.shards entry (the `shard` format)
//! ```
//!
//! Which training shard a data slot trains on in a round is `tessera_protocol::data::assigned_shard`:
//! the hub, contributors and validators must agree on it.

use std::path::Path;

use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ct_merkle::{InclusionProof, RootHash};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::shard::{HEADER_BYTES, SHARD_TOKENS_MAX};

pub const FORMAT: &str = "tessera.manifest.v1";
pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// A manifest larger than this is refused before it is parsed (about a million shards).
pub const MANIFEST_BYTES_MAX: usize = 512 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {0} bytes, over the {MANIFEST_BYTES_MAX}-byte limit")]
    TooLarge(usize),
    #[error("manifest is not valid: {0}")]
    Json(String),
    #[error("manifest format {0:?} is not {FORMAT:?}")]
    Format(String),
    #[error("manifest: {0}")]
    Invalid(String),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

/// Which split a shard belongs to. Documents are split whole, by the hash of their id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Validation,
}

/// The tokenizer every shard was encoded with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerInfo {
    /// BLAKE3 (hex) of `tokenizer.json`'s bytes.
    pub hash: String,
    pub vocab_size: u32,
    /// The id that separates documents, and its text.
    pub eos_id: u32,
    pub eos_token: String,
}

/// Where a shard's documents came from: a source file and a half-open row range in it (rows
/// are parquet rows, JSONL lines, or 0..1 for a whole text file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub source: String,
    pub rows: [u64; 2],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// BLAKE3 (hex) of the shard file's bytes: its name and its check.
    pub hash: String,
    pub split: Split,
    pub tokens: u64,
    /// Documents that start in this shard.
    pub documents: u64,
    /// The file's length, so a download knows when it is done.
    pub bytes: u64,
    pub sources: Vec<Provenance>,
}

/// What preparation read, kept and dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareStats {
    pub documents_read: u64,
    /// Dropped: the same normalised text was seen before (exact deduplication).
    pub duplicates: u64,
    /// Rows whose text was not valid UTF-8 (skipped and counted, unless refused by flag).
    pub invalid_utf8: u64,
    /// Rows with no text (null or only whitespace).
    pub empty: u64,
    pub train_documents: u64,
    pub validation_documents: u64,
    pub train_tokens: u64,
    pub validation_tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// For people: where it came from.
    pub name: String,
    pub tokenizer: TokenizerInfo,
    /// Tokens per shard; every shard but the last of each split holds exactly this many.
    pub shard_tokens: u64,
    /// Documents whose id hashes below this fraction (in thousandths) are validation.
    pub validation_per_mille: u32,
    pub shards: Vec<ShardEntry>,
    pub stats: PrepareStats,
    /// The data's exact entropy rate in nats per token, when known (the embedded corpus).
    #[serde(default)]
    pub loss_floor: Option<f64>,
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// BLAKE3 (hex) of bytes.
pub fn hash_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The file name of a shard in a published dataset, relative to its root.
pub fn shard_path(hash: &str) -> String {
    format!("shards/{hash}.tshard")
}

impl Manifest {
    /// Parses and checks a manifest; returns it with its identity (the BLAKE3 of `bytes`).
    pub fn parse(bytes: &[u8]) -> Result<(Manifest, String), ManifestError> {
        if bytes.len() > MANIFEST_BYTES_MAX {
            return Err(ManifestError::TooLarge(bytes.len()));
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
        manifest.check()?;
        Ok((manifest, hash_hex(bytes)))
    }

    /// Reads `path`: a manifest file, or a directory holding `manifest.json`.
    pub fn read(path: &Path) -> Result<(Manifest, String), ManifestError> {
        let file = if path.is_dir() { path.join(MANIFEST_FILE) } else { path.to_owned() };
        let io = |e: std::io::Error| ManifestError::Io { path: file.display().to_string(), message: e.to_string() };
        let len = std::fs::metadata(&file).map_err(io)?.len();
        if len > MANIFEST_BYTES_MAX as u64 {
            return Err(ManifestError::TooLarge(len as usize));
        }
        let bytes = std::fs::read(&file).map_err(io)?;
        Manifest::parse(&bytes)
            .map_err(|e| ManifestError::Io { path: file.display().to_string(), message: e.to_string() })
    }

    /// The canonical bytes: what `parse` reads back and what the identity hashes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        out.push(b'\n');
        out
    }

    /// Every rule a manifest keeps; `parse` refuses one that breaks any.
    pub fn check(&self) -> Result<(), ManifestError> {
        let bad = |m: String| Err(ManifestError::Invalid(m));
        if self.format != FORMAT {
            return Err(ManifestError::Format(self.format.clone()));
        }
        let t = &self.tokenizer;
        if !is_hash(&t.hash) {
            return bad(format!("tokenizer hash {:?} is not 64 lowercase hex digits", t.hash));
        }
        if t.vocab_size == 0 || t.eos_id >= t.vocab_size {
            return bad(format!("end-of-text id {} is outside the vocabulary of {}", t.eos_id, t.vocab_size));
        }
        if self.shard_tokens == 0 || self.shard_tokens > SHARD_TOKENS_MAX {
            return bad(format!("shard_tokens {} is not in 1..={SHARD_TOKENS_MAX}", self.shard_tokens));
        }
        if self.validation_per_mille > 1000 {
            return bad(format!("validation_per_mille {} is over 1000", self.validation_per_mille));
        }
        let width: u64 = if t.vocab_size <= 1 << 16 { 2 } else { 4 };
        // Two shards with the same bytes share a hash and a file; both entries stand.
        for (i, s) in self.shards.iter().enumerate() {
            if !is_hash(&s.hash) {
                return bad(format!("shard {i}: hash {:?} is not 64 lowercase hex digits", s.hash));
            }
            if s.tokens == 0 || s.tokens > self.shard_tokens {
                return bad(format!("shard {i}: {} tokens is not in 1..={}", s.tokens, self.shard_tokens));
            }
            if s.bytes != HEADER_BYTES as u64 + s.tokens * width {
                return bad(format!("shard {i}: {} bytes does not hold {} tokens of {width} bytes", s.bytes, s.tokens));
            }
            if let Some(p) = s.sources.iter().find(|p| p.rows[0] > p.rows[1]) {
                return bad(format!("shard {i}: row range {:?} of {} runs backwards", p.rows, p.source));
            }
        }
        for split in [Split::Train, Split::Validation] {
            if !self.shards.iter().any(|s| s.split == split) {
                return bad(format!("no {split:?} shard"));
            }
        }
        Ok(())
    }

    /// How many training shards a run hands out: the full ones (all but a shorter last one), or
    /// the one there is when the dataset is smaller than a shard. They come first, in order.
    pub fn assignable_train_shards(&self) -> u32 {
        let full = self.split(Split::Train).take_while(|e| e.tokens == self.shard_tokens).count();
        full.max(1) as u32
    }

    /// The manifest index of the `k`-th training shard.
    pub fn train_shard(&self, k: u32) -> Option<usize> {
        self.shards.iter().enumerate().filter(|(_, e)| e.split == Split::Train).nth(k as usize).map(|(i, _)| i)
    }

    /// The shards of one split, in manifest order.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &ShardEntry> {
        self.shards.iter().filter(move |s| s.split == split)
    }

    pub fn tokens(&self, split: Split) -> u64 {
        self.split(split).map(|s| s.tokens).sum()
    }

    fn tree(&self) -> MemoryBackedTree<Sha256, Vec<u8>> {
        let mut tree = MemoryBackedTree::new();
        for s in &self.shards {
            tree.push(s.hash.as_bytes().to_vec());
        }
        tree
    }

    /// Hex Merkle root over the shard hashes, in manifest order.
    pub fn merkle_root(&self) -> String {
        hex::encode(self.tree().root().as_bytes())
    }

    /// Proof that shard `index` is under [`Manifest::merkle_root`] (hex).
    pub fn prove(&self, index: usize) -> Option<String> {
        (index < self.shards.len()).then(|| hex::encode(self.tree().prove_inclusion(index).as_bytes()))
    }
}

/// Checks a proof from [`Manifest::prove`]: the shard `hash` is entry `index` of a manifest of
/// `n_shards` shards whose Merkle root is `root`.
pub fn verify_shard(root: &str, n_shards: u64, index: u64, hash: &str, proof: &str) -> Result<(), String> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(root, &mut digest).map_err(|_| "root is not 32 hex bytes")?;
    let root = RootHash::<Sha256>::new(digest.into(), n_shards);
    let proof = InclusionProof::<Sha256>::try_from_bytes(hex::decode(proof).map_err(|_| "proof is not hex")?)
        .map_err(|_| "malformed proof")?;
    root.verify_inclusion(&hash.as_bytes().to_vec(), index, &proof)
        .map_err(|_| "the shard is not under that root".to_owned())
}

/// Writes `tokens` as a shard under `root` (`shards/<blake3>.tshard`, through a temporary file
/// and a rename, so a crash never leaves a partial shard under its final name) and returns its
/// manifest entry.
pub fn write_shard(
    root: &Path,
    split: Split,
    tokens: Vec<u32>,
    vocab_size: u32,
    documents: u64,
    sources: Vec<Provenance>,
) -> Result<ShardEntry, ManifestError> {
    let count = tokens.len() as u64;
    let bytes = crate::Shard::new(vocab_size, tokens).map_err(|e| ManifestError::Invalid(e.to_string()))?.encode();
    let hash = hash_hex(&bytes);
    let path = root.join(shard_path(&hash));
    let io = |p: &Path, e: std::io::Error| ManifestError::Io { path: p.display().to_string(), message: e.to_string() };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, &bytes).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
    Ok(ShardEntry { hash, split, tokens: count, documents, bytes: bytes.len() as u64, sources })
}

/// Reads shard `entry` of a published dataset under `root` and checks it: its bytes against the
/// entry's BLAKE3, then the shard format's own checks, then the vocabulary.
pub fn read_shard(root: &Path, entry: &ShardEntry, vocab_size: u32) -> Result<Vec<u32>, ManifestError> {
    let path = root.join(shard_path(&entry.hash));
    let bytes = std::fs::read(&path)
        .map_err(|e| ManifestError::Io { path: path.display().to_string(), message: e.to_string() })?;
    decode_shard(&bytes, entry, vocab_size)
        .map_err(|message| ManifestError::Io { path: path.display().to_string(), message })
}

/// Checks a shard's bytes against its manifest entry and decodes them.
pub fn decode_shard(bytes: &[u8], entry: &ShardEntry, vocab_size: u32) -> Result<Vec<u32>, String> {
    let got = hash_hex(bytes);
    if got != entry.hash {
        return Err(format!("shard bytes hash to {got}, the manifest says {} (corrupt or wrong file)", entry.hash));
    }
    let shard = crate::Shard::decode(bytes).map_err(|e| e.to_string())?;
    if shard.vocab_size != vocab_size || shard.tokens.len() as u64 != entry.tokens {
        return Err(format!(
            "shard holds {} tokens of vocabulary {}, the manifest says {} of {vocab_size}",
            shard.tokens.len(),
            shard.vocab_size,
            entry.tokens
        ));
    }
    Ok(shard.tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(n_train: usize, n_val: usize) -> Manifest {
        let shard = |i: usize, split| ShardEntry {
            hash: hash_hex(&i.to_le_bytes()),
            split,
            tokens: 100,
            documents: 3,
            bytes: HEADER_BYTES as u64 + 200,
            sources: vec![Provenance { source: format!("f{i}.parquet"), rows: [0, 3] }],
        };
        Manifest {
            format: FORMAT.into(),
            name: "t".into(),
            tokenizer: TokenizerInfo { hash: hash_hex(b"tok"), vocab_size: 300, eos_id: 256, eos_token: "e".into() },
            shard_tokens: 100,
            validation_per_mille: 10,
            shards: (0..n_train)
                .map(|i| shard(i, Split::Train))
                .chain((0..n_val).map(|i| shard(n_train + i, Split::Validation)))
                .collect(),
            stats: PrepareStats::default(),
            loss_floor: None,
        }
    }

    #[test]
    fn bytes_round_trip_and_identity_is_their_hash() {
        let m = sample(5, 1);
        let bytes = m.to_bytes();
        let (back, id) = Manifest::parse(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(id, hash_hex(&bytes));
    }

    #[test]
    fn broken_rules_are_named() {
        type Break = Box<dyn Fn(&mut Manifest)>;
        let cases: Vec<(Break, &str)> = vec![
            (Box::new(|m| m.format = "x".into()), "format"),
            (Box::new(|m| m.tokenizer.eos_id = 300), "end-of-text"),
            (Box::new(|m| m.shards[0].hash = "ABC".into()), "hex"),
            (Box::new(|m| m.shards[0].tokens = 101), "tokens"),
            (Box::new(|m| m.shards[0].bytes += 1), "bytes"),
            (Box::new(|m| m.shards.retain(|s| s.split == Split::Train)), "Validation"),
            (Box::new(|m| m.shards[0].sources[0].rows = [3, 1]), "backwards"),
        ];
        for (break_it, word) in cases {
            let mut m = sample(3, 1);
            break_it(&mut m);
            let err = Manifest::parse(&m.to_bytes()).unwrap_err().to_string();
            assert!(err.contains(word), "{word}: {err}");
        }
        let unknown = String::from_utf8(sample(2, 1).to_bytes()).unwrap().replacen('{', "{\"extra\": 1,", 1);
        assert!(Manifest::parse(unknown.as_bytes()).unwrap_err().to_string().contains("extra"));
    }

    #[test]
    fn every_shard_proves_its_membership_and_no_other_does() {
        for n in [1usize, 2, 3, 7, 8] {
            let m = sample(n, 1);
            let root = m.merkle_root();
            let count = m.shards.len() as u64;
            for (i, s) in m.shards.iter().enumerate() {
                let proof = m.prove(i).unwrap();
                verify_shard(&root, count, i as u64, &s.hash, &proof).unwrap();
                assert!(verify_shard(&root, count, i as u64, &hash_hex(b"other"), &proof).is_err());
            }
            assert!(m.prove(m.shards.len()).is_none());
        }
    }
}
