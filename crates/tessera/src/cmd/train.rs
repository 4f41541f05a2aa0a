//! `tessera train` and `tessera generate`: one machine, one model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_model::{LlamaConfig, SamplingParams, generate, load_checkpoint};
use tessera_train::trainer::describe_eval;
use tessera_train::{AdamWConfig, TrainConfig, Trainer};

use crate::args::{DataArgs, RuntimeArgs, human, load_dataset, setup_runtime};

#[derive(Args)]
pub struct TrainArgs {
    /// A preset name (`tessera model info` lists them) or a config.json.
    #[arg(long, default_value = "nano")]
    pub model: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2000)]
    pub steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 12)]
    pub batch_size: usize,
    /// Tokens per sequence (default: the model's context length).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    pub min_lr: Option<f64>,
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: u64,
    /// Decoupled AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.99)]
    beta2: f64,
    /// Clip gradients to this global L2 norm.
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value_t = 250)]
    pub eval_interval: u64,
    /// Validation windows per evaluation, evenly spaced over the whole split (0: every window).
    #[arg(long, default_value_t = 200)]
    pub eval_windows: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_interval: u64,
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// Run directory: metrics.jsonl and checkpoint/ go here.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Continue from a checkpoint written by an earlier run (same data).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop after this step even if the schedule runs longer (resume later with --resume).
    #[arg(long)]
    pub stop_at: Option<u64>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// A checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[arg(long, default_value_t = 200)]
    pub max_new_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn train(args: TrainArgs) -> Result<()> {
    let device = setup_runtime(&args.runtime)?;
    let dataset = load_dataset(&args.data)?;
    println!(
        "data: {} | {} training + {} validation tokens | vocabulary {}",
        dataset.info.name,
        dataset.train.len(),
        dataset.validation.len(),
        dataset.tokenizer.vocab_size()
    );
    if let Some(floor) = dataset.info.loss_floor {
        println!("data: exact entropy floor {floor:.4} nats/token");
    }
    let mut trainer = match &args.resume {
        Some(dir) => {
            let t = Trainer::resume(dir, dataset, device, Some(args.steps))
                .with_context(|| format!("resuming from {}", dir.display()))?;
            println!("resumed at step {} of {} (training settings come from the checkpoint)", t.step(), t.config.steps);
            t
        }
        None => {
            let model_config = LlamaConfig::from_preset_or_path(&args.model)?;
            let config = TrainConfig {
                steps: args.steps,
                batch_size: args.batch_size,
                seq_len: args.seq_len.unwrap_or(model_config.max_position_embeddings as usize),
                grad_accum: args.grad_accum,
                lr: args.lr,
                min_lr: args.min_lr.unwrap_or(args.lr / 10.0),
                warmup_steps: args.warmup_steps,
                grad_clip: args.grad_clip,
                adamw: AdamWConfig { beta1: args.beta1, beta2: args.beta2, eps: 1e-8, weight_decay: args.weight_decay },
                eval_interval: args.eval_interval,
                eval_windows: args.eval_windows,
                checkpoint_interval: args.checkpoint_interval,
                seed: args.seed,
                ..TrainConfig::default()
            };
            Trainer::new(config, &model_config, dataset, device)?
        }
    };
    let c = &trainer.model.config;
    println!(
        "model: {} | {} parameters | {} layers, width {}, {} heads ({} kv), context {} | device {:?}, {} threads",
        args.model,
        human(c.num_params() as f64),
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.kv_heads(),
        c.max_position_embeddings,
        device,
        tch::get_num_threads()
    );
    println!(
        "train: {} steps × {} tokens, lr {} → {}, warmup {}, AdamW β=({}, {}), wd {}, clip {}",
        trainer.config.steps,
        trainer.config.tokens_per_step(),
        trainer.config.lr,
        trainer.config.min_lr,
        trainer.config.warmup_steps,
        trainer.config.adamw.beta1,
        trainer.config.adamw.beta2,
        trainer.config.adamw.weight_decay,
        trainer.config.grad_clip
    );
    if trainer.step() == 0 {
        println!("{}", describe_eval(&trainer.evaluate()?));
    }
    let summary = trainer.run(Some(&args.out), args.stop_at, true)?;
    println!(
        "done: {} steps in {:.1} s, {:.0} tokens/s | final val loss {:.4}{}",
        summary.steps,
        summary.elapsed_s,
        summary.tokens_per_s,
        summary.final_eval.val_loss,
        tessera_train::trainer::describe_coverage(&summary.final_eval)
    );
    if let Some(gap) = summary.final_eval.floor_gap {
        println!("distance to the entropy floor (warm-context val loss − floor): {gap:+.4} nats/token");
    }
    println!("metrics: {}", args.out.join("metrics.jsonl").display());
    if let Some(ckpt) = summary.checkpoint {
        println!("checkpoint: {}  (Hugging Face format)", ckpt.display());
        println!("next: tessera generate --checkpoint {} --prompt \"...\"", ckpt.display());
    }
    Ok(())
}

pub fn generate_text(args: GenerateArgs) -> Result<()> {
    let device = setup_runtime(&args.runtime)?;
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be ≥ 0");
    }
    let (model, tokenizer) = load_checkpoint(&args.checkpoint, device)?;
    let tokenizer = tokenizer.with_context(|| format!("{} has no tokenizer.json", args.checkpoint.display()))?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        stop_token: Some(tokenizer.eos_id()),
    };
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    let mut new_tokens: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut failure = None;
    generate(&model, &prompt, &params, |tok| {
        if tok == tokenizer.eos_id() {
            return;
        }
        new_tokens.push(tok);
        // Decode the whole continuation so multi-byte characters print only when complete.
        match tokenizer.decode(&new_tokens) {
            Ok(text) if !text.ends_with('\u{FFFD}') && text.len() >= printed => {
                let _ = write!(stdout, "{}", &text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
            Ok(_) => {}
            Err(e) => failure = Some(e),
        }
    })?;
    writeln!(stdout)?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    Ok(())
}
