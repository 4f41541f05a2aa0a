//! `tessera bench train`: training throughput of presets on this machine.

use anyhow::{Result, bail};
use clap::Args;
use tessera_model::LlamaConfig;
use tessera_train::bench::{BenchOptions, train_throughput};

use crate::args::{RuntimeArgs, human, setup_runtime};

#[derive(Args)]
pub struct BenchTrainArgs {
    /// Comma-separated presets.
    #[arg(long, default_value = "nano,micro", value_delimiter = ',')]
    pub models: Vec<String>,
    #[arg(long, default_value_t = 12)]
    pub batch_size: usize,
    /// Tokens per sequence (default: each model's context length).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Timed steps per model.
    #[arg(long, default_value_t = 40)]
    pub steps: u64,
    /// Untimed warm-up steps per model.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Matrix multiplies in `bf16` (weights, norms and the optimizer stay f32, as under
    /// autocast) or `f32`; default bf16 on CUDA, f32 on the CPU.
    #[arg(long, value_parser = ["bf16", "f32"])]
    pub precision: Option<String>,
    /// The device's peak dense TFLOP/s at that precision, for model FLOPs utilisation (known
    /// for H100, H200 and A100 from their names).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn bench_train(args: &BenchTrainArgs) -> Result<()> {
    let device = setup_runtime(&args.runtime)?;
    if args.steps == 0 || args.batch_size == 0 || args.seq_len == Some(0) {
        bail!("--steps, --batch-size and --seq-len must be positive");
    }
    let peak_flops = match args.peak_tflops {
        Some(t) if t.is_finite() && t > 0.0 => Some(t * 1e12),
        Some(t) => bail!("--peak-tflops must be positive, not {t}"),
        None if device.is_cuda() => gpu_name().as_deref().and_then(tessera_train::bench::known_gpu_peak),
        None => None,
    };
    let options = BenchOptions {
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        steps: args.steps,
        warmup: args.warmup,
        device,
        bf16: args.precision.as_deref().map(|p| p == "bf16"),
        peak_flops,
    };
    let mut results = Vec::new();
    if !args.json {
        println!(
            "{:<8} {:>9} {:>9} {:>8} {:>5} {:>10} {:>12} {:>10} {:>7} {:>10}",
            "model", "params", "batch×seq", "threads", "prec", "step ms", "tokens/s", "GFLOP/s", "MFU", "peak RSS"
        );
    }
    for name in &args.models {
        let config = LlamaConfig::from_preset_or_path(name)?;
        let r = train_throughput(name, &config, &options)?;
        if args.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{:<8} {:>9} {:>9} {:>8} {:>5} {:>10.2} {:>12.0} {:>10.2} {:>7} {:>10}",
                r.preset,
                human(r.params as f64),
                format!("{}×{}", r.batch_size, r.seq_len),
                r.threads,
                r.precision,
                r.step_ms,
                r.tokens_per_s,
                r.gflops,
                r.mfu.map_or("–".into(), |m| format!("{:.1}%", 100.0 * m)),
                r.peak_rss_mib.map_or("–".into(), |m| format!("{m:.0} MiB")),
            );
        }
        results.push(r);
    }
    if !args.json {
        println!("\nwhere a step's time goes (a few more steps, timed stage by stage):");
        println!(
            "{:<8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10}",
            "model", "data", "forward", "backward", "clip+sync", "AdamW", "step ms"
        );
        for r in &results {
            let p = &r.profile;
            let total = p.data_s + p.forward_s + p.backward_s + p.clip_s + p.optimizer_s;
            let pct = |x: f64| format!("{:.1}%", 100.0 * x / total.max(1e-12));
            println!(
                "{:<8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>10.2}",
                r.preset,
                pct(p.data_s),
                pct(p.forward_s),
                pct(p.backward_s),
                pct(p.clip_s),
                pct(p.optimizer_s),
                1e3 * total / p.steps.max(1) as f64
            );
        }
    }
    Ok(())
}

/// The first GPU's name, from `nvidia-smi` (as `tessera doctor` reads it).
fn gpu_name() -> Option<String> {
    let (_, gpus) = crate::cmd::doctor::gpus()?;
    gpus.into_iter().next().map(|(name, _)| name).filter(|n| !n.is_empty())
}
