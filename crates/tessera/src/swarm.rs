//! `tessera hub`, `tessera contribute` and `tessera demo`: DiLoCo over the network.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tch::Device;
use tessera_contributor::{Contributor, ContributorConfig, Outcome, inner_config, run_dataset};
use tessera_data::Dataset;
use tessera_hub::{Db, Hub, NewRun, Store};
use tessera_model::{Llama, LlamaConfig, save_checkpoint};
use tessera_protocol::api::{
    AttestationPolicy, ContestSpec, DataSource, DataSpec, HubStatus, InnerSpec, OuterSpec, RunInfo,
};
use tessera_protocol::{Codec, RunSpec, TensorSpec, decode_weights};
use tessera_train::diloco::{read_params, write_params};
use tessera_train::trainer::{describe_eval, print_above};
use tessera_train::{EvalStats, Trainer};

use crate::commands::{gib, load_dataset, setup_runtime};
use crate::{DataArgs, RuntimeArgs};

fn parse_codec(s: &str) -> Result<Codec, String> {
    s.parse()
}

/// What defines a run (used by `tessera hub` when it creates one, and by `tessera demo`).
#[derive(Args, Clone)]
pub struct RunArgs {
    /// A preset name (`tessera model info` lists them) or a config.json.
    #[arg(long, default_value = "nano")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// H: inner AdamW steps per round.
    #[arg(long, default_value_t = 50)]
    inner_steps: u64,
    /// Outer rounds: the run finishes after this many.
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Sequences per contributor per inner step.
    #[arg(long, default_value_t = 12)]
    batch_size: u32,
    /// Tokens per sequence (default: the model's context length).
    #[arg(long)]
    seq_len: Option<u32>,
    /// Inner peak learning rate (cosine over the run's inner steps).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Inner warmup steps (default: 10% of the run's inner steps, at most 100).
    #[arg(long)]
    warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    #[arg(long, default_value_t = 0.7)]
    outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    outer_momentum: f32,
    /// Codec of uploaded pseudo-gradients: f32, bf16, int8[:block], int4[:block], topk:chunk:k.
    #[arg(long, default_value = "int8:64", value_parser = parse_codec)]
    codec: Codec,
    /// Codec of the per-round weight updates contributors download.
    #[arg(long, default_value = "int8:64", value_parser = parse_codec)]
    broadcast_codec: Codec,
    /// Per-round decay of each contributor's error-feedback residual: 1 is plain error
    /// feedback; e.g. 0.95 with --outer-momentum 0 --outer-lr 1 makes the residual the momentum
    /// (SparseLoCo), the better choice for top-k
    #[arg(long, default_value_t = 1.0)]
    feedback_decay: f32,
    /// A round closes when this many submissions are in…
    #[arg(long, default_value_t = 4)]
    quorum: u32,
    /// …or this many seconds after its first submission.
    #[arg(long, default_value_t = 120.0)]
    deadline: f64,
    /// Accept submissions trained from up to this many rounds ago…
    #[arg(long, default_value_t = 1)]
    max_staleness: u64,
    /// …weighted by this to the power of their staleness.
    #[arg(long, default_value_t = 0.5)]
    staleness_decay: f64,
    /// Seed of the initial weights and of every contributor's data windows.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// How each round's pseudo-gradients are combined: mean, norm-clip[:factor],
    /// trimmed-mean[:trim], median, centered-clip[:factor[:iters]] (default: centered-clip with
    /// --scored, else mean).
    #[arg(long)]
    aggregation: Option<tessera_protocol::Aggregation>,
    /// Grow the model into a later phase: MODEL:ROUNDS[:TOP][:loss=X] (a preset or config.json;
    /// that phase's rounds; in a scored run how many of the leaderboard's top may train in it;
    /// and a loss that ends it early), repeatable, in order. --rounds is then the first phase's
    /// rounds. The hub grows the model function-preservingly at each phase boundary;
    /// contributors switch on their own.
    #[arg(long, value_name = "MODEL:ROUNDS")]
    grow_to: Vec<String>,
    /// Layer-sharded training: each contributor trains and submits only one of this many
    /// contiguous groups of layers (plus the shared embedding and head); unscored runs.
    #[arg(long, default_value_t = 1)]
    fragments: u32,
    /// With --grow-to: the first phase also ends once a round's mean inner loss is at or below
    /// this (the next phase gets the rounds left).
    #[arg(long)]
    until_loss: Option<f64>,
    /// The usage economy: the hex Ed25519 public key of the API operator (`tessera keygen`,
    /// then `tessera economy close --key` with it), the only one who may close epochs of served
    /// usage into this run's ledger.
    #[arg(long, value_name = "HEX")]
    operator: Option<String>,
    /// With --operator: the share of each epoch's revenue that funds the next phase.
    #[arg(long, default_value_t = 0.2)]
    funding_share: f64,
    /// With --operator: tokens held from the start (e.g. the sale that funded the run), a TOML
    /// file of `HOLDER = AMOUNT` lines; written into the ledger when the run is created.
    #[arg(long)]
    allocations: Option<PathBuf>,
    #[command(flatten)]
    contest: ContestArgs,
}

/// Scoring, ratings, rewards and promotion.
#[derive(Args, Clone)]
pub struct ContestArgs {
    /// Score every submission with a validator (`tessera validate`) before aggregating: weights
    /// from scores, ratings, rewards and the leaderboard.
    #[arg(long)]
    scored: bool,
    /// Reward units each round emits, split by score.
    #[arg(long, default_value_t = 1_000_000)]
    reward_units: u64,
    /// Reward share ∝ score^power.
    #[arg(long, default_value_t = 2.0)]
    reward_power: f64,
    /// Aggregate only the best N scores (default: every positive one).
    #[arg(long)]
    top: Option<u32>,
    /// Held-out windows per score.
    #[arg(long, default_value_t = 32)]
    eval_windows: u32,
    /// Assigned windows per submission in the data-fit check.
    #[arg(long, default_value_t = 16)]
    fit_windows: u32,
    /// Aggregate unscored if no scores arrive this many seconds after submissions close.
    #[arg(long, default_value_t = 600.0)]
    score_timeout: f64,
    /// At the phase boundary, this many contributors at the top of the leaderboard qualify for
    /// the next phase.
    #[arg(long, default_value_t = 10)]
    promote_top: u32,
    /// The boundary: after this round is published (default: the run's last); everyone else
    /// keeps contributing to this run.
    #[arg(long)]
    promote_at: Option<u64>,
    /// Seal submissions with HPKE to an attested validator (with --scored): the hub stores
    /// only ciphertext, and the validator settles rounds and signs the reward ledger.
    #[arg(long, requires = "scored")]
    sealed: bool,
    /// A SEV-SNP launch measurement (96 hex digits) the validator may run (repeatable).
    #[arg(long, requires = "sealed")]
    sev_snp_measurement: Vec<String>,
    /// A TDX MRTD (96 hex digits) the validator may run (repeatable).
    #[arg(long, requires = "sealed")]
    tdx_mrtd: Vec<String>,
    /// A TDX TCB status accepted besides UpToDate (e.g. SWHardeningNeeded; repeatable).
    #[arg(long, requires = "sealed")]
    tdx_status: Vec<String>,
    /// DEVELOPMENT ONLY, INSECURE: accept a validator with no TEE (its software attestation
    /// proves nothing). Shown as INSECURE in logs, the API and every ledger entry it signs.
    #[arg(long, requires = "sealed")]
    insecure_dev_tee: bool,
}

impl ContestArgs {
    fn spec(&self) -> Option<ContestSpec> {
        self.scored.then_some(ContestSpec {
            reward_units: self.reward_units,
            reward_power: self.reward_power,
            top: self.top,
            eval_windows: self.eval_windows,
            fit_windows: self.fit_windows,
            score_timeout_ms: (self.score_timeout * 1000.0) as u64,
            promote_top: self.promote_top,
            promote_at: self.promote_at,
        })
    }

    fn trust(&self) -> Option<AttestationPolicy> {
        let mut statuses = self.tdx_status.clone();
        if !statuses.is_empty() && !statuses.iter().any(|s| s == "UpToDate") {
            statuses.push("UpToDate".into());
        }
        self.sealed.then(|| AttestationPolicy {
            sev_snp_measurements: self.sev_snp_measurement.iter().map(|m| m.to_ascii_lowercase()).collect(),
            tdx_mrtds: self.tdx_mrtd.iter().map(|m| m.to_ascii_lowercase()).collect(),
            tdx_statuses: statuses,
            allow_insecure_dev: self.insecure_dev_tee,
        })
    }
}

#[derive(Args)]
pub struct HubArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Metadata database: sqlite://FILE or postgres://…
    #[arg(long, default_value = "sqlite://runs/hub/hub.db")]
    database: String,
    /// Blob store: a directory, or s3://bucket[/prefix] (AWS_* environment variables).
    #[arg(long, default_value = "runs/hub/store")]
    store: String,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Write the address actually bound to this file.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// The bearer token `tessera validator` must present (scored runs).
    #[arg(long, env = "TESSERA_VALIDATOR_TOKEN", hide_env_values = true)]
    validator_token: Option<String>,
    /// The hub's Ed25519 key (created, owner-only, if missing): it signs the run's ledger
    /// genesis, assignments and run info. A run must be served with the key it was created with.
    #[arg(long, default_value = "runs/hub/hub-key.pem")]
    key: PathBuf,
}

#[derive(Args)]
pub struct ContributeArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    hub: String,
    /// Identity, inner optimizer state and cached weights; reuse it to rejoin after a restart.
    #[arg(long, default_value = "runs/contributor")]
    state_dir: PathBuf,
    /// A name shown on the hub's status page.
    #[arg(long, default_value = "anonymous")]
    name: String,
    /// Your Ed25519 identity (`tessera keygen`); default: identity.pem in the state directory,
    /// created if missing. Every request is signed with it; rewards are credited to it.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Training data, for runs that do not use the embedded corpus (must match the run's fingerprint).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokenizer for --data: `char`, `byte` or a tokenizer.json.
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// Stop after this many rounds (default: until the run finishes).
    #[arg(long)]
    max_rounds: Option<u64>,
    /// Keep retrying an unreachable hub for this many seconds.
    #[arg(long, default_value_t = 300)]
    patience: u64,
    /// TESTING TOOL — attack the run instead of helping it, to check the hub and validator:
    /// nan, noise, sign-flip, scale, alie, ipm, zero, lazy, stale, replay, wrong-data, copy,
    /// copy-noise. Never use on a run you do not own.
    #[arg(long)]
    adversary: Option<tessera_contest::Adversary>,
    /// Emulate a slower uplink: upload no faster than this many megabits per second (a token
    /// bucket over every submission).
    #[arg(long, value_name = "MBPS")]
    max_upload_mbps: Option<f64>,
    /// Emulate a slower downlink: download checkpoints and updates no faster than this many
    /// megabits per second.
    #[arg(long, value_name = "MBPS")]
    max_download_mbps: Option<f64>,
    /// Keep training while talking to the hub: upload each round's pseudo-gradient and
    /// download the next checkpoint while the next round already trains. That round starts from
    /// an estimate of the hub's next weights (its outer step, with this contributor's own
    /// pseudo-gradient for the mean) and moves onto the real ones as soon as they arrive.
    /// Alone on a run it loses nothing. Among several contributors the steps trained before
    /// the real weights arrive are worth less: with short rounds (H = 20) the loss after the
    /// same rounds was several percent higher, with H = 50 within 1% (docs/benchmarks.md).
    #[arg(long)]
    overlap: bool,
    /// Write a JSON line per submitted round, then one with the totals, to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Megabits per second as bytes per second; refuses what is not a positive finite rate.
fn mbps(flag: &str, v: Option<f64>) -> Result<Option<f64>> {
    match v {
        Some(m) if m.is_finite() && m > 0.0 => Ok(Some(m * 1e6 / 8.0)),
        Some(m) => bail!("{flag} must be a positive number of megabits per second, not {m}"),
        None => Ok(None),
    }
}

#[derive(Args)]
pub struct DemoArgs {
    /// Contributor processes.
    #[arg(long, default_value_t = 4)]
    contributors: usize,
    /// Working directory: database, store, contributor state, logs and the final checkpoint.
    #[arg(long, default_value = "runs/swarm")]
    dir: PathBuf,
    /// The seven-phase demo ladder: start from `ladder1` and grow through `ladder7` (presets
    /// small enough for two cores), --rounds rounds per phase (default here: 4); with --scored,
    /// each phase after the first admits the top --promote-top of the leaderboard.
    #[arg(long)]
    phases: bool,
    /// Contributors overlap their uploads and downloads with training (`contribute --overlap`).
    #[arg(long)]
    overlap: bool,
    /// Each contributor uploads no faster than this (`contribute --max-upload-mbps`).
    #[arg(long, value_name = "MBPS")]
    max_upload_mbps: Option<f64>,
    /// Each contributor downloads no faster than this (`contribute --max-download-mbps`).
    #[arg(long, value_name = "MBPS")]
    max_download_mbps: Option<f64>,
    #[command(flatten)]
    run: RunArgs,
}

/// A finished local run: what the hub reported, the final model's evaluation, and each
/// contributor's totals.
pub struct SwarmRun {
    pub info: RunInfo,
    pub status: HubStatus,
    pub eval: EvalStats,
    pub elapsed: f64,
    pub final_dir: PathBuf,
    /// A line about the verified ledger (sealed runs).
    pub ledger_line: Option<String>,
    /// Per contributor, the totals from its `--report` (absent if it wrote none).
    pub contributors: Vec<Option<tessera_contributor::Summary>>,
}

/// The later phases of `--grow-to`: each model planned as a function-preserving growth of the
/// one before (so its config and tensor table are fixed now).
fn grow_phases(args: &RunArgs, first: &LlamaConfig) -> Result<Vec<tessera_protocol::api::PhaseSpec>> {
    let mut prev = first.clone();
    let mut phases = Vec::new();
    for (i, g) in args.grow_to.iter().enumerate() {
        let parts: Vec<&str> = g.split(':').collect();
        let [model, rounds, extra @ ..] = parts.as_slice() else {
            bail!("--grow-to {g:?}: expected MODEL:ROUNDS[:TOP][:loss=X]");
        };
        let model = *model;
        let rounds: u64 =
            rounds.parse().with_context(|| format!("--grow-to {g:?}: {rounds:?} is not a number of rounds"))?;
        let (mut qualify_top, mut until_loss) = (None, None);
        for e in extra {
            if let Some(x) = e.strip_prefix("loss=") {
                until_loss = Some(x.parse::<f64>().with_context(|| format!("--grow-to {g:?}: {x:?} is not a loss"))?);
            } else {
                let t = e.strip_prefix("top=").unwrap_or(e);
                qualify_top = Some(
                    t.parse::<u32>()
                        .with_context(|| format!("--grow-to {g:?}: {t:?} is not a number of contributors"))?,
                );
            }
        }
        let mut target = LlamaConfig::from_preset_or_path(model)?;
        target.vocab_size = prev.vocab_size;
        target.tie_word_embeddings = prev.tie_word_embeddings;
        let seed = args.seed.wrapping_add(1 + i as u64);
        let growth = tessera_model::Growth::plan(&prev, &target, seed)?;
        let tensors = growth
            .to
            .parameter_shapes()
            .into_iter()
            .map(|(name, shape)| TensorSpec { name, shape: shape.iter().map(|&d| d as u64).collect() })
            .collect();
        phases.push(tessera_protocol::api::PhaseSpec {
            name: format!("phase {} ({model})", i + 2),
            model: serde_json::to_value(&growth.to)?,
            tensors,
            rounds,
            seed,
            qualify_top,
            until_loss,
        });
        prev = growth.to;
    }
    Ok(phases)
}

/// The hub's growth between phases: `tessera_model::grow` on the flat buffers the hub keeps.
pub struct TorchGrower;

impl tessera_hub::Grower for TorchGrower {
    fn grow(
        &self,
        from: &RunSpec,
        to: &RunSpec,
        seed: u64,
        theta: &[Vec<f32>],
        momentum: &[Vec<f32>],
        residual: &[Vec<f32>],
    ) -> Result<tessera_hub::Grown, String> {
        use std::collections::HashMap;
        let config = |v: &serde_json::Value| LlamaConfig::from_json(v.clone());
        let growth =
            tessera_model::Growth::plan(&config(&from.model)?, &config(&to.model)?, seed).map_err(|e| e.to_string())?;
        let named = |buffers: &[Vec<f32>]| -> Result<HashMap<String, tch::Tensor>, String> {
            from.tensors
                .iter()
                .zip(buffers)
                .map(|(t, b)| {
                    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                    let v =
                        tch::Tensor::from_slice(b).f_view(shape.as_slice()).map_err(|e| format!("{}: {e}", t.name))?;
                    Ok((t.name.clone(), v))
                })
                .collect()
        };
        let flat = |grown: HashMap<String, tch::Tensor>| -> Result<Vec<Vec<f32>>, String> {
            to.tensors
                .iter()
                .map(|t| {
                    let g = grown.get(&t.name).ok_or_else(|| format!("growth produced no {}", t.name))?;
                    Vec::<f32>::try_from(g.flatten(0, -1)).map_err(|e| e.to_string())
                })
                .collect()
        };
        let err = |e: tessera_model::ModelError| e.to_string();
        Ok(tessera_hub::Grown {
            theta: flat(growth.weights(&named(theta)?).map_err(err)?)?,
            momentum: flat(growth.moments(&named(momentum)?, 1).map_err(err)?)?,
            residual: flat(growth.moments(&named(residual)?, 1).map_err(err)?)?,
        })
    }
}

fn run_spec(args: &RunArgs, dataset: &Dataset, model: &Llama) -> Result<RunSpec> {
    let seq_len = args.seq_len.unwrap_or(model.config.max_position_embeddings as u32);
    let phases = grow_phases(args, &model.config)?;
    let rounds = args.rounds + phases.iter().map(|p| p.rounds).sum::<u64>();
    let total = rounds * args.inner_steps;
    let (tensors, data) = model_tables(model, dataset, &args.data);
    Ok(RunSpec {
        name: format!("{} on {}", args.model, dataset.info.name),
        model: serde_json::to_value(&model.config)?,
        tensors,
        data,
        inner: InnerSpec {
            batch_size: args.batch_size,
            seq_len,
            lr: args.lr,
            min_lr: args.lr / 10.0,
            warmup_steps: args.warmup_steps.unwrap_or((total / 10).clamp(1, 100)),
            grad_clip: args.grad_clip,
            weight_decay: args.weight_decay,
        },
        inner_steps: args.inner_steps,
        rounds,
        outer: OuterSpec { lr: args.outer_lr, momentum: args.outer_momentum, nesterov: true },
        codec: args.codec,
        feedback_decay: args.feedback_decay,
        broadcast_codec: args.broadcast_codec,
        quorum: args.quorum,
        round_deadline_ms: (args.deadline * 1000.0) as u64,
        max_staleness: args.max_staleness,
        staleness_decay: args.staleness_decay,
        seed: args.seed,
        aggregation: args.aggregation.unwrap_or(if args.contest.scored {
            tessera_protocol::Aggregation::DEFAULT
        } else {
            tessera_protocol::Aggregation::Mean
        }),
        contest: args.contest.spec(),
        trust: args.contest.trust(),
        phases,
        fragments: args.fragments,
        until_loss: args.until_loss,
        economy: economy_spec(args)?,
    })
}

/// The run's usage economy from --operator, --funding-share and --allocations.
fn economy_spec(args: &RunArgs) -> Result<Option<tessera_protocol::api::EconomySpec>> {
    let Some(operator) = &args.operator else {
        if args.allocations.is_some() {
            bail!("--allocations needs --operator (who reports the usage that pays holders)");
        }
        return Ok(None);
    };
    let key = tessera_trust::PublicKey::parse(operator).map_err(|e| anyhow::anyhow!("--operator: {e}"))?;
    if !(0.0..=1.0).contains(&args.funding_share) {
        bail!("--funding-share must be from 0 to 1");
    }
    let mut allocations = Vec::new();
    if let Some(path) = &args.allocations {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let table: std::collections::BTreeMap<String, u64> =
            toml::from_str(&text).with_context(|| format!("{}: expected HOLDER = AMOUNT lines", path.display()))?;
        if table.values().any(|&a| a == 0) {
            bail!("{}: every allocation must be positive", path.display());
        }
        allocations = table.into_iter().collect();
    }
    Ok(Some(tessera_protocol::api::EconomySpec {
        operator: key.hex(),
        funding_ppm: (args.funding_share * 1e6).round() as u32,
        allocations,
    }))
}

pub fn hub(args: HubArgs) -> Result<()> {
    // Build the initial model only if the database holds no run yet.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let db = Db::connect(&args.database).await.with_context(|| format!("database {}", args.database))?;
        let store = Store::open(&args.store).with_context(|| format!("store {}", args.store))?;
        let new = if db.load_run().await?.is_none() {
            let r = &args.run;
            let dataset = load_dataset(&r.data)?;
            let mut config = LlamaConfig::from_preset_or_path(&r.model)?;
            config.vocab_size = dataset.tokenizer.vocab_size() as i64;
            let model = Llama::new(&config, Device::Cpu, r.seed)?;
            let spec = run_spec(r, &dataset, &model)?;
            spec.validate().map_err(anyhow::Error::msg)?;
            Some(NewRun { weights: read_params(&model)?, spec })
        } else {
            None
        };
        if let Some(dir) = args.key.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let key = tessera_trust::Identity::load_or_create(&args.key)?;
        let hub = Hub::open(db, store, new, key).await?;
        hub.set_grower(std::sync::Arc::new(TorchGrower));
        if hub.spec.trust.as_ref().is_some_and(|t| t.allow_insecure_dev) {
            tracing::warn!(
                "this run accepts an INSECURE development validator (no TEE): submissions are not protected"
            );
        }
        match (&args.validator_token, &hub.spec.contest) {
            (Some(token), _) => hub.set_validator_token(token),
            (None, Some(_)) => tracing::warn!(
                "a scored run without --validator-token: no validator can report, so every round is aggregated \
                 unscored after its score timeout"
            ),
            (None, None) => {}
        }
        let listener =
            tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
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
        tessera_hub::serve(hub, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
}

/// The training bar's message: the last loss and, with --overlap, the share sent so far of the
/// submission uploading beside the training.
#[derive(Default)]
struct StepMessage {
    loss: String,
    sending: Option<u64>,
}

impl std::fmt::Display for StepMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.loss)?;
        match self.sending {
            Some(p) => write!(f, " · sending {p}%"),
            None => Ok(()),
        }
    }
}

pub fn contribute(args: ContributeArgs) -> Result<()> {
    let device = setup_runtime(&args.runtime)?;
    let data = external_data(&args.data, &args.tokenizer)?;
    let config = ContributorConfig {
        hub: args.hub.trim_end_matches('/').to_owned(),
        state_dir: args.state_dir.clone(),
        name: args.name.clone(),
        key: args.key.clone(),
        device,
        data,
        max_rounds: args.max_rounds,
        patience: Duration::from_secs(args.patience),
        adversary: args.adversary,
        max_upload_bps: mbps("--max-upload-mbps", args.max_upload_mbps)?,
        max_download_bps: mbps("--max-download-mbps", args.max_download_mbps)?,
        overlap: args.overlap,
    };
    if args.overlap && args.adversary.is_some() {
        bail!("--overlap and --adversary do not go together: an attack's rounds are not overlapped");
    }
    let mut report = match &args.report {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("create the report {}", p.display()))?,
        )),
        None => None,
    };
    if let Some(kind) = args.adversary {
        tracing::warn!(%kind, "ADVERSARY MODE (a testing tool): this contributor attacks the run");
    }
    let mut contributor = Contributor::join(config)?;
    eprintln!(
        "tessera contribute: contributor {} in run {} ({}), H = {}, codec {}{}{}",
        contributor.id(),
        contributor.run.run_id,
        contributor.run.spec.name,
        contributor.run.spec.inner_steps,
        contributor.run.spec.codec,
        if contributor.run.spec.trust.is_some() { ", submissions sealed to the attested validator" } else { "" },
        if args.overlap { ", transfers overlapped with training" } else { "" }
    );
    eprintln!("your key {} (rewards are credited to it)", contributor.public_key());
    // Live status on a terminal (hidden when stderr is not one): phase, round, inner step and
    // loss, then the upload (with --overlap, its share sent beside the loss, as the next round
    // trains meanwhile); a line per round stays above it.
    let bar = indicatif::ProgressBar::new(0);
    let training =
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] step {pos}/{len} · loss {msg} · {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let uploading = indicatif::ProgressStyle::with_template(
        "{prefix} uploading [{bar:30}] {bytes}/{total_bytes} · {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let phases = contributor.run.spec.phases.len() + 1;
    let scored = contributor.run.spec.contest.is_some();
    {
        let bar = bar.clone();
        let standing = std::sync::Mutex::new(String::new());
        let overlap = args.overlap;
        let message = std::sync::Mutex::new(StepMessage::default());
        contributor.on_progress(std::sync::Arc::new(move |p: &tessera_contributor::Progress| match *p {
            tessera_contributor::Progress::Standing { rank, of, mean_score, rewards } => {
                if let Ok(mut s) = standing.lock() {
                    let score = mean_score.map_or("–".into(), |s| format!("{s:+.4}"));
                    *s = format!(" · rank {rank}/{of}, mean score {score}, {rewards} units");
                }
            }
            tessera_contributor::Progress::Round { round, phase, steps } => {
                bar.set_style(training.clone());
                let standing = standing.lock().map(|s| s.clone()).unwrap_or_default();
                bar.set_prefix(format!("phase {}/{phases} · round {round}{standing}", phase + 1));
                bar.set_length(steps);
                bar.set_position(0);
                bar.reset_elapsed();
            }
            tessera_contributor::Progress::Step { step, loss } => {
                bar.set_position(step);
                if let Ok(mut m) = message.lock() {
                    m.loss = format!("{loss:.4}");
                    bar.set_message(m.to_string());
                }
            }
            tessera_contributor::Progress::Upload { sent, total } if overlap => {
                if let Ok(mut m) = message.lock() {
                    m.sending = (sent < total).then(|| 100 * sent / total.max(1));
                    bar.set_message(m.to_string());
                }
            }
            tessera_contributor::Progress::Upload { sent, total } => {
                if bar.length() != Some(total) {
                    bar.set_style(uploading.clone());
                    bar.set_length(total);
                }
                bar.set_position(sent);
            }
        }));
    }
    let mut report_error = None;
    let summary = contributor.run(|r| {
        if let Some(w) = report.as_mut()
            && let Err(e) = serde_json::to_writer(&mut *w, r).map_err(std::io::Error::from).and_then(|()| writeln!(w))
        {
            report_error.get_or_insert(e);
        }
        let outcome = match &r.outcome {
            Outcome::Accepted(rc) if rc.staleness > 0 => {
                format!("accepted into round {} at weight {}", rc.round, rc.weight)
            }
            Outcome::Accepted(_) => "accepted".to_owned(),
            Outcome::AlreadyAccepted => "already accepted (an earlier attempt's answer was lost)".to_owned(),
            Outcome::NotUsed(why) => format!("not used: {why}"),
        };
        let waited = r.waited_s.map_or(String::new(), |w| format!(" (+{w:.1} s waiting)"));
        bar.suspend(|| {
            eprintln!(
                "round {:>4}: inner loss {:.4} | {:.1} s training{waited} | ↑ {} ↓ {} | {outcome}",
                r.round,
                r.inner_loss,
                r.train_s,
                gib(r.bytes_up),
                gib(r.bytes_down)
            )
        });
    })?;
    bar.finish_and_clear();
    if scored {
        match contributor.standing() {
            Ok(Some((row, of))) => eprintln!(
                "standing: rank {}/{of} · rating μ−3σ {:.2} · mean score {} · {} reward units · {}",
                row.rank,
                row.ordinal,
                row.mean_score.map_or("–".into(), |s| format!("{s:+.5}")),
                row.rewards,
                if row.qualified { "qualified for the next phase" } else { "not (yet) qualified" }
            ),
            Ok(None) => eprintln!("standing: not on the leaderboard yet"),
            Err(e) => eprintln!("standing: could not read the leaderboard: {e}"),
        }
    }
    eprintln!(
        "tessera contribute: done after {} round(s); training {:.1} s of {:.1} s since the first step \
         ({:.1}% compute utilisation; {:.1} s joining before it)",
        summary.rounds,
        summary.training_s,
        summary.wall_s,
        100.0 * summary.utilisation(),
        summary.joining_s
    );
    if let Some(mut w) = report {
        serde_json::to_writer(&mut w, &summary)?;
        writeln!(w)?;
        w.flush()?;
    }
    if let Some(e) = report_error {
        bail!("writing the report: {e}");
    }
    Ok(())
}

/// A child process whose output goes to a log file.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, log: PathBuf, args: &[String]) -> Result<Proc> {
        Proc::spawn_with(name, log, args, &[])
    }

    fn spawn_with(name: &str, log: PathBuf, args: &[String], env: &[(&str, &str)]) -> Result<Proc> {
        let exe = std::env::current_exe()?;
        let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Proc { name: name.to_owned(), child, log })
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments that recreate `args` on a `tessera hub` command line.
fn run_flags(r: &RunArgs) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "--model".into(),
        r.model.clone(),
        "--inner-steps".into(),
        r.inner_steps.to_string(),
        "--rounds".into(),
        r.rounds.to_string(),
        "--batch-size".into(),
        r.batch_size.to_string(),
        "--lr".into(),
        r.lr.to_string(),
        "--weight-decay".into(),
        r.weight_decay.to_string(),
        "--grad-clip".into(),
        r.grad_clip.to_string(),
        "--outer-lr".into(),
        r.outer_lr.to_string(),
        "--outer-momentum".into(),
        r.outer_momentum.to_string(),
        "--codec".into(),
        r.codec.to_string(),
        "--broadcast-codec".into(),
        r.broadcast_codec.to_string(),
        "--feedback-decay".into(),
        r.feedback_decay.to_string(),
        "--quorum".into(),
        r.quorum.to_string(),
        "--deadline".into(),
        r.deadline.to_string(),
        "--max-staleness".into(),
        r.max_staleness.to_string(),
        "--staleness-decay".into(),
        r.staleness_decay.to_string(),
        "--seed".into(),
        r.seed.to_string(),
        "--synthetic-chars".into(),
        r.data.synthetic_chars.to_string(),
        "--synthetic-seed".into(),
        r.data.synthetic_seed.to_string(),
        "--tokenizer".into(),
        r.data.tokenizer.clone(),
    ];
    if let Some(s) = r.seq_len {
        v.extend(["--seq-len".into(), s.to_string()]);
    }
    if let Some(w) = r.warmup_steps {
        v.extend(["--warmup-steps".into(), w.to_string()]);
    }
    if let Some(d) = &r.data.data {
        v.extend(["--data".into(), d.display().to_string()]);
    }
    if let Some(a) = &r.aggregation {
        v.extend(["--aggregation".into(), a.to_string()]);
    }
    for g in &r.grow_to {
        v.extend(["--grow-to".into(), g.clone()]);
    }
    if r.fragments > 1 {
        v.extend(["--fragments".into(), r.fragments.to_string()]);
    }
    if let Some(l) = r.until_loss {
        v.extend(["--until-loss".into(), l.to_string()]);
    }
    let c = &r.contest;
    if c.scored {
        v.push("--scored".into());
        for (flag, value) in [
            ("--reward-units", c.reward_units.to_string()),
            ("--reward-power", c.reward_power.to_string()),
            ("--eval-windows", c.eval_windows.to_string()),
            ("--fit-windows", c.fit_windows.to_string()),
            ("--score-timeout", c.score_timeout.to_string()),
            ("--promote-top", c.promote_top.to_string()),
        ] {
            v.extend([flag.into(), value]);
        }
        if let Some(t) = c.top {
            v.extend(["--top".into(), t.to_string()]);
        }
        if let Some(at) = c.promote_at {
            v.extend(["--promote-at".into(), at.to_string()]);
        }
        if c.sealed {
            v.push("--sealed".into());
            for m in &c.sev_snp_measurement {
                v.extend(["--sev-snp-measurement".into(), m.clone()]);
            }
            for m in &c.tdx_mrtd {
                v.extend(["--tdx-mrtd".into(), m.clone()]);
            }
            for st in &c.tdx_status {
                v.extend(["--tdx-status".into(), st.clone()]);
            }
            if c.insecure_dev_tee {
                v.push("--insecure-dev-tee".into());
            }
        }
    }
    v
}

fn get_json<T: serde::de::DeserializeOwned>(http: &reqwest::blocking::Client, url: &str) -> Result<T> {
    let r = http.get(url).send().with_context(|| format!("GET {url}"))?;
    if !r.status().is_success() {
        bail!("GET {url}: {}", r.status());
    }
    Ok(r.json()?)
}

pub fn demo(args: DemoArgs) -> Result<()> {
    let r = run_swarm(&args)?;
    summary(&r.info, &r.status, &r.eval, r.elapsed, &r.final_dir);
    if let Some(line) = r.ledger_line {
        println!("{line}");
    }
    Ok(())
}

/// Runs a hub and `--contributors` contributor processes on localhost until the run finishes,
/// then evaluates the final weights.
pub fn run_swarm(args: &DemoArgs) -> Result<SwarmRun> {
    if args.contributors == 0 {
        bail!("--contributors must be at least 1");
    }
    let dir = &args.dir;
    std::fs::create_dir_all(dir)?;
    // A fresh run each time: clear what an earlier demo left here.
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if name.starts_with("hub.")
            || name == "store"
            || name.starts_with("contributor-")
            || name == "final"
            || name == "validator.log"
        {
            if p.is_dir() { std::fs::remove_dir_all(&p)? } else { std::fs::remove_file(&p)? }
        }
    }
    let mut run = RunArgs { quorum: args.run.quorum.min(args.contributors as u32), ..args.run.clone() };
    if args.phases {
        if !run.grow_to.is_empty() || run.model != "nano" {
            bail!("--phases sets the model and its growth itself; leave out --model and --grow-to");
        }
        // 20 rounds is the single-phase default; a ladder phase gets 4 unless told otherwise.
        let per_phase = if run.rounds == 20 { 4 } else { run.rounds };
        let top = run.contest.scored.then(|| format!(":{}", run.contest.promote_top.min(args.contributors as u32)));
        run.model = "ladder1".into();
        run.rounds = per_phase;
        run.grow_to = (2..=7).map(|k| format!("ladder{k}:{per_phase}{}", top.as_deref().unwrap_or(""))).collect();
        // Each phase must still reach its quorum with the contributors it admits.
        if let Some(t) = run.contest.scored.then_some(run.contest.promote_top) {
            run.quorum = run.quorum.min(t.max(1));
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.contributors).max(1);
    println!(
        "tessera demo: a hub and {} contributors on localhost, `{}` on {}, {} rounds × H = {} inner steps, codec {} up / {} down",
        args.contributors,
        run.model,
        if run.data.data.is_some() { "your data" } else { "the embedded corpus" },
        run.rounds,
        run.inner_steps,
        run.codec,
        run.broadcast_codec
    );
    if !run.grow_to.is_empty() {
        let first = LlamaConfig::from_preset_or_path(&run.model)?;
        let phases = grow_phases(&run, &first)?;
        let sizes: Vec<String> = std::iter::once(format!("{} ({} rounds)", run.model, run.rounds))
            .chain(phases.iter().map(|p| {
                let n: u64 = p.tensors.iter().map(TensorSpec::numel).sum();
                format!(
                    "{n} parameters ({} rounds{})",
                    p.rounds,
                    p.qualify_top.map_or(String::new(), |t| format!(", top {t}"))
                )
            }))
            .collect();
        println!("phases, each grown from the one before: {}", sizes.join(" → "));
    }
    println!("logs and state: {}", dir.display());

    let addr_file = dir.join("hub.addr");
    let mut hub_args: Vec<String> = vec![
        "hub".into(),
        "--database".into(),
        format!("sqlite://{}", dir.join("hub.db").display()),
        "--store".into(),
        dir.join("store").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--addr-file".into(),
        addr_file.display().to_string(),
        "--key".into(),
        dir.join("hub.key.pem").display().to_string(),
    ];
    hub_args.extend(run_flags(&run));
    // A scored demo runs a validator too; its token goes to both through the environment.
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness for the validator token: {e}"))?;
    let token = hex::encode(raw);
    let secret = [("TESSERA_VALIDATOR_TOKEN", token.as_str())];
    let mut hub = Proc::spawn_with("hub", dir.join("hub.log"), &hub_args, &secret)?;
    let start = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        if let Some(status) = hub.child.try_wait()? {
            bail!("the hub exited ({status}):\n{}", hub.tail());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the hub did not start within 120 s:\n{}", hub.tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let url = format!("http://{}", addr.trim());
    let mut workers = Vec::new();
    for i in 0..args.contributors {
        let name = format!("contributor-{i}");
        let mut a: Vec<String> = vec![
            "contribute".into(),
            "--hub".into(),
            url.clone(),
            "--state-dir".into(),
            dir.join(&name).display().to_string(),
            "--name".into(),
            name.clone(),
            "--threads".into(),
            threads.to_string(),
            "--report".into(),
            dir.join(format!("{name}.report.jsonl")).display().to_string(),
        ];
        if let Some(d) = &run.data.data {
            a.extend(["--data".into(), d.display().to_string(), "--tokenizer".into(), run.data.tokenizer.clone()]);
        }
        if args.overlap {
            a.push("--overlap".into());
        }
        for (flag, v) in [("--max-upload-mbps", args.max_upload_mbps), ("--max-download-mbps", args.max_download_mbps)]
        {
            if let Some(v) = v {
                a.extend([flag.into(), v.to_string()]);
            }
        }
        workers.push(Proc::spawn(&name, dir.join(format!("{name}.log")), &a)?);
    }
    let _validator = if run.contest.scored {
        let mut a: Vec<String> =
            vec!["validator".into(), "--hub".into(), url.clone(), "--threads".into(), threads.to_string()];
        if run.contest.insecure_dev_tee {
            a.push("--insecure-dev-tee".into());
        }
        if let Some(d) = &run.data.data {
            a.extend(["--data".into(), d.display().to_string(), "--tokenizer".into(), run.data.tokenizer.clone()]);
        }
        Some(Proc::spawn_with("validator", dir.join("validator.log"), &a, &secret)?)
    } else {
        None
    };

    let http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let bar = indicatif::ProgressBar::new(run.rounds);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut reported = 0usize;
    let status: HubStatus = loop {
        let status: HubStatus = get_json(&http, &format!("{url}/v1/status"))?;
        let published: Vec<_> = status.history.iter().filter(|r| r.result_checkpoint.is_some()).collect();
        for r in &published[reported.min(published.len())..] {
            print_above(
                &bar,
                format!(
                    "round {:>3}: {} submissions ({}), inner loss {}, {} up",
                    r.round + 1,
                    r.accepted,
                    r.closed_by.as_deref().unwrap_or("?"),
                    r.mean_inner_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    gib(r.bytes_up)
                ),
            );
        }
        reported = published.len();
        bar.set_length(status.rounds);
        bar.set_position(status.round.min(status.rounds));
        let current = status.history.last().map_or(0, |r| r.accepted);
        bar.set_message(format!(
            "· {current}/{} in · {} up, {} down",
            run.quorum,
            gib(status.bytes_up),
            gib(status.bytes_down)
        ));
        if status.finished {
            break status;
        }
        for w in &mut workers {
            if let Some(code) = w.child.try_wait()?
                && !code.success()
            {
                bar.abandon();
                bail!("{} exited ({code}):\n{}", w.name, w.tail());
            }
        }
        if let Some(code) = hub.child.try_wait()? {
            bar.abandon();
            bail!("the hub exited ({code}):\n{}", hub.tail());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    for w in &mut workers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // Evaluate the final global weights here, where libtorch is.
    let info: RunInfo = get_json(&http, &format!("{url}/v1/run"))?;
    let ledger_line = if info.spec.trust.is_some() {
        let bytes = http.get(format!("{url}/v1/ledger")).send()?.error_for_status()?.bytes()?;
        std::fs::write(dir.join("ledger.bin"), &bytes)?;
        let ledger = tessera_trust::ledger::Ledger::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("the run's ledger does not verify: {e}"))?;
        let insecure = ledger.validators().any(|v| v.insecure);
        Some(format!(
            "ledger: {} entries verified (signatures, chain, Merkle roots, attestations, balances){}; saved to {} \
             (`tessera ledger verify --file` it)",
            ledger.len(),
            if insecure { ", signed by an INSECURE development validator" } else { "" },
            dir.join("ledger.bin").display()
        ))
    } else {
        None
    };
    let bytes = http.get(format!("{url}/v1/checkpoints/{}", info.checkpoint)).send()?.error_for_status()?.bytes()?;
    drop(hub);
    let weights = decode_weights(&bytes, &info.spec.tensors)?;
    let dataset = run_dataset(&info, run.data.data.as_ref().map(|_| load_dataset(&run.data)).transpose()?)?;
    let config = LlamaConfig::from_json(info.spec.model.clone()).map_err(anyhow::Error::msg)?;
    let model = Llama::zeroed(&config, Device::Cpu)?;
    write_params(&model, &weights)?;
    let final_dir = dir.join("final");
    save_checkpoint(&model, Some(&dataset.tokenizer), &final_dir)?;
    let trainer = Trainer::from_model(inner_config(&info, 0), model, dataset)?;
    let eval = EvalStats { step: info.spec.rounds * info.spec.inner_steps, ..trainer.evaluate()? };
    let contributors = (0..args.contributors)
        .map(|i| {
            let text = std::fs::read_to_string(dir.join(format!("contributor-{i}.report.jsonl"))).ok()?;
            serde_json::from_str(text.lines().last()?).ok()
        })
        .collect();
    Ok(SwarmRun { info, status, eval, elapsed, final_dir, ledger_line, contributors })
}

fn summary(info: &RunInfo, status: &HubStatus, eval: &EvalStats, elapsed: f64, final_dir: &Path) {
    let spec = &info.spec;
    let p = spec.num_params();
    let submissions: u64 = status.contributors.iter().map(|c| c.accepted).sum();
    let worker_steps = submissions * spec.inner_steps;
    let tokens = worker_steps * u64::from(spec.inner.batch_size) * u64::from(spec.inner.seq_len);
    // Synchronous data parallel on the same worker-steps: each uploads its f32 gradient and
    // downloads the f32 average at every step.
    let dp = worker_steps * 2 * 4 * p;
    let moved = status.bytes_up + status.bytes_down;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nrun {} finished: {} rounds in {elapsed:.0} s, {} tokens trained",
        info.run_id, spec.rounds, tokens
    );
    let _ = writeln!(out, "final global model: {}", describe_eval(eval));
    let _ = writeln!(
        out,
        "bytes: {} uploaded + {} downloaded = {}; synchronous data parallel would move {} ({:.0}× more)",
        gib(status.bytes_up),
        gib(status.bytes_down),
        gib(moved),
        gib(dp),
        dp as f64 / moved.max(1) as f64
    );
    let _ = writeln!(
        out,
        "\n{:>4}  {:<16} {:>9} {:>9} {:>12} {:>11}",
        "id", "name", "accepted", "rejected", "uploaded", "inner loss"
    );
    for c in &status.contributors {
        let _ = writeln!(
            out,
            "{:>4}  {:<16} {:>9} {:>9} {:>12} {:>11}",
            c.id,
            c.name,
            c.accepted,
            c.rejected,
            gib(c.bytes_up),
            c.mean_inner_loss.map_or("-".into(), |l| format!("{l:.4}"))
        );
    }
    let _ = writeln!(out, "\nfinal checkpoint (Hugging Face format): {}", final_dir.display());
}

#[derive(Args)]
pub struct BenchSwarmArgs {
    /// Simulated contributors, all submitting concurrently.
    #[arg(long, default_value_t = 200)]
    contributors: usize,
    /// Rounds (the quorum is every contributor).
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Model size: parameters, in tensors of 16,384 values.
    #[arg(long, default_value_t = 262_144)]
    params: u64,
    #[arg(long, default_value = "int8:64", value_parser = parse_codec)]
    codec: Codec,
    /// Metadata database (default: SQLite in a temporary directory).
    #[arg(long)]
    database: Option<String>,
    /// Blob store (default: a temporary directory).
    #[arg(long)]
    store: Option<String>,
}

/// Many contributors against one hub over real HTTP on loopback: registration, assignment and
/// submission of real messages; reports errors and submission latency percentiles.
pub fn bench_swarm(args: BenchSwarmArgs) -> Result<()> {
    use tessera_protocol::PseudoGradient;
    use tessera_protocol::api::{Assignment, Registration};

    if args.contributors == 0 || args.rounds == 0 || args.params == 0 {
        bail!("--contributors, --rounds and --params must be positive");
    }
    let tmp = tempfile::tempdir()?;
    let database = args.database.clone().unwrap_or_else(|| format!("sqlite://{}/hub.db", tmp.path().display()));
    let store = args.store.clone().unwrap_or_else(|| tmp.path().join("store").display().to_string());
    let tensor = 16_384u64;
    let tensors: Vec<TensorSpec> = (0..args.params.div_ceil(tensor))
        .map(|i| TensorSpec { name: format!("t{i:04}"), shape: vec![tensor.min(args.params - i * tensor)] })
        .collect();
    let weights: Vec<Vec<f32>> = tensors.iter().map(|t| vec![0.01; t.numel() as usize]).collect();
    let spec = RunSpec {
        name: "bench".into(),
        model: serde_json::json!({}),
        tensors,
        data: DataSpec {
            name: "none".into(),
            fingerprint: String::new(),
            source: DataSource::External,
            loss_floor: None,
        },
        inner: InnerSpec {
            batch_size: 1,
            seq_len: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            grad_clip: 1.0,
            weight_decay: 0.0,
        },
        inner_steps: 1,
        rounds: args.rounds,
        outer: OuterSpec { lr: 0.7, momentum: 0.9, nesterov: true },
        codec: args.codec,
        feedback_decay: 1.0,
        broadcast_codec: args.codec,
        quorum: args.contributors as u32,
        round_deadline_ms: 600_000,
        max_staleness: 1,
        staleness_decay: 0.5,
        seed: 0,
        aggregation: tessera_protocol::Aggregation::Mean,
        contest: None,
        trust: None,
        phases: Vec::new(),
        fragments: 0,
        until_loss: None,
        economy: None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let key = tessera_trust::Identity::generate()?;
        let hub =
            Hub::open(Db::connect(&database).await?, Store::open(&store)?, Some(NewRun { spec, weights }), key).await?;
        let info = hub.info().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tessera_hub::serve(hub, listener, async {
            let _ = stop_rx.await;
        }));
        println!(
            "{} contributors × {} rounds against one hub on loopback: {} parameters, codec {}, database {}",
            args.contributors,
            args.rounds,
            args.params,
            args.codec,
            if database.starts_with("sqlite") { "SQLite" } else { "PostgreSQL" }
        );
        let http = reqwest::Client::builder().pool_max_idle_per_host(args.contributors).build()?;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..args.contributors {
            let (http, url, info) = (http.clone(), url.clone(), info.clone());
            tasks.spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = Vec::new();
                let me = tessera_trust::Identity::generate()?;
                let signed = |path: &str, body: Vec<u8>| -> Result<reqwest::RequestBuilder> {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
                    let mut b = http.post(format!("{url}{path}"));
                    for (k, v) in me.sign_request("POST", path, &body, now)? {
                        b = b.header(k, v);
                    }
                    Ok(b.body(body))
                };
                let name = serde_json::to_vec(&serde_json::json!({"name": format!("sim-{i}")}))?;
                let _reg: Registration = signed("/v1/contributors", name)?.send().await?.json().await?;
                let mut run_id = [0u8; 16];
                hex::decode_to_slice(&info.run_id, &mut run_id)?;
                loop {
                    let a: Assignment = signed("/v1/assignments", Vec::new())?.send().await?.json().await?;
                    if a.finished {
                        break;
                    }
                    let mut base = [0u8; 32];
                    hex::decode_to_slice(&a.base_checkpoint, &mut base)?;
                    let body = tokio::task::spawn_blocking({
                        let info = info.clone();
                        move || -> Result<Vec<u8>> {
                            let deltas: Vec<Vec<f32>> = info
                                .spec
                                .tensors
                                .iter()
                                .map(|t| (0..t.numel()).map(|j| ((j + i as u64) as f32 * 0.37).sin() * 1e-3).collect())
                                .collect();
                            let tensors = info
                                .spec
                                .tensors
                                .iter()
                                .zip(&deltas)
                                .map(|(t, d)| (t.name.as_str(), t.shape.as_slice(), d.as_slice()));
                            Ok(PseudoGradient::build(info.spec.codec, run_id, a.round, base, tensors)?.to_bytes())
                        }
                    })
                    .await??;
                    let t = Instant::now();
                    let r = signed("/v1/submissions", body)?.send().await?;
                    latencies.push(t.elapsed().as_secs_f64());
                    if r.status() != reqwest::StatusCode::ACCEPTED {
                        errors.push(format!("{}: {}", r.status(), r.text().await.unwrap_or_default()));
                    }
                }
                anyhow::Ok((latencies, errors))
            });
        }
        let (mut latencies, mut errors) = (Vec::new(), Vec::new());
        while let Some(joined) = tasks.join_next().await {
            match joined? {
                Ok((l, e)) => {
                    latencies.extend(l);
                    errors.extend(e);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let _ = stop_tx.send(());
        server.await??;
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
        println!(
            "{} submissions in {elapsed:.1} s, {} errors | submission latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            errors.len(),
            pct(0.5) * 1e3,
            pct(0.9) * 1e3,
            pct(0.99) * 1e3,
            pct(1.0) * 1e3
        );
        for e in errors.iter().take(5) {
            println!("error: {e}");
        }
        if !errors.is_empty() {
            bail!("{} submissions failed", errors.len());
        }
        Ok(())
    })
}

#[derive(Args)]
pub struct ValidateArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    hub: String,
    /// The token the hub was started with (`tessera hub --validator-token`).
    #[arg(long, env = "TESSERA_VALIDATOR_TOKEN", hide_env_values = true)]
    token: String,
    /// Training data, for runs that do not use the embedded corpus (must match the run's fingerprint).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Tokenizer for --data: `char`, `byte` or a tokenizer.json.
    #[arg(long, default_value = "char")]
    tokenizer: String,
    /// Stop after scoring this many rounds (default: until the run finishes).
    #[arg(long)]
    max_rounds: Option<u64>,
    /// Keep retrying an unreachable hub for this many seconds.
    #[arg(long, default_value_t = 300)]
    patience: u64,
    /// Sealed runs, SEV-SNP guests: this chip's VCEK (DER), fetched ahead of time from AMD's
    /// key distribution service.
    #[arg(long)]
    vcek: Option<PathBuf>,
    /// Sealed runs, TDX guests: the quote's DCAP collateral (JSON), fetched ahead of time.
    #[arg(long)]
    tdx_collateral: Option<PathBuf>,
    /// The kernel's configfs-tsm report directory.
    #[arg(long, default_value = tessera_validator::tee::TSM_REPORTS)]
    tsm_dir: PathBuf,
    /// DEVELOPMENT ONLY, INSECURE: attest with a software stand-in instead of a TEE (the run
    /// must allow it). Nothing about this validator is proven; it says so everywhere.
    #[arg(long)]
    insecure_dev_tee: bool,
    /// Serve Prometheus metrics (`tessera_validator_*`: rounds and submissions scored, time per
    /// round) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

/// Serves this process's Prometheus metrics at `addr`/metrics from a thread of its own.
fn serve_metrics(addr: std::net::SocketAddr) -> Result<()> {
    tessera_protocol::telemetry::prometheus().context("a metrics recorder is already installed")?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("metrics on {addr}"))?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let Ok(rt) = rt else { return };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            let app = axum::Router::new()
                .route("/metrics", axum::routing::get(|| async { tessera_protocol::telemetry::exposition() }));
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the metrics server stopped");
            }
        });
    })?;
    eprintln!("tessera validator: metrics at http://{addr}/metrics");
    Ok(())
}

pub fn validate(args: ValidateArgs) -> Result<()> {
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr)?;
    }
    let device = setup_runtime(&args.runtime)?;
    let data = external_data(&args.data, &args.tokenizer)?;
    let config = tessera_validator::client::ValidatorConfig {
        hub: args.hub.trim_end_matches('/').to_owned(),
        token: args.token.clone(),
        device,
        data,
        poll: Duration::from_millis(500),
        patience: Duration::from_secs(args.patience),
        attester: Some(if args.insecure_dev_tee {
            tracing::warn!("--insecure-dev-tee: attesting with an INSECURE software stand-in, not a TEE");
            tessera_validator::tee::Attester::InsecureDev
        } else {
            tessera_validator::tee::Attester::Tsm {
                reports: args.tsm_dir.clone(),
                vcek: args.vcek.clone(),
                tdx_collateral: args.tdx_collateral.clone(),
            }
        }),
    };
    let mut validator = tessera_validator::client::Validator::connect(config)?;
    match validator.attestation() {
        Some(v) => eprintln!("tessera validator: attested as {v}; settling rounds of {} as they close", args.hub),
        None => eprintln!("tessera validator: scoring rounds of {} as they close", args.hub),
    }
    let rounds = validator.run(args.max_rounds, |r| {
        eprintln!(
            "round {:>4}: {} submissions scored in {:.1} s ({} windows forward), {} copies, best score {}",
            r.round,
            r.submissions,
            r.cost.seconds,
            r.cost.windows_forward,
            r.copies,
            r.best.map_or("–".into(), |b| format!("{b:.4}"))
        );
    })?;
    eprintln!("tessera validator: scored {rounds} rounds");
    Ok(())
}

#[derive(Args)]
pub struct LeaderboardArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    hub: String,
    /// Print the hub's JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Show at most this many rows.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

pub fn leaderboard(args: LeaderboardArgs) -> Result<()> {
    let url = format!("{}/api/leaderboard", args.hub.trim_end_matches('/'));
    let response = reqwest::blocking::get(&url).with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response.text().with_context(|| format!("GET {url}"))?;
    if !status.is_success() {
        bail!("{url}: {status}: {body}");
    }
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let board: tessera_protocol::api::Leaderboard =
        serde_json::from_str(&body).with_context(|| format!("{url}: unexpected answer"))?;
    println!(
        "run {} at round {}{}",
        board.run_id,
        board.round,
        if board.promoted {
            format!(", phase boundary passed at round {}: the top {} qualified", board.promote_at, board.promote_top)
        } else {
            format!(", the top {} qualify after round {}", board.promote_top, board.promote_at)
        }
    );
    println!(
        "{:>4} {:>5} {:<20} {:>8} {:>7} {:>8} {:>6} {:>8} {:>8} {:>12} {:>10}",
        "rank", "id", "name", "μ−3σ", "μ", "σ", "rounds", "accepted", "rejected", "rewards", "mean score"
    );
    for r in board.rows.iter().take(args.limit) {
        println!(
            "{:>4} {:>5} {:<20} {:>8.2} {:>7.2} {:>8.3} {:>6} {:>8} {:>8} {:>12} {:>10}{}",
            r.rank,
            r.id,
            r.name.chars().take(20).collect::<String>(),
            r.ordinal,
            r.mu,
            r.sigma,
            r.rounds,
            r.accepted,
            r.rejected,
            r.rewards,
            r.mean_score.map_or("–".into(), |s| format!("{s:.4}")),
            if r.qualified { "  qualified" } else { "" }
        );
    }
    Ok(())
}

/// The run spec's tensor table for `model` and its data description (embedded source, or an
/// external dataset checked by fingerprint).
pub(crate) fn model_tables(model: &Llama, dataset: &Dataset, data: &DataArgs) -> (Vec<TensorSpec>, DataSpec) {
    let source = match &data.data {
        None => DataSource::Embedded {
            seed: data.synthetic_seed,
            train_chars: data.synthetic_chars as u64,
            val_chars: data.synthetic_chars as u64 / 10,
        },
        Some(_) => DataSource::External,
    };
    let tensors = model
        .named_parameters()
        .iter()
        .map(|(n, t)| TensorSpec { name: n.clone(), shape: t.size().iter().map(|&d| d as u64).collect() })
        .collect();
    let data = DataSpec {
        name: dataset.info.name.clone(),
        fingerprint: dataset.info.fingerprint.clone(),
        source,
        loss_floor: dataset.info.loss_floor,
    };
    (tensors, data)
}

/// The dataset given with `--data` (for runs whose data is external), if any.
fn external_data(data: &Option<PathBuf>, tokenizer: &str) -> Result<Option<Dataset>> {
    let Some(path) = data else { return Ok(None) };
    let args =
        DataArgs { data: Some(path.clone()), tokenizer: tokenizer.to_owned(), synthetic_chars: 0, synthetic_seed: 0 };
    Ok(Some(load_dataset(&args)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hub's grower, on the flat buffers the hub keeps, computes the grown model's function
    /// exactly: logits before and after match.
    #[test]
    fn the_hubs_grower_preserves_the_function_on_flat_buffers() {
        let small = tessera_model::preset("tiny").unwrap();
        let model = Llama::new(&small, Device::Cpu, 5).unwrap();
        let table = |m: &Llama| -> Vec<TensorSpec> {
            m.named_parameters()
                .iter()
                .map(|(n, t)| TensorSpec { name: n.clone(), shape: t.size().iter().map(|&d| d as u64).collect() })
                .collect()
        };
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let args = <Cli as clap::Parser>::try_parse_from(["x", "--grow-to", "nano:1"]).unwrap().run;
        let phases = grow_phases(&args, &small).unwrap();
        let from = RunSpec { model: serde_json::to_value(&small).unwrap(), tensors: table(&model), ..dummy_spec() };
        let to = RunSpec { model: phases[0].model.clone(), tensors: phases[0].tensors.clone(), ..dummy_spec() };
        let theta = read_params(&model).unwrap();
        let zeros: Vec<Vec<f32>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
        let grown =
            tessera_hub::Grower::grow(&TorchGrower, &from, &to, phases[0].seed, &theta, &zeros, &zeros).unwrap();
        let big = Llama::zeroed(&LlamaConfig::from_json(to.model.clone()).unwrap(), Device::Cpu).unwrap();
        assert_eq!(table(&big), to.tensors);
        write_params(&big, &grown.theta).unwrap();
        let tokens = tch::Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3, 3, 8]).view([1, 8]);
        let (a, b) = (model.forward(&tokens, None).unwrap(), big.forward(&tokens, None).unwrap());
        assert!(f64::try_from((a - b).abs().max()).unwrap() <= 1e-5);
        assert!(grown.momentum.iter().flatten().all(|&v| v == 0.0));
    }

    fn dummy_spec() -> RunSpec {
        serde_json::from_value(serde_json::json!({
            "name": "t", "model": {}, "tensors": [], "data": {"name": "d", "fingerprint": "", "source": {"kind": "external"}},
            "inner": {"batch_size": 1, "seq_len": 8, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 1, "grad_clip": 1.0, "weight_decay": 0.0},
            "inner_steps": 1, "rounds": 2, "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": true}, "codec": "f32",
            "broadcast_codec": "f32", "quorum": 1, "round_deadline_ms": 1000, "max_staleness": 1, "staleness_decay": 0.5, "seed": 1
        }))
        .unwrap()
    }
}
