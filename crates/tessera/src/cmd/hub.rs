//! `tessera hub`: serve a run, described by its flags or by one spec file.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_hub::{Db, Hub, HubConfig, Store};

use crate::spec::{RunArgs, phase_run};

#[derive(Args)]
pub struct HubArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The run's description: a TOML file whose keys are the run flags above (`--print-spec`
    /// writes one). Used when the database holds no run yet; a run flag on the command line
    /// beside it is an error.
    #[arg(long, value_name = "FILE", conflicts_with = "phase")]
    pub spec: Option<PathBuf>,
    /// Start phase N of the plan (`tessera phases`): its model, sequence length, micro-batch,
    /// H, codecs, quorum and scoring, with rounds for its token budget. Run flags given beside
    /// it change those settings; phase 1 needs --data (a prepared dataset, whose manifest
    /// names and hashes its tokenizer).
    #[arg(long, value_name = "N")]
    pub phase: Option<usize>,
    /// Print the run spec the flags (or --spec) describe, as TOML, and exit: edit it, then
    /// serve it with `--spec`.
    #[arg(long)]
    pub print_spec: bool,
    /// Metadata database: sqlite://FILE or postgres://…
    #[arg(long, default_value = "sqlite://runs/hub/hub.db")]
    pub database: String,
    /// Blob store: a directory, or s3://bucket[/prefix] (AWS_* environment variables). With
    /// S3, contributors upload and download straight to and from the bucket on URLs the hub
    /// presigns; the hub moves no submission or checkpoint bytes itself.
    #[arg(long, default_value = "runs/hub/store")]
    pub store: String,
    /// Move every byte through the hub even with an S3 store (for a bucket contributors cannot
    /// reach, e.g. a private endpoint).
    #[arg(long)]
    pub through_hub: bool,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Write the address actually bound to this file.
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
    /// The bearer token `tessera validator` must present (scored runs).
    #[arg(long, env = "TESSERA_VALIDATOR_TOKEN", hide_env_values = true)]
    pub validator_token: Option<String>,
    /// More validators, one per line of FILE: `NAME TOKEN` (blank lines and `#` comments
    /// skipped). A run scored in tasks (--task-size) shares each round among all of them; the
    /// name is what the hub's log and the ledger's fault entries call it. --validator-token
    /// is the validator named `validator`.
    #[arg(long, value_name = "FILE")]
    pub validator_tokens: Option<PathBuf>,
    /// The hub's Ed25519 key (created, owner-only, if missing): it signs the run's ledger
    /// genesis, assignments and run info. A run must be served with the key it was created with.
    #[arg(long, default_value = "runs/hub/hub-key.pem")]
    pub key: PathBuf,
    /// Hand each round's aggregation to `tessera aggregate-worker` processes, split into N
    /// tensor ranges (jobs taken from the PostgreSQL database; the round waits for workers).
    /// 0: this hub aggregates itself.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub aggregate_shards: usize,
    /// Memory for a robust rule's working set (median, trimmed mean, norm or centred
    /// clipping), in MiB: each stage reads every submission a piece at a time so that the
    /// pieces held at once fit, whatever the model's size and the number of submissions
    /// (more reads when it is small). Used here and, through the round's plan, by the workers.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub aggregate_memory: usize,
    /// Request bodies (submissions posted to the hub) held at once, in MiB; a body that does
    /// not fit waits up to 30 s, then is refused as busy. At least one whole submission.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub body_memory: u64,
    /// Signed requests per second one key may make (bursts of ten times as many); 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub rate_per_key: u32,
    /// Serve an unscored run to other machines. Without scores, whoever registers moves the
    /// model by what they submit (the mean takes any key's update as it is): INSECURE unless
    /// everyone who can reach the hub is trusted. Unscored runs listen only on loopback
    /// without this flag.
    #[arg(long)]
    pub allow_unscored: bool,
    #[command(flatten)]
    pub edge: crate::args::EdgeArgs,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// The hub's database (PostgreSQL: postgres://…), where rounds' aggregation jobs wait.
    #[arg(long)]
    pub database: String,
    /// The hub's blob store: a directory every worker and hub sees, or s3://bucket[/prefix]
    /// (AWS_* environment variables).
    #[arg(long)]
    pub store: String,
    /// This worker's name in the job table (default: host and process id).
    #[arg(long)]
    pub name: Option<String>,
}

/// `tessera aggregate-worker`: takes aggregation jobs until interrupted.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let db = Db::connect(&args.database).await.with_context(|| format!("database {}", args.database))?;
        if !db.shared() {
            bail!("aggregation jobs live in PostgreSQL: --database must be postgres://…");
        }
        let store = Store::open(&args.store).with_context(|| format!("store {}", args.store))?;
        let name = args.name.unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}:{}", host.trim(), std::process::id())
        });
        eprintln!("tessera aggregate-worker {name}: taking jobs from {}", redact(&args.database));
        let (done, failed) = tessera_hub::workers::work(&db, &store, &name, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await;
        eprintln!("tessera aggregate-worker {name}: stopped after {done} jobs ({failed} could not be done)");
        Ok(())
    })
}

/// A database URL without its credentials, for logs.
fn redact(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| Some((scheme, rest.rsplit_once('@')?.1))) {
        Some((scheme, host)) => format!("{scheme}://…@{host}"),
        None => url.to_owned(),
    }
}

/// The run `args` describe: its spec file, or its flags (never both).
pub fn run_args(args: &HubArgs) -> Result<RunArgs> {
    if let Some(n) = args.phase {
        return phase_run(n, &args.run);
    }
    let Some(path) = &args.spec else { return Ok(args.run.clone()) };
    let given = args.run.changed()?;
    if !given.is_empty() {
        bail!(
            "--spec {} describes the whole run, so run flags cannot be added to it (given: {}); put them in the file",
            path.display(),
            given.iter().map(|k| format!("--{}", k.replace('_', "-"))).collect::<Vec<_>>().join(", ")
        );
    }
    RunArgs::read(path)
}

/// A phase's model is sized for the phases' vocabulary; a dataset whose tokenizer has another
/// size trains a model of another size, which is said before the run is created.
fn vocabulary_note(phase: usize, model: &str, new: &tessera_hub::NewRun) -> Result<()> {
    let planned = tessera_model::LlamaConfig::from_preset_or_path(model)?;
    let actual = tessera_model::LlamaConfig::from_json(new.spec.model.clone()).map_err(anyhow::Error::msg)?;
    if planned.vocab_size != actual.vocab_size {
        eprintln!(
            "note: phase {phase}'s model {model} is sized for a {}-token vocabulary; this dataset's tokenizer has {}, \
             so the run trains {} parameters instead of {} (`tessera tokenizer train --vocab {}` makes one \
             that matches)",
            planned.vocab_size,
            actual.vocab_size,
            crate::args::human(actual.num_params() as f64),
            crate::args::human(planned.num_params() as f64),
            planned.vocab_size
        );
    }
    Ok(())
}

pub fn hub(args: HubArgs) -> Result<()> {
    let run = run_args(&args)?;
    if args.print_spec {
        print!("{}", run.to_toml()?);
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let db = Db::connect(&args.database).await.with_context(|| format!("database {}", args.database))?;
        let mut store = Store::open(&args.store).with_context(|| format!("store {}", args.store))?;
        if args.through_hub {
            store = store.through_hub();
        }
        // Build the initial model only if the database holds no run yet. Off the async
        // threads: it may fetch a published dataset's manifest with a blocking client.
        let new =
            if db.load_run().await?.is_none() { Some(tokio::task::block_in_place(|| run.new_run())?) } else { None };
        if let (Some(n), Some(new)) = (args.phase, &new) {
            vocabulary_note(n, &run.model, new)?;
        }
        if let Some(dir) = args.key.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let key = tessera_trust::Identity::load_or_create(&args.key)?;
        let config = HubConfig {
            grower: Some(std::sync::Arc::new(tessera_train::TorchGrower)),
            validator_token: args.validator_token.clone(),
            validator_tokens: match &args.validator_tokens {
                Some(path) => read_validator_tokens(path)?,
                None => Vec::new(),
            },
            direct_multipart: None,
            aggregate_shards: args.aggregate_shards,
            aggregate_memory: Some(args.aggregate_memory.saturating_mul(1 << 20)),
            body_bytes: Some(args.body_memory.saturating_mul(1 << 20)),
            key_rate: Some(tessera_edge::Rate {
                per_second: args.rate_per_key,
                burst: args.rate_per_key.saturating_mul(10),
            }),
        };
        let hub = Hub::open(db, store, new, key, config).await?;
        if hub.spec().trust.as_ref().is_some_and(|t| t.allow_insecure_dev) {
            tracing::warn!(
                "this run accepts an INSECURE development validator (no TEE): submissions are not protected"
            );
        }
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        if hub.spec().contest.is_none() && !addr.ip().is_loopback() {
            if !args.allow_unscored {
                bail!(
                    "this run is unscored, so anyone who registers moves the model by what they submit; it is served \
                     on loopback only. Score it (--scored, with a validator), listen on 127.0.0.1, or pass \
                     --allow-unscored if everyone who can reach {addr} is trusted"
                );
            }
            tracing::warn!(
                %addr,
                "INSECURE: an unscored run open to the network: any registered key moves the model at will"
            );
        }
        if let Some(path) = &args.addr_file {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, addr.to_string())?;
            std::fs::rename(&tmp, path)?;
        }
        let info = hub.info().await;
        eprintln!(
            "tessera hub: run {} ({}), round {}/{}, {} parameters, codec {} / broadcast {}, aggregation {}{}, \
             listening on http://{addr}",
            info.run_id,
            info.spec.name,
            info.round,
            info.spec.rounds,
            info.spec.num_params(),
            info.spec.codec,
            info.spec.broadcast_codec,
            info.spec.aggregation,
            match (&info.spec.contest, &info.spec.trust) {
                (_, Some(t)) if t.allow_insecure_dev => ", scored, sealed (INSECURE development validator allowed)",
                (_, Some(_)) => ", scored, sealed to an attested validator",
                (Some(_), None) => ", scored",
                (None, _) => "",
            }
        );
        eprintln!("hub key {} (signs the ledger genesis, assignments and run info)", info.hub_key);
        tessera_hub::serve(hub, listener, args.edge.limits(), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
}

/// `NAME TOKEN` per line; blank lines and `#` comments skipped.
fn read_validator_tokens(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read validator tokens {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(name), Some(token), None) => out.push((name.to_owned(), token.to_owned())),
            _ => bail!("{} line {}: expected `NAME TOKEN`", path.display(), i + 1),
        }
    }
    Ok(out)
}
