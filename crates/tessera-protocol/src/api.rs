//! The hub's HTTP API messages (JSON), version [`PROTOCOL_VERSION`]. `docs/protocol.md` is the
//! specification; these types are its single implementation, shared by hub and contributor.
//!
//! Decoding is tolerant of unknown fields (a newer peer may add some) and strict about the
//! ones it knows. Every failure the hub reports has a stable [`ErrorCode`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Aggregation, Codec};

/// Bumped on any breaking change to the JSON messages or the binary formats. 2: the inner loss
/// travels in the signed path, and the ledger pins the funding share at genesis.
pub const PROTOCOL_VERSION: u32 = 2;

/// Optional query parameter of a submission: the mean training loss of its inner steps
/// (`POST /v1/submissions?inner_loss=0.8123`). The path a request signs includes its query, so
/// nobody on the way can change what the hub reads.
pub const INNER_LOSS_PARAM: &str = "inner_loss";

/// Where protocol 1 sent the inner loss, outside the signature; the hub refuses a submission
/// that carries it, so an old client learns why instead of having its loss ignored.
pub const UNSIGNED_INNER_LOSS_HEADER: &str = "x-tessera-inner-loss";

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

/// Everything that defines a run. Fixed when the run is created.
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
            score_timeout_ms: 600_000,
            promote_top: 10,
            promote_at: None,
        }
    }
}

impl RunSpec {
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
        }
        if self.tensors.is_empty() {
            return Err("the model has no tensors".into());
        }
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub protocol: u32,
    /// 32 hex digits.
    pub run_id: String,
    pub spec: RunSpec,
    /// The round now collecting submissions (equals `spec.rounds` once finished).
    pub round: u64,
    /// Hex BLAKE3 of the current global weights.
    pub checkpoint: String,
    pub finished: bool,
    /// The current phase; `spec` shows its model and tensor table.
    #[serde(default)]
    pub phase: u32,
    /// The hub's Ed25519 key (hex): it signs this answer, every assignment and the ledger's
    /// genesis (`x-tessera-hub-signature`).
    #[serde(default)]
    pub hub_key: String,
}

/// Registers the request's signing key under a display name. Registering again with the same
/// key returns the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub contributor_id: u64,
    /// The key it is registered under (hex).
    pub public_key: String,
}

/// What a contributor should do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub run_id: String,
    pub finished: bool,
    /// The round to train for: start from its base checkpoint.
    pub round: u64,
    /// Hex BLAKE3 of the base checkpoint.
    pub base_checkpoint: String,
    /// The data slot: which windows of the training split this contributor draws
    /// (`sampler::train_windows(seed, slot, step, …)`).
    pub slot: u64,
    pub seed: u64,
    pub inner_steps: u64,
    /// The global inner step this round starts at, for the inner learning-rate schedule.
    pub schedule_step: u64,
    /// Total inner steps of the run (the schedule's length).
    pub schedule_total: u64,
    /// Hex commitment to this round's evaluation seed (scored runs), revealed once the round's
    /// submissions close: the evaluation data cannot be known while training.
    #[serde(default)]
    pub eval_commitment: Option<String>,
    /// The run's phase (its model): a contributor that trained another one fetches `GET /v1/run`
    /// again and switches.
    #[serde(default)]
    pub phase: u32,
    /// Layer-sharded runs: the fragment to train and submit (`RunSpec::fragment_tensors`).
    #[serde(default)]
    pub fragment: Option<u32>,
}

/// A round waiting for its scores: what the validator must score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoringJob {
    pub round: u64,
    /// The run's phase for this round (its model).
    #[serde(default)]
    pub phase: u32,
    /// Hex BLAKE3 of the round's base checkpoint: the weights the submissions are applied to.
    pub base_checkpoint: String,
    /// The revealed evaluation seed (hex, 32 bytes) and the commitment published with the
    /// round's assignments; a validator checks one against the other.
    pub eval_seed: String,
    pub eval_commitment: String,
    /// In arrival order.
    pub submissions: Vec<JobSubmission>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSubmission {
    pub contributor: u64,
    /// The data slot, the run's inner step its round started at and its inner steps: which
    /// windows it was assigned.
    pub slot: u64,
    pub base_round: u64,
    pub schedule_step: u64,
    pub inner_steps: u64,
    /// Staleness weight.
    pub weight: f64,
    /// Fetch with `GET /v1/validator/submissions/{blob}`.
    pub blob: String,
    pub received_ms: i64,
    /// The contributor's public key (hex).
    #[serde(default)]
    pub contributor_key: String,
}

/// A round's evaluation-seed commitment, and the seed once the round's submissions closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSeed {
    pub round: u64,
    pub commitment: String,
    pub seed: Option<String>,
}

/// The validator's measurements for a round, one per job submission, in the job's order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreReport {
    pub round: u64,
    pub scores: Vec<SubmissionScore>,
    /// The held-out loss of the round's weights on the round's evaluation windows. A scored
    /// run's loss target (`until_loss`) is judged on this, never on the inner losses
    /// contributors report about themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out_loss: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SubmissionScore {
    pub contributor: u64,
    /// Held-out loss before minus after applying the submission alone.
    pub score: f64,
    /// Gain on its assigned windows minus the other submissions' median gain on them; `None`
    /// when it was not in the round's data-fit sample.
    pub data_fit: Option<f64>,
    /// Position in the job of the earlier submission this one copies.
    pub copy_of: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leaderboard {
    pub run_id: String,
    pub round: u64,
    pub finished: bool,
    /// How many qualify for the next phase at the boundary, and when it is (the round whose
    /// publication fixes who qualified).
    pub promote_top: u32,
    pub promote_at: u64,
    /// The boundary has passed: `qualified` is final.
    pub promoted: bool,
    /// Best first.
    pub rows: Vec<LeaderRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderRow {
    pub rank: u64,
    pub id: u64,
    pub name: String,
    /// Weng–Lin rating: skill estimate, its uncertainty, and μ − 3σ (what the rank is by).
    pub mu: f64,
    pub sigma: f64,
    pub ordinal: f64,
    /// Rounds rated.
    pub rounds: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Reward units earned, all rounds.
    pub rewards: u64,
    /// Mean score of its scored submissions.
    pub mean_score: Option<f64>,
    /// Qualified for the next phase at the boundary (frozen then).
    pub qualified: bool,
}

/// `GET /v1/contributors/{id}/history`: a contributor's scored submissions and rating history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContributorHistory {
    pub contributor: u64,
    /// Oldest first.
    pub scores: Vec<ScoredSubmission>,
    /// (round, μ, σ) after each round that changed the rating, oldest first.
    pub ratings: Vec<(u64, f64, f64)>,
    /// Submissions the hub refused, oldest first.
    #[serde(default)]
    pub rejections: Vec<Rejection>,
}

/// A submission the hub refused, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// The round open when it arrived.
    pub round: Option<u64>,
    /// The refusal's `ErrorCode`, snake_case.
    pub code: String,
    pub message: String,
    pub received_ms: i64,
}

/// One scored submission as the round that used it recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredSubmission {
    /// The round it was scored in, and the round it was trained from.
    pub round: u64,
    pub base_round: u64,
    pub score: Option<f64>,
    pub data_fit: Option<f64>,
    /// Why it earned nothing (`copy`, `non_positive`, `malformed`…), if it did not.
    pub flag: Option<String>,
    pub weight: f64,
    pub reward: u64,
}

/// A round as the hub announces it (`GET /v1/rounds/{r}`, signed): what it starts from, the
/// commitment to its evaluation seed, and what it published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    pub run_id: String,
    pub round: u64,
    pub state: RoundState,
    pub base_checkpoint: String,
    #[serde(default)]
    pub eval_commitment: Option<String>,
    pub result_checkpoint: Option<String>,
    pub opened_ms: i64,
    pub closed_ms: Option<i64>,
}

/// A sealed run's round, settled by the validator: what the hub could not compute without
/// reading the submissions. Posted after the round's aggregate (`POST /v1/validator/aggregate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub report: ScoreReport,
    /// Per job submission, in the job's order.
    pub settled: Vec<Settled>,
    /// The ledger entries recording it (receipts, emission, root), back to back, hex; chained
    /// onto the hub's ledger at `ledger_from`.
    pub ledger_from: u64,
    pub ledger: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settled {
    /// Aggregation weight (0: left out).
    pub weight: f64,
    pub reward: u64,
    /// The score the rating ranks by (`None`: it places last).
    pub effective: Option<f64>,
    pub flag: Option<String>,
}

/// The validator a sealed run seals to, as the hub verified it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidatorInfo {
    /// `tessera_trust::ValidatorAttestation` as JSON: keys and evidence.
    pub attestation: serde_json::Value,
    /// What the hub's verification established (`tessera_trust::Verified`); contributors check
    /// the evidence themselves.
    pub verified: serde_json::Value,
    /// INSECURE: the development attester, no TEE.
    pub insecure: bool,
    /// Its entry in the ledger.
    pub ledger_seq: u64,
}

/// The hub's answer to an accepted submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The round whose aggregate includes this submission.
    pub round: u64,
    /// The round whose checkpoint the submission was trained from.
    pub base_round: u64,
    pub staleness: u64,
    pub weight: f64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundState {
    Open,
    Collecting,
    /// Submissions closed; waiting for the validator's scores.
    Scoring,
    Aggregating,
    Published,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u64,
    pub state: RoundState,
    pub base_checkpoint: String,
    pub result_checkpoint: Option<String>,
    pub accepted: u64,
    pub weight: f64,
    pub mean_inner_loss: Option<f64>,
    pub bytes_up: u64,
    /// `quorum` or `deadline`.
    pub closed_by: Option<String>,
    pub opened_ms: i64,
    pub closed_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContributorStats {
    pub id: u64,
    pub name: String,
    pub accepted: u64,
    pub rejected: u64,
    /// Base rounds of the accepted submissions, ascending.
    pub submitted_rounds: Vec<u64>,
    pub bytes_up: u64,
    pub mean_inner_loss: Option<f64>,
    pub last_seen_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubStatus {
    pub run_id: String,
    pub round: u64,
    pub rounds: u64,
    pub finished: bool,
    pub num_params: u64,
    pub bytes_up: u64,
    /// Checkpoint and update bytes served since this hub process started.
    pub bytes_down: u64,
    pub history: Vec<RoundSummary>,
    pub contributors: Vec<ContributorStats>,
}

/// Stable machine-readable reasons for refusing a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    MalformedMessage,
    Unauthorized,
    WrongRun,
    CodecMismatch,
    TensorMismatch,
    BaseMismatch,
    FutureRound,
    Stale,
    Duplicate,
    /// The exact bytes of an earlier submission.
    Replay,
    /// The round is being scored; retry once it is published.
    Busy,
    /// No round is waiting for scores, or they do not match it.
    NotScoring,
    TooLarge,
    RunFinished,
    /// A signed request whose (key, nonce) the hub has seen before.
    ReplayedRequest,
    /// A sealed submission for a validator key that is not the run's current one.
    WrongValidator,
    /// No attested validator yet: sealed submissions cannot be accepted.
    NoValidator,
    /// The run's current phase admits only the contributors who qualified for it.
    NotQualified,
    /// The request is well formed but conflicts with what is recorded (e.g. an epoch that is
    /// already closed).
    Conflict,
    NotFound,
    RangeNotSatisfiable,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorCode {
    /// Its name on the wire (`malformed_message`, `run_finished`…), as in an `ApiError`'s JSON.
    pub fn wire_name(self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Codec::F32 => write!(f, "f32"),
            Codec::Bf16 => write!(f, "bf16"),
            Codec::Int8 { block } => write!(f, "int8:{block}"),
            Codec::Int4 { block } => write!(f, "int4:{block}"),
            Codec::TopK { chunk, k } => write!(f, "topk:{chunk}:{k}"),
        }
    }
}

impl FromStr for Codec {
    type Err = String;

    /// `f32`, `bf16`, `int8[:block]`, `int4[:block]` (block 64 by default) or `topk:chunk:k`.
    fn from_str(s: &str) -> Result<Codec, String> {
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or_default();
        let nums: Vec<u32> = parts
            .map(|p| p.parse::<u32>().map_err(|_| format!("codec {s:?}: {p:?} is not a number")))
            .collect::<Result<_, _>>()?;
        let codec = match (kind, nums.as_slice()) {
            ("f32", []) => Codec::F32,
            ("bf16", []) => Codec::Bf16,
            ("int8", []) => Codec::Int8 { block: 64 },
            ("int8", [b]) => Codec::Int8 { block: *b },
            ("int4", []) => Codec::Int4 { block: 64 },
            ("int4", [b]) => Codec::Int4 { block: *b },
            ("topk", [c, k]) => Codec::TopK { chunk: *c, k: *k },
            _ => return Err(format!("unknown codec {s:?}: use f32, bf16, int8[:block], int4[:block] or topk:chunk:k")),
        };
        codec.validate().map_err(|e| e.to_string())?;
        Ok(codec)
    }
}

impl Serialize for Codec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Codec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Codec, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn codec_strings_round_trip() {
        for c in [
            Codec::F32,
            Codec::Bf16,
            Codec::Int8 { block: 64 },
            Codec::Int4 { block: 128 },
            Codec::TopK { chunk: 4096, k: 16 },
        ] {
            assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Codec>(&json).unwrap(), c);
        }
        assert_eq!("int8".parse::<Codec>().unwrap(), Codec::Int8 { block: 64 });
        for bad in ["", "int8:0", "int4:3", "topk:10", "topk:4:8", "f32:1", "int8:x", "zip"] {
            assert!(bad.parse::<Codec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn error_codes_are_snake_case() {
        let e = ApiError { code: ErrorCode::BaseMismatch, message: "m".into() };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"code":"base_mismatch","message":"m"}"#);
    }

    proptest! {
        #[test]
        fn codec_parser_never_panics(s in ".{0,24}") {
            let _ = s.parse::<Codec>();
        }

        #[test]
        fn json_decoders_never_panic(s in ".{0,200}") {
            let _ = serde_json::from_str::<RunInfo>(&s);
            let _ = serde_json::from_str::<Assignment>(&s);
            let _ = serde_json::from_str::<ApiError>(&s);
            let _ = serde_json::from_str::<HubStatus>(&s);
            let _ = serde_json::from_str::<ScoringJob>(&s);
            let _ = serde_json::from_str::<ScoreReport>(&s);
            let _ = serde_json::from_str::<Leaderboard>(&s);
            let _ = serde_json::from_str::<Verdict>(&s);
            let _ = serde_json::from_str::<ValidatorInfo>(&s);
            let _ = serde_json::from_str::<AttestationPolicy>(&s);
        }
    }
}
