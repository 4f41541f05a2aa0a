//! `tessera bench feed`: does a contributor's data arrive before training needs it? A prepared
//! dataset is served over local HTTP (Range requests); a `ShardCache` downloads through a link
//! limited to what one round needs (a shard per round's compute, times `--headroom`); each round
//! trains H real inner steps on its assigned shard (`assigned_shard`, one data slot) while the
//! next round's shard is prefetched. Reported: each round's stall (time spent waiting for its
//! shard; target 0 after the first), and the peak memory, which holds one shard whatever the
//! dataset's size.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use tch::Device;
use tessera_client::ShardCache;
use tessera_client::link::Bucket;
use tessera_data::manifest::Split;
use tessera_data::{Dataset, SyntheticSpec, TessTokenizer};
use tessera_protocol::data::assigned_shard;
use tessera_train::{TrainConfig, Trainer};

use tessera_model::LlamaConfig;
use tessera_train::bench::memory;

#[derive(Args)]
pub struct BenchFeedArgs {
    /// A prepared dataset's directory (default: the embedded corpus, prepared here).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Embedded corpus only: tokens per shard.
    #[arg(long, default_value_t = 500_000)]
    shard_tokens: u64,
    /// Embedded corpus only: training shards in the dataset (the memory held must not depend
    /// on it).
    #[arg(long, default_value_t = 8)]
    dataset_shards: u64,
    #[arg(long, default_value = "nano")]
    model: String,
    #[arg(long, default_value_t = 6)]
    rounds: u64,
    /// H: inner steps per round.
    #[arg(long, default_value_t = 30)]
    inner_steps: u64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// The link passes this multiple of what a round needs.
    #[arg(long, default_value_t = 1.25)]
    headroom: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
}

pub fn bench_feed(args: &BenchFeedArgs) -> Result<()> {
    if args.rounds < 2 || args.inner_steps == 0 || args.headroom <= 0.0 || args.dataset_shards == 0 {
        bail!("--rounds must be at least 2; --inner-steps, --headroom and --dataset-shards positive");
    }
    let scratch = tempfile::tempdir()?;
    let dir = match &args.data {
        Some(d) => d.clone(),
        None => {
            let dir = scratch.path().join("dataset");
            let chars = (args.shard_tokens * args.dataset_shards) as usize;
            let spec = SyntheticSpec { seed: args.seed, ..SyntheticSpec::default() };
            Dataset::synthetic(spec, chars, chars / 10)?.write_manifest(&dir, args.shard_tokens)?;
            dir
        }
    };
    // From here on the process holds what a contributor would: not the dataset just written.
    memory::reset_peak();
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = tessera_prepare::serve::router(dir, None)?;
    runtime.spawn(async move { axum::serve(listener, router).await });

    // What a round needs: one training shard per round's compute, measured on the first shard.
    let probe = ShardCache::open(std::slice::from_ref(&url), None, &scratch.path().join("probe"), u64::MAX, None)?;
    let m = probe.manifest.clone();
    let train: Vec<usize> = (0..m.shards.len()).filter(|&i| m.shards[i].split == Split::Train).collect();
    let validation = m.shards.iter().position(|e| e.split == Split::Validation).context("no validation shard")?;
    let pick = |round: u64| -> Result<usize> {
        let p = assigned_shard(args.seed, round, 0, 1, train.len() as u32).context("no training shard")?;
        Ok(train[p.shard as usize])
    };
    let tokenizer = TessTokenizer::load_with_eos(&probe.tokenizer_path(), Some(&m.tokenizer.eos_token))?;
    let info = tessera_data::corpus::DatasetInfo {
        name: m.name.clone(),
        loss_floor: m.loss_floor,
        fingerprint: probe.id.clone(),
    };
    let dataset = Dataset { info, tokenizer, train: probe.shard(pick(0)?)?, validation: probe.shard(validation)? };
    let model_config = LlamaConfig::from_preset_or_path(&args.model)?;
    let config = TrainConfig {
        steps: args.rounds * args.inner_steps,
        batch_size: args.batch_size,
        seq_len: model_config.max_position_embeddings as usize,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(config, &model_config, dataset, Device::Cpu)?;
    let started = Instant::now();
    for _ in 0..args.inner_steps {
        trainer.train_step()?;
    }
    let round_s = started.elapsed().as_secs_f64();
    let shard_bytes = m.shards[pick(0)?].bytes as f64;
    let rate = shard_bytes / round_s * args.headroom;
    println!(
        "dataset {} | {} training shards of about {} | a round of {} steps: {round_s:.2} s | link {:.2} Mbit/s ({:.2}× what a round needs)",
        probe.id,
        train.len(),
        crate::args::gib(shard_bytes as u64),
        args.inner_steps,
        rate * 8.0 / 1e6,
        args.headroom
    );

    let cache = Arc::new(ShardCache::open(
        &[url],
        Some(&probe.id),
        &scratch.path().join("cache"),
        4 * shard_bytes as u64,
        Some(Bucket::shared(rate)),
    )?);
    println!("{:>5} {:>8} {:>9} {:>9} {:>9}", "round", "shard", "stall s", "train s", "loss");
    let mut stalls = Vec::new();
    for round in 0..args.rounds {
        let before = cache.stats().stall_s;
        trainer.dataset.train = cache.shard(pick(round)?)?;
        let stall = cache.stats().stall_s - before;
        let next = (round + 1 < args.rounds).then(|| pick(round + 1).map(|i| cache.prefetch(vec![i]))).transpose()?;
        let t = Instant::now();
        let mut loss = 0.0;
        for _ in 0..args.inner_steps {
            loss = trainer.train_step()?.loss;
        }
        let train_s = t.elapsed().as_secs_f64();
        println!("{round:>5} {:>8} {stall:>9.3} {train_s:>9.2} {loss:>9.4}", &m.shards[pick(round)?].hash[..8]);
        stalls.push(stall);
        if let Some(handle) = next {
            // The prefetch runs on; a failed one is retried by the next round's ask.
            drop(handle);
        }
    }
    let stats = cache.stats();
    let after_first: f64 = stalls[1..].iter().sum();
    println!(
        "stall: first round {:.3} s (nothing to prefetch), later rounds {after_first:.3} s in all (target 0) | {} downloaded, {} retries",
        stalls[0],
        crate::args::gib(stats.downloaded_bytes),
        stats.retries
    );
    if let Some(mib) = memory::peak_rss_mib() {
        println!("peak resident memory {mib:.0} MiB (a shard is {})", crate::args::gib(shard_bytes as u64));
    }
    Ok(())
}
