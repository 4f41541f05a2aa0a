//! `tessera-serve`: the trained model behind an OpenAI-compatible HTTP API.
//!
//! ```text
//!  openai client ──HTTP──▶ http (axum): auth (hashed keys) → rate limit → parse → tokenize
//!                               │  Job{prompt, limits, events}          ▲ Event::Token / Done
//!                               ▼                                        │
//!                          engine thread: prefill alone → slot in the shared BatchCache →
//!                          one decode step for every occupied slot per forward pass
//!                               │ completed request
//!                               ▼
//!                          keys::Store (SQLite): usage row in the open epoch
//! ```
//!
//! Invariants: the key itself is never stored (only its BLAKE3 hash); a request is billed only
//! when it completed (a refused, failed or abandoned request costs nothing); the prompt plus
//! `max_tokens` never exceeds the model's context; libtorch runs only on the engine thread.

pub mod attested;
pub mod engine;
mod http;
pub mod keys;
pub mod openai;
pub mod prices;
pub mod verify;

pub use attested::Attested;
pub use engine::{Engine, Event, Finish, Job};
pub use http::{AppState, Served, edge_refusal, router};
pub use keys::{EpochUsage, KeyInfo, Store};
pub use prices::Prices;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the model's engine thread has stopped")]
    EngineStopped,
    #[error("key store: {0}")]
    Store(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error(transparent)]
    Tokenizer(#[from] tessera_data::TokenizerError),
}
