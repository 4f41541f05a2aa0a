//! `tessera data` and `tessera tokenizer`: corpora, their entropy floor, prepared shards and
//! trained tokenizers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use tessera_data::{Dataset, SyntheticSource, SyntheticSpec, TessTokenizer, TextSource};

use crate::args::{DataArgs, human, load_dataset};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Describe a dataset: a manifest (identity, tokenizer, shards, tokens, what preparation
    /// dropped, Merkle root), or a corpus given with --data; with neither, the embedded corpus
    /// and its exact entropy rate (the loss floor).
    Info {
        /// A manifest.json, or a directory holding one.
        manifest: Option<PathBuf>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Turn text into content-addressed token shards and a manifest: parquet (FineWeb layout),
    /// JSONL or text, local, s3://bucket/prefix, http(s)://…/file or
    /// hf://datasets/OWNER/NAME/PATH[@REV] (under $HF_ENDPOINT if set). Streams a row group at a
    /// time, deduplicates documents exactly, splits train/validation by document id, tokenizes
    /// on every core. A run that is stopped resumes where it was when run again.
    ///
    /// Example: tessera data prepare hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet
    /// --tokenizer llama3/tokenizer.json --out fineweb-edu
    Prepare(PrepareArgs),
    /// Copy a prepared dataset where contributors fetch it: a directory (serve it with any HTTP
    /// server that answers Range requests) or s3://bucket/prefix. Shards already there are
    /// skipped; the manifest goes last.
    Publish {
        /// The prepared dataset's directory.
        dir: PathBuf,
        /// A directory or s3://bucket/prefix.
        dest: String,
    },
    /// Serve a published dataset's directory over HTTP with Range requests (for a local run or
    /// a test; a real run uses any web server or bucket that answers Range requests).
    Serve {
        dir: PathBuf,
        /// Where to listen; port 0 picks a free one (the address is printed).
        #[arg(long, default_value = "127.0.0.1:8090")]
        addr: String,
        /// Append every request to this file, one JSON line each: method, path, Range header,
        /// status and bytes answered.
        #[arg(long, value_name = "FILE")]
        access_log: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// Files, directories, s3://bucket/prefix, http(s)://…/file, hf://datasets/…; none: the
    /// embedded corpus (character-level, with its exact loss floor).
    pub inputs: Vec<String>,
    /// Output directory: manifest.json, tokenizer.json, shards/.
    #[arg(long)]
    pub out: PathBuf,
    /// A Hugging Face tokenizer.json, or `byte` (one token per byte).
    #[arg(long, default_value = "byte")]
    pub tokenizer: String,
    /// The end-of-text token, if the tokenizer_config.json beside the tokenizer does not name it.
    #[arg(long)]
    pub eos_token: Option<String>,
    /// Parquet column / JSONL field holding the text.
    #[arg(long, default_value = "text")]
    pub text_column: String,
    /// Column / field holding the document id (decides its split; the text's hash when absent).
    #[arg(long, default_value = "id")]
    pub id_column: String,
    /// Tokens per shard.
    #[arg(long, default_value_t = tessera_prepare::SHARD_TOKENS)]
    pub shard_tokens: u64,
    /// Documents per thousand held out for validation.
    #[arg(long, default_value_t = tessera_prepare::VALIDATION_PER_MILLE)]
    pub validation_per_mille: u32,
    /// The dataset's name in its manifest (default: the inputs).
    #[arg(long)]
    pub name: Option<String>,
    /// Stop at a row whose text is not UTF-8 instead of skipping and counting it.
    #[arg(long)]
    pub refuse_invalid_utf8: bool,
    /// Tokenizer threads (0: every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Discard an unfinished preparation in --out instead of resuming it.
    #[arg(long)]
    pub restart: bool,
    /// Embedded corpus only: characters of training text (validation gets a tenth).
    #[arg(long, default_value_t = 4_000_000)]
    pub synthetic_chars: usize,
    /// Embedded corpus only: the source's seed.
    #[arg(long, default_value_t = 1234)]
    pub synthetic_seed: u64,
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
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

pub fn data(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Info { manifest: Some(path), .. } => manifest_info(&path),
        DataCommand::Info { manifest: None, data } => data_info(&data),
        DataCommand::Prepare(args) => prepare(&args),
        DataCommand::Serve { dir, addr, access_log } => {
            let (m, id) = tessera_data::Manifest::read(&dir)?;
            let router = tessera_prepare::serve::router(dir, access_log.as_deref())
                .with_context(|| format!("opening the access log {}", access_log.unwrap_or_default().display()))?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(&addr).await?;
                println!("serving dataset {id} ({} shards) at http://{}/", m.shards.len(), listener.local_addr()?);
                tessera_edge::serve(listener, router, tessera_edge::Limits::default(), std::future::pending()).await?;
                Ok::<_, anyhow::Error>(())
            })
        }
        DataCommand::Publish { dir, dest } => {
            let report = tessera_prepare::publish(&dir, &dest)?;
            println!(
                "published {} to {dest}: {} shard(s) uploaded ({}), {} already there",
                report.id,
                report.uploaded,
                crate::args::gib(report.bytes),
                report.skipped
            );
            Ok(())
        }
    }
}

fn prepare(args: &PrepareArgs) -> Result<()> {
    if args.inputs.is_empty() {
        if args.synthetic_chars < 10_000 {
            bail!("--synthetic-chars must be at least 10000");
        }
        let spec = SyntheticSpec { seed: args.synthetic_seed, ..SyntheticSpec::default() };
        let dataset = Dataset::synthetic(spec, args.synthetic_chars, args.synthetic_chars / 10)?;
        let (m, id) = dataset.write_manifest(&args.out, args.shard_tokens)?;
        println!("embedded corpus → {} ({} shards)", args.out.display(), m.shards.len());
        println!("dataset {id}");
        return Ok(());
    }
    // The built-in byte-level tokenizer goes through a file like any other: the manifest names
    // the bytes it was prepared with.
    let scratch = tempfile::tempdir()?;
    let tokenizer = match args.tokenizer.as_str() {
        "byte" => {
            let path = scratch.path().join("tokenizer.json");
            TessTokenizer::byte_level().save(&path)?;
            path
        }
        "char" => bail!(
            "--tokenizer char needs the whole text before it starts; train a BPE tokenizer first (tessera tokenizer train) or use byte"
        ),
        file => PathBuf::from(file),
    };
    let config = tessera_prepare::PrepareConfig {
        inputs: args.inputs.clone(),
        out: args.out.clone(),
        tokenizer,
        eos_token: args.eos_token.clone(),
        columns: tessera_prepare::Columns { text: args.text_column.clone(), id: args.id_column.clone() },
        shard_tokens: args.shard_tokens,
        validation_per_mille: args.validation_per_mille,
        name: args.name.clone().unwrap_or_else(|| args.inputs.join(" ")),
        refuse_invalid_utf8: args.refuse_invalid_utf8,
        threads: args.threads,
        restart: args.restart,
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut announced = false;
    // Without a terminal (a log), a plain line every half minute instead of the spinner.
    let mut logged = std::time::Instant::now();
    let (m, id) = tessera_prepare::prepare(&config, &mut |p| {
        if !announced && p.resumed_shards > 0 {
            eprintln!("resuming: {} shard(s) already done", p.resumed_shards);
        }
        announced = true;
        let tokens = p.stats.train_tokens + p.stats.validation_tokens;
        let line = format!(
            "input {}/{} {} | {} documents, {} duplicates | {} tokens | {} shards | {} tokens/s",
            (p.input + 1).min(p.inputs),
            p.inputs,
            p.input_name,
            human(p.stats.documents_read as f64),
            human(p.stats.duplicates as f64),
            human(tokens as f64),
            p.shards,
            human(tokens as f64 / p.elapsed_s.max(1e-9)),
        );
        if bar.is_hidden() {
            if logged.elapsed().as_secs() >= 30 {
                eprintln!("{line}");
                logged = std::time::Instant::now();
            }
        } else {
            bar.set_message(line);
        }
    })?;
    bar.finish_and_clear();
    let s = &m.stats;
    println!("prepared {} → {}", m.name, args.out.display());
    println!("dataset {id}");
    println!(
        "  documents  {} read: {} train, {} validation; dropped {} duplicates, {} empty, {} not UTF-8",
        s.documents_read, s.train_documents, s.validation_documents, s.duplicates, s.empty, s.invalid_utf8
    );
    println!("  tokens     {} train + {} validation in {} shards", s.train_tokens, s.validation_tokens, m.shards.len());
    println!("next: tessera data publish {} DEST, or tessera train --data {}", args.out.display(), args.out.display());
    Ok(())
}

fn manifest_info(path: &Path) -> Result<()> {
    use tessera_data::manifest::Split;
    let (m, id) = tessera_data::Manifest::read(path)?;
    let t = &m.tokenizer;
    println!("dataset    {id}");
    println!("name       {}", m.name);
    println!("tokenizer  {} (vocabulary {}, end of text {:?} = {})", t.hash, t.vocab_size, t.eos_token, t.eos_id);
    for split in [Split::Train, Split::Validation] {
        let shards: Vec<_> = m.split(split).collect();
        let bytes: u64 = shards.iter().map(|e| e.bytes).sum();
        let docs: u64 = shards.iter().map(|e| e.documents).sum();
        println!(
            "{:<10} {} shards, {} tokens, {} documents, {}",
            format!("{split:?}").to_lowercase(),
            shards.len(),
            m.tokens(split),
            docs,
            crate::args::gib(bytes)
        );
    }
    let s = &m.stats;
    println!(
        "dropped    {} duplicates, {} empty, {} not UTF-8 (of {} read)",
        s.duplicates, s.empty, s.invalid_utf8, s.documents_read
    );
    println!(
        "shards     {} tokens each; {} per mille of documents in validation",
        m.shard_tokens, m.validation_per_mille
    );
    if let Some(f) = m.loss_floor {
        println!("floor      {f:.6} nats/token");
    }
    println!("merkle     {} (RFC 6962, SHA-256 over the shard hashes)", m.merkle_root());
    Ok(())
}

pub fn tokenizer(command: TokenizerCommand) -> Result<()> {
    match command {
        TokenizerCommand::Train { data, vocab, out } => train_tokenizer(&data, vocab, &out),
    }
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
        Some(p) if !Dataset::is_manifest(p) => TextSource::read(p)?.iter().map(|d| d.chars().count()).sum(),
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
