//! `tessera data` and `tessera tokenizer`: corpora, their entropy floor, prepared shards and
//! trained tokenizers.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Subcommand;
use tessera_data::{Dataset, SyntheticSource, SyntheticSpec, TessTokenizer, TextSource};

use crate::args::{DataArgs, load_dataset};

#[derive(Subcommand)]
pub enum DataCommand {
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
        DataCommand::Info { data } => data_info(&data),
        DataCommand::Prepare { data, out, shard_tokens } => {
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
    }
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
