//! The hub's HTTP API messages (JSON), version [`PROTOCOL_VERSION`]. `docs/protocol.md` is the
//! specification; these types are its single implementation, shared by hub and contributor.
//!
//! Decoding is tolerant of unknown fields (a newer peer may add some) and strict about the
//! ones it knows. Every failure the hub reports has a stable [`ErrorCode`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Codec;

/// Bumped on any breaking change to the JSON messages or the binary formats. 2: the inner loss
/// travels in the signed path, and the ledger pins the funding share at genesis. 3: a manifest
/// run's submission names its assigned data in the signed path. 4: a request's signature
/// covers its audience (the hub's key and the run), and its body's BLAKE3 travels in a header
/// so the hub checks it before reading the body. 5: a sealed round's evaluation seed is drawn
/// and committed by its validator (`SeedCommitment`) and revealed in its verdict; a run may be
/// scored in tasks by many validators (`TaskJob`, a report's `task` and copy `samples`).
pub const PROTOCOL_VERSION: u32 = 5;

/// Optional query parameter of a submission: the mean training loss of its inner steps
/// (`POST /v1/submissions?inner_loss=0.8123`). The path a request signs includes its query, so
/// nobody on the way can change what the hub reads.
pub const INNER_LOSS_PARAM: &str = "inner_loss";

/// Query parameters by which a manifest run's submission commits to the data it was trained on
/// (`POST /v1/submissions?inner_loss=…&data_slot=3&epoch=0&shard=17`), signed with the path: the
/// hub refuses one whose claim is not what the round assigned it (`ErrorCode::WrongData`).
pub const DATA_SLOT_PARAM: &str = "data_slot";
pub const EPOCH_PARAM: &str = "epoch";
pub const SHARD_PARAM: &str = "shard";
/// Which dataset of a mixture the claimed shard is from (absent: the run's own).
pub const SOURCE_PARAM: &str = "data_source";

/// Where protocol 1 sent the inner loss, outside the signature; the hub refuses a submission
/// that carries it, so an old client learns why instead of having its loss ignored.
pub const UNSIGNED_INNER_LOSS_HEADER: &str = "x-tessera-inner-loss";

pub mod governance;
mod spec;
pub use spec::*;

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
    /// What taking part in this run trusts the hub's operator with, in plain words (from the
    /// spec: [`RunSpec::operator_trust`]).
    #[serde(default)]
    pub operator_trusted_with: Vec<String>,
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
    /// Manifest runs: the training shard this round's windows come from.
    #[serde(default)]
    pub data: Option<DataAssignment>,
    /// Changes its holders voted into the run's spec so far (a steered run): a contributor that
    /// holds the spec at another revision fetches `GET /v1/run` again.
    #[serde(default)]
    pub revision: u64,
}

/// Which shard of a manifest run's dataset a contributor trains on in a round: the `shard`-th
/// training shard of the manifest, from data slot `slot` in `epoch`
/// (`data::assigned_shard(seed, round, slot, slots_per_round, train_shards)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataAssignment {
    pub slot: u64,
    pub epoch: u64,
    pub shard: u32,
    /// Which dataset of the run's mixture: 0 its own, `i` its `mixture[i − 1]`.
    #[serde(default)]
    pub source: u32,
}

impl DataAssignment {
    /// Its form in a submission's signed query (`data_slot=…&epoch=…&shard=…`, and
    /// `&data_source=…` for a mixed dataset).
    pub fn query(&self) -> String {
        let mut q =
            format!("{DATA_SLOT_PARAM}={}&{EPOCH_PARAM}={}&{SHARD_PARAM}={}", self.slot, self.epoch, self.shard);
        if self.source != 0 {
            q.push_str(&format!("&{SOURCE_PARAM}={}", self.source));
        }
        q
    }
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
    /// In arrival order: the round's, or (a run scored by many validators) its task's.
    pub submissions: Vec<JobSubmission>,
    /// A run scored by many validators: the task this validator holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskJob>,
    /// Changes its holders voted into the run's spec so far (as `Assignment::revision`): a
    /// validator holding the spec at another revision fetches `GET /v1/run` again.
    #[serde(default)]
    pub revision: u64,
}

/// One task of a round's scoring (`tessera_contest::tasks`), held by the validator it was given
/// to until `lease_until_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskJob {
    pub id: u32,
    /// Tasks in the round.
    pub tasks: u32,
    /// Its submissions' positions in the round's arrival order.
    pub positions: Vec<u32>,
    pub lease_until_ms: i64,
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
    /// A run scored by many validators: the task these scores are for (`scores` in its order)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<u32>,
    /// …and each submission's copy sample (`tessera_contest::tasks::cross_sample`), hex of
    /// little-endian f32s, for finding copies across tasks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<String>,
}

/// `POST /v1/validator/failed`: the validator cannot score the round waiting for scores (its
/// own failure: a checkpoint it cannot read, a device error…). The round is aggregated unscored
/// at once, as if its scores had timed out: nobody in it is rated, flagged or penalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoringFailure {
    pub round: u64,
    /// What went wrong, in words (at most [`ScoringFailure::REASON_MAX`] characters are kept).
    pub reason: String,
}

impl ScoringFailure {
    pub const REASON_MAX: usize = 300;
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SubmissionScore {
    pub contributor: u64,
    /// Held-out loss before minus after applying the submission alone at the contest's
    /// `score_step`, over the step.
    pub score: f64,
    /// Gain on its assigned windows minus the other submissions' median gain on them; `None`
    /// when it was not in the round's data-fit sample.
    pub data_fit: Option<f64>,
    /// Position in the job of the earlier submission this one copies.
    pub copy_of: Option<u32>,
    /// The score's standard error over the held-out windows (shown with the score; it does
    /// not change the judgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_se: Option<f64>,
    /// The norm bound it was scored against: twice the median Δ norm of the submissions scored
    /// with it (its round, or its task). With the round's checkpoint, revealed seed and its own
    /// Δ, a contributor recomputes its score from this alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
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
    /// Contributors rated in at least one round, best first by μ − 3σ.
    pub rows: Vec<LeaderRow>,
    /// Contributors never rated (no scored round yet, or only rounds whose scoring failed),
    /// by id, rank 0: listed apart, because the default rating says nothing about them and
    /// would otherwise rank some of them above rated contributors.
    #[serde(default)]
    pub unrated: Vec<LeaderRow>,
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

/// `GET /v1/rounds/{r}/audit` (signed): what a published round's scores can be recomputed from,
/// and what it published (`tessera audit`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundAudit {
    pub run_id: String,
    /// What the validator was given: the round's base checkpoint, its seed (revealed) and the
    /// seed's commitment, and each submission's assignment, in arrival order.
    pub job: ScoringJob,
    /// What the round published for each submission, in the job's order.
    pub scores: Vec<PublishedScore>,
    /// Whether anyone may fetch the submissions (`GET /v1/rounds/{r}/submissions/{blob}`).
    pub submissions_published: bool,
}

/// One submission's published score, flag, weight and reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishedScore {
    pub contributor: u64,
    pub base_round: u64,
    pub score: Option<f64>,
    pub data_fit: Option<f64>,
    pub fit_factor: Option<f64>,
    pub flag: Option<String>,
    pub weight: f64,
    pub reward: u64,
    /// The norm bound it was scored against (`SubmissionScore::norm_bound`; `None`: its
    /// validator did not report one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
}

/// `GET /v1/contributors/{id}/rewards`: how each of a contributor's scored submissions turned
/// into reward units, recomputed from its round's published rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardExplanation {
    pub round: u64,
    pub base_round: u64,
    /// Held-out loss gain from applying it alone at the contest's `score_step`, over the step
    /// (nats per token).
    pub score: Option<f64>,
    /// This round's data-fit measurement, and the factor its contributor's record gave.
    pub data_fit: Option<f64>,
    pub fit_factor: Option<f64>,
    /// The part of the fit factor that is its contributor's conduct record (1: never caught).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conduct: Option<f64>,
    /// Aggregation weight: staleness weight × fit factor (0: left out).
    pub weight: f64,
    pub flag: Option<String>,
    /// (score × fit factor)^power, 0 when flagged; the round's total of shares and its units.
    pub share: f64,
    pub round_shares: f64,
    pub round_units: u64,
    pub reward_power: f64,
    pub reward: u64,
    /// The recorded reward is what the rule gives on the round's published rows.
    pub reproduced: bool,
    /// The rule, with this submission's numbers in it.
    pub formula: String,
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
    /// What its score was discounted by, from its contributor's data-fit record.
    #[serde(default)]
    pub fit_factor: Option<f64>,
    /// Its score's standard error over the held-out windows, where the validator measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_se: Option<f64>,
    /// The norm bound it was scored against (`SubmissionScore::norm_bound`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_bound: Option<f64>,
    /// The part of its fit factor that is its contributor's conduct record: earlier rounds in
    /// which it was caught cheating lower it below 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conduct: Option<f64>,
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
    /// The round's evaluation seed (hex), drawn inside the validator and committed with
    /// `POST /v1/validator/commitment`: revealed here, checked against that commitment, and
    /// published with the round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_seed: Option<String>,
}

/// `POST /v1/validator/commitment`: a sealed run's validator commits the evaluation seed of a
/// round it drew inside its TEE (`commitment` = `tessera_contest::commit::commitment(seed)`,
/// hex) before that round takes submissions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedCommitment {
    pub round: u64,
    pub commitment: String,
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

/// A contributor asks to put a submission straight into the run's object store
/// (`POST /v1/uploads`, signed), naming it by its BLAKE3 and giving its length and SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadRequest {
    /// Hex BLAKE3 of the whole submission: its name in the store.
    pub blob: String,
    pub bytes: u64,
    /// Hex SHA-256 of the whole submission, which a single presigned PUT binds (S3 checks it).
    pub sha256: String,
}

/// Where to put a submission's bytes. No parts: this hub takes them itself (`POST
/// /v1/submissions`). One part: a presigned PUT of the whole. Several: a multipart upload,
/// each part a presigned PUT whose `ETag` the commit returns, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadGrant {
    /// The multipart upload the parts belong to (several parts only).
    pub upload_id: Option<String>,
    pub parts: Vec<UploadPart>,
    /// Until when (Unix ms) the URLs are good.
    pub expires_ms: i64,
}

/// One presigned request: send exactly these headers with the bytes `offset..offset + bytes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadPart {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub offset: u64,
    pub bytes: u64,
}

/// After the upload: the `ETag` of each part of a multipart upload, in order (empty after a
/// single PUT). Posted, signed, to `POST /v1/uploads/{blob}` with the submission's claim in the
/// signed query, as `POST /v1/submissions` takes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UploadCommit {
    /// The grant's multipart upload, if it was one.
    pub upload_id: Option<String>,
    pub etags: Vec<String>,
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
    /// A manifest run's submission that does not name, in its signed query, the data slot,
    /// epoch and shard its round assigned it.
    WrongData,
    /// The request is well formed but conflicts with what is recorded (e.g. an epoch that is
    /// already closed).
    Conflict,
    NotFound,
    RangeNotSatisfiable,
    /// Too many requests from this key or address, or too many of its bytes in flight: retry
    /// after a pause.
    RateLimited,
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
