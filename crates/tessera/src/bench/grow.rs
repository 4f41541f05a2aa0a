//! `tessera bench grow`: does a grown model reach a same-size model's loss on fewer tokens?
//!
//! The baseline trains the target model from scratch for `--steps`. Each growth run has a budget
//! of a fraction of those steps (the same batch and sequence length, so of the tokens): it trains
//! a model half as wide and half as deep for `--small-share` of its budget, grows it
//! (`Trainer::grow`, function-preserving, AdamW moments carried over) and trains the rest. Every
//! run has its own warmup + cosine schedule over its whole budget, and is evaluated on the same
//! validation windows at its end. Each budget under the baseline's is also trained from scratch,
//! so growth is compared with the same tokens spent on the target model alone.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use tessera_model::LlamaConfig;
use tessera_train::{NewMoments, TrainConfig, Trainer};

use crate::args::{DataArgs, RuntimeArgs, load_dataset, setup_runtime};

#[derive(Args)]
pub struct BenchGrowArgs {
    /// The target model (a preset or a config.json); the small one is half as wide (hidden size,
    /// heads, K/V heads, MLP) and half as deep.
    #[arg(long, default_value = "nano")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// Steps of the from-scratch baseline.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    #[arg(long, default_value_t = 12)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Budgets of the growth runs, as fractions of the baseline's tokens.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.65,0.8")]
    budgets: Vec<f64>,
    /// What the small model halves: `both` (width and depth), `width` or `depth`.
    #[arg(long, value_enum, default_value = "both")]
    shrink: Shrink,
    /// How new entries' AdamW second moments start at growth: `mean` (of their kind of tensor,
    /// what `Trainer::grow` does) or `zero`.
    #[arg(long, value_enum, default_value = "mean")]
    new_moments: NewMomentsArg,
    /// Share of a growth run's budget spent training the small model.
    #[arg(long, default_value_t = 0.4)]
    small_share: f64,
    #[arg(long, default_value_t = 400)]
    eval_windows: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Append one JSON line per run to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum NewMomentsArg {
    Mean,
    Zero,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Shrink {
    Both,
    Width,
    Depth,
}

/// Half as wide (hidden size, heads, K/V heads, MLP; the same head size) and/or half as deep.
pub fn half(c: &LlamaConfig, shrink: Shrink) -> LlamaConfig {
    let mut small = c.clone();
    if matches!(shrink, Shrink::Both | Shrink::Width) {
        let heads = (c.num_attention_heads / 2).max(1);
        small.hidden_size = heads * c.head_dim();
        small.num_attention_heads = heads;
        small.num_key_value_heads = Some((c.kv_heads() / 2).max(1));
        small.head_dim = c.head_dim.map(|_| c.head_dim());
        small.intermediate_size = (c.intermediate_size / 2).max(1);
    }
    if matches!(shrink, Shrink::Both | Shrink::Depth) {
        small.num_hidden_layers = (c.num_hidden_layers / 2).max(1);
    }
    small
}

/// A flag value's name as `--help` shows it (what the JSON records).
fn flag_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().map(|p| p.get_name().to_owned()).unwrap_or_default()
}

#[derive(serde::Serialize)]
struct Outcome {
    run: String,
    model: String,
    /// What the small model halved, its share of the budget and how new second moments
    /// started (empty for the from-scratch runs).
    shrink: String,
    small_share: f64,
    new_moments: String,
    steps: u64,
    small_steps: u64,
    tokens: u64,
    share_of_baseline: f64,
    /// Training FLOPs (6N + attention per token, at each model's size) as a share of the baseline's.
    flops_share: f64,
    val_loss: f64,
    val_loss_warm: f64,
    seconds: f64,
}

pub fn bench_grow(args: BenchGrowArgs) -> Result<()> {
    // Long on purpose: the baseline, then each budget grown and from scratch, then the table.
    if args.steps == 0
        || args.budgets.iter().any(|b| !(*b > 0.0 && *b <= 1.0))
        || !(0.0..1.0).contains(&args.small_share)
    {
        bail!("--steps must be positive, --budgets in (0, 1] and --small-share in [0, 1)");
    }
    let device = setup_runtime(&args.runtime)?;
    let dataset = load_dataset(&args.data)?;
    let mut big = LlamaConfig::from_preset_or_path(&args.model)?;
    big.vocab_size = dataset.tokenizer.vocab_size() as i64;
    let small = half(&big, args.shrink);
    let seq = big.max_position_embeddings as usize;
    let config = |steps: u64| TrainConfig {
        steps,
        batch_size: args.batch_size,
        seq_len: seq,
        lr: args.lr,
        min_lr: args.lr / 10.0,
        warmup_steps: (steps / 10).clamp(1, 100),
        eval_windows: args.eval_windows,
        seed: args.seed,
        ..TrainConfig::default()
    };
    println!(
        "growth against training from scratch: {} ({} parameters) vs {} ({} parameters) grown into it; {} tokens per step, data {}",
        args.model,
        big.num_params(),
        format_args!("{}×{}", small.num_hidden_layers, small.hidden_size),
        small.num_params(),
        args.batch_size * seq,
        dataset.info.name
    );
    // Each budget below the baseline's is also trained from scratch, the same-tokens reference.
    let budget_steps: u64 = args.budgets.iter().map(|b| (b * args.steps as f64).round() as u64).sum();
    let shorter: u64 = args.budgets.iter().filter(|&&b| b < 1.0).map(|b| (b * args.steps as f64).round() as u64).sum();
    let total = args.steps + budget_steps + shorter;
    let flops = |c: &LlamaConfig| c.train_flops_per_token(seq as i64) as f64;
    let baseline_flops = args.steps as f64 * flops(&big);
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let tokens_per_step = (args.batch_size * seq) as u64;
    let mut outcomes = Vec::new();
    let run = |name: String, steps: u64, small_steps: u64| -> Result<Outcome> {
        bar.set_message(name.clone());
        let started = std::time::Instant::now();
        let first = if small_steps > 0 { &small } else { &big };
        let mut trainer = Trainer::new(config(steps), first, dataset.clone(), device)?;
        for step in 0..steps {
            if step == small_steps && small_steps > 0 {
                let new_moments = match args.new_moments {
                    NewMomentsArg::Mean => NewMoments::KindMean,
                    NewMomentsArg::Zero => NewMoments::Zero,
                };
                trainer = trainer.grow_with(&big, args.seed ^ 0x67726f77, new_moments)?;
            }
            trainer.train_step()?;
            bar.inc(1);
        }
        let eval = trainer.evaluate()?;
        let grown = small_steps > 0;
        Ok(Outcome {
            run: name,
            model: args.model.clone(),
            shrink: if grown { flag_name(args.shrink) } else { String::new() },
            small_share: if grown { args.small_share } else { 0.0 },
            new_moments: if grown { flag_name(args.new_moments) } else { String::new() },
            steps,
            small_steps,
            tokens: steps * tokens_per_step,
            share_of_baseline: steps as f64 / args.steps as f64,
            flops_share: (small_steps as f64 * flops(&small) + (steps - small_steps) as f64 * flops(&big))
                / baseline_flops,
            val_loss: eval.val_loss,
            val_loss_warm: eval.val_loss_warm,
            seconds: started.elapsed().as_secs_f64(),
        })
    };
    outcomes.push(run("from scratch".into(), args.steps, 0)?);
    for &b in &args.budgets {
        let steps = (b * args.steps as f64).round() as u64;
        let small_steps = (args.small_share * steps as f64).round() as u64;
        outcomes.push(run(format!("grown, {:.0}% budget", 100.0 * b), steps, small_steps)?);
        if b < 1.0 {
            outcomes.push(run(format!("scratch, {:.0}% budget", 100.0 * b), steps, 0)?);
        }
    }
    bar.finish_and_clear();
    let baseline = outcomes[0].val_loss;
    println!(
        "{:<22} {:>7} {:>12} {:>11} {:>9} {:>9} {:>10} {:>11} {:>8}",
        "run", "steps", "small steps", "tokens", "tokens %", "FLOPs %", "val loss", "vs scratch", "seconds"
    );
    for o in &outcomes {
        println!(
            "{:<22} {:>7} {:>12} {:>11} {:>8.0}% {:>8.0}% {:>10.4} {:>+11.4} {:>8.1}",
            o.run,
            o.steps,
            o.small_steps,
            o.tokens,
            100.0 * o.share_of_baseline,
            100.0 * o.flops_share,
            o.val_loss,
            o.val_loss - baseline,
            o.seconds
        );
    }
    let grown = outcomes[1..].iter().filter(|o| o.small_steps > 0);
    match grown.filter(|o| o.val_loss <= baseline).map(|o| o.share_of_baseline).reduce(f64::min) {
        Some(share) => println!(
            "a grown model reached the from-scratch loss {baseline:.4} with {:.0}% of its tokens",
            100.0 * share
        ),
        None => println!("no growth run reached the from-scratch loss {baseline:.4} within its budget"),
    }
    if let Some(path) = &args.json_out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        for o in &outcomes {
            writeln!(f, "{}", serde_json::to_string(o)?)?;
        }
    }
    Ok(())
}
