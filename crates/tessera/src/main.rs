//! `tessera`: the command line. Parsing only parses and validates; each subcommand's work lives
//! in the library crates (`tessera-data`, `tessera-model`, `tessera-train`).

mod arena;
mod commands;
mod growbench;
mod overlapbench;
mod phases;
mod serving;
mod swarm;
mod trust;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Train an open language model together: local training, checkpoints, generation.",
    long_about = "Tessera trains Llama-family models on libtorch and writes Hugging Face checkpoints.\n\n\
                  Start with `tessera train`: it trains the `nano` model on the embedded synthetic corpus \
                  (no downloads) and reports how far the model is from that corpus's exact entropy floor. \
                  Then `tessera generate --checkpoint runs/demo/checkpoint --prompt \"...\"`."
)]
struct Cli {
    /// More log output (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub and N contributors on localhost as separate processes: DiLoCo end to end on
    /// the embedded corpus, with live progress and a summary (loss vs the entropy floor, bytes
    /// vs synchronous data parallel, per-contributor statistics).
    Demo(Box<swarm::DemoArgs>),
    /// Serve a DiLoCo run: assignments, submissions, rounds, checkpoints (resumes the run in
    /// --database if there is one).
    Hub(Box<swarm::HubArgs>),
    /// Join a hub's run: train H inner steps per round from the published weights and upload
    /// the compressed pseudo-gradient, until the run finishes.
    Contribute(Box<swarm::ContributeArgs>),
    /// The validator role: score every submission of a scored run (`tessera hub --scored`) —
    /// held-out loss before and after each submission alone, on data drawn from the round's
    /// committed seed; a check that it was trained on its assigned data; copy detection. In a
    /// sealed run it attests its keys (SEV-SNP or TDX), opens the sealed submissions, settles
    /// and aggregates each round and signs the reward ledger.
    #[command(alias = "validate")]
    Validator(Box<swarm::ValidateArgs>),
    /// The seven-phase plan: each phase's model, token budget, memory per contributor (and
    /// whether one contributor can hold it), bytes per round by codec against synchronous data
    /// parallel, and who qualifies — computed from the model configurations.
    Phases(phases::PhasesArgs),
    /// Grow a checkpoint into a larger model that computes exactly the same function
    /// (wider hidden size, MLP, more heads, more layers), written as a Hugging Face checkpoint.
    Grow(GrowArgs),
    /// Make an Ed25519 identity (owner-only PEM file) for `tessera contribute --key`.
    Keygen(trust::KeygenArgs),
    /// The reward ledger: verify a hub's (or an exported file) from its bytes alone.
    #[command(subcommand)]
    Ledger(trust::LedgerCommand),
    /// A hub's leaderboard: contributors by rating (μ − 3σ), rewards, and who qualified for the
    /// next phase at the phase boundary.
    Leaderboard(swarm::LeaderboardArgs),
    /// Train a model (by default `nano` on the embedded synthetic corpus).
    Train(Box<TrainArgs>),
    /// Sample text from a checkpoint with a KV cache.
    Generate(GenerateArgs),
    /// Serve a checkpoint through an OpenAI-compatible API (`/v1/models`, `/v1/completions`,
    /// `/v1/chat/completions`, streaming included): concurrent requests are decoded together
    /// with a shared KV cache, every request needs an API key and is metered under it.
    Serve(Box<serving::ServeArgs>),
    /// API keys for `tessera serve`: create (shown once, stored hashed), revoke, list.
    #[command(subcommand)]
    Keys(serving::KeysCommand),
    /// The usage economy: close an epoch of served usage into a run's ledger (exact pro-rata
    /// payouts to token holders), and report epochs, revenue, payouts and returns.
    #[command(subcommand)]
    Economy(serving::EconomyCommand),
    /// Inspect model configurations and presets.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Inspect and prepare training data.
    #[command(subcommand)]
    Data(DataCommand),
    /// Train tokenizers.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args)]
struct GrowArgs {
    /// The Hugging Face checkpoint directory to grow.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The target sizes: a preset or a config.json (hidden size, MLP size, heads, K/V heads,
    /// layers and context may grow; head size, RoPE and vocabulary are kept).
    #[arg(long)]
    to: String,
    /// Where to write the grown checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the new weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum BuiltinTokenizer {
    Char,
    Byte,
}

/// Where training text comes from.
#[derive(Args, Clone)]
struct DataArgs {
    /// A UTF-8 text file, a directory of them, JSONL with a `text` field, or a directory written
    /// by `tessera data prepare`. Default: the embedded synthetic corpus.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokenizer for --data: `char`, `byte`, or a tokenizer.json (e.g. from `tessera tokenizer train`).
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// Characters of embedded training text to generate (validation gets a tenth).
    #[arg(long, default_value_t = 4_000_000)]
    synthetic_chars: usize,
    /// Seed of the embedded corpus's source (a different seed is a different language).
    #[arg(long, default_value_t = 1234)]
    synthetic_seed: u64,
}

#[derive(Args)]
struct TrainArgs {
    /// A preset name (`tessera model info` lists them) or a config.json.
    #[arg(long, default_value = "nano")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// Optimizer steps.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 12)]
    batch_size: usize,
    /// Tokens per sequence (default: the model's context length).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    /// Decoupled AdamW weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    #[arg(long, default_value_t = 0.99)]
    beta2: f64,
    /// Clip gradients to this global L2 norm.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 250)]
    eval_interval: u64,
    /// Validation windows per evaluation.
    #[arg(long, default_value_t = 200)]
    eval_windows: usize,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    checkpoint_interval: u64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Run directory: metrics.jsonl and checkpoint/ go here.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Continue from a checkpoint written by an earlier run (same data).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop after this step even if the schedule runs longer (resume later with --resume).
    #[arg(long)]
    stop_at: Option<u64>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Args, Clone)]
struct RuntimeArgs {
    /// `cpu`, `cuda` or `cuda:N` (CUDA uses bf16 matrix multiplies).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads for libtorch (default: libtorch's choice, usually all cores).
    #[arg(long)]
    threads: Option<i32>,
}

#[derive(Args)]
struct GenerateArgs {
    /// A checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.8)]
    temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    top_p: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand)]
enum ModelCommand {
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
    /// Print the tokens of TEXT and the model's logits for them, as JSON (for comparisons).
    Logits {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        text: String,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Describe a corpus; for the embedded one, its exact entropy rate (the loss floor).
    Info {
        #[command(flatten)]
        data: DataArgs,
    },
    /// Tokenize a corpus into checksummed shards with a fixed validation split.
    Prepare {
        #[command(flatten)]
        data: DataArgs,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Tokens per training shard.
        #[arg(long, default_value_t = 16 << 20)]
        shard_tokens: usize,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer and save it as tokenizer.json.
    Train {
        /// Text file, directory or JSONL to train on.
        #[arg(long)]
        data: PathBuf,
        /// Vocabulary size, including the 256 byte symbols and <|endoftext|>.
        #[arg(long, default_value_t = 8192)]
        vocab: usize,
        #[arg(long, default_value = "tokenizer.json")]
        out: PathBuf,
    },
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Comma-separated presets.
    #[arg(long, default_value = "nano,micro", value_delimiter = ',')]
    models: Vec<String>,
    #[arg(long, default_value_t = 12)]
    batch_size: usize,
    /// Timed steps per model.
    #[arg(long, default_value_t = 40)]
    steps: u64,
    /// Untimed warm-up steps per model.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Matrix multiplies in `bf16` (weights, norms and the optimizer stay f32, as under
    /// autocast) or `f32`; default bf16 on CUDA, f32 on the CPU.
    #[arg(long, value_parser = ["bf16", "f32"])]
    precision: Option<String>,
    /// The device's peak dense TFLOP/s at that precision, for model FLOPs utilisation (known
    /// for H100, H200 and A100 from their names).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training throughput of presets on this machine: tokens/s, achieved GFLOP/s, model FLOPs
    /// utilisation (when the device's peak is known), peak resident memory while training, and
    /// where a step's time goes. `benchmarks/train_pytorch.py` runs it next to Python PyTorch.
    Train(BenchTrainArgs),
    /// What trust costs: sealing and opening a submission with HPKE (against BLAKE3 and memcpy
    /// of the same bytes, measured in the same run), signing and verifying a request, and
    /// writing and verifying ledger entries.
    Trust(crate::trust::BenchTrustArgs),
    /// Growth against training from scratch: a model half as wide and deep, grown into the
    /// target part-way, on a fraction of the baseline's tokens; final losses side by side.
    Grow(Box<crate::growbench::BenchGrowArgs>),
    /// A contributor's compute utilisation on links limited so that one transfer of a round's
    /// payload takes a set share of a round's compute, without and with `--overlap`, and the
    /// final loss of each run.
    Overlap(Box<crate::overlapbench::BenchOverlapArgs>),
    /// The hub's round: parse, checksum, decode and average pseudo-gradients from N contributors,
    /// then one outer step; reported against memcpy bandwidth measured in the same run.
    Hub {
        /// Model parameters.
        #[arg(long, default_value_t = 100_000_000)]
        params: u64,
        /// Values per tensor.
        #[arg(long, default_value_t = 4_000_000)]
        tensor_len: u64,
        #[arg(long, default_value_t = 16)]
        contributors: usize,
        /// Codecs to measure, comma-separated.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16,int8,int4,topk")]
        codecs: Vec<CodecName>,
        #[command(flatten)]
        codec: CodecArgs,
    },
    /// Each robust aggregation rule on one round of N contributors' decoded pseudo-gradients
    /// (one of them scaled ×100), as seconds and as a multiple of the plain mean's time
    /// measured in the same run.
    Robust {
        /// Model parameters.
        #[arg(long, default_value_t = 100_000_000)]
        params: u64,
        /// Values per tensor.
        #[arg(long, default_value_t = 4_000_000)]
        tensor_len: u64,
        #[arg(long, default_value_t = 16)]
        contributors: usize,
        /// Rules to time, comma-separated; the first is the baseline.
        #[arg(long, value_delimiter = ',', default_value = "mean,norm-clip,trimmed-mean,median,centered-clip")]
        rules: Vec<tessera_protocol::Aggregation>,
        /// Runs per rule (the best is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
    /// A scored run under attack: N contributors (some adversaries) against a real in-process
    /// hub and validator; final loss, rejections, attackers' rewards and ranks per scenario.
    Arena(Box<arena::ArenaArgs>),
    /// DiLoCo simulated in one process (M workers, H inner steps, outer Nesterov), optionally
    /// against synchronous data parallel on the same number of tokens.
    Diloco(Box<DilocoArgs>),
    /// Many simulated contributors (real HTTP, real messages, no training) against one hub:
    /// errors and submission latency percentiles.
    Swarm(swarm::BenchSwarmArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum CodecName {
    F32,
    Bf16,
    Int8,
    Int4,
    Topk,
}

/// Parameters of the pseudo-gradient codecs.
#[derive(Args, Clone, Copy)]
struct CodecArgs {
    /// Block size of int8 / int4.
    #[arg(long, default_value_t = 64)]
    block: u32,
    /// Top-k chunk size.
    #[arg(long, default_value_t = 4096)]
    topk_chunk: u32,
    /// Top-k values kept per chunk.
    #[arg(long, default_value_t = 16)]
    topk_k: u32,
}

#[derive(Args)]
struct DilocoArgs {
    #[arg(long, default_value = "nano")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// Workers (M).
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Inner AdamW steps per round (H).
    #[arg(long, default_value_t = 50)]
    inner_steps: u64,
    /// Outer rounds.
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Sequences per worker per inner step.
    #[arg(long, default_value_t = 12)]
    batch_size: usize,
    /// Inner peak learning rate (cosine over all inner steps, warmup 10% capped at 100).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Decay of each worker's error-feedback residual per round: 1 is plain error feedback;
    /// below 1 the residual doubles as a local momentum (pair with --outer-momentum 0)
    #[arg(long, default_value_t = 1.0)]
    feedback_decay: f32,
    /// Pseudo-gradient codec.
    #[arg(long, value_enum, default_value = "f32")]
    codec: CodecName,
    #[command(flatten)]
    codec_args: CodecArgs,
    /// Codec of the weight update published each round: f32, bf16, int8[:block], int4[:block].
    #[arg(long, default_value = "f32", value_parser = |s: &str| s.parse::<tessera_protocol::Codec>())]
    broadcast_codec: tessera_protocol::Codec,
    /// Write every evaluation (and the baseline's) as JSON lines to this file, for plots.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Evaluate the global model every N rounds.
    #[arg(long, default_value_t = 1)]
    eval_every: u64,
    /// Also train the synchronous data-parallel baseline on the same number of tokens.
    #[arg(long)]
    baseline: bool,
    /// Train only the baseline (e.g. to tune its learning rate).
    #[arg(long)]
    baseline_only: bool,
    /// Baseline learning rate (default: --lr).
    #[arg(long)]
    baseline_lr: Option<f64>,
    #[arg(long, default_value_t = 200)]
    eval_windows: usize,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match commands::run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
