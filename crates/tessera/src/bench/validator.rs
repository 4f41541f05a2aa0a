//! `tessera bench validator`: what scoring costs a validator, against what training costs a
//! contributor, measured in the same run on the same machine. For each preset: a contributor's
//! round (H inner steps at its batch and sequence length, timed), then one validator task of K
//! submissions scored by the real `Scorer` (held-out windows, data-fit windows and controls,
//! copy samples; timed). The submissions are random Δs of the model's shape: a forward pass
//! costs the same whatever the weights, so only the time is meaningful here, not the scores.
//!
//! From the two it derives the figure a run is planned with: how many validators, each as fast
//! as one contributor's machine, close a round of N contributors within a tenth of the round's
//! training time when a share S of the work is scored twice:
//! `⌈N × (1 + S) × validator seconds per submission / (0.1 × contributor round seconds)⌉`.

use std::time::Instant;

use anyhow::{Result, bail};
use clap::Args;
use tessera_data::{Dataset, SyntheticSpec};
use tessera_model::LlamaConfig;
use tessera_train::{TrainConfig, Trainer};
use tessera_validator::{Candidate, ScoreConfig, Scorer};

use crate::args::{RuntimeArgs, human, setup_runtime};

#[derive(Args)]
pub struct BenchValidatorArgs {
    /// Comma-separated presets.
    #[arg(long, default_value = "nano,micro", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Submissions in the scored task (at least 5: the data-fit check needs four controls).
    #[arg(long, default_value_t = 8)]
    pub submissions: usize,
    /// A contributor's inner steps per round (H).
    #[arg(long, default_value_t = 20)]
    pub inner_steps: u64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens per window (default: each model's context length).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Held-out windows per score and assigned windows per data-fit check (the contest's
    /// defaults).
    #[arg(long, default_value_t = 32)]
    pub eval_windows: usize,
    #[arg(long, default_value_t = 16)]
    pub fit_windows: usize,
    /// The step submissions are scored at (the contest's default; below 1 it costs one more
    /// pass over the held-out windows per submission).
    #[arg(long, default_value_t = tessera_protocol::api::DEFAULT_SCORE_STEP)]
    pub score_step: f64,
    /// Contributors per round and the double-scored share, for the validator count.
    #[arg(long, default_value_t = 1000)]
    pub contributors: u64,
    #[arg(long, default_value_t = 0.1)]
    pub double_share: f64,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    model: String,
    params: u64,
    seq_len: usize,
    batch_size: usize,
    inner_steps: u64,
    /// A contributor's round: H inner steps.
    round_s: f64,
    submissions: usize,
    /// The task's scoring, all submissions together, and per submission.
    task_s: f64,
    per_submission_s: f64,
    windows_per_submission: f64,
    /// Seconds per window run forward, and per inner step: what the two costs scale from.
    window_s: f64,
    step_s: f64,
    /// Validator seconds per submission over a contributor's round seconds.
    ratio: f64,
    /// Validators (each one contributor's machine) that close a round of `contributors` within
    /// 10% of its training time.
    validators_needed: u64,
}

pub fn bench_validator(args: &BenchValidatorArgs) -> Result<()> {
    let device = setup_runtime(&args.runtime)?;
    if args.submissions < 5 || args.inner_steps == 0 || args.batch_size == 0 || args.seq_len == Some(0) {
        bail!("--submissions must be at least 5, and --inner-steps, --batch-size and --seq-len positive");
    }
    if !(args.score_step > 0.0 && args.score_step <= 1.0) {
        bail!("--score-step must be in (0, 1]");
    }
    if args.eval_windows == 0 || args.fit_windows == 0 || !(0.0..=1.0).contains(&args.double_share) {
        bail!("--eval-windows and --fit-windows must be positive and --double-share in [0, 1]");
    }
    if !args.json {
        println!(
            "{:<8} {:>9} {:>9} {:>11} {:>12} {:>13} {:>9} {:>10} {:>10} {:>10}",
            "model",
            "params",
            "batch×seq",
            "round (H)",
            "task (K)",
            "s/submission",
            "fwd/sub",
            "s/window",
            "sub/round",
            format!("validators/{}", args.contributors)
        );
    }
    for name in &args.models {
        let config = LlamaConfig::from_preset_or_path(name)?;
        let row = measure(name, &config, args, device)?;
        if args.json {
            println!("{}", serde_json::to_string(&row)?);
        } else {
            println!(
                "{:<8} {:>9} {:>9} {:>11} {:>12} {:>13.3} {:>9.0} {:>10.4} {:>10.3} {:>10}",
                row.model,
                human(row.params as f64),
                format!("{}×{}", row.batch_size, row.seq_len),
                format!("{:.2} s", row.round_s),
                format!("{:.2} s", row.task_s),
                row.per_submission_s,
                row.windows_per_submission,
                row.window_s,
                row.ratio,
                row.validators_needed
            );
        }
    }
    Ok(())
}

fn measure(name: &str, config: &LlamaConfig, args: &BenchValidatorArgs, device: tch::Device) -> Result<Row> {
    let seq_len = args.seq_len.unwrap_or(config.max_position_embeddings as usize);
    let chars = (args.batch_size * (seq_len + 1) * 64).max(200_000);
    let dataset = Dataset::synthetic(SyntheticSpec::default(), chars, (seq_len + 1) * 256)?;
    let inner = TrainConfig {
        steps: args.inner_steps + 2,
        batch_size: args.batch_size,
        seq_len,
        warmup_steps: 1,
        ..TrainConfig::default()
    };
    // The contributor's round: H steps after one untimed step.
    let mut trainer = Trainer::new(inner.clone(), config, dataset.clone(), device)?;
    trainer.train_step()?;
    let started = Instant::now();
    for _ in 0..args.inner_steps {
        trainer.train_step()?;
    }
    let round_s = started.elapsed().as_secs_f64();
    let theta = tessera_train::diloco::read_params(&trainer.model)?;
    drop(trainer);

    // One validator task of K submissions, as it scores a real one.
    let score = ScoreConfig { eval_windows: args.eval_windows, fit_windows: args.fit_windows, step: args.score_step };
    let mut scorer = Scorer::new(inner, config, dataset, device, score)?;
    tch::manual_seed(7);
    let random = |n: usize| -> Result<Vec<f32>> {
        let t = tch::Tensor::randn([n as i64], (tch::Kind::Float, tch::Device::Cpu)) * 1e-3;
        Ok(Vec::<f32>::try_from(&t)?)
    };
    let candidates: Vec<Candidate> = (0..args.submissions as u64)
        .map(|i| {
            Ok(Candidate {
                contributor: i,
                slot: i,
                schedule_step: 0,
                inner_steps: args.inner_steps,
                base_round: 0,
                delta: theta.iter().map(|t| random(t.len())).collect::<Result<_>>()?,
                weight: 1.0,
                assigned: None,
            })
        })
        .collect::<Result<_>>()?;
    let scored = scorer.score(&theta, &candidates, &[9u8; 32])?;
    let k = args.submissions as f64;
    let per_submission_s = scored.cost.seconds / k;
    let ratio = per_submission_s / round_s;
    let needed = (args.contributors as f64 * (1.0 + args.double_share) * ratio / 0.1).ceil() as u64;
    Ok(Row {
        model: name.to_owned(),
        params: config.num_params(),
        seq_len,
        batch_size: args.batch_size,
        inner_steps: args.inner_steps,
        round_s,
        submissions: args.submissions,
        task_s: scored.cost.seconds,
        per_submission_s,
        windows_per_submission: scored.cost.windows_forward as f64 / k,
        window_s: scored.cost.seconds / scored.cost.windows_forward.max(1) as f64,
        step_s: round_s / args.inner_steps as f64,
        ratio,
        validators_needed: needed,
    })
}
