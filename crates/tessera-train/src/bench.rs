//! `tessera bench train`: throughput of the real training step (forward, backward, clipping,
//! AdamW — [`Trainer::train_step`], nothing special-cased) on the embedded corpus, reported as
//! tokens/s and achieved GFLOP/s from the model's FLOP count (6N + attention, see
//! [`LlamaConfig::train_flops_per_token`]). `benchmarks/train_pytorch.py` times the same model,
//! batch and thread count in Python PyTorch and prints the ratio.

use std::time::Instant;

use tch::Device;
use tessera_data::{Dataset, SyntheticSpec};
use tessera_model::{Llama, LlamaConfig};

use crate::{TrainConfig, TrainError, Trainer};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub preset: String,
    pub params: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub threads: i32,
    pub steps: u64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
}

/// Times `steps` training steps after `warmup` untimed ones. The model keeps the preset's
/// vocabulary so that the comparison with Python uses identical shapes.
pub fn train_throughput(
    name: &str,
    model_config: &LlamaConfig,
    batch_size: usize,
    steps: u64,
    warmup: u64,
    device: Device,
) -> Result<BenchResult, TrainError> {
    let seq_len = model_config.max_position_embeddings as usize;
    let chars = (batch_size * (seq_len + 1) * 4).max(100_000);
    let dataset = Dataset::synthetic(SyntheticSpec::default(), chars, seq_len * 4)?;
    let config = TrainConfig { steps: warmup + steps, batch_size, seq_len, warmup_steps: 1, ..TrainConfig::default() };
    let model = Llama::new(model_config, device, 0)?;
    let mut trainer = Trainer::from_model(config, model, dataset)?;
    for _ in 0..warmup {
        trainer.train_step()?;
    }
    let started = Instant::now();
    for _ in 0..steps {
        trainer.train_step()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tokens_per_s = (steps as usize * batch_size * seq_len) as f64 / elapsed;
    Ok(BenchResult {
        preset: name.to_owned(),
        params: model_config.num_params(),
        batch_size,
        seq_len,
        threads: tch::get_num_threads(),
        steps,
        step_ms: elapsed * 1e3 / steps as f64,
        tokens_per_s,
        gflops: tokens_per_s * model_config.train_flops_per_token(seq_len as i64) as f64 / 1e9,
    })
}
