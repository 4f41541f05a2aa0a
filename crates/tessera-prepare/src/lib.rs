//! Web-scale text to a Tessera dataset: documents streamed from parquet (the FineWeb layout),
//! JSONL or plain text — local, `s3://` or HTTP(S) with Range requests — deduplicated exactly,
//! split into train and validation by the hash of each document's id, tokenized on every core,
//! and written as fixed-size token shards named by their BLAKE3, with a manifest
//! (`tessera_data::manifest`). A run killed at any point resumes where its last checkpoint was,
//! without redoing the shards it finished. [`publish`] copies a prepared dataset to an object
//! store or a directory an HTTP server serves.
//!
//! Costs, for D documents, T tokens and S shards of `shard_tokens` each:
//! - memory: one batch of documents in flight (1024 rows, read a row group's column chunks at
//!   a time), the partial shard of each split (≤ `shard_tokens` × 4 bytes each), and the
//!   deduplication set, 16 bytes per kept document (10B tokens of FineWeb-Edu ≈ 10M documents
//!   ≈ 160 MB; 1T tokens would need about 16 GB, or sharding the set by hash prefix);
//! - disk: the shards (T × 2 or 4 bytes), plus the journal: the kept documents' hashes (16
//!   bytes each) and the partial shards, removed at the end;
//! - reads: every input byte of the text and id columns once (other parquet columns are never
//!   fetched).

pub mod publish;
pub mod serve;
pub mod source;
mod work;

use std::path::PathBuf;

pub use publish::{PublishReport, publish};
pub use source::{Columns, Input, Kind};
pub use work::{Progress, prepare};

/// Validation fraction by default: 5 documents in 1000.
pub const VALIDATION_PER_MILLE: u32 = 5;
/// Tokens per shard by default: 2^24 (32 MiB at 2 bytes a token, 64 MiB at 4).
pub const SHARD_TOKENS: u64 = 1 << 24;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("{input}: {message}")]
    Input { input: String, message: String },
    #[error("{input}, row {row}: the text is not valid UTF-8 (drop --refuse-invalid-utf8 to skip and count such rows)")]
    InvalidUtf8 { input: String, row: u64 },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(
        "{out} holds an unfinished preparation of other inputs or settings; use another --out, or --restart to discard it"
    )]
    OtherJournal { out: PathBuf },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] tessera_data::TokenizerError),
    #[error("{0}")]
    Manifest(#[from] tessera_data::ManifestError),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io_err(path: &std::path::Path, e: impl std::fmt::Display) -> PrepareError {
    PrepareError::Io { path: path.to_owned(), message: e.to_string() }
}

/// What to prepare and how.
#[derive(Debug, Clone)]
pub struct PrepareConfig {
    /// Files, directories, `s3://bucket/prefix`, `http(s)://…/file`, `hf://datasets/…`.
    pub inputs: Vec<String>,
    pub out: PathBuf,
    /// A Hugging Face `tokenizer.json`; its end-of-text token is `eos_token`, else the one its
    /// `tokenizer_config.json` names.
    pub tokenizer: PathBuf,
    pub eos_token: Option<String>,
    pub columns: Columns,
    pub shard_tokens: u64,
    pub validation_per_mille: u32,
    pub name: String,
    /// Fail on a row whose text is not UTF-8 instead of skipping and counting it.
    pub refuse_invalid_utf8: bool,
    /// Tokenizer threads (0: every core).
    pub threads: usize,
    /// Discard an unfinished preparation in `out` instead of resuming it.
    pub restart: bool,
}
