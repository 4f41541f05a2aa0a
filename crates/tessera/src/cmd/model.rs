//! `tessera model` and `tessera grow`: presets and configs, fresh checkpoints, logits, and
//! function-preserving growth of a checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tch::Device;
use tessera_data::TessTokenizer;
use tessera_model::{LlamaConfig, TrainingMemory, load_checkpoint, presets};

use crate::args::{gib, human};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Parameters, training FLOPs per token and training memory of a preset or config.json;
    /// with no argument, a table of all presets.
    Info {
        /// Preset name or path to a config.json / checkpoint directory.
        model: Option<String>,
        /// Sequence length for the attention FLOPs (default: the model's context).
        #[arg(long)]
        seq_len: Option<i64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a freshly initialised model as a Hugging Face checkpoint.
    Init {
        /// Preset name or config.json.
        #[arg(long, default_value = "tiny")]
        model: String,
        /// Tokenizer saved with it (sets the vocabulary): `byte` or a tokenizer.json.
        #[arg(long, default_value = "byte")]
        tokenizer: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Download a hub's current global weights (checked against their hash and the hub's
    /// signature) and write them as a Hugging Face checkpoint with the run's tokenizer: what
    /// `transformers` and `tessera serve` load.
    Pull {
        /// The hub's URL.
        #[arg(long)]
        hub: String,
        /// The checkpoint directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Runs on a published dataset: where its tokenizer is fetched to.
        #[arg(long, default_value = "runs/pull-cache")]
        cache: PathBuf,
    },
    /// Print the tokens of TEXT and the model's logits for them, as JSON (for comparisons).
    Logits {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        text: String,
    },
}

#[derive(Args)]
pub struct GrowArgs {
    /// The Hugging Face checkpoint directory to grow.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The target sizes: a preset or a config.json (hidden size, MLP size, heads, K/V heads,
    /// layers and context may grow; head size, RoPE and vocabulary are kept).
    #[arg(long)]
    pub to: String,
    /// Where to write the grown checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the new weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn model(command: ModelCommand) -> Result<()> {
    match command {
        ModelCommand::Info { model, seq_len, json } => model_info(model.as_deref(), seq_len, json),
        ModelCommand::Init { model, tokenizer, seed, out } => model_init(&model, &tokenizer, seed, &out),
        ModelCommand::Logits { checkpoint, text } => model_logits(&checkpoint, &text),
        ModelCommand::Pull { hub, out, cache } => model_pull(&hub, &out, &cache),
    }
}

fn model_pull(hub: &str, out: &Path, cache: &Path) -> Result<()> {
    let client = tessera_client::HubClient::new(hub)?;
    let info = client.run()?;
    let client = client.pinning(tessera_trust::PublicKey::parse(&info.hub_key)?);
    eprintln!("downloading the weights of run {} ({}) after round {}…", info.run_id, info.spec.name, info.round);
    let bytes = client.checkpoint(&info.checkpoint, None)?;
    let weights = tessera_protocol::decode_weights(&bytes, &info.spec.tensors)?;
    drop(bytes);
    let tokenizer = match &info.spec.data.source {
        tessera_protocol::api::DataSource::Manifest { urls, .. } => {
            let shards =
                tessera_client::ShardCache::open(urls, Some(&info.spec.data.fingerprint), cache, 1 << 30, None)?;
            Some(shards.tokenizer()?)
        }
        tessera_protocol::api::DataSource::Embedded { .. } => {
            Some(tessera_train::run::run_dataset(&info, None)?.tokenizer)
        }
        // The run's own data: the tokenizer is not the hub's to give.
        tessera_protocol::api::DataSource::External => None,
    };
    let config = LlamaConfig::from_json(info.spec.model.clone()).map_err(anyhow::Error::msg)?;
    let model = tessera_model::Llama::zeroed(&config, Device::Cpu)?;
    tessera_train::diloco::write_params(&model, &weights)?;
    drop(weights);
    tessera_model::save_checkpoint(&model, tokenizer.as_ref(), out)?;
    println!(
        "wrote {} ({} parameters, checkpoint {}){}",
        out.display(),
        human(config.num_params() as f64),
        &info.checkpoint[..16],
        if tokenizer.is_none() { "; the run trains on external data, so no tokenizer was written" } else { "" }
    );
    Ok(())
}

fn model_info(model: Option<&str>, seq_len: Option<i64>, json: bool) -> Result<()> {
    let Some(spec) = model else {
        println!(
            "{:<8} {:>6} {:>6} {:>9} {:>6} {:>7} {:>6} {:>10} {:>12} {:>12}  summary",
            "preset", "layers", "width", "heads/kv", "ffn", "vocab", "ctx", "params", "FLOPs/token", "train mem"
        );
        for p in presets() {
            let c = &p.config;
            println!(
                "{:<8} {:>6} {:>6} {:>9} {:>6} {:>7} {:>6} {:>10} {:>12} {:>12}  {}",
                p.name,
                c.num_hidden_layers,
                c.hidden_size,
                format!("{}/{}", c.num_attention_heads, c.kv_heads()),
                c.intermediate_size,
                c.vocab_size,
                c.max_position_embeddings,
                human(c.num_params() as f64),
                human(c.train_flops_per_token(c.max_position_embeddings) as f64),
                gib(TrainingMemory::f32(c).total()),
                p.summary
            );
        }
        println!(
            "\nFLOPs/token: training (6N + attention) at full context; train mem: f32 weights + grads + AdamW moments."
        );
        return Ok(());
    };
    let c = LlamaConfig::from_preset_or_path(spec)?;
    let t = seq_len.unwrap_or(c.max_position_embeddings);
    if t <= 0 {
        bail!("--seq-len must be positive");
    }
    let mem = TrainingMemory::f32(&c);
    let flops = c.train_flops_per_token(t);
    if json {
        let v = serde_json::json!({
            "model": spec, "config": c, "params": c.num_params(), "matmul_params": c.matmul_params(),
            "seq_len": t, "train_flops_per_token": flops, "six_n": 6 * c.matmul_params(),
            "memory_bytes": {"weights_f32": mem.weights, "gradients_f32": mem.gradients,
                             "adamw_state_f32": mem.adamw_state, "total": mem.total()},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model {spec}");
    println!(
        "  shape              {} layers, width {}, {} heads ({} kv, head dim {}), ffn {}, vocab {}, context {}, tied embeddings: {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.kv_heads(),
        c.head_dim(),
        c.intermediate_size,
        c.vocab_size,
        c.max_position_embeddings,
        c.tie_word_embeddings
    );
    println!("  parameters         {} ({})", c.num_params(), human(c.num_params() as f64));
    println!(
        "  training FLOPs     {} per token at sequence length {t} (6N = {}, attention = {})",
        human(flops as f64),
        human((6 * c.matmul_params()) as f64),
        human((flops - 6 * c.matmul_params()) as f64)
    );
    println!(
        "  memory (f32)       weights {} + gradients {} + AdamW state {} = {}",
        gib(mem.weights),
        gib(mem.gradients),
        gib(mem.adamw_state),
        gib(mem.total())
    );
    Ok(())
}

fn model_init(spec: &str, tokenizer: &str, seed: u64, out: &Path) -> Result<()> {
    let mut config = LlamaConfig::from_preset_or_path(spec)?;
    let tokenizer = match tokenizer {
        "byte" => TessTokenizer::byte_level(),
        file => TessTokenizer::load(Path::new(file))?,
    };
    config.vocab_size = tokenizer.vocab_size() as i64;
    let model = tessera_model::Llama::new(&config, Device::Cpu, seed)?;
    tessera_model::save_checkpoint(&model, Some(&tokenizer), out)?;
    println!("wrote {} ({} parameters) to {}", spec, config.num_params(), out.display());
    Ok(())
}

fn model_logits(checkpoint: &Path, text: &str) -> Result<()> {
    let (model, tokenizer) = load_checkpoint(checkpoint, Device::Cpu)?;
    let tokenizer = tokenizer.with_context(|| format!("{} has no tokenizer.json", checkpoint.display()))?;
    let tokens = tokenizer.encode(text)?;
    if tokens.is_empty() {
        bail!("--text encodes to no tokens");
    }
    let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
    let logits = tch::no_grad(|| model.forward(&tch::Tensor::from_slice(&ids).view([1, -1]), None))?;
    let rows: Vec<Vec<f32>> =
        (0..ids.len() as i64).map(|i| Vec::<f32>::try_from(logits.get(0).get(i))).collect::<Result<_, _>>()?;
    println!("{}", serde_json::json!({"tokens": tokens, "logits": rows}));
    Ok(())
}

pub fn grow(args: GrowArgs) -> Result<()> {
    let (model, tokenizer) = tessera_model::load_checkpoint(&args.checkpoint, tch::Device::Cpu)
        .with_context(|| format!("load {}", args.checkpoint.display()))?;
    let mut target = tessera_model::LlamaConfig::from_preset_or_path(&args.to)?;
    // Presets leave the vocabulary to the tokenizer; growth keeps the checkpoint's.
    if tessera_model::preset(&args.to).is_some() {
        target.vocab_size = model.config.vocab_size;
        target.tie_word_embeddings = model.config.tie_word_embeddings;
    }
    let (grown, growth) = tessera_model::grow(&model, &target, args.seed)?;
    tessera_model::save_checkpoint(&grown, tokenizer.as_ref(), &args.out)?;
    let (a, b) = (&growth.from, &growth.to);
    println!(
        "grew {} → {} parameters: layers {} → {}, hidden {} → {}, MLP {} → {}, heads {}/{} → {}/{} (head size {}); \
         RMSNorm ε {:e} → {:e}; written to {}",
        a.num_params(),
        b.num_params(),
        a.num_hidden_layers,
        b.num_hidden_layers,
        a.hidden_size,
        b.hidden_size,
        a.intermediate_size,
        b.intermediate_size,
        a.num_attention_heads,
        a.kv_heads(),
        b.num_attention_heads,
        b.kv_heads(),
        b.head_dim(),
        a.rms_norm_eps,
        b.rms_norm_eps,
        args.out.display()
    );
    Ok(())
}
