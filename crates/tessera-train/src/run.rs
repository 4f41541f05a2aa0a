//! What a run's spec says about local training, for everyone who trains or evaluates for it
//! (contributors, the validator, the command line's final evaluation): its dataset, checked
//! against the run's fingerprint, and the inner trainer's configuration for a data slot.

use tessera_data::Dataset;
use tessera_data::synthetic::SyntheticSpec;
use tessera_protocol::api::{DataSource, RunInfo};

use crate::{AdamWConfig, TrainConfig, TrainError};

/// Builds the run's dataset, or checks the one given, against the run's fingerprint.
pub fn run_dataset(run: &RunInfo, given: Option<Dataset>) -> Result<Dataset, TrainError> {
    let data = &run.spec.data;
    let dataset = match (&data.source, given) {
        (_, Some(d)) => d,
        (DataSource::Embedded { seed, train_chars, val_chars }, None) => {
            let spec = SyntheticSpec { seed: *seed, ..SyntheticSpec::default() };
            Dataset::synthetic(spec, *train_chars as usize, *val_chars as usize)
                .map_err(|e| TrainError::Data(e.to_string()))?
        }
        (DataSource::Manifest { urls, .. }, None) => {
            return Err(TrainError::Data(format!(
                "the run's data is published at {}: fetch it with tessera_client::ShardCache",
                urls.join(", ")
            )));
        }
        (DataSource::External, None) => {
            return Err(TrainError::Data(format!(
                "the run trains on {:?}: pass the same data with --data (fingerprint {})",
                data.name, data.fingerprint
            )));
        }
    };
    if dataset.info.fingerprint != data.fingerprint {
        return Err(TrainError::Data(format!(
            "this data ({}, fingerprint {}) is not the run's ({}, fingerprint {})",
            dataset.info.name, dataset.info.fingerprint, data.name, data.fingerprint
        )));
    }
    Ok(dataset)
}

/// The inner trainer's configuration for a run and data slot.
pub fn inner_config(run: &RunInfo, slot: u64) -> TrainConfig {
    let s = &run.spec;
    TrainConfig {
        steps: s.rounds * s.inner_steps,
        batch_size: s.inner.batch_size as usize,
        seq_len: s.inner.seq_len as usize,
        grad_accum: 1,
        lr: s.inner.lr,
        min_lr: s.inner.min_lr,
        warmup_steps: s.inner.warmup_steps,
        grad_clip: s.inner.grad_clip,
        adamw: AdamWConfig { weight_decay: s.inner.weight_decay, ..AdamWConfig::default() },
        seed: s.seed,
        worker: slot,
        ..TrainConfig::default()
    }
}
