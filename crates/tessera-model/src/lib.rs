//! `tessera-model`: the Llama-family transformer on libtorch (through `tch`), its configuration
//! and presets, Hugging Face checkpoints, and sampling with a KV cache.
//!
//! The model's weights live in a `tch::nn::VarStore` under exactly the names Hugging Face uses
//! (`model.layers.3.self_attn.q_proj.weight`), so checkpoints are a straight copy in both
//! directions. The trainer (`tessera-train`) owns the optimizer; this crate owns the forward pass.

pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod grow;
pub mod llama;

pub use checkpoint::{load_checkpoint, save_checkpoint};
pub use config::{LlamaConfig, Preset, TrainingMemory, preset, presets};
pub use generate::{SamplingParams, generate, sample};
pub use grow::{Growth, grow};
pub use llama::{BatchCache, KvCache, Llama};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("config {path}: {message}")]
    Config { path: String, message: String },
    #[error("unknown preset or missing config file {name:?} (presets: {known})")]
    UnknownPreset { name: String, known: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("sequence of {len} tokens exceeds max_position_embeddings = {max}")]
    TooLong { len: i64, max: i64 },
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: i64, vocab: i64 },
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Tokenizer(#[from] tessera_data::TokenizerError),
}
