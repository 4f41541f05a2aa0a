//! `tessera-train`: the local trainer. It owns the optimizer, the learning-rate schedule,
//! evaluation against the held-out split, the JSONL metrics log and exact checkpoint/resume.
//! Data comes from `tessera-data` as token streams; the model from `tessera-model`.

pub mod bench;
pub mod diloco;
pub mod grow;
pub mod optim;
pub mod run;
pub mod trainer;

pub use grow::{PhaseTarget, TorchGrower, plan_phases};
pub use optim::{AdamW, AdamWConfig, lr_at};
pub use trainer::{EvalStats, NewMoments, RunSummary, StepStats, TrainConfig, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Corpus(#[from] tessera_data::corpus::CorpusError),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("resume from {path}: {message}")]
    Resume { path: String, message: String },
    #[error("invalid training setup: {0}")]
    Invalid(String),
    /// The run's data is not what was given, or cannot be built.
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Wire(#[from] tessera_protocol::WireError),
    #[error(transparent)]
    Codec(#[from] tessera_protocol::CodecError),
    #[error(transparent)]
    Aggregate(#[from] tessera_aggregate::AggregateError),
    #[error("training diverged at step {step}: loss is {loss}")]
    Diverged { step: u64, loss: f64 },
}
