//! What defines a run: the flags of `tessera hub` and `tessera demo` ([`RunArgs`]), one TOML
//! file that holds them (`tessera hub --spec run.toml`, written by `--print-spec` and by
//! `tessera demo`), and the [`RunSpec`] a hub creates the run from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use tch::Device;
use tessera_data::Dataset;
use tessera_hub::NewRun;
use tessera_model::{Llama, LlamaConfig};
use tessera_protocol::api::{AttestationPolicy, ContestSpec, DataSource, DataSpec, InnerSpec, OuterSpec, PhaseSpec};
use tessera_protocol::{Codec, RunSpec, TensorSpec};
use tessera_train::diloco::read_params;
use tessera_train::{PhaseTarget, plan_phases};

use crate::args::{DataArgs, clap_defaults, dataset_header, parse_codec};

/// What defines a run (used by `tessera hub` when it creates one, and by `tessera demo`).
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunArgs {
    /// A preset name (`tessera model info` lists them) or a config.json.
    #[arg(long, default_value = "nano")]
    pub model: String,
    #[command(flatten)]
    pub data: DataArgs,
    /// Data slots per round of a run on a published dataset (--data MANIFEST_DIR or URL):
    /// contributor c trains the shard of slot c mod N each round; use at least as many as
    /// contributors, or some will share shards.
    #[arg(long, default_value_t = 64)]
    pub data_slots: u32,
    /// H: inner AdamW steps per round.
    #[arg(long, default_value_t = 50)]
    pub inner_steps: u64,
    /// Outer rounds: the run finishes after this many.
    #[arg(long, default_value_t = 20)]
    pub rounds: u64,
    /// Sequences per contributor per inner step.
    #[arg(long, default_value_t = 12)]
    pub batch_size: u32,
    /// Tokens per sequence (default: the model's context length).
    #[arg(long)]
    pub seq_len: Option<u32>,
    /// Inner peak learning rate (cosine over the run's inner steps).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Inner warmup steps (default: 10% of the run's inner steps, at most 100).
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    #[arg(long, default_value_t = 0.7)]
    pub outer_lr: f32,
    #[arg(long, default_value_t = 0.9)]
    pub outer_momentum: f32,
    /// Codec of uploaded pseudo-gradients: f32, bf16, int8[:block], int4[:block], topk:chunk:k.
    #[arg(long, default_value = "int8:64", value_parser = parse_codec)]
    pub codec: Codec,
    /// Codec of the per-round weight updates contributors download.
    #[arg(long, default_value = "int8:64", value_parser = parse_codec)]
    pub broadcast_codec: Codec,
    /// Per-round decay of each contributor's error-feedback residual: 1 is plain error
    /// feedback; e.g. 0.95 with --outer-momentum 0 --outer-lr 1 makes the residual the momentum
    /// (SparseLoCo), the better choice for top-k
    #[arg(long, default_value_t = 1.0)]
    pub feedback_decay: f32,
    /// A round closes when this many submissions are in…
    #[arg(long, default_value_t = 4)]
    pub quorum: u32,
    /// …or this many seconds after its first submission.
    #[arg(long, default_value_t = 120.0)]
    pub deadline: f64,
    /// Accept submissions trained from up to this many rounds ago…
    #[arg(long, default_value_t = 1)]
    pub max_staleness: u64,
    /// …weighted by this to the power of their staleness.
    #[arg(long, default_value_t = 0.5)]
    pub staleness_decay: f64,
    /// Seed of the initial weights and of every contributor's data windows.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// How each round's pseudo-gradients are combined: mean, norm-clip[:factor],
    /// trimmed-mean[:trim], median, centered-clip[:factor[:iters]] (default: centered-clip with
    /// --scored, else mean).
    #[arg(long)]
    pub aggregation: Option<tessera_protocol::Aggregation>,
    /// Grow the model into a later phase: MODEL:ROUNDS[:TOP][:loss=X] (a preset or config.json;
    /// that phase's rounds; in a scored run how many of the leaderboard's top may train in it;
    /// and a loss that ends it early), repeatable, in order. --rounds is then the first phase's
    /// rounds. The hub grows the model function-preservingly at each phase boundary;
    /// contributors switch on their own.
    #[arg(long, value_name = "MODEL:ROUNDS")]
    pub grow_to: Vec<String>,
    /// Layer-sharded training: each contributor trains and submits only one of this many
    /// contiguous groups of layers (plus the shared embedding and head); unscored runs.
    #[arg(long, default_value_t = 1)]
    pub fragments: u32,
    /// With --grow-to: the first phase also ends once a round's mean inner loss is at or below
    /// this (the next phase gets the rounds left).
    #[arg(long)]
    pub until_loss: Option<f64>,
    /// The usage economy: the hex Ed25519 public key of the API operator (`tessera keygen`,
    /// then `tessera economy close --key` with it), the only one who may close epochs of served
    /// usage into this run's ledger.
    #[arg(long, value_name = "HEX")]
    pub operator: Option<String>,
    /// With --operator: the share of each epoch's revenue that funds the next phase.
    #[arg(long, default_value_t = 0.2)]
    pub funding_share: f64,
    /// With --operator: tokens held from the start (e.g. the sale that funded the run), a TOML
    /// file of `HOLDER = AMOUNT` lines; written into the ledger when the run is created.
    #[arg(long)]
    pub allocations: Option<PathBuf>,
    /// Let the run's token holders steer it by vote: a TOML file of the vote's rules and what may
    /// be changed within which bounds (`voting_rounds`, `quorum_ppm`, `threshold_ppm`,
    /// `min_proposer_balance`, and a `[bounds]` table: `inner_steps = [lo, hi]`, `quorum`,
    /// `outer_lr`, `codecs = ["int8:64", …]`, `phase_start`, `phase_loss`, `promote_top`,
    /// `releases = true`); see docs/governance.md.
    #[arg(long, value_name = "FILE")]
    pub governance: Option<PathBuf>,
    /// Mix another published dataset (a manifest directory or URL, with --data's tokenizer) into
    /// a run on a published dataset, repeatable: each round's data slots are split among the
    /// datasets by --mix-weights.
    #[arg(long, value_name = "DATASET")]
    pub mix_data: Vec<PathBuf>,
    /// With --mix-data: the mixture's weights, one per dataset, --data's first (default: 1 each),
    /// e.g. `3,1`; a steered run may change them by vote.
    #[arg(long, value_name = "W,W,…")]
    pub mix_weights: Option<String>,
    #[command(flatten)]
    pub contest: ContestArgs,
}

/// Scoring, ratings, rewards and promotion.
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContestArgs {
    /// Score every submission with a validator (`tessera validate`) before aggregating: weights
    /// from scores, ratings, rewards and the leaderboard.
    #[arg(long)]
    pub scored: bool,
    /// Reward units each round emits, split by score.
    #[arg(long, default_value_t = 1_000_000)]
    pub reward_units: u64,
    /// Reward share ∝ score^power.
    #[arg(long, default_value_t = 2.0)]
    pub reward_power: f64,
    /// Aggregate only the best N scores (default: every positive one).
    #[arg(long)]
    pub top: Option<u32>,
    /// Held-out windows per score.
    #[arg(long, default_value_t = 32)]
    pub eval_windows: u32,
    /// Assigned windows per submission in the data-fit check.
    #[arg(long, default_value_t = 16)]
    pub fit_windows: u32,
    /// Score each submission at this step: its held-out gain from θ − STEP·Δ, over STEP. A
    /// small step scores what it adds to the round's mean (first order), so honest noise that
    /// the mean averages out does not count against it and a submission pooled from several
    /// workers gains no edge; 1 scores what it does applied alone (docs/competition.md).
    #[arg(long, value_name = "STEP", default_value_t = tessera_protocol::api::DEFAULT_SCORE_STEP)]
    pub score_step: f64,
    /// Aggregate unscored if no scores arrive this many seconds after submissions close.
    #[arg(long, default_value_t = 600.0)]
    pub score_timeout: f64,
    /// At the phase boundary, this many contributors at the top of the leaderboard qualify for
    /// the next phase.
    #[arg(long, default_value_t = 10)]
    pub promote_top: u32,
    /// The boundary: after this round is published (default: the run's last); everyone else
    /// keeps contributing to this run.
    #[arg(long)]
    pub promote_at: Option<u64>,
    /// Publish each round's submissions once the round is published, so anyone can recompute
    /// its scores with `tessera audit` (unsealed runs; a sealed run refuses it at start).
    #[arg(long, requires = "scored")]
    pub publish_submissions: bool,
    /// Share each round's scoring among many validators (the hub's --validator-tokens): split
    /// its submissions into tasks of at most N (at least 8), each scored by whichever validator
    /// asks next, so the work per validator stays bounded as contributors grow.
    #[arg(long, value_name = "N", requires = "scored")]
    pub task_size: Option<u32>,
    /// With --task-size: the share of tasks (drawn from the revealed seed) a second validator
    /// scores too; a disagreement goes to a third, and the validator the two others contradict
    /// is recorded in the ledger.
    #[arg(long, value_name = "SHARE", default_value_t = 0.1)]
    pub double_share: f64,
    /// With --task-size: seconds a validator holds a task before it goes to the next one that
    /// asks (a validator that vanished loses its tasks after this long).
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub task_lease: f64,
    /// With --task-size: two validators' numbers agree within `ABS + REL × |first|`.
    #[arg(long, value_name = "ABS", default_value_t = 1e-4)]
    pub agree_abs: f64,
    #[arg(long, value_name = "REL", default_value_t = 1e-2)]
    pub agree_rel: f64,
    /// Seal submissions with HPKE to an attested validator (with --scored): the hub stores
    /// only ciphertext, and the validator settles rounds and signs the reward ledger.
    #[arg(long, requires = "scored")]
    pub sealed: bool,
    /// A SEV-SNP launch measurement (96 hex digits) the validator may run (repeatable).
    #[arg(long, requires = "sealed")]
    pub sev_snp_measurement: Vec<String>,
    /// A TDX MRTD (96 hex digits) the validator may run (repeatable).
    #[arg(long, requires = "sealed")]
    pub tdx_mrtd: Vec<String>,
    /// A TDX TCB status accepted besides UpToDate (e.g. SWHardeningNeeded; repeatable).
    #[arg(long, requires = "sealed")]
    pub tdx_status: Vec<String>,
    /// DEVELOPMENT ONLY, INSECURE: accept a validator with no TEE (its software attestation
    /// proves nothing). Shown as INSECURE in logs, the API and every ledger entry it signs.
    #[arg(long, requires = "sealed")]
    pub insecure_dev_tee: bool,
}

impl ContestArgs {
    pub fn spec(&self) -> Option<ContestSpec> {
        self.scored.then_some(ContestSpec {
            reward_units: self.reward_units,
            reward_power: self.reward_power,
            top: self.top,
            eval_windows: self.eval_windows,
            fit_windows: self.fit_windows,
            score_step: self.score_step,
            score_timeout_ms: (self.score_timeout * 1000.0) as u64,
            promote_top: self.promote_top,
            promote_at: self.promote_at,
            publish_submissions: self.publish_submissions,
            tasks: self.task_size.map(|size| tessera_protocol::api::TaskSpec {
                size,
                double_share: self.double_share,
                lease_ms: (self.task_lease * 1000.0) as u64,
                tolerance_abs: self.agree_abs,
                tolerance_rel: self.agree_rel,
            }),
        })
    }

    pub fn trust(&self) -> Option<AttestationPolicy> {
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

impl Default for RunArgs {
    fn default() -> Self {
        clap_defaults()
    }
}

impl Default for ContestArgs {
    fn default() -> Self {
        clap_defaults()
    }
}

impl RunArgs {
    /// Reads a run's description (what `tessera hub --print-spec` writes). Whatever it leaves
    /// out takes the flag's default; a key that is no flag is an error naming it.
    pub fn read(path: &Path) -> Result<RunArgs> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read the run spec {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("the run spec {}", path.display()))
    }

    /// The description as TOML, every setting written out.
    pub fn to_toml(&self) -> Result<String> {
        Ok(format!(
            "# A Tessera run: `tessera hub --spec FILE` serves it. Keys are `tessera hub`'s flags (see\n\
             # `tessera hub --help`); relative paths are read from the directory the hub starts in.\n{}",
            toml::to_string(self).context("writing the run spec")?
        ))
    }

    /// Writes the description to `path` (atomically: a sibling, then a rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.to_toml()?).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
    }

    /// Phase `n` of the plan Tessera ships with (`phases.toml`), as the run it starts.
    pub fn for_phase(n: usize) -> Result<RunArgs> {
        let table = crate::plan::phase_run(crate::plan::DEFAULT_PLAN, n)?;
        let args: RunArgs = toml::Value::Table(table).try_into().with_context(|| format!("phase {n}'s run"))?;
        Ok(args)
    }

    /// These settings with every flag `flags` changes from its default put over them (a phase's
    /// run with `--data`, or a shorter sequence for a test).
    pub fn overlay(&self, flags: &RunArgs) -> Result<RunArgs> {
        let changed = flags.changed()?;
        let mut base = toml::Value::try_from(self).context("the run's settings")?;
        let given = toml::Value::try_from(flags).context("the flags")?;
        let (Some(base_table), Some(given_table)) = (base.as_table_mut(), given.as_table()) else {
            bail!("the run's settings are not a table");
        };
        for key in changed {
            if let Some(v) = given_table.get(&key) {
                base_table.insert(key, v.clone());
                continue;
            }
            for (name, nested) in given_table.iter().filter_map(|(k, v)| v.as_table().map(|t| (k, t))) {
                if let Some(v) = nested.get(&key)
                    && let Some(t) = base_table.get_mut(name).and_then(toml::Value::as_table_mut)
                {
                    t.insert(key.clone(), v.clone());
                }
            }
        }
        base.try_into().context("the run's settings")
    }

    /// The settings that differ from the defaults (by flag name, `_` for `-`).
    pub fn changed(&self) -> Result<Vec<String>> {
        let flat = |v: toml::Value| -> Vec<(String, toml::Value)> {
            let mut out = Vec::new();
            for (k, v) in v.as_table().cloned().unwrap_or_default() {
                match v.as_table() {
                    Some(t) => out.extend(t.iter().map(|(k, v)| (k.clone(), v.clone()))),
                    None => out.push((k, v)),
                }
            }
            out
        };
        let now = flat(toml::Value::try_from(self).context("the run's settings")?);
        let default = flat(toml::Value::try_from(RunArgs::default()).context("the default settings")?);
        Ok(now.into_iter().filter(|kv| !default.contains(kv)).map(|(k, _)| k).collect())
    }

    /// The later phases `--grow-to` asks for.
    fn phase_targets(&self) -> Result<Vec<PhaseTarget>> {
        let mut targets = Vec::with_capacity(self.grow_to.len());
        for g in &self.grow_to {
            let parts: Vec<&str> = g.split(':').collect();
            let [model, rounds, extra @ ..] = parts.as_slice() else {
                bail!("--grow-to {g:?}: expected MODEL:ROUNDS[:TOP][:loss=X]");
            };
            let rounds: u64 =
                rounds.parse().with_context(|| format!("--grow-to {g:?}: {rounds:?} is not a number of rounds"))?;
            let (mut qualify_top, mut until_loss) = (None, None);
            for e in extra {
                if let Some(x) = e.strip_prefix("loss=") {
                    until_loss =
                        Some(x.parse::<f64>().with_context(|| format!("--grow-to {g:?}: {x:?} is not a loss"))?);
                } else {
                    let t = e.strip_prefix("top=").unwrap_or(e);
                    qualify_top = Some(
                        t.parse::<u32>()
                            .with_context(|| format!("--grow-to {g:?}: {t:?} is not a number of contributors"))?,
                    );
                }
            }
            let config = LlamaConfig::from_preset_or_path(model)?;
            targets.push(PhaseTarget { model: (*model).to_owned(), config, rounds, qualify_top, until_loss });
        }
        Ok(targets)
    }

    /// The later phases of `--grow-to`: each model planned as a function-preserving growth of
    /// the one before (so its config and tensor table are fixed when the run is created).
    pub fn phases(&self, first: &LlamaConfig) -> Result<Vec<PhaseSpec>> {
        Ok(plan_phases(first, &self.phase_targets()?, self.seed)?)
    }

    /// The run this describes, ready for a hub to create: its spec and initial weights.
    pub fn new_run(&self) -> Result<NewRun> {
        let dataset = dataset_header(&self.data)?;
        let mut config = LlamaConfig::from_preset_or_path(&self.model)?;
        config.vocab_size = dataset.tokenizer.vocab_size() as i64;
        let model = Llama::new(&config, Device::Cpu, self.seed)?;
        let spec = run_spec(self, &dataset, &model)?;
        spec.validate().map_err(anyhow::Error::msg)?;
        Ok(NewRun { weights: read_params(&model)?, spec })
    }
}

/// Phase `n`'s run with the run flags given put over it.
pub fn phase_run(n: usize, flags: &RunArgs) -> Result<RunArgs> {
    let run = RunArgs::for_phase(n)?.overlay(flags)?;
    if run.data.data.is_none() {
        bail!(
            "phase {n} trains on real text: give --data, a dataset prepared with `tessera data prepare` (a \
             directory, or the URL `tessera data publish` put it under); its manifest names and hashes the \
             tokenizer (train one with `tessera tokenizer train`)"
        );
    }
    Ok(run)
}

fn run_spec(args: &RunArgs, dataset: &Dataset, model: &Llama) -> Result<RunSpec> {
    let seq_len = args.seq_len.unwrap_or(model.config.max_position_embeddings as u32);
    let phases = args.phases(&model.config)?;
    let rounds = args.rounds + phases.iter().map(|p| p.rounds).sum::<u64>();
    let total = rounds * args.inner_steps;
    let (tensors, mut data) = model_tables(model, dataset, &args.data, args.data_slots)?;
    mix_data(&mut data, args)?;
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
        governance: governance_spec(args)?,
    })
}

/// The run's usage economy from --operator, --funding-share and --allocations.
fn governance_spec(args: &RunArgs) -> Result<Option<tessera_protocol::api::governance::GovernanceSpec>> {
    let Some(path) = &args.governance else { return Ok(None) };
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let g: tessera_protocol::api::governance::GovernanceSpec =
        toml::from_str(&text).with_context(|| format!("the governance rules {}", path.display()))?;
    g.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some(g))
}

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

/// A published dataset's manifest and identity, from a directory or a URL.
fn read_manifest(source: &str) -> Result<(tessera_data::Manifest, String)> {
    if crate::args::is_url(Path::new(source)) {
        let cache = crate::args::published(source)?;
        return Ok((cache.manifest.clone(), cache.id.clone()));
    }
    Ok(tessera_data::Manifest::read(Path::new(source))?)
}

/// The mixture of a run on published datasets (`--mix-data`, `--mix-weights`): each mixed
/// dataset's manifest read and checked (it must use the run's dataset's tokenizer), its identity
/// and training shards recorded.
fn mix_data(data: &mut DataSpec, args: &RunArgs) -> Result<()> {
    if args.mix_data.is_empty() {
        if args.mix_weights.is_some() {
            bail!("--mix-weights needs --mix-data");
        }
        return Ok(());
    }
    let DataSource::Manifest { urls, mixture, weights, .. } = &mut data.source else {
        bail!("--mix-data mixes published datasets: --data must be one too (a manifest directory or URL)");
    };
    let (own, _) = read_manifest(&urls[0])?;
    for path in &args.mix_data {
        let Some(source) = crate::args::published_source(path)? else {
            bail!("--mix-data {}: not a published dataset (a manifest directory or URL)", path.display());
        };
        let (manifest, id) = read_manifest(&source).with_context(|| format!("--mix-data {}", path.display()))?;
        if manifest.tokenizer.hash != own.tokenizer.hash {
            bail!(
                "--mix-data {}: its tokenizer is not --data's (a mixture trains one model on one vocabulary)",
                path.display()
            );
        }
        let train_shards = manifest.assignable_train_shards();
        if train_shards == 0 {
            bail!("--mix-data {}: it has no training shard", path.display());
        }
        mixture.push(tessera_protocol::api::MixedData {
            name: path.display().to_string(),
            fingerprint: id,
            urls: vec![source],
            train_shards,
        });
    }
    if let Some(w) = &args.mix_weights {
        let parsed: Vec<u32> = w
            .split(',')
            .map(|x| x.trim().parse::<u32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("--mix-weights {w:?}: whole numbers separated by commas"))?;
        weights.push((0, parsed));
    }
    data.source.validate_mixture().map_err(|e| anyhow::anyhow!("--mix-weights: {e}"))?;
    Ok(())
}

/// The run spec's tensor table for `model` and its data description: the embedded source, a
/// published dataset (a manifest directory or URL, which contributors fetch a shard at a time,
/// `data_slots` per round), or an external dataset checked by fingerprint.
pub fn model_tables(
    model: &Llama,
    dataset: &Dataset,
    data: &DataArgs,
    data_slots: u32,
) -> Result<(Vec<TensorSpec>, DataSpec)> {
    let source = match &data.data {
        None => DataSource::Embedded {
            seed: data.synthetic_seed,
            train_chars: data.synthetic_chars as u64,
            val_chars: data.synthetic_chars as u64 / 10,
        },
        Some(path) if crate::args::published_source(path)?.is_some() => {
            let source = crate::args::published_source(path)?.unwrap_or_default();
            let manifest = if crate::args::is_url(path) {
                crate::args::published(&source)?.manifest.clone()
            } else {
                tessera_data::Manifest::read(Path::new(&source))?.0
            };
            if data_slots == 0 {
                anyhow::bail!("--data-slots must be at least 1");
            }
            DataSource::Manifest {
                urls: vec![source],
                train_shards: manifest.assignable_train_shards(),
                slots_per_round: data_slots,
                mixture: Vec::new(),
                weights: Vec::new(),
            }
        }
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
    Ok((tensors, data))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Parser)]
    struct DemoCli {
        #[command(flatten)]
        args: DemoArgs,
    }

    #[derive(Parser)]
    struct HubCli {
        #[command(flatten)]
        args: HubArgs,
    }
    use crate::cmd::demo::{DemoArgs, demo_run, hub_command};
    use crate::cmd::hub::{HubArgs, run_args};

    /// A value other than the default for each run flag `tessera demo` takes (and the hub
    /// serves): the test below fails for a flag missing here, so a new flag gets one.
    const SAMPLES: &[(&str, &str)] = &[
        ("model", "micro"),
        ("data", "corpus.txt"),
        ("tokenizer", "byte"),
        ("synthetic_chars", "50000"),
        ("synthetic_seed", "9"),
        ("data_slots", "9"),
        ("inner_steps", "7"),
        ("rounds", "11"),
        ("batch_size", "5"),
        ("seq_len", "33"),
        ("lr", "0.002"),
        ("warmup_steps", "3"),
        ("weight_decay", "0.05"),
        ("grad_clip", "0.5"),
        ("outer_lr", "0.6"),
        ("outer_momentum", "0.8"),
        ("codec", "int4:32"),
        ("broadcast_codec", "bf16"),
        ("feedback_decay", "0.9"),
        ("quorum", "3"),
        ("deadline", "30"),
        ("max_staleness", "2"),
        ("staleness_decay", "0.25"),
        ("seed", "99"),
        ("aggregation", "median"),
        ("grow_to", "micro:3:loss=1.5"),
        ("fragments", "2"),
        ("until_loss", "2.5"),
        ("operator", "0000000000000000000000000000000000000000000000000000000000000000"),
        ("funding_share", "0.3"),
        ("allocations", "sale.toml"),
        ("governance", "rules.toml"),
        ("mix_data", "code"),
        ("mix_weights", "3,1"),
        ("scored", ""),
        ("reward_units", "77"),
        ("reward_power", "1.5"),
        ("top", "4"),
        ("eval_windows", "9"),
        ("fit_windows", "6"),
        ("score_step", "0.1"),
        ("score_timeout", "12"),
        ("promote_top", "3"),
        ("promote_at", "5"),
        ("publish_submissions", ""),
        ("task_size", "16"),
        ("double_share", "0.25"),
        ("task_lease", "30"),
        ("agree_abs", "0.001"),
        ("agree_rel", "0.05"),
        ("sealed", ""),
        ("sev_snp_measurement", "aa"),
        ("tdx_mrtd", "bb"),
        ("tdx_status", "SWHardeningNeeded"),
        ("insecure_dev_tee", ""),
    ];

    /// Every run flag `tessera demo` accepts reaches the hub it starts: the demo writes the run
    /// as a spec file, the hub reads it back, and each flag set on the demo's command line is
    /// there with its value. (The demo used to copy flags back into argv by hand and dropped
    /// --operator, --funding-share and --allocations.)
    #[test]
    fn every_run_flag_the_demo_accepts_reaches_the_hub() {
        let demo = DemoCli::command();
        let mut ids: Vec<String> = Vec::new();
        let run = RunArgs::augment_args(clap::Command::new("run"));
        for arg in run.get_arguments() {
            ids.push(arg.get_id().to_string());
            assert!(demo.get_arguments().any(|a| a.get_id() == arg.get_id()), "the demo lacks --{}", arg.get_id());
        }
        let mut argv = vec!["demo".to_owned(), "--contributors".into(), "8".into()];
        for id in &ids {
            let (_, value) = SAMPLES.iter().find(|(k, _)| k == id).unwrap_or_else(|| panic!("no sample for --{id}"));
            argv.push(format!("--{}", id.replace('_', "-")));
            if !value.is_empty() {
                argv.push((*value).to_owned());
            }
        }
        let args = DemoCli::try_parse_from(&argv).unwrap().args;
        let run = demo_run(&args).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hub.run.toml");
        run.write(&file).unwrap();
        let hub_argv = hub_command(dir.path(), &file, &dir.path().join("hub.addr"));
        let hub =
            HubCli::try_parse_from(std::iter::once("hub".to_owned()).chain(hub_argv.into_iter().skip(1))).unwrap().args;
        let served = run_args(&hub).unwrap();
        assert_eq!(served, run);
        // Each flag moved its setting away from the default, so none was lost on the way.
        let changed = served.changed().unwrap();
        for id in &ids {
            assert!(changed.contains(id), "--{id} did not reach the hub");
        }
    }

    /// A spec file leaves out what it likes (defaults fill in), names what it got wrong, and a
    /// run flag beside `--spec` is refused.
    #[test]
    fn a_spec_file_fills_in_defaults_and_refuses_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(&file, "rounds = 3\n[contest]\nscored = true\n").unwrap();
        let run = RunArgs::read(&file).unwrap();
        assert_eq!((run.rounds, run.contest.scored, run.model.as_str()), (3, true, "nano"));
        assert_eq!(
            run,
            RunArgs {
                rounds: 3,
                contest: ContestArgs { scored: true, ..ContestArgs::default() },
                ..RunArgs::default()
            }
        );
        std::fs::write(&file, "roundz = 3\n").unwrap();
        let e = format!("{:#}", RunArgs::read(&file).unwrap_err());
        assert!(e.contains("roundz") && e.contains("run.toml"), "{e}");
        std::fs::write(&file, "rounds = 3\n").unwrap();
        let spec = file.to_str().unwrap();
        for flag in [["--rounds", "4"], ["--synthetic-chars", "40000"], ["--reward-units", "5"]] {
            let hub = HubCli::try_parse_from(["hub", "--spec", spec, flag[0], flag[1]]).unwrap().args;
            let e = run_args(&hub).unwrap_err().to_string();
            assert!(e.contains(flag[0]), "{e}");
        }
        let hub = HubCli::try_parse_from(["hub", "--spec", spec, "--listen", "127.0.0.1:0"]).unwrap().args;
        assert_eq!(run_args(&hub).unwrap().rounds, 3);
    }
}
