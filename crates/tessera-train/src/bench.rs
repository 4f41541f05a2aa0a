//! `tessera bench train`: throughput of the real training step (forward, backward, clipping,
//! AdamW — [`Trainer::train_step`], nothing special-cased) on the embedded corpus, reported as
//! tokens/s and achieved GFLOP/s from the model's FLOP count (6N + attention, see
//! [`LlamaConfig::train_flops_per_token`]), the process's peak resident memory while it trains,
//! model FLOPs utilisation when the device's peak is known, and where a step's time goes.
//! `benchmarks/train_pytorch.py` times the same model, batch and thread count in Python PyTorch
//! and prints the ratios.

use std::time::Instant;

use tch::{Device, Kind};
use tessera_data::{Dataset, SyntheticSpec};
use tessera_model::{Llama, LlamaConfig};

use crate::trainer::StepProfile;
use crate::{TrainConfig, TrainError, Trainer};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub preset: String,
    pub params: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub threads: i32,
    pub device: String,
    /// The kind matrix multiplies run in: `f32`, or `bf16` (weights, norms and the optimizer
    /// stay f32, as under autocast).
    pub precision: String,
    pub steps: u64,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub gflops: f64,
    /// Achieved model FLOP/s over the device's peak, when the peak is known.
    pub mfu: Option<f64>,
    /// The process's resident memory when the timed steps began, and its peak during them
    /// (Linux; MiB).
    pub rss_before_mib: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// A few more steps after the timed ones, timed stage by stage.
    pub profile: StepProfile,
}

/// What to measure, beyond the model.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch_size: usize,
    /// Tokens per sequence (`None`: the model's context length).
    pub seq_len: Option<usize>,
    pub steps: u64,
    pub warmup: u64,
    pub device: Device,
    /// Matrix multiplies in bf16 (`Some(true)`), f32 (`Some(false)`), or the device's default
    /// (bf16 on CUDA, f32 on the CPU).
    pub bf16: Option<bool>,
    /// The device's peak dense FLOP/s at that precision, for model FLOPs utilisation.
    pub peak_flops: Option<f64>,
}

/// Times `steps` training steps after `warmup` untimed ones, then profiles a few more. The model
/// keeps the preset's vocabulary so that the comparison with Python uses identical shapes.
pub fn train_throughput(name: &str, model_config: &LlamaConfig, o: &BenchOptions) -> Result<BenchResult, TrainError> {
    let (batch_size, device) = (o.batch_size, o.device);
    let seq_len = o.seq_len.unwrap_or(model_config.max_position_embeddings as usize);
    let chars = (batch_size * (seq_len + 1) * 4).max(100_000);
    let dataset = Dataset::synthetic(SyntheticSpec::default(), chars, seq_len * 4)?;
    let profiled = o.steps.clamp(1, 5);
    let config = TrainConfig {
        steps: o.warmup + o.steps + profiled,
        batch_size,
        seq_len,
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    let mut model = Llama::new(model_config, device, 0)?;
    if let Some(bf16) = o.bf16 {
        model.set_compute_kind(if bf16 { Kind::BFloat16 } else { Kind::Float });
    }
    let precision = if model.compute_kind() == Kind::BFloat16 { "bf16" } else { "f32" };
    let mut trainer = Trainer::from_model(config, model, dataset)?;
    for _ in 0..o.warmup {
        trainer.train_step()?;
    }
    let rss_before_mib = memory::reset_peak().then(memory::rss_mib).flatten();
    let started = Instant::now();
    for _ in 0..o.steps {
        trainer.train_step()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let peak_rss_mib = rss_before_mib.and(memory::peak_rss_mib());
    trainer.profile = Some(StepProfile::default());
    for _ in 0..profiled {
        trainer.train_step()?;
    }
    let tokens_per_s = (o.steps as usize * batch_size * seq_len) as f64 / elapsed;
    let flops = tokens_per_s * model_config.train_flops_per_token(seq_len as i64) as f64;
    Ok(BenchResult {
        preset: name.to_owned(),
        params: model_config.num_params(),
        batch_size,
        seq_len,
        threads: tch::get_num_threads(),
        device: format!("{device:?}").to_lowercase(),
        precision: precision.to_owned(),
        steps: o.steps,
        step_ms: elapsed * 1e3 / o.steps as f64,
        tokens_per_s,
        gflops: flops / 1e9,
        mfu: o.peak_flops.map(|p| flops / p),
        rss_before_mib,
        peak_rss_mib,
        profile: trainer.profile.take().unwrap_or_default(),
    })
}

/// The dense bf16 peak of the GPUs whose figures are published, from the name `nvidia-smi`
/// gives (FLOP/s).
pub fn known_gpu_peak(name: &str) -> Option<f64> {
    let tflops = if name.contains("H100") && name.contains("PCIe") {
        756.0
    } else if name.contains("H100") && name.contains("NVL") {
        835.0
    } else if name.contains("H100") || name.contains("H200") {
        989.0
    } else if name.contains("A100") {
        312.0
    } else {
        return None;
    };
    Some(tflops * 1e12)
}

/// The process's resident memory, from `/proc/self` (Linux).
pub mod memory {
    fn status_mib(field: &str) -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(field))?;
        let kib: f64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024.0)
    }

    /// Resident memory now (VmRSS).
    pub fn rss_mib() -> Option<f64> {
        status_mib("VmRSS:")
    }

    /// The peak resident memory since the process started or [`reset_peak`] (VmHWM).
    pub fn peak_rss_mib() -> Option<f64> {
        status_mib("VmHWM:")
    }

    /// Starts the peak over from the current resident memory; false where that is not possible.
    pub fn reset_peak() -> bool {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peak follows an allocation that is touched, and starts over when reset.
    #[test]
    fn peak_rss_sees_a_touched_allocation() {
        if !memory::reset_peak() {
            return; // Not Linux: nothing to measure with.
        }
        let before = memory::peak_rss_mib().unwrap();
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let peak = memory::peak_rss_mib().unwrap();
        assert!(peak >= before + 60.0, "64 MiB touched, peak {before:.0} → {peak:.0} MiB");
        drop(big);
        assert!(memory::reset_peak());
        let after = memory::peak_rss_mib().unwrap();
        assert!(after < peak - 60.0, "after a reset the peak is today's resident memory: {after:.0} MiB");
    }

    #[test]
    fn published_peaks() {
        assert_eq!(known_gpu_peak("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(known_gpu_peak("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(known_gpu_peak("NVIDIA H200"), Some(989e12));
        assert_eq!(known_gpu_peak("some other card"), None);
    }
}
