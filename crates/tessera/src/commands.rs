//! The work behind each subcommand: composes the library crates and prints for people.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::Device;
use tessera_data::{Dataset, SyntheticSource, SyntheticSpec, TessTokenizer, TextSource, TokenizerKind};
use tessera_model::{LlamaConfig, SamplingParams, TrainingMemory, generate, load_checkpoint, presets};
use tessera_train::bench::{BenchOptions, train_throughput};
use tessera_train::trainer::{describe_eval, print_above};
use tessera_train::{AdamWConfig, TrainConfig, Trainer};

use crate::{
    BenchCommand, CodecArgs, CodecName, Command, DataArgs, DataCommand, DilocoArgs, GenerateArgs, ModelCommand,
    RuntimeArgs, TokenizerCommand, TrainArgs,
};

pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Train(args) => train(*args),
        Command::Generate(args) => generate_text(args),
        Command::Serve(args) => crate::serving::serve(*args),
        Command::Keys(cmd) => crate::serving::keys(cmd),
        Command::Economy(cmd) => crate::serving::economy(cmd),
        Command::Model(ModelCommand::Info { model, seq_len, json }) => model_info(model.as_deref(), seq_len, json),
        Command::Model(ModelCommand::Init { model, tokenizer, seed, out }) => {
            model_init(&model, &tokenizer, seed, &out)
        }
        Command::Model(ModelCommand::Logits { checkpoint, text }) => model_logits(&checkpoint, &text),
        Command::Data(DataCommand::Info { data }) => data_info(&data),
        Command::Data(DataCommand::Prepare { data, out, shard_tokens }) => {
            if shard_tokens == 0 {
                bail!("--shard-tokens must be positive");
            }
            let dataset = load_dataset(&data)?;
            let shards = dataset.write_dir(&out, shard_tokens)?;
            println!(
                "wrote {} training tokens in {shards} shard(s) and {} validation tokens to {}",
                dataset.train.len(),
                dataset.validation.len(),
                out.display()
            );
            Ok(())
        }
        Command::Tokenizer(TokenizerCommand::Train { data, vocab, out }) => train_tokenizer(&data, vocab, &out),
        Command::Bench(BenchCommand::Train(args)) => bench_train(&args),
        Command::Bench(BenchCommand::Diloco(args)) => bench_diloco(*args),
        Command::Bench(BenchCommand::Arena(args)) => crate::arena::bench_arena(*args),
        Command::Bench(BenchCommand::Swarm(args)) => crate::swarm::bench_swarm(args),
        Command::Bench(BenchCommand::Trust(args)) => crate::trust::bench_trust(args),
        Command::Bench(BenchCommand::Grow(args)) => crate::growbench::bench_grow(*args),
        Command::Bench(BenchCommand::Overlap(args)) => crate::overlapbench::bench_overlap(*args),
        Command::Hub(args) => crate::swarm::hub(*args),
        Command::Validator(args) => crate::swarm::validate(*args),
        Command::Keygen(args) => crate::trust::keygen(args),
        Command::Phases(args) => crate::phases::phases(args),
        Command::Grow(args) => grow(args),
        Command::Ledger(cmd) => crate::trust::ledger(cmd),
        Command::Leaderboard(args) => crate::swarm::leaderboard(args),
        Command::Contribute(args) => crate::swarm::contribute(*args),
        Command::Demo(args) => crate::swarm::demo(*args),
        Command::Bench(BenchCommand::Robust { params, tensor_len, contributors, rules, repeats }) => {
            bench_robust(params, tensor_len, contributors, &rules, repeats)
        }
        Command::Bench(BenchCommand::Hub { params, tensor_len, contributors, codecs, codec }) => {
            bench_hub(params, tensor_len, contributors, &codecs, codec)
        }
    }
}

/// Loads libtorch's CUDA half. The binary links it, but nothing names its symbols, so linkers
/// that drop unused libraries (`--as-needed`, Debian's and Ubuntu's default) leave it out;
/// loading it only when a GPU is asked for keeps CPU runs from mapping the CUDA libraries.
/// Loading it again when it is already there (a linker that kept it) changes nothing.
fn load_torch_cuda() -> Result<()> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        // SAFETY (both loads below): the library's initialisers register libtorch's CUDA
        // backend with the libtorch this binary already runs (the same installation, found
        // through the binary's rpath or LD_LIBRARY_PATH); it is never unloaded, so nothing it
        // registered can dangle.
        // Global, as a preloaded library would be, so later libraries resolve against it too.
        #[cfg(unix)]
        let library = unsafe {
            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
            Library::open(Some("libtorch_cuda.so"), RTLD_NOW | RTLD_GLOBAL)
        };
        #[cfg(not(unix))]
        let library = unsafe { libloading::Library::new("torch_cuda.dll") };
        match library {
            Ok(library) => {
                std::mem::forget(library);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    });
    match loaded {
        Ok(()) => Ok(()),
        Err(e) => {
            bail!("--device cuda: libtorch's CUDA library could not be loaded ({e}); is this PyTorch a CPU-only build?")
        }
    }
}

pub(crate) fn setup_runtime(runtime: &RuntimeArgs) -> Result<Device> {
    if let Some(n) = runtime.threads {
        if n < 1 {
            bail!("--threads must be at least 1");
        }
        tch::set_num_threads(n);
    }
    let device = match runtime.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device {other:?}: use cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(i) = device {
        // Before any CUDA query: libtorch settles on its CUDA hooks at the first one, and a
        // query made before the CUDA library is loaded disables CUDA for the whole process.
        load_torch_cuda()?;
        let count = tch::Cuda::device_count();
        if !tch::Cuda::is_available() || i as i64 >= count {
            bail!("CUDA device {i} requested but {count} CUDA device(s) are available");
        }
    }
    Ok(device)
}

pub(crate) fn load_dataset(args: &DataArgs) -> Result<Dataset> {
    let Some(path) = &args.data else {
        if args.synthetic_chars < 10_000 {
            bail!("--synthetic-chars must be at least 10000");
        }
        let spec = SyntheticSpec { seed: args.synthetic_seed, ..SyntheticSpec::default() };
        return Ok(Dataset::synthetic(spec, args.synthetic_chars, args.synthetic_chars / 10)?);
    };
    if Dataset::is_prepared_dir(path) {
        return Ok(Dataset::read_dir(path)?);
    }
    let (tokenizer, kind) = match args.tokenizer.as_str() {
        "char" => (None, TokenizerKind::Char),
        "byte" => (None, TokenizerKind::Byte),
        file => (Some(TessTokenizer::load(Path::new(file))?), TokenizerKind::Byte),
    };
    Ok(Dataset::from_path(path, tokenizer, kind)?)
}

fn train(args: TrainArgs) -> Result<()> {
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
                worker: 0,
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
        "done: {} steps in {:.1} s, {:.0} tokens/s | final val loss {:.4}",
        summary.steps, summary.elapsed_s, summary.tokens_per_s, summary.final_eval.val_loss
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

fn generate_text(args: GenerateArgs) -> Result<()> {
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

fn human(x: f64) -> String {
    for (scale, suffix) in [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")] {
        if x >= scale {
            return format!("{:.2}{suffix}", x / scale);
        }
    }
    format!("{x:.0}")
}

pub(crate) fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.1} GiB", b / 1_073_741_824.0),
    }
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

fn data_info(args: &DataArgs) -> Result<()> {
    if args.data.is_none() {
        let spec = SyntheticSpec { seed: args.synthetic_seed, ..SyntheticSpec::default() };
        let source = SyntheticSource::new(spec);
        let h = source.entropy_rate_nats_per_char();
        println!("embedded corpus: sparse word-level Markov source (seed {})", spec.seed);
        println!(
            "  words               {} (alphabet of {} characters incl. space)",
            source.words.len(),
            source.alphabet().len()
        );
        println!(
            "  successors per word {}–{}, plus {} uniform noise",
            spec.successors_min, spec.successors_max, spec.noise
        );
        println!("  entropy per word    {:.6} nats", source.entropy_per_word);
        println!("  characters per word {:.6} (incl. the space)", source.chars_per_word);
        println!(
            "  entropy rate        {h:.6} nats/char = {:.6} bits/char  ← the loss floor",
            h / std::f64::consts::LN_2
        );
        println!("  sample              {:?}", source.train_text(160));
        return Ok(());
    }
    let dataset = load_dataset(args)?;
    let chars: usize = match &args.data {
        Some(p) if !Dataset::is_prepared_dir(p) => TextSource::read(p)?.iter().map(|d| d.chars().count()).sum(),
        _ => 0,
    };
    let tokens = dataset.train.len() + dataset.validation.len();
    println!("corpus {}", dataset.info.name);
    println!("  vocabulary   {}", dataset.tokenizer.vocab_size());
    println!("  tokens       {} training + {} validation", dataset.train.len(), dataset.validation.len());
    if chars > 0 {
        println!("  characters   {chars} ({:.3} per token)", chars as f64 / tokens as f64);
    }
    match dataset.info.loss_floor {
        Some(f) => println!("  loss floor   {f:.6} nats/token"),
        None => println!("  loss floor   unknown (real text)"),
    }
    Ok(())
}

fn train_tokenizer(data: &Path, vocab: usize, out: &Path) -> Result<()> {
    let docs = TextSource::read(data)?;
    let bar = indicatif::ProgressBar::new_spinner().with_message(format!("training BPE with {vocab} tokens"));
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let tokenizer = TessTokenizer::train_bpe(docs.iter(), vocab)?;
    bar.finish_and_clear();
    tokenizer.save(out)?;
    let sample: String = docs.iter().flat_map(|d| d.chars()).take(200_000).collect();
    let n = tokenizer.encode(&sample)?.len().max(1);
    println!(
        "wrote {} ({} tokens); {:.2} characters per token on the first {} characters",
        out.display(),
        tokenizer.vocab_size(),
        sample.chars().count() as f64 / n as f64,
        sample.chars().count()
    );
    Ok(())
}

fn bench_train(args: &crate::BenchTrainArgs) -> Result<()> {
    let device = setup_runtime(&args.runtime)?;
    if args.steps == 0 || args.batch_size == 0 {
        bail!("--steps and --batch-size must be positive");
    }
    let peak_flops = match args.peak_tflops {
        Some(t) if t.is_finite() && t > 0.0 => Some(t * 1e12),
        Some(t) => bail!("--peak-tflops must be positive, not {t}"),
        None if device.is_cuda() => gpu_name().as_deref().and_then(tessera_train::bench::known_gpu_peak),
        None => None,
    };
    let options = BenchOptions {
        batch_size: args.batch_size,
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

/// The first GPU's name, from `nvidia-smi`.
fn gpu_name() -> Option<String> {
    let out =
        std::process::Command::new("nvidia-smi").args(["--query-gpu=name", "--format=csv,noheader"]).output().ok()?;
    let name = String::from_utf8(out.stdout).ok()?.lines().next()?.trim().to_owned();
    (!name.is_empty()).then_some(name)
}

fn bench_diloco(args: DilocoArgs) -> Result<()> {
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

fn make_codec(name: CodecName, p: CodecArgs) -> Result<tessera_protocol::Codec> {
    use tessera_protocol::Codec;
    let codec = match name {
        CodecName::F32 => Codec::F32,
        CodecName::Bf16 => Codec::Bf16,
        CodecName::Int8 => Codec::Int8 { block: p.block },
        CodecName::Int4 => Codec::Int4 { block: p.block },
        CodecName::Topk => Codec::TopK { chunk: p.topk_chunk, k: p.topk_k },
    };
    codec.validate()?;
    Ok(codec)
}

fn bench_hub(params: u64, tensor_len: u64, contributors: usize, codecs: &[CodecName], p: CodecArgs) -> Result<()> {
    if params == 0 || tensor_len == 0 || contributors == 0 {
        bail!("--params, --tensor-len and --contributors must be positive");
    }
    println!(
        "hub round: {} parameters in tensors of {tensor_len}, {contributors} contributors, {} threads \
         (verify: parse + checksum of all {contributors} messages; arrival: verify + decode + check of one)",
        human(params as f64),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<18} {:>10} {:>14} {:>11} {:>12} {:>7} {:>10} {:>12}",
        "codec", "message", "decode+agg+outer s", "GB/s (f32)", "memcpy GB/s", "ratio", "verify s", "arrival s/msg"
    );
    for &name in codecs {
        let codec = make_codec(name, p)?;
        let r = tessera_aggregate::bench::hub_round(params, tensor_len, contributors, codec)?;
        println!(
            "{:<18} {:>10} {:>14.2} {:>11.2} {:>12.2} {:>6.1}% {:>10.2} {:>12.3}",
            codec.to_string(),
            gib(r.message_bytes),
            r.seconds,
            r.gb_per_s,
            r.memcpy_gb_per_s,
            100.0 * r.gb_per_s / r.memcpy_gb_per_s,
            r.verify_seconds,
            r.arrival_seconds
        );
    }
    Ok(())
}

fn bench_robust(
    params: u64,
    tensor_len: u64,
    contributors: usize,
    rules: &[tessera_protocol::Aggregation],
    repeats: usize,
) -> Result<()> {
    if params == 0 || tensor_len == 0 || contributors == 0 || rules.is_empty() {
        bail!("--params, --tensor-len, --contributors and --rules must be non-empty");
    }
    println!(
        "robust aggregation: {} parameters in tensors of {tensor_len}, {contributors} decoded submissions \
         ({} in memory), {} threads, best of {repeats}",
        human(params as f64),
        gib(params * 4 * contributors as u64),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let results = tessera_aggregate::bench::robust_round(params, tensor_len, contributors, rules, repeats)?;
    let base = results[0].seconds;
    println!("{:<22} {:>10} {:>10} {:>9}", "rule", "seconds", "vs first", "clipped");
    for r in &results {
        println!("{:<22} {:>10.3} {:>9.2}x {:>9}", r.rule.to_string(), r.seconds, r.seconds / base, r.clipped);
    }
    Ok(())
}

fn grow(args: crate::GrowArgs) -> Result<()> {
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
