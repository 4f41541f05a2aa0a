//! Tessera's data layer: the embedded synthetic corpus, real-text loading, tokenizers and the
//! on-disk token shard format.
//!
//! This crate works on plain buffers and files; it links no libtorch, so the hub and other
//! bookkeeping crates can hand out and verify data without a tensor runtime. The trainer
//! (`tessera-train`) turns the token windows it produces into tensors.

pub mod corpus;
pub mod manifest;
pub mod sampler;
pub mod shard;
pub mod synthetic;
pub mod tokenizer;

pub use corpus::{Dataset, TextSource};
pub use manifest::{Manifest, ManifestError, ShardEntry, Split};
pub use sampler::{eval_window_count, eval_windows, train_windows};
pub use shard::{Shard, ShardError};
pub use synthetic::{SyntheticSource, SyntheticSpec};
pub use tokenizer::{TessTokenizer, TokenizerError, TokenizerKind};
