//! What defines a run ([`RunSpec`]) and its parts: the model's tensor table, the data, the inner
//! and outer optimizers, the codecs, the contest, the attestation policy, the economy and the
//! later phases, with the checks a hub makes before it serves one.

use serde::{Deserialize, Serialize};

use crate::{Aggregation, Codec};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The inner (local AdamW) optimisation every contributor runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InnerSpec {
    pub batch_size: u32,
    pub seq_len: u32,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub grad_clip: f64,
    pub weight_decay: f64,
}

/// Where training data comes from. Contributors build or load it themselves and must arrive at
/// the same fingerprint; the assignment says which windows of it each one trains on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// The embedded synthetic corpus, generated from its seed.
    Embedded { seed: u64, train_chars: u64, val_chars: u64 },
    /// A dataset the contributor supplies (`--data`), checked by fingerprint.
    External,
    /// A published dataset (`tessera data publish`): its manifest's identity is the
    /// fingerprint; contributors fetch from `urls` (mirrors, or a directory) only the shard each
    /// round assigns them (`Assignment::data`, `data::assigned_shard`).
    Manifest {
        urls: Vec<String>,
        /// Training shards handed out: the manifest's first `train_shards` training shards.
        train_shards: u32,
        /// Data slots per round: contributor `c` takes slot `c mod slots_per_round`.
        slots_per_round: u32,
        /// Further published datasets trained on with this one (the same tokenizer): each
        /// round's data slots are split among them by the mixture's weights. Empty: this one.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        mixture: Vec<MixedData>,
        /// The mixture's weights from a round on: (the first round they apply to, one weight for
        /// this dataset then one per `mixture` entry), rounds increasing; a vote of a steered
        /// run appends to it. Empty: weight 1 each.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        weights: Vec<(u64, Vec<u32>)>,
    },
}

/// A published dataset mixed into a manifest run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MixedData {
    pub name: String,
    /// Its manifest's identity (BLAKE3 of the manifest).
    pub fingerprint: String,
    pub urls: Vec<String>,
    /// Training shards handed out: the manifest's first `train_shards`.
    pub train_shards: u32,
}

impl DataSource {
    /// The mixture's weights in effect at `round` (one per dataset, this run's own first);
    /// empty for a source that is not a manifest.
    pub fn weights_at(&self, round: u64) -> Vec<u32> {
        let DataSource::Manifest { mixture, weights, .. } = self else { return Vec::new() };
        weights
            .iter()
            .take_while(|(from, _)| *from <= round)
            .last()
            .map_or_else(|| vec![1; mixture.len() + 1], |(_, w)| w.clone())
    }

    /// Checks a manifest source's mixture: every mixed dataset named and fetchable, weights one
    /// per dataset, from increasing rounds, none all zero.
    pub fn validate_mixture(&self) -> Result<(), String> {
        let DataSource::Manifest { mixture, weights, .. } = self else { return Ok(()) };
        for m in mixture {
            if m.urls.is_empty() || m.train_shards == 0 || m.fingerprint.is_empty() {
                return Err(format!("mixed dataset {:?} needs a URL, a fingerprint and a training shard", m.name));
            }
        }
        let mut last = None;
        for (from, w) in weights {
            if w.len() != mixture.len() + 1 {
                return Err(format!("mixture weights {w:?}: one per dataset, {} in all", mixture.len() + 1));
            }
            if w.iter().all(|&x| x == 0) || w.iter().any(|&x| x > 1_000_000) {
                return Err(format!("mixture weights {w:?}: at most 10⁶ each, not all zero"));
            }
            if last.is_some_and(|l| l >= *from) {
                return Err("mixture weights must come in increasing rounds".into());
            }
            last = Some(*from);
        }
        Ok(())
    }

    /// The data slot contributor `contributor` (the hub's ids count from 0, densely) takes in
    /// a manifest run.
    pub fn data_slot(contributor: u64, slots_per_round: u32) -> u64 {
        contributor % u64::from(slots_per_round.max(1))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    pub name: String,
    /// `DatasetInfo::fingerprint`: BLAKE3 of the tokenised splits.
    pub fingerprint: String,
    pub source: DataSource,
    /// The data's exact entropy rate in nats per token, when it is known (the embedded corpus):
    /// no model's loss can go below it.
    #[serde(default)]
    pub loss_floor: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OuterSpec {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
}

/// Everything that defines a run. Fixed when the run is created, except what its holders change
/// by vote within the bounds of its `governance` (every change recorded in its ledger).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub name: String,
    /// The model's Hugging Face `config.json`.
    pub model: serde_json::Value,
    pub tensors: Vec<TensorSpec>,
    pub data: DataSpec,
    pub inner: InnerSpec,
    /// H: inner steps per round.
    pub inner_steps: u64,
    /// Outer rounds; the run finishes when this many have been published.
    pub rounds: u64,
    pub outer: OuterSpec,
    /// Codec of submitted pseudo-gradients.
    pub codec: Codec,
    /// Per-round decay β of each contributor's error-feedback residual (e ← β·e + Δ): 1 is
    /// plain error feedback; below 1 the residual doubles as a local momentum (SparseLoCo),
    /// usually with outer momentum 0.
    #[serde(default = "no_decay")]
    pub feedback_decay: f32,
    /// Codec of the published per-round weight updates (the hub keeps error feedback).
    pub broadcast_codec: Codec,
    /// A round closes as soon as this many submissions are accepted…
    pub quorum: u32,
    /// …or this long after its first accepted submission.
    pub round_deadline_ms: u64,
    /// Submissions based on a round at most this many rounds old are accepted…
    pub max_staleness: u64,
    /// …with weight `staleness_decay ^ staleness`.
    pub staleness_decay: f64,
    pub seed: u64,
    /// How the round's pseudo-gradients are combined (specs from before this field: the mean).
    #[serde(default = "mean_rule")]
    pub aggregation: Aggregation,
    /// Scoring, ratings and rewards; `None`: every accepted submission counts, nothing is paid.
    #[serde(default)]
    pub contest: Option<ContestSpec>,
    /// Sealed submissions (scored runs): the attestation a validator must present before
    /// contributors seal their pseudo-gradients to it. `None`: submissions travel in the clear.
    #[serde(default)]
    pub trust: Option<AttestationPolicy>,
    /// Later phases, in order: after the rounds before each, the hub grows the model to that
    /// phase's configuration (function-preserving) and the run goes on. `rounds` counts every
    /// phase's rounds; the first phase (`model`, `tensors`) has what the later ones leave.
    #[serde(default)]
    pub phases: Vec<PhaseSpec>,
    /// Layer-sharded training: split the decoder layers into this many contiguous fragments;
    /// a contributor trains and submits only its fragment (slot mod fragments) plus the shared
    /// embedding, final norm and head, and the hub averages each tensor over the submissions
    /// that carry it. 0 or 1: every contributor trains the whole model.
    #[serde(default)]
    pub fragments: u32,
    /// The first phase also ends (and the run grows) once a round's mean inner loss is at or
    /// below this.
    #[serde(default)]
    pub until_loss: Option<f64>,
    /// The usage economy: who may report served usage, and how revenue is split.
    #[serde(default)]
    pub economy: Option<EconomySpec>,
    /// A run steered by its token holders: what they may change by vote, and the vote's rules
    /// (`docs/governance.md`). `None`: the spec stays as created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub governance: Option<super::governance::GovernanceSpec>,
}

/// The usage economy of a run: written into its ledger when the run is created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EconomySpec {
    /// Hex Ed25519 key of the API operator, the only one who may report an epoch's usage.
    pub operator: String,
    /// Parts per million of each epoch's revenue that fund the next phase.
    pub funding_ppm: u32,
    /// Tokens held from the start (e.g. the sale that funded the run): (holder, amount).
    #[serde(default)]
    pub allocations: Vec<(String, u64)>,
}

/// One account's usage in an epoch, as the API operator metered and priced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountUsage {
    pub account: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// In micro-units of the revenue currency.
    pub revenue: u64,
}

/// `POST /v1/economy/epochs`, signed by the operator: closes `epoch` with this usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochReport {
    pub epoch: u64,
    pub usage: Vec<AccountUsage>,
}

/// What closing an epoch wrote to the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochSettled {
    pub epoch: u64,
    pub revenue: u64,
    pub funding: u64,
    pub payable: u64,
    /// (holder, amount), in holder order.
    pub payouts: Vec<(String, u64)>,
    /// Ledger entries written, first and one past the last.
    pub ledger_from: u64,
    pub ledger_to: u64,
}

/// A later phase of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSpec {
    pub name: String,
    /// The grown model's `config.json` (fixed when the run is created).
    pub model: serde_json::Value,
    pub tensors: Vec<TensorSpec>,
    /// Rounds of this phase.
    pub rounds: u64,
    /// Seed of the weights growth adds.
    pub seed: u64,
    /// Only this many contributors, the top of the leaderboard when the phase begins, may train
    /// in it (scored runs); `None`: everyone.
    #[serde(default)]
    pub qualify_top: Option<u32>,
    /// This phase also ends (and the run grows into the next) once a round's mean inner loss is
    /// at or below this; the next phase then has the rounds left.
    #[serde(default)]
    pub until_loss: Option<f64>,
}

/// What a run accepts as a validator's attestation, pinned in its spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationPolicy {
    /// SEV-SNP launch measurements accepted (96 hex digits each).
    #[serde(default)]
    pub sev_snp_measurements: Vec<String>,
    /// TDX MRTD values accepted (96 hex digits each).
    #[serde(default)]
    pub tdx_mrtds: Vec<String>,
    /// TDX TCB statuses accepted; empty means only `UpToDate`.
    #[serde(default)]
    pub tdx_statuses: Vec<String>,
    /// Accept the software attester (development only: anyone can forge it).
    #[serde(default)]
    pub allow_insecure_dev: bool,
}

impl AttestationPolicy {
    pub fn validate(&self) -> Result<(), String> {
        for m in self.sev_snp_measurements.iter().chain(&self.tdx_mrtds) {
            if m.len() != 96 || !m.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("measurement {m:?} is not 96 hex digits"));
            }
        }
        if self.sev_snp_measurements.is_empty() && self.tdx_mrtds.is_empty() && !self.allow_insecure_dev {
            return Err("no measurement is accepted: pin a SEV-SNP or TDX measurement (or allow the insecure development attester)".into());
        }
        Ok(())
    }
}

fn no_decay() -> f32 {
    1.0
}

fn mean_rule() -> Aggregation {
    Aggregation::Mean
}

/// A scored run: each round's submissions close, a validator scores them, and the hub weights,
/// rates and pays by the scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContestSpec {
    /// Reward units each round emits, split among the accepted submissions by score.
    pub reward_units: u64,
    /// Reward share ∝ score^power (of positive, unflagged scores).
    pub reward_power: f64,
    /// Aggregate only the best this many by score (`None`: every positive one).
    pub top: Option<u32>,
    /// Held-out windows per score, and assigned windows per contributor in the data-fit check.
    pub eval_windows: u32,
    pub fit_windows: u32,
    /// The step each submission is scored at: its held-out gain from θ − step·Δ, over step.
    /// A small step measures the first-order gain, linear in Δ: what a submission adds as one
    /// of many in their mean, where the noise a mean averages out no longer costs it — and a
    /// submission pooled from several workers' Δs scores their mean, not more. 1 scores what it
    /// does applied alone (the rule of specs written before this field, which read as 1).
    #[serde(default = "whole_step")]
    pub score_step: f64,
    /// A round whose scores have not arrived this long after its submissions closed is
    /// aggregated unscored (staleness weights only, no rewards, ratings unchanged).
    pub score_timeout_ms: u64,
    /// At the phase boundary, this many contributors at the top of the leaderboard qualify for
    /// the next phase…
    pub promote_top: u32,
    /// …the boundary being the publication of this round (`None`: the run's last); the run goes
    /// on after it for everyone else.
    #[serde(default)]
    pub promote_at: Option<u64>,
    /// Once a round is published, anyone may download its submissions
    /// (`GET /v1/rounds/{r}/submissions/{blob}`) and recompute its scores (`tessera audit`).
    /// Unsealed runs only.
    #[serde(default)]
    pub publish_submissions: bool,
    /// Many validators: each round's submissions are split into scoring tasks, any validator
    /// takes one at a time, and a share of them is scored twice. `None`: one validator scores
    /// every round whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<TaskSpec>,
}

/// A new run's score step: small enough that scores are first-order for Δs within the norm
/// bound (`docs/competition.md`, measured in `tessera bench arena`).
pub const DEFAULT_SCORE_STEP: f64 = 0.05;

fn whole_step() -> f64 {
    1.0
}

/// How a round's scoring is shared among validators (`tessera_contest::tasks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Submissions per task, at most (tasks are of near-equal size, at least 8).
    pub size: u32,
    /// Share of the tasks (drawn from the revealed seed) scored by a second validator; a
    /// disagreement beyond the tolerance goes to a third, and the validator the other two
    /// contradict is recorded in the ledger.
    pub double_share: f64,
    /// A validator holds a task this long; a task whose holder has not reported by then goes
    /// to the next validator that asks.
    pub lease_ms: u64,
    /// Two results agree when every number differs by at most `absolute + relative × |first|`.
    pub tolerance_abs: f64,
    pub tolerance_rel: f64,
}

impl Default for TaskSpec {
    fn default() -> Self {
        TaskSpec { size: 32, double_share: 0.1, lease_ms: 120_000, tolerance_abs: 1e-4, tolerance_rel: 1e-2 }
    }
}

impl TaskSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.size < 8 {
            return Err(format!("tasks of {} submissions: at least 8 (the data-fit check needs controls)", self.size));
        }
        if !(0.0..=1.0).contains(&self.double_share) {
            return Err(format!("a double-scored share of {} is not in [0, 1]", self.double_share));
        }
        if self.lease_ms == 0 {
            return Err("a task lease must be positive".into());
        }
        let ok = |t: f64| t.is_finite() && t >= 0.0;
        if !ok(self.tolerance_abs) || !ok(self.tolerance_rel) {
            return Err("tolerances must be finite and non-negative".into());
        }
        Ok(())
    }
}

impl ContestSpec {
    /// The round whose publication is the phase boundary, in a run of `rounds`.
    pub fn boundary(&self, rounds: u64) -> u64 {
        self.promote_at.unwrap_or(rounds).min(rounds)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.reward_power.is_finite() && self.reward_power > 0.0 && self.reward_power <= 8.0) {
            return Err(format!("reward power {} must be in (0, 8]", self.reward_power));
        }
        if self.top == Some(0) || self.eval_windows == 0 || self.fit_windows == 0 {
            return Err("top, evaluation windows and data-fit windows must be positive".into());
        }
        if self.promote_at == Some(0) {
            return Err("the phase boundary comes after a round: promote_at must be at least 1".into());
        }
        if self.eval_windows > 4096 || self.fit_windows > 4096 {
            return Err("at most 4096 evaluation or data-fit windows".into());
        }
        if !(self.score_step > 0.0 && self.score_step <= 1.0) {
            return Err(format!("a score step of {} is not in (0, 1]", self.score_step));
        }
        if let Some(t) = &self.tasks {
            t.validate().map_err(|e| format!("tasks: {e}"))?;
        }
        Ok(())
    }
}

impl Default for ContestSpec {
    fn default() -> Self {
        ContestSpec {
            reward_units: 1_000_000,
            reward_power: 2.0,
            top: None,
            eval_windows: 32,
            fit_windows: 16,
            score_step: DEFAULT_SCORE_STEP,
            score_timeout_ms: 600_000,
            promote_top: 10,
            promote_at: None,
            publish_submissions: false,
            tasks: None,
        }
    }
}

impl RunSpec {
    /// What taking part in a run of this spec trusts the hub's operator with, in plain words:
    /// what the protocol does not prove. Shown by `GET /v1/run`, the dashboard and the hub's log.
    pub fn operator_trust(&self) -> Vec<String> {
        let mut out = Vec::new();
        // A sealed run's validator draws the seed inside its TEE; the hub sees only the
        // commitment until the round's verdict reveals it.
        if self.contest.is_some() && self.trust.is_none() {
            out.push(
                "the evaluation seed: the hub draws each round's seed and stores it, so its operator can know it \
                 before submissions close (the commitment only proves it was not changed afterwards)"
                    .to_owned(),
            );
        }
        if let (Some(c), None) = (&self.contest, &self.trust) {
            let afterwards = if c.publish_submissions {
                "anyone can recompute them afterwards from the published submissions (tessera audit)"
            } else {
                "this run does not publish its submissions, so only the rewards can be recomputed from them"
            };
            out.push(format!(
                "the scores: the validator is whoever holds the operator's validator token, and its scores are \
                 taken as reported; {afterwards}"
            ));
        }
        if self.trust.is_none() {
            out.push("the submissions: they are stored in the clear, readable by the operator".to_owned());
        }
        out
    }

    pub fn num_params(&self) -> u64 {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// The round phase `k` starts at (phase 0 is the spec's own model).
    pub fn phase_start(&self, k: usize) -> u64 {
        if k == 0 {
            return 0;
        }
        let later: u64 = self.phases.iter().map(|p| p.rounds).sum();
        let first = self.rounds.saturating_sub(later);
        first + self.phases.iter().take(k - 1).map(|p| p.rounds).sum::<u64>()
    }

    /// Phase `k`'s loss target, if it has one.
    pub fn until_loss(&self, k: usize) -> Option<f64> {
        match k.checked_sub(1) {
            None => self.until_loss,
            Some(i) => self.phases.get(i).and_then(|p| p.until_loss),
        }
    }

    /// The phase round `round` belongs to as planned (a finished run's count of rounds: its
    /// last phase); a phase that reached its loss target ends earlier (the hub records when).
    pub fn phase_of(&self, round: u64) -> usize {
        (1..=self.phases.len()).rev().find(|&k| round >= self.phase_start(k)).unwrap_or(0)
    }

    /// The spec as it stands in phase `k`: that phase's model and tensor table.
    pub fn at_phase(&self, k: usize) -> RunSpec {
        match k.checked_sub(1).and_then(|i| self.phases.get(i)) {
            Some(p) => RunSpec { model: p.model.clone(), tensors: p.tensors.clone(), ..self.clone() },
            None => self.clone(),
        }
    }

    /// Indices (into `tensors`) of what fragment `fragment` trains: its layers' tensors and
    /// every tensor outside the layers. All of them when the run is not sharded.
    pub fn fragment_tensors(&self, fragment: u32) -> Vec<usize> {
        let layer = |name: &str| -> Option<u64> { name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok() };
        let layers = self.tensors.iter().filter_map(|t| layer(&t.name)).max().map_or(0, |m| m + 1);
        let f = u64::from(self.fragments.max(1));
        (0..self.tensors.len())
            .filter(|&i| match layer(&self.tensors[i].name) {
                Some(l) if f > 1 => l * f / layers.max(1) == u64::from(fragment) % f,
                _ => true,
            })
            .collect()
    }

    /// The fragment a data slot trains.
    pub fn fragment_of(&self, slot: u64) -> u32 {
        (slot % u64::from(self.fragments.max(1))) as u32
    }

    /// The largest model of the run, in parameters.
    pub fn max_params(&self) -> u64 {
        self.phases
            .iter()
            .map(|p| p.tensors.iter().map(TensorSpec::numel).sum())
            .chain([self.num_params()])
            .max()
            .unwrap_or(0)
    }

    /// Checks what a hub must check before it accepts a spec.
    pub fn validate(&self) -> Result<(), String> {
        self.codec.validate().map_err(|e| format!("codec: {e}"))?;
        self.broadcast_codec.validate().map_err(|e| format!("broadcast codec: {e}"))?;
        crate::ErrorFeedback::check_decay(self.feedback_decay).map_err(|e| e.to_string())?;
        self.aggregation.validate().map_err(|e| format!("aggregation: {e}"))?;
        if let Some(c) = &self.contest {
            c.validate().map_err(|e| format!("contest: {e}"))?;
        }
        if let Some(t) = &self.trust {
            t.validate().map_err(|e| format!("trust: {e}"))?;
            if self.contest.is_none() {
                return Err("sealed submissions need a scored run: only the validator can read them".into());
            }
            if self.contest.as_ref().is_some_and(|c| c.publish_submissions) {
                return Err("a sealed run cannot publish its submissions: the hub holds only ciphertext".into());
            }
            if self.contest.as_ref().is_some_and(|c| c.tasks.is_some()) {
                return Err(
                    "a sealed run is scored by its one attested validator: its submissions are sealed to that \
                     validator's key, so they cannot be split among several"
                        .into(),
                );
            }
        }
        if let Some(g) = &self.governance {
            g.validate().map_err(|e| format!("governance: {e}"))?;
        }
        if self.tensors.is_empty() {
            return Err("the model has no tensors".into());
        }
        if let DataSource::Manifest { urls, train_shards, slots_per_round, .. } = &self.data.source
            && (urls.is_empty() || *train_shards == 0 || *slots_per_round == 0)
        {
            return Err("a manifest source needs a URL, a training shard and a data slot".into());
        }
        self.data.source.validate_mixture()?;
        if self.fragments > 1 {
            let has_layers =
                |f: u32| self.fragment_tensors(f).iter().any(|&i| self.tensors[i].name.starts_with("model.layers."));
            if !(0..self.fragments).all(has_layers) {
                return Err(format!(
                    "{} fragments leave some without a layer: use at most as many as the model has layers",
                    self.fragments
                ));
            }
            if self.contest.is_some()
                || self.trust.is_some()
                || !self.phases.is_empty()
                || self.aggregation != Aggregation::Mean
            {
                return Err("layer-sharded runs are unscored, unsealed, single-phase and use the plain mean".into());
            }
        }
        let later: u64 = self.phases.iter().map(|p| p.rounds).sum();
        if !self.phases.is_empty() && later >= self.rounds {
            return Err(format!("the later phases' {later} rounds leave none of the {} for the first", self.rounds));
        }
        let targets = self.phases.iter().map(|p| p.until_loss).chain([self.until_loss]);
        if targets.flatten().any(|l| !l.is_finite()) {
            return Err("a phase's loss target must be a finite number".into());
        }
        if self.until_loss.is_some() && self.phases.is_empty() {
            return Err("a loss target ends a phase early: it needs a later phase to grow into".into());
        }
        for p in &self.phases {
            if p.tensors.is_empty() || p.rounds == 0 {
                return Err(format!("phase {:?} needs tensors and at least one round", p.name));
            }
            if p.qualify_top.is_some() && self.contest.is_none() {
                return Err(format!("phase {:?} admits the top of the leaderboard: that needs a scored run", p.name));
            }
            if p.qualify_top == Some(0) {
                return Err(format!("phase {:?} would admit nobody", p.name));
            }
        }
        if self.inner_steps == 0 || self.rounds == 0 || self.quorum == 0 {
            return Err("inner steps, rounds and quorum must be positive".into());
        }
        if !(self.staleness_decay > 0.0 && self.staleness_decay <= 1.0) {
            return Err(format!("staleness decay {} must be in (0, 1]", self.staleness_decay));
        }
        if !(self.outer.lr.is_finite() && self.outer.lr > 0.0 && (0.0..1.0).contains(&self.outer.momentum)) {
            return Err("outer lr must be positive and momentum in [0, 1)".into());
        }
        Ok(())
    }
}
