//! `tessera bench diloco`: DiLoCo simulated in one process, optionally against synchronous
//! data parallel on the same tokens.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tch::Device;
use tessera_data::Dataset;
use tessera_model::LlamaConfig;
use tessera_train::trainer::{describe_eval, print_above};
use tessera_train::{TrainConfig, Trainer};

use crate::args::{CodecArgs, CodecName, DataArgs, RuntimeArgs, gib, load_dataset, make_codec, setup_runtime};

#[derive(Args)]
pub struct DilocoArgs {
    #[arg(long, default_value = "nano")]
    pub model: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Workers (M).
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Inner AdamW steps per round (H).
    #[arg(long, default_value_t = 50)]
    pub inner_steps: u64,
    /// Outer rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Sequences per worker per inner step.
    #[arg(long, default_value_t = 12)]
    pub batch_size: usize,
    /// Inner peak learning rate (cosine over all inner steps, warmup 10% capped at 100).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.7)]
    pub outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    pub outer_momentum: f32,
    /// Decay of each worker's error-feedback residual per round: 1 is plain error feedback;
    /// below 1 the residual doubles as a local momentum (pair with --outer-momentum 0)
    #[arg(long, default_value_t = 1.0)]
    pub feedback_decay: f32,
    /// Pseudo-gradient codec.
    #[arg(long, value_enum, default_value = "f32")]
    pub codec: CodecName,
    #[command(flatten)]
    pub codec_args: CodecArgs,
    /// Codec of the weight update published each round: f32, bf16, int8[:block], int4[:block].
    #[arg(long, default_value = "f32", value_parser = |s: &str| s.parse::<tessera_protocol::Codec>())]
    pub broadcast_codec: tessera_protocol::Codec,
    /// Write every evaluation (and the baseline's) as JSON lines to this file, for plots.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Evaluate the global model every N rounds.
    #[arg(long, default_value_t = 1)]
    pub eval_every: u64,
    /// Also train the synchronous data-parallel baseline on the same number of tokens.
    #[arg(long)]
    pub baseline: bool,
    /// Train only the baseline (e.g. to tune its learning rate).
    #[arg(long)]
    pub baseline_only: bool,
    /// Baseline learning rate (default: --lr).
    #[arg(long)]
    pub baseline_lr: Option<f64>,
    #[arg(long, default_value_t = 200)]
    pub eval_windows: usize,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn bench_diloco(args: DilocoArgs) -> Result<()> {
    // Long on purpose: set-up, the run with its JSON log, and the report, in order.
    use tessera_aggregate::OuterConfig;
    use tessera_train::diloco::{DilocoConfig, run_diloco};

    let device = setup_runtime(&args.runtime)?;
    let dataset = load_dataset(&args.data)?;
    let model_config = LlamaConfig::from_preset_or_path(&args.model)?;
    let codec = make_codec(args.codec, args.codec_args)?;
    let total_inner = args.rounds * args.inner_steps;
    let inner = TrainConfig {
        steps: total_inner,
        batch_size: args.batch_size,
        seq_len: model_config.max_position_embeddings as usize,
        lr: args.lr,
        min_lr: args.lr / 10.0,
        warmup_steps: (total_inner / 10).clamp(1, 100),
        eval_windows: args.eval_windows,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let config = DilocoConfig {
        workers: args.workers,
        inner_steps: args.inner_steps,
        rounds: args.rounds,
        outer: OuterConfig { lr: args.outer_lr, momentum: args.outer_momentum, nesterov: true },
        codec,
        broadcast: args.broadcast_codec,
        eval_every: args.eval_every,
        feedback_decay: args.feedback_decay,
    };
    println!(
        "DiLoCo: {} workers × {} inner steps × {} rounds, codec {codec} up / {} down, inner lr {}, outer lr {} momentum {}, data {}",
        args.workers,
        args.inner_steps,
        args.rounds,
        args.broadcast_codec,
        args.lr,
        args.outer_lr,
        args.outer_momentum,
        dataset.info.name
    );
    let mut json_out = match &args.json_out {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
        )),
        None => None,
    };
    let tokens_per_round = args.workers as u64 * args.inner_steps * inner.tokens_per_step() as u64;
    let mut write_json = |value: serde_json::Value| -> Result<()> {
        if let Some(out) = json_out.as_mut() {
            writeln!(out, "{value}")?;
            out.flush()?;
        }
        Ok(())
    };
    write_json(serde_json::json!({
        "event": "config", "run": "diloco", "model": args.model, "data": dataset.info.name,
        "workers": args.workers, "inner_steps": args.inner_steps, "rounds": args.rounds,
        "batch_size": args.batch_size, "lr": args.lr, "outer_lr": args.outer_lr,
        "outer_momentum": args.outer_momentum, "feedback_decay": args.feedback_decay, "codec": codec.to_string(),
        "broadcast_codec": args.broadcast_codec.to_string(), "seed": args.seed,
    }))?;
    if args.baseline_only {
        return bench_baseline(&args, inner, &model_config, dataset, device, None, write_json);
    }
    let bar = indicatif::ProgressBar::new(args.rounds);
    let mut json_error = None;
    let summary = run_diloco(&inner, &model_config, &dataset, &config, device, |r| {
        bar.set_position(r.round);
        bar.set_message(format!("inner loss {:.4}", r.inner_loss));
        if let Some(e) = &r.eval {
            print_above(&bar, format!("round {:>4} | {}", r.round, describe_eval(e)));
            let line = serde_json::json!({"event": "eval", "run": "diloco", "round": r.round,
                "tokens": r.round * tokens_per_round, "inner_loss": r.inner_loss,
                "val_loss": e.val_loss, "val_loss_warm": e.val_loss_warm, "bytes_up": r.bytes_up});
            if let Err(err) = write_json(line) {
                json_error.get_or_insert(err);
            }
        }
    })?;
    bar.finish_and_clear();
    if let Some(err) = json_error {
        return Err(err);
    }
    let moved = summary.bytes_up + summary.bytes_down;
    println!(
        "DiLoCo: final val loss {:.4} | {} tokens | uploaded {} + downloaded {} | synchronous data parallel would move {} ({:.1}× more)",
        summary.final_eval.val_loss,
        summary.tokens,
        gib(summary.bytes_up),
        gib(summary.bytes_down),
        gib(summary.data_parallel_bytes),
        summary.data_parallel_bytes as f64 / moved.max(1) as f64
    );
    write_json(serde_json::json!({"event": "summary", "run": "diloco", "val_loss": summary.final_eval.val_loss,
        "val_loss_warm": summary.final_eval.val_loss_warm, "tokens": summary.tokens, "bytes_up": summary.bytes_up,
        "bytes_down": summary.bytes_down, "data_parallel_bytes": summary.data_parallel_bytes}))?;
    if args.baseline {
        bench_baseline(&args, inner, &model_config, dataset, device, Some(summary.final_eval.val_loss), write_json)?;
    }
    Ok(())
}

/// Synchronous data parallel: every step averages the gradients of M workers' batches, i.e.
/// one step on M × batch windows; the same tokens as the DiLoCo run of `args`.
fn bench_baseline(
    args: &DilocoArgs,
    inner: TrainConfig,
    model_config: &LlamaConfig,
    dataset: Dataset,
    device: Device,
    diloco_loss: Option<f64>,
    mut write_json: impl FnMut(serde_json::Value) -> Result<()>,
) -> Result<()> {
    let lr = args.baseline_lr.unwrap_or(args.lr);
    let total_inner = inner.steps;
    let config = TrainConfig {
        grad_accum: args.workers,
        lr,
        min_lr: lr / 10.0,
        eval_interval: args.inner_steps * args.eval_every,
        ..inner
    };
    let tokens_per_step = config.tokens_per_step() as u64;
    let metrics_dir = tempfile::tempdir()?;
    let mut trainer = Trainer::new(config, model_config, dataset, device)?;
    let base = trainer.run(Some(metrics_dir.path()), None, true)?;
    let metrics = std::fs::read_to_string(metrics_dir.path().join("metrics.jsonl"))?;
    for line in metrics.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["event"] == "eval" {
            let step = v["step"].as_u64().unwrap_or(0);
            write_json(serde_json::json!({"event": "eval", "run": "baseline", "step": step,
                "tokens": step * tokens_per_step, "val_loss": v["val_loss"], "val_loss_warm": v["val_loss_warm"]}))?;
        }
    }
    write_json(serde_json::json!({"event": "summary", "run": "baseline", "lr": lr,
        "val_loss": base.final_eval.val_loss, "val_loss_warm": base.final_eval.val_loss_warm}))?;
    let ratio =
        diloco_loss.map_or(String::new(), |d| format!(" | DiLoCo / baseline = {:.4}", d / base.final_eval.val_loss));
    println!(
        "baseline (synchronous data parallel, {total_inner} steps of {} × {} windows, lr {lr}): final val loss {:.4}{ratio}",
        args.workers, args.batch_size, base.final_eval.val_loss,
    );
    Ok(())
}
