//! The run's state machine. Every round moves open → collecting → (scoring) → aggregating →
//! published: open when its base checkpoint is published, collecting from its first accepted
//! submission; at quorum or when its deadline passes its submissions close, and in a scored run
//! it waits for the validator's scores (its evaluation seed is revealed then; submissions
//! arriving meanwhile are told to retry); aggregating with the weights the scores give, and
//! published when the new checkpoint, the compressed update and the outer-optimizer state are
//! in the store and one database transaction has closed the round (scores, rewards, ratings
//! included) and opened the next.
//!
//! Crash safety: a submission is acknowledged only after its blob is stored and its row
//! committed; a round's outputs are written (content-addressed or keyed by round, so rewriting
//! is harmless) before the transaction that publishes them. A hub killed at any moment restarts
//! from the database: the current round's accepted submissions are all there, and a round that
//! was aggregating is aggregated again from the same inputs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tessera_aggregate::{
    Accumulator, AggregateError, OuterConfig, OuterOptimizer, broadcast_step, check_view, decode_view,
};
use tessera_contest::rating::Standing;
use tessera_contest::{Policy, Ratings, Scored, Settlement, settle};
use tessera_protocol::api::{
    Assignment, ContributorStats, HubStatus, JobSubmission, LeaderRow, Leaderboard, Receipt, Registration, RoundState,
    RoundSummary, RunInfo, ScoreReport, ScoringJob,
};
use tessera_protocol::api::{Settled, ValidatorInfo, Verdict};
use tessera_protocol::{
    Aggregation, ApiError, ErrorCode, MessageView, PROTOCOL_VERSION, PseudoGradient, RunSpec, TensorEntry, TensorSpec,
    decode_weights, encode_weights, weights_hash,
};
use tessera_trust::ledger::{Body as LedgerBody, Ledger};
use tessera_trust::{Identity, PublicKey, SealedHeader, SignedBy, ValidatorAttestation, Verified};
use tokio::sync::{Mutex, watch};

use crate::HubError;
use crate::db::{Db, Publication, ScoreRow, SubmissionRow};
use crate::store::Store;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn api(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError { code, message: message.into() }
}

fn internal(e: HubError) -> ApiError {
    tracing::error!(error = %e, "internal error");
    api(ErrorCode::Internal, e.to_string())
}

pub fn checkpoint_key(hash: &str) -> String {
    format!("checkpoints/{hash}.safetensors")
}

pub fn update_key(round: u64) -> String {
    format!("updates/{round:08}.tpg")
}

fn outer_key(round: u64) -> String {
    format!("outer/{round:08}.safetensors")
}

fn submission_key(hash: &str) -> String {
    format!("submissions/{hash}.tpg")
}

/// How a round's submissions were judged.
enum Judgement<'a> {
    /// Staleness weights only (no validator, or its scores timed out).
    Unscored,
    /// A validator's scores, judged here.
    Scored(&'a ScoreReport),
    /// A sealed run: the validator judged and aggregated what only it can read.
    Sealed { verdict: &'a Verdict, mean: Vec<Vec<f32>>, ledger: Vec<(u64, String)>, next: Box<Ledger> },
}

/// The attested validator submissions are sealed to.
#[derive(Clone)]
struct CurrentValidator {
    attestation: ValidatorAttestation,
    verified: Verified,
    /// BLAKE3 of its HPKE key: what a sealed header must name.
    recipient: [u8; 32],
    seq: u64,
}

fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// A run to create when the database holds none.
pub struct NewRun {
    pub spec: RunSpec,
    /// Initial weights, one flat buffer per `spec.tensors` entry.
    pub weights: Vec<Vec<f32>>,
}

struct State {
    round: u64,
    finished: bool,
    /// Base checkpoint (hex) of every round so far, the current one last.
    bases: Vec<String>,
    theta: Vec<Vec<f32>>,
    outer: OuterOptimizer,
    /// What the compressed broadcast of past updates has not delivered yet.
    residual: Vec<Vec<f32>>,
    accepted: u64,
    first_accept_ms: Option<i64>,
    /// Hex commitment to the current round's evaluation seed.
    commitment: String,
    /// Set while the round's submissions are closed and its scores awaited.
    scoring: Option<Scoring>,
    ratings: Ratings,
    /// Each contributor's measured data fits so far: (sum, count).
    fit_record: HashMap<u64, (f64, u64)>,
    /// A sealed run's aggregate for the round being scored, from the validator.
    sealed_mean: Option<(u64, Vec<Vec<f32>>)>,
    /// Who may train in the current phase (`None`: everyone).
    members: Option<std::collections::HashSet<u64>>,
    /// The round each phase so far began at (`starts[0]` = 0).
    starts: Vec<u64>,
    /// The run's phase: its model's tensor table and their lengths.
    phase: usize,
    tensors: Vec<TensorSpec>,
    lengths: Vec<usize>,
}

/// What growing a run's state into its next phase gives.
pub struct Grown {
    pub theta: Vec<Vec<f32>>,
    pub momentum: Vec<Vec<f32>>,
    pub residual: Vec<Vec<f32>>,
}

/// Grows the global state into the next phase's model, function-preserving (the hub links no
/// libtorch; the binary supplies this from `tessera_model::grow`). `from` and `to` are the run's
/// spec at the two phases; momentum and the broadcast residual live in weight space.
pub trait Grower: Send + Sync {
    fn grow(
        &self,
        from: &RunSpec,
        to: &RunSpec,
        seed: u64,
        theta: &[Vec<f32>],
        momentum: &[Vec<f32>],
        residual: &[Vec<f32>],
    ) -> Result<Grown, String>;
}

struct Scoring {
    since_ms: i64,
    closed_by: String,
}

pub struct Hub {
    db: Db,
    store: Store,
    pub spec: RunSpec,
    pub run_id: String,
    run_id_bytes: [u8; 16],
    state: Mutex<State>,
    grower: std::sync::RwLock<Option<Arc<dyn Grower>>>,
    /// Contributors by key, and keys by id.
    keys: std::sync::RwLock<(HashMap<PublicKey, u64>, HashMap<u64, PublicKey>)>,
    /// Signs what the hub publishes and its ledger entries.
    identity: Identity,
    ledger: std::sync::RwLock<Ledger>,
    validator: std::sync::RwLock<Option<CurrentValidator>>,
    round_tx: watch::Sender<u64>,
    bytes_down: AtomicU64,
    /// BLAKE3 of the validator's bearer token; no validator can report without one.
    validator_token: std::sync::RwLock<Option<String>>,
}

/// What the hub checks of a submission before it looks at the run's state.
struct Header {
    round: u64,
    base: String,
    run_id: [u8; 16],
    codec: tessera_protocol::Codec,
    table: Vec<(String, Vec<u64>)>,
}

impl Header {
    fn of(view: &MessageView<'_>) -> Header {
        Header {
            round: view.round,
            base: hex::encode(view.base_checkpoint),
            run_id: view.run_id,
            codec: view.codec,
            table: view.tensors.iter().map(|t| (t.name.to_owned(), t.shape.clone())).collect(),
        }
    }
}

/// The result of aggregating one round, not yet published.
struct Aggregated {
    theta: Vec<Vec<f32>>,
    outer: OuterOptimizer,
    residual: Vec<Vec<f32>>,
    weights_bytes: Vec<u8>,
    update_bytes: Vec<u8>,
    outer_bytes: Vec<u8>,
    weight: f64,
    used: u64,
}

fn outer_table(tensors: &[TensorSpec]) -> Vec<TensorSpec> {
    let mut table = Vec::with_capacity(2 * tensors.len());
    for prefix in ["momentum", "residual"] {
        table.extend(
            tensors.iter().map(|t| TensorSpec { name: format!("{prefix}/{}", t.name), shape: t.shape.clone() }),
        );
    }
    table
}

impl Hub {
    /// Opens the run in `db` and `store`, creating it from `new` if the database holds none.
    pub async fn open(db: Db, store: Store, new: Option<NewRun>, identity: Identity) -> Result<Arc<Hub>, HubError> {
        // Metrics are recorded from the start (GET /metrics renders them).
        let _ = tessera_protocol::telemetry::prometheus();
        let run = match db.load_run().await? {
            Some(run) => {
                if new.is_some() {
                    tracing::info!(run = %run.id, round = run.round, "resuming the run in the database");
                }
                run
            }
            None => {
                let new = new.ok_or_else(|| HubError::Config("the database holds no run and none was given".into()))?;
                new.spec.validate().map_err(HubError::Config)?;
                let bytes = encode_weights(&new.spec.tensors, &new.weights)?;
                let hash = hex::encode(weights_hash(&bytes));
                store.put(&checkpoint_key(&hash), Bytes::from(bytes)).await?;
                let mut id = [0u8; 16];
                getrandom::fill(&mut id).map_err(|e| HubError::Config(format!("no randomness: {e}")))?;
                let spec = serde_json::to_string(&new.spec).map_err(|e| HubError::Corrupt(e.to_string()))?;
                db.create_run(&hex::encode(id), &spec, &hash, now_ms()).await?;
                tracing::info!(run = %hex::encode(id), checkpoint = %hash, "run created");
                db.load_run().await?.ok_or_else(|| HubError::Corrupt("run vanished after creation".into()))?
            }
        };
        let spec: RunSpec =
            serde_json::from_str(&run.spec).map_err(|e| HubError::Corrupt(format!("stored run spec: {e}")))?;
        let mut run_id_bytes = [0u8; 16];
        hex::decode_to_slice(&run.id, &mut run_id_bytes).map_err(|e| HubError::Corrupt(format!("run id: {e}")))?;
        // The current phase's model: what the stored weights and outer state are shaped as.
        let mut starts = vec![0];
        starts.extend(db.phase_starts().await?.into_iter().map(|(_, r)| r));
        let phase = starts.len() - 1;
        let tensors = spec.at_phase(phase).tensors;
        let lengths: Vec<usize> = tensors.iter().map(|t| t.numel() as usize).collect();

        let rounds = db.rounds().await?;
        let bases: Vec<String> = rounds.iter().map(|r| r.base_checkpoint.clone()).collect();
        let current = bases.last().ok_or_else(|| HubError::Corrupt("run has no rounds".into()))?.clone();
        let theta = decode_weights(&store.get(&checkpoint_key(&current)).await?, &tensors)?;
        let outer_config =
            OuterConfig { lr: spec.outer.lr, momentum: spec.outer.momentum, nesterov: spec.outer.nesterov };
        let mut outer = OuterOptimizer::new(outer_config, &lengths);
        let mut residual: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
        let last_published = rounds.iter().rev().find(|r| r.state == RoundState::Published).map(|r| r.round + 1);
        if let Some(r) = last_published {
            let mut saved = decode_weights(&store.get(&outer_key(r)).await?, &outer_table(&tensors))?;
            residual = saved.split_off(lengths.len());
            outer.set_momentum(r, saved)?;
        }
        let round = run.round;
        let pending = if run.finished { Vec::new() } else { db.submissions(Some(round)).await? };
        let commitment = if run.finished { String::new() } else { db.eval_seed(round).await?.1 };
        let ratings = db.ratings().await?;
        let mut fit_record = HashMap::new();
        for past in db.scores().await? {
            note_fit(&mut fit_record, &past);
        }
        let mut keys = (HashMap::new(), HashMap::new());
        for (id, _, key) in db.contributors().await? {
            if let Ok(k) = PublicKey::parse(&key) {
                keys.0.insert(k, id);
                keys.1.insert(id, k);
            }
        }
        let (ledger, validator) = open_ledger(&db, &run.id, &spec, &identity).await?;
        let members = match phase.checked_sub(1).and_then(|i| spec.phases[i].qualify_top) {
            Some(_) => Some(db.phase_members(phase as u64).await?.into_iter().collect()),
            None => None,
        };
        let state = State {
            round,
            finished: run.finished,
            bases,
            theta,
            outer,
            residual,
            accepted: pending.len() as u64,
            first_accept_ms: pending.iter().map(|s| s.received_ms).min(),
            commitment,
            scoring: None,
            ratings,
            fit_record,
            sealed_mean: None,
            members,
            starts,
            phase,
            tensors,
            lengths,
        };
        let hub = Arc::new(Hub {
            db,
            store,
            spec,
            run_id: run.id,
            run_id_bytes,
            state: Mutex::new(state),
            grower: std::sync::RwLock::new(None),
            keys: std::sync::RwLock::new(keys),
            identity,
            ledger: std::sync::RwLock::new(ledger),
            validator: std::sync::RwLock::new(validator),
            round_tx: watch::Sender::new(round),
            bytes_down: AtomicU64::new(0),
            validator_token: std::sync::RwLock::new(None),
        });
        {
            let mut state = hub.state.lock().await;
            let closed = rounds
                .iter()
                .any(|r| r.round == round && matches!(r.state, RoundState::Aggregating | RoundState::Scoring));
            if !state.finished && (closed || state.accepted >= u64::from(hub.spec.quorum)) {
                tracing::info!(round, "finishing the round that was closing when the hub stopped");
                hub.close_round(&mut state, "quorum").await?;
            }
        }
        Ok(hub)
    }

    pub async fn info(&self) -> RunInfo {
        let state = self.state.lock().await;
        RunInfo {
            protocol: PROTOCOL_VERSION,
            run_id: self.run_id.clone(),
            spec: self.spec.at_phase(state.phase),
            phase: state.phase as u32,
            round: state.round,
            checkpoint: state.bases.last().cloned().unwrap_or_default(),
            finished: state.finished,
            hub_key: self.identity.public().hex(),
        }
    }

    /// Sets how the run's state grows into its next phase (needed by a run with phases).
    pub fn set_grower(&self, grower: Arc<dyn Grower>) {
        if let Ok(mut g) = self.grower.write() {
            *g = Some(grower);
        }
    }

    /// The hub's signature (hex) over a body it publishes.
    pub fn sign_publication(&self, body: &[u8]) -> String {
        self.identity.sign_hex(&tessera_trust::identity::publication_message(body))
    }

    /// The hub's signature (hex) over a published body named by its BLAKE3 (a checkpoint).
    pub fn sign_published_hash(&self, blake3_hex: &str) -> String {
        self.identity.sign_hex(&tessera_trust::identity::publication_message_for(blake3_hex))
    }

    /// Round `round` as announced: its base, its seed commitment, what it published.
    pub async fn announcement(&self, round: u64) -> Result<tessera_protocol::api::RoundAnnouncement, ApiError> {
        let rounds = self.db.rounds().await.map_err(internal)?;
        let r = rounds
            .into_iter()
            .find(|r| r.round == round)
            .ok_or_else(|| api(ErrorCode::NotFound, format!("round {round} has not opened")))?;
        let eval_commitment = match &self.spec.contest {
            Some(_) => Some(self.db.eval_seed(round).await.map_err(internal)?.1),
            None => None,
        };
        Ok(tessera_protocol::api::RoundAnnouncement {
            run_id: self.run_id.clone(),
            round,
            state: r.state,
            base_checkpoint: r.base_checkpoint,
            eval_commitment,
            result_checkpoint: r.result_checkpoint,
            opened_ms: r.opened_ms,
            closed_ms: r.closed_ms,
        })
    }

    /// Checks a signed request and that its nonce is new; returns who signed it.
    pub async fn verify_signed<'a>(
        &self,
        header: impl Fn(&str) -> Option<&'a str>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<SignedBy, ApiError> {
        let signed = tessera_trust::verify_request(header, method, path, body, now_ms())
            .map_err(|e| api(ErrorCode::Unauthorized, e.to_string()))?;
        if !self.db.use_nonce(&signed.key.hex(), &signed.nonce, now_ms()).await.map_err(internal)? {
            return Err(api(
                ErrorCode::ReplayedRequest,
                "this signed request was already received (same key and nonce): a replay is refused",
            ));
        }
        Ok(signed)
    }

    /// The registered contributor a verified request comes from.
    pub fn contributor_of(&self, key: &PublicKey) -> Result<u64, ApiError> {
        let keys = self.keys.read().map_err(|_| api(ErrorCode::Internal, "key table poisoned"))?;
        keys.0.get(key).copied().ok_or_else(|| {
            api(ErrorCode::Unauthorized, format!("key {key} is not registered: POST /v1/contributors first"))
        })
    }

    /// Registers `key` under `name`; the same key gets the same id again.
    pub async fn register(&self, name: &str, key: PublicKey) -> Result<Registration, ApiError> {
        let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
        // Serialise registrations so ids are dense.
        let _state = self.state.lock().await;
        let id = self.db.register(&name, &key.hex(), now_ms()).await.map_err(internal)?;
        let mut keys = self.keys.write().map_err(|_| api(ErrorCode::Internal, "key table poisoned"))?;
        keys.0.insert(key, id);
        keys.1.insert(id, key);
        tracing::info!(contributor = id, name, key = %key, "registered");
        Ok(Registration { contributor_id: id, public_key: key.hex() })
    }

    fn key_of(&self, contributor: u64) -> Option<PublicKey> {
        self.keys.read().ok()?.1.get(&contributor).copied()
    }

    /// Sets the token the validator authenticates with (its hash is kept).
    pub fn set_validator_token(&self, token: &str) {
        if let Ok(mut t) = self.validator_token.write() {
            *t = Some(token_hash(token));
        }
    }

    pub fn authenticate_validator(&self, token: &str) -> Result<(), ApiError> {
        let known = self.validator_token.read().map_err(|_| api(ErrorCode::Internal, "validator token poisoned"))?;
        match known.as_deref() {
            Some(h) if h == token_hash(token) => Ok(()),
            Some(_) => Err(api(ErrorCode::Unauthorized, "wrong validator token")),
            None => Err(api(ErrorCode::Unauthorized, "this hub has no validator token configured")),
        }
    }

    /// Round `round`'s evaluation-seed commitment, with the seed once its submissions closed.
    pub async fn eval_seed(&self, round: u64) -> Result<tessera_protocol::api::EvalSeed, ApiError> {
        let (current, scoring, finished) = {
            let s = self.state.lock().await;
            (s.round, s.scoring.is_some(), s.finished)
        };
        // A finished run's `round` counts the rounds it had; none of that number ever opened.
        if round > current || (finished && round == current) {
            return Err(api(ErrorCode::NotFound, format!("round {round} has not opened")));
        }
        let (seed, commitment) = self.db.eval_seed(round).await.map_err(internal)?;
        let revealed = round < current || scoring;
        Ok(tessera_protocol::api::EvalSeed { round, commitment, seed: revealed.then_some(seed) })
    }

    /// The contributor's next round. If it has already submitted for the current round, waits
    /// (up to `wait`) for the round to close first.
    pub async fn assign(&self, contributor: u64, wait: Duration) -> Result<Assignment, ApiError> {
        let mut rx = self.round_tx.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let round = *rx.borrow_and_update();
            let done = self.db.has_submitted(contributor, round).await.map_err(internal)?;
            if !done || tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                break;
            }
        }
        let state = self.state.lock().await;
        self.check_member(&state, contributor)?;
        let h = self.spec.inner_steps;
        Ok(Assignment {
            run_id: self.run_id.clone(),
            finished: state.finished,
            round: state.round,
            base_checkpoint: state.bases.last().cloned().unwrap_or_default(),
            slot: contributor,
            seed: self.spec.seed,
            inner_steps: h,
            schedule_step: state.round.min(self.spec.rounds) * h,
            schedule_total: self.spec.rounds * h,
            eval_commitment: self.spec.contest.as_ref().map(|_| state.commitment.clone()),
            phase: state.phase as u32,
            fragment: (self.spec.fragments > 1).then(|| self.spec.fragment_of(contributor)),
        })
    }

    /// Largest acceptable submission: an f32 message plus its table.
    pub fn max_submission_bytes(&self) -> usize {
        let table =
            |tensors: &[TensorSpec]| -> usize { tensors.iter().map(|t| t.name.len() + 16 + 8 * t.shape.len()).sum() };
        let tables =
            self.spec.phases.iter().map(|p| table(&p.tensors)).chain([table(&self.spec.tensors)]).max().unwrap_or(0);
        4 * self.spec.max_params() as usize + tables + 4096
    }

    /// Validates, stores and records one submission. Closes the round at quorum.
    pub async fn submit(
        self: &Arc<Self>,
        contributor: u64,
        key: PublicKey,
        body: Bytes,
        inner_loss: Option<f64>,
    ) -> Result<Receipt, ApiError> {
        let result = if self.spec.trust.is_some() {
            self.submit_sealed(contributor, key, body, inner_loss).await
        } else {
            self.submit_inner(contributor, body, inner_loss).await
        };
        if let Some(e) = result.as_ref().err().filter(|e| e.code != ErrorCode::Busy) {
            let code = e.code.wire_name();
            let round = *self.round_tx.borrow();
            if let Err(db) = self.db.insert_rejection(contributor, round, &code, &e.message, now_ms()).await {
                tracing::warn!(error = %db, "could not record a rejection");
            }
            tracing::info!(contributor, code, message = %e.message, "submission rejected");
        }
        result
    }

    async fn submit_inner(
        self: &Arc<Self>,
        contributor: u64,
        body: Bytes,
        inner_loss: Option<f64>,
    ) -> Result<Receipt, ApiError> {
        let (mut tensors, mut lengths, phase, starts) = {
            let s = self.state.lock().await;
            (s.tensors.clone(), s.lengths.clone(), s.phase, s.starts.clone())
        };
        // A layer-sharded run: the contributor's fragment is the whole message.
        if self.spec.fragments > 1 {
            let keep = self.spec.fragment_tensors(self.spec.fragment_of(contributor));
            tensors = keep.iter().map(|&i| tensors[i].clone()).collect();
            lengths = keep.iter().map(|&i| lengths[i]).collect();
        }
        let (header, decoded) = self.parse_off_thread(body.clone(), lengths, check_view).await?;
        // Work on an earlier phase's model is stale, not malformed: its table is that model's.
        if header.run_id == self.run_id_bytes && phase_at(&starts, header.round) < phase {
            return Err(api(
                ErrorCode::Stale,
                format!(
                    "trained on an earlier phase's model (round {}); the run has grown: fetch a new assignment",
                    header.round
                ),
            ));
        }
        self.check_header(&header, &tensors)?;
        // Only now that names and shapes match the model does a decoding failure mean bad values.
        decoded.map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        let (base_round, base_hash) = (header.round, header.base);
        let inner_loss = inner_loss.filter(|l| l.is_finite());
        // The message ends with the BLAKE3 of everything before it (verified by the parse):
        // that names the blob.
        let blob = hex::encode(&body[body.len().saturating_sub(32)..]);
        let bytes = body.len() as u64;
        self.store.put(&submission_key(&blob), body).await.map_err(internal)?;
        // Recording (and closing the round at quorum) runs as its own task: if the client hangs
        // up, the request's future is dropped, but a half-done state change must never be.
        let hub = self.clone();
        tokio::spawn(async move { hub.record(contributor, base_round, base_hash, blob, bytes, inner_loss).await })
            .await
            .map_err(|e| api(ErrorCode::Internal, e.to_string()))?
    }

    /// A sealed run's submission: the hub checks the envelope's clear header (run, base, sender,
    /// recipient) and stores the ciphertext; only the validator can check the rest.
    async fn submit_sealed(
        self: &Arc<Self>,
        contributor: u64,
        key: PublicKey,
        body: Bytes,
        inner_loss: Option<f64>,
    ) -> Result<Receipt, ApiError> {
        let header = SealedHeader::parse(&body).map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        if header.run_id != self.run_id_bytes {
            return Err(api(
                ErrorCode::WrongRun,
                format!("sealed for run {}, this is {}", hex::encode(header.run_id), self.run_id),
            ));
        }
        if header.contributor != key {
            return Err(api(
                ErrorCode::Unauthorized,
                "the envelope names another contributor: only its sender may submit it",
            ));
        }
        let current = self.validator.read().map_err(|_| api(ErrorCode::Internal, "validator poisoned"))?.clone();
        let Some(current) = current else {
            return Err(api(ErrorCode::NoValidator, "no attested validator has registered yet; retry shortly"));
        };
        if header.recipient != current.recipient {
            return Err(api(
                ErrorCode::WrongValidator,
                "sealed to a validator key that is not the current one: fetch GET /v1/validator and seal again",
            ));
        }
        let blob = blake3::hash(&body).to_hex().to_string();
        let bytes = body.len() as u64;
        self.store.put(&submission_key(&blob), body).await.map_err(internal)?;
        let base_hash = hex::encode(header.base_checkpoint);
        let hub = self.clone();
        tokio::spawn(
            async move { hub.record(contributor, header.base_round, base_hash, blob, bytes, inner_loss).await },
        )
        .await
        .map_err(|e| api(ErrorCode::Internal, e.to_string()))?
    }

    async fn record(
        &self,
        contributor: u64,
        base_round: u64,
        base_hash: String,
        blob: String,
        bytes: u64,
        inner_loss: Option<f64>,
    ) -> Result<Receipt, ApiError> {
        let mut state = self.state.lock().await;
        if state.finished {
            return Err(api(ErrorCode::RunFinished, "the run has finished"));
        }
        let round = state.round;
        if state.scoring.is_some() {
            return Err(api(
                ErrorCode::Busy,
                format!("round {round} is being scored; retry when it is published (this submission is kept for you)"),
            ));
        }
        if base_round > round {
            return Err(api(
                ErrorCode::FutureRound,
                format!("round {base_round} has not opened; the run is at {round}"),
            ));
        }
        if state.bases[base_round as usize] != base_hash {
            return Err(api(
                ErrorCode::BaseMismatch,
                format!(
                    "round {base_round} started from checkpoint {}, not {base_hash}",
                    state.bases[base_round as usize]
                ),
            ));
        }
        // Late work from an earlier phase is stale whoever sent it: its sender learns that the
        // new phase did not admit it from its next assignment, and stops there without an error.
        if phase_at(&state.starts, base_round) != state.phase {
            return Err(api(
                ErrorCode::Stale,
                format!(
                    "trained on an earlier phase's model (round {base_round}); the run has grown: fetch a new assignment"
                ),
            ));
        }
        self.check_member(&state, contributor)?;
        let staleness = round - base_round;
        if staleness > self.spec.max_staleness {
            return Err(api(
                ErrorCode::Stale,
                format!(
                    "trained from round {base_round} but the run is at round {round}: {staleness} rounds stale, at most \
                     {} accepted; fetch a new assignment",
                    self.spec.max_staleness
                ),
            ));
        }
        match self.db.blob_owner(&blob).await.map_err(internal)? {
            // Its own accepted submission again: a retry after a lost answer (or a hub restart).
            Some(owner) if owner == contributor => {
                return Err(api(
                    ErrorCode::Duplicate,
                    format!("these exact bytes are contributor {owner}'s accepted submission for round {base_round}"),
                ));
            }
            Some(owner) => {
                return Err(api(
                    ErrorCode::Replay,
                    format!(
                        "these exact bytes were already submitted by contributor {owner}; a submission is new work"
                    ),
                ));
            }
            None => {}
        }
        let weight = self.spec.staleness_decay.powi(staleness as i32);
        let now = now_ms();
        let row = SubmissionRow { contributor, base_round, round, weight, bytes, inner_loss, blob, received_ms: now };
        if !self.db.insert_submission(&row).await.map_err(internal)? {
            return Err(api(
                ErrorCode::Duplicate,
                format!("contributor {contributor} already submitted for round {base_round}"),
            ));
        }
        state.accepted += 1;
        state.first_accept_ms.get_or_insert(now);
        tracing::info!(contributor, round, base_round, weight, bytes, accepted = state.accepted, "submission accepted");
        if state.accepted >= u64::from(self.spec.quorum) {
            self.close_round(&mut state, "quorum").await.map_err(internal)?;
        }
        Ok(Receipt { round, base_round, staleness, weight, bytes })
    }

    /// Parses a message (which verifies the checksum of the whole body) and runs `decode` on it,
    /// off the async workers. A body that does not parse is `malformed_message`.
    async fn parse_off_thread<T: Send + 'static>(
        &self,
        body: Bytes,
        lengths: Vec<usize>,
        decode: fn(&[usize], &MessageView<'_>) -> T,
    ) -> Result<(Header, T), ApiError> {
        tokio::task::spawn_blocking(move || {
            let view = MessageView::parse(&body)?;
            Ok::<_, tessera_protocol::WireError>((Header::of(&view), decode(&lengths, &view)))
        })
        .await
        .map_err(|e| api(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))
    }

    /// Refuses a contributor the current phase does not admit.
    fn check_member(&self, state: &State, contributor: u64) -> Result<(), ApiError> {
        match &state.members {
            Some(m) if !m.contains(&contributor) => Err(api(
                ErrorCode::NotQualified,
                format!(
                    "phase {} admits only the {} contributors who led the leaderboard when it began; contributor \
                     {contributor} did not qualify",
                    state.phase + 1,
                    m.len()
                ),
            )),
            _ => Ok(()),
        }
    }

    fn check_header(&self, h: &Header, tensors: &[TensorSpec]) -> Result<(), ApiError> {
        let (run_id, codec, table) = (h.run_id, h.codec, &h.table);
        if run_id != self.run_id_bytes {
            return Err(api(
                ErrorCode::WrongRun,
                format!("message is for run {}, this is {}", hex::encode(run_id), self.run_id),
            ));
        }
        if codec != self.spec.codec {
            return Err(api(
                ErrorCode::CodecMismatch,
                format!("message uses codec {codec}, the run uses {}", self.spec.codec),
            ));
        }
        if table.len() != tensors.len() {
            return Err(api(
                ErrorCode::TensorMismatch,
                format!("message has {} tensors, the model {}", table.len(), tensors.len()),
            ));
        }
        for ((name, shape), s) in table.iter().zip(tensors) {
            if *name != s.name || *shape != s.shape {
                return Err(api(
                    ErrorCode::TensorMismatch,
                    format!("tensor {name} {shape:?} where the model has {} {:?}", s.name, s.shape),
                ));
            }
        }
        Ok(())
    }

    /// Closes the round if its deadline has passed, or aggregates it unscored if its scores
    /// are overdue. Called periodically.
    pub async fn tick(&self) -> Result<(), HubError> {
        self.db.forget_nonces(now_ms() - 2 * tessera_trust::identity::MAX_SKEW_MS).await?;
        let mut state = self.state.lock().await;
        if let (Some(scoring), Some(contest)) = (&state.scoring, &self.spec.contest) {
            if now_ms() >= scoring.since_ms + contest.score_timeout_ms as i64 {
                let closed_by = format!("{} (scores timed out)", scoring.closed_by);
                tracing::warn!(round = state.round, "no scores arrived in time; aggregating unscored");
                self.finish_round(&mut state, &closed_by, Judgement::Unscored).await?;
            }
            return Ok(());
        }
        let due = state.first_accept_ms.is_some_and(|t| now_ms() >= t + self.spec.round_deadline_ms as i64);
        if !state.finished && state.accepted > 0 && due {
            self.close_round(&mut state, "deadline").await?;
        }
        Ok(())
    }

    /// Ends a round's submissions: aggregates at once, or in a scored run reveals the seed and
    /// waits for the validator.
    async fn close_round(&self, state: &mut State, closed_by: &str) -> Result<(), HubError> {
        if self.spec.contest.is_none() {
            return self.finish_round(state, closed_by, Judgement::Unscored).await;
        }
        if state.scoring.is_none() {
            self.db.set_round_state(state.round, RoundState::Scoring).await?;
            tracing::info!(round = state.round, closed_by, "submissions closed; waiting for scores");
            state.scoring = Some(Scoring { since_ms: now_ms(), closed_by: closed_by.to_owned() });
        }
        Ok(())
    }

    /// The round waiting for scores, if any: its submissions in arrival order and the revealed
    /// evaluation seed.
    pub async fn scoring_job(&self) -> Result<Option<ScoringJob>, HubError> {
        let state = self.state.lock().await;
        if state.scoring.is_none() {
            return Ok(None);
        }
        let round = state.round;
        let (eval_seed, eval_commitment) = self.db.eval_seed(round).await?;
        let h = self.spec.inner_steps;
        let submissions = self
            .arrival_order(round)
            .await?
            .into_iter()
            .map(|r| JobSubmission {
                contributor: r.contributor,
                slot: r.contributor,
                base_round: r.base_round,
                schedule_step: r.base_round * h,
                inner_steps: h,
                weight: r.weight,
                contributor_key: self.key_of(r.contributor).map(|k| k.hex()).unwrap_or_default(),
                blob: r.blob,
                received_ms: r.received_ms,
            })
            .collect();
        Ok(Some(ScoringJob {
            round,
            phase: state.phase as u32,
            base_checkpoint: state.bases[round as usize].clone(),
            eval_seed,
            eval_commitment,
            submissions,
        }))
    }

    /// A stored submission's bytes, for the validator.
    pub async fn submission_blob(&self, blob: &str) -> Result<Bytes, ApiError> {
        if blob.len() != 64 || !blob.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(api(ErrorCode::BadRequest, "a submission is named by 64 hex digits"));
        }
        if self.db.blob_owner(blob).await.map_err(internal)?.is_none() {
            return Err(api(ErrorCode::NotFound, format!("no submission {blob}")));
        }
        self.store.get(&submission_key(blob)).await.map_err(internal)
    }

    /// Takes the validator's scores for the round being scored and publishes it.
    pub async fn post_scores(&self, report: ScoreReport) -> Result<(), ApiError> {
        if self.spec.trust.is_some() {
            return Err(api(ErrorCode::BadRequest, "a sealed run is settled with POST /v1/validator/verdict"));
        }
        let mut state = self.state.lock().await;
        self.check_report(&state, &report).await?;
        let closed_by = state.scoring.as_ref().map(|s| s.closed_by.clone()).unwrap_or_default();
        self.finish_round(&mut state, &closed_by, Judgement::Scored(&report)).await.map_err(internal)
    }

    /// Checks a score report against the round being scored.
    async fn check_report(&self, state: &State, report: &ScoreReport) -> Result<Vec<SubmissionRow>, ApiError> {
        if state.scoring.is_none() || report.round != state.round {
            return Err(api(
                ErrorCode::NotScoring,
                format!("round {} is not waiting for scores (the run is at round {})", report.round, state.round),
            ));
        }
        let rows = self.arrival_order(state.round).await.map_err(internal)?;
        if rows.len() != report.scores.len()
            || rows.iter().zip(&report.scores).any(|(r, s)| r.contributor != s.contributor)
        {
            return Err(api(
                ErrorCode::NotScoring,
                "the scores do not list the round's submissions in the job's order",
            ));
        }
        for (i, s) in report.scores.iter().enumerate() {
            if !s.score.is_finite()
                || s.data_fit.is_some_and(|f| !f.is_finite())
                || s.copy_of.is_some_and(|j| j as usize >= i)
            {
                return Err(api(ErrorCode::BadRequest, format!("score {i} is not finite or copies a later one")));
            }
        }
        Ok(rows)
    }

    /// A sealed run: the validator's aggregate Δ̄ of the round being scored (an f32 message
    /// whose base is the round's checkpoint). Kept until its verdict arrives.
    pub async fn post_aggregate(&self, round: u64, body: Bytes) -> Result<(), ApiError> {
        if self.spec.trust.is_none() {
            return Err(api(ErrorCode::BadRequest, "only a sealed run takes its aggregate from the validator"));
        }
        let mut state = self.state.lock().await;
        if state.scoring.is_none() || round != state.round {
            return Err(api(ErrorCode::NotScoring, format!("round {round} is not being scored")));
        }
        let (header, mean) = self.parse_off_thread(body, state.lengths.clone(), decode_view).await?;
        if header.run_id != self.run_id_bytes || header.round != round || header.base != state.bases[round as usize] {
            return Err(api(ErrorCode::BaseMismatch, "the aggregate is not for this run's round and base"));
        }
        if header.codec != tessera_protocol::Codec::F32 {
            return Err(api(ErrorCode::CodecMismatch, "the aggregate travels in f32"));
        }
        let mean = mean.map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        state.sealed_mean = Some((round, mean));
        Ok(())
    }

    /// A sealed run: the validator's verdict on the round being scored, with the ledger entries
    /// that record it. Publishes the round.
    pub async fn post_verdict(&self, verdict: Verdict) -> Result<(), ApiError> {
        if self.spec.trust.is_none() {
            return Err(api(ErrorCode::BadRequest, "only a sealed run is settled by the validator"));
        }
        let mut state = self.state.lock().await;
        let rows = self.check_report(&state, &verdict.report).await?;
        if verdict.settled.len() != rows.len() {
            return Err(api(ErrorCode::BadRequest, "the verdict does not settle every submission of the round"));
        }
        if verdict.settled.iter().any(|s| !(s.weight.is_finite() && s.weight >= 0.0)) {
            return Err(api(ErrorCode::BadRequest, "aggregation weights must be finite and non-negative"));
        }
        // The aggregate stays posted until the verdict is accepted: a refused verdict can be
        // fixed and sent again.
        if !matches!(state.sealed_mean, Some((r, _)) if r == state.round) {
            return Err(api(
                ErrorCode::NotScoring,
                "post the round's aggregate (POST /v1/validator/aggregate/{round}) before its verdict",
            ));
        }
        // The entries must chain onto the ledger, be signed by the attested validator, and pay
        // exactly what the verdict says to the round's submitters.
        let raw = hex::decode(&verdict.ledger).map_err(|_| api(ErrorCode::BadRequest, "ledger entries are not hex"))?;
        let mut next = self.ledger.read().map_err(|_| api(ErrorCode::Internal, "ledger poisoned"))?.clone();
        let from = next.len();
        if verdict.ledger_from != from {
            return Err(api(
                ErrorCode::NotScoring,
                format!("the ledger has {from} entries, not {}: fetch it again and re-sign", verdict.ledger_from),
            ));
        }
        next.extend(&raw).map_err(|e| api(ErrorCode::BadRequest, format!("ledger entries refused: {e}")))?;
        let added: Vec<tessera_trust::ledger::Entry> = (from..next.len()).filter_map(|s| next.entry(s)).collect();
        let current = self.validator.read().ok().and_then(|v| v.as_ref().map(|v| v.attestation.signing_key.clone()));
        if added.iter().any(|e| Some(&e.signer) != current.as_ref()) {
            return Err(api(ErrorCode::WrongValidator, "a round is settled by the current validator's key only"));
        }
        let receipts: Vec<_> = added.iter().filter(|e| matches!(e.body, LedgerBody::Receipt { .. })).collect();
        let matches = receipts.len() == rows.len()
            && rows.iter().zip(&receipts).zip(&verdict.settled).all(|((row, e), s)| match &e.body {
                LedgerBody::Receipt { contributor, submission, units, .. } => {
                    e.round == row.round
                        && *submission == row.blob
                        && *units == s.reward
                        && self.key_of(row.contributor).is_some_and(|k| k.hex() == *contributor)
                }
                _ => false,
            });
        if !matches || next.check_committed().is_err() {
            return Err(api(
                ErrorCode::BadRequest,
                "the ledger entries must be one receipt per submission (in the job's order, paying what the \
                 verdict says), the round's emission, and a signed root",
            ));
        }
        let ledger = (from..next.len()).filter_map(|s| next.entry_bytes(s).map(|b| (s, hex::encode(b)))).collect();
        let Some((_, mean)) = state.sealed_mean.take() else {
            return Err(api(ErrorCode::Internal, "the posted aggregate vanished"));
        };
        let closed_by = state.scoring.as_ref().map(|s| s.closed_by.clone()).unwrap_or_default();
        self.finish_round(
            &mut state,
            &closed_by,
            Judgement::Sealed { verdict: &verdict, mean, ledger, next: Box::new(next) },
        )
        .await
        .map_err(internal)
    }

    /// Registers an attested validator: its attestation must verify under the run's policy now,
    /// and `entry` must be its signed `Validator` ledger entry chained onto the ledger.
    pub async fn register_validator(&self, attestation: ValidatorAttestation, entry: &str) -> Result<u64, ApiError> {
        let Some(policy) = &self.spec.trust else {
            return Err(api(ErrorCode::BadRequest, "this run does not seal submissions; no attestation is needed"));
        };
        let verified = attestation
            .verify(policy, (now_ms() / 1000) as u64)
            .map_err(|e| api(ErrorCode::Unauthorized, e.to_string()))?;
        let raw = hex::decode(entry).map_err(|_| api(ErrorCode::BadRequest, "the ledger entry is not hex"))?;
        let _state = self.state.lock().await; // No round publishes meanwhile.
        let mut next = self.ledger.read().map_err(|_| api(ErrorCode::Internal, "ledger poisoned"))?.clone();
        let seq = next.len();
        next.extend(&raw).map_err(|e| api(ErrorCode::BadRequest, format!("ledger entry refused: {e}")))?;
        match next.entry(seq).map(|e| e.body) {
            Some(LedgerBody::Validator { attestation: a }) if a == attestation && next.len() == seq + 1 => {}
            _ => return Err(api(ErrorCode::BadRequest, "the entry must be this attestation's validator entry")),
        }
        self.db.append_ledger(&[(seq, hex::encode(&raw))]).await.map_err(internal)?;
        if verified.insecure {
            tracing::warn!(key = %attestation.signing_key, "validator registered with an INSECURE development attestation (no TEE)");
        } else {
            tracing::info!(key = %attestation.signing_key, attestation = %verified, "validator attested");
        }
        let recipient = tessera_trust::SealingKey::parse(&attestation.sealing_key)
            .map_err(|e| api(ErrorCode::BadRequest, e.to_string()))?
            .fingerprint();
        *self.ledger.write().map_err(|_| api(ErrorCode::Internal, "ledger poisoned"))? = next;
        *self.validator.write().map_err(|_| api(ErrorCode::Internal, "validator poisoned"))? =
            Some(CurrentValidator { attestation, verified, recipient, seq });
        Ok(seq)
    }

    /// Closes an epoch of API usage, reported by the run's operator: writes a usage entry per
    /// account, the epoch closing (revenue, the funding share, what is payable) and a payout per
    /// holder by the ledger's own largest-remainder split of the balances, then a root over them
    /// all — signed by the hub, in one transaction.
    pub async fn close_epoch(
        &self,
        signer: &PublicKey,
        report: tessera_protocol::api::EpochReport,
    ) -> Result<tessera_protocol::api::EpochSettled, ApiError> {
        let Some(economy) = &self.spec.economy else {
            return Err(api(ErrorCode::BadRequest, "this run has no usage economy (start the hub with --operator)"));
        };
        if signer.hex() != economy.operator {
            return Err(api(ErrorCode::Unauthorized, "only the run's API operator may report usage"));
        }
        let mut accounts = std::collections::BTreeSet::new();
        if report.usage.iter().any(|u| u.account.is_empty() || !accounts.insert(u.account.as_str())) {
            return Err(api(ErrorCode::BadRequest, "each account must appear once, with a name"));
        }
        let state = self.state.lock().await; // No round publishes meanwhile.
        let round = state.round;
        let mut next = self.ledger.read().map_err(|_| api(ErrorCode::Internal, "ledger poisoned"))?.clone();
        if let Some(last) = next.epochs.keys().next_back().copied().filter(|&l| report.epoch <= l) {
            return Err(api(
                ErrorCode::Conflict,
                format!("epoch {} is not after the last closed epoch {last}", report.epoch),
            ));
        }
        let from = next.len();
        let refused =
            |e: tessera_trust::ledger::LedgerError| api(ErrorCode::BadRequest, format!("refused by the ledger: {e}"));
        for u in &report.usage {
            let body = LedgerBody::Usage {
                epoch: report.epoch,
                account: u.account.clone(),
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                revenue: u.revenue,
            };
            next.append(round, now_ms(), false, body, &self.identity).map_err(refused)?;
        }
        let revenue = report.usage.iter().try_fold(0u64, |a, u| a.checked_add(u.revenue));
        let revenue = revenue.ok_or_else(|| api(ErrorCode::BadRequest, "the epoch's revenue overflows"))?;
        let balances = next.balances();
        let (funding, payable) = tessera_trust::ledger::epoch_split(revenue, economy.funding_ppm, &balances);
        let close =
            LedgerBody::EpochClose { epoch: report.epoch, revenue, funding_ppm: economy.funding_ppm, funding, payable };
        next.append(round, now_ms(), false, close, &self.identity).map_err(refused)?;
        let payouts = tessera_trust::ledger::split_pro_rata(payable, &balances);
        for (holder, amount) in &payouts {
            let body = LedgerBody::Payout { epoch: report.epoch, holder: holder.clone(), amount: *amount };
            next.append(round, now_ms(), false, body, &self.identity).map_err(refused)?;
        }
        let root = LedgerBody::Root { size: next.len(), root: next.root() };
        next.append(round, now_ms(), false, root, &self.identity).map_err(refused)?;
        let to = next.len();
        let rows: Vec<(u64, String)> =
            (from..to).filter_map(|s| next.entry_bytes(s).map(|b| (s, hex::encode(b)))).collect();
        self.db.append_ledger(&rows).await.map_err(internal)?;
        *self.ledger.write().map_err(|_| api(ErrorCode::Internal, "ledger poisoned"))? = next;
        drop(state);
        tracing::info!(epoch = report.epoch, revenue, funding, payable, holders = payouts.len(), "epoch closed");
        Ok(tessera_protocol::api::EpochSettled {
            epoch: report.epoch,
            revenue,
            funding,
            payable,
            payouts,
            ledger_from: from,
            ledger_to: to,
        })
    }

    /// The validator submissions are sealed to, if one is registered.
    pub fn validator_info(&self) -> Option<ValidatorInfo> {
        let v = self.validator.read().ok()?.clone()?;
        Some(ValidatorInfo {
            attestation: serde_json::to_value(&v.attestation).ok()?,
            verified: serde_json::to_value(&v.verified).ok()?,
            insecure: v.verified.insecure,
            ledger_seq: v.seq,
        })
    }

    /// A registered contributor's scored submissions and rating history.
    pub async fn contributor_history(&self, id: u64) -> Result<tessera_protocol::api::ContributorHistory, ApiError> {
        let known = self.keys.read().map_err(|_| api(ErrorCode::Internal, "keys poisoned"))?.1.contains_key(&id);
        if !known {
            return Err(api(ErrorCode::NotFound, format!("no contributor {id}")));
        }
        self.db.contributor_history(id).await.map_err(internal)
    }

    /// The economy the ledger records, as JSON: closed epochs, usage, balances, allocations,
    /// reward units and payouts.
    pub fn economy(&self) -> Result<tessera_trust::ledger::Economy, ApiError> {
        Ok(self.ledger.read().map_err(|_| api(ErrorCode::Internal, "ledger poisoned"))?.economy())
    }

    /// The ledger's bytes from entry `from` on.
    pub fn ledger_bytes(&self, from: u64) -> Vec<u8> {
        self.ledger.read().map(|l| l.bytes_from(from).to_vec()).unwrap_or_default()
    }

    /// An inclusion proof of entry `seq` under the first signed root after it.
    pub fn ledger_proof(&self, seq: u64) -> Result<tessera_trust::ledger::Proof, ApiError> {
        let l = self.ledger.read().map_err(|_| api(ErrorCode::Internal, "ledger poisoned"))?;
        if seq >= l.len() {
            return Err(api(ErrorCode::NotFound, format!("the ledger has {} entries", l.len())));
        }
        l.prove(seq).ok_or_else(|| api(ErrorCode::NotFound, format!("entry {seq} is not under a signed root yet")))
    }

    /// The round's submissions in arrival order (ties by contributor).
    async fn arrival_order(&self, round: u64) -> Result<Vec<SubmissionRow>, HubError> {
        let mut rows = self.db.submissions(Some(round)).await?;
        rows.sort_by_key(|r| (r.received_ms, r.contributor));
        Ok(rows)
    }

    /// Judges (when scored), rates and pays the round, aggregates it and publishes it.
    async fn finish_round(&self, state: &mut State, closed_by: &str, judgement: Judgement<'_>) -> Result<(), HubError> {
        let round = state.round;
        self.db.set_round_state(round, RoundState::Aggregating).await?;
        let rows = self.arrival_order(round).await?;
        let (weights, score_rows, rated) = self.judge_round(state, &rows, &judgement).await?;
        let sealed = self.spec.trust.is_some();
        let (mean, ledger, next_ledger) = match judgement {
            Judgement::Sealed { mean, ledger, next, .. } => (Some(mean), ledger, Some(next)),
            // A sealed round nobody settled: the hub cannot read it, so nothing is aggregated.
            _ if sealed => (Some(state.lengths.iter().map(|&n| vec![0.0; n]).collect()), Vec::new(), None),
            _ => (None, Vec::new(), None),
        };
        let mut inputs = Vec::with_capacity(rows.len());
        let mut fragments = Vec::with_capacity(rows.len());
        for (row, &w) in rows.iter().zip(&weights) {
            if w <= 0.0 || mean.is_some() {
                continue;
            }
            match self.store.get(&submission_key(&row.blob)).await {
                Ok(bytes) => {
                    inputs.push((w as f32, bytes));
                    fragments.push(self.spec.fragment_tensors(self.spec.fragment_of(row.contributor)));
                }
                Err(e) => {
                    tracing::error!(contributor = row.contributor, error = %e, "submission blob unreadable; left out")
                }
            }
        }
        // A layer-sharded run: each tensor is the mean of the submissions that carry it.
        let mean = match mean {
            None if self.spec.fragments > 1 => {
                let lengths = state.lengths.clone();
                let inputs = std::mem::take(&mut inputs);
                Some(
                    tokio::task::spawn_blocking(move || fragment_mean(&lengths, &inputs, &fragments))
                        .await
                        .map_err(|e| HubError::Corrupt(format!("aggregation task failed: {e}")))?,
                )
            }
            m => m,
        };
        // Copies, not moves: whatever happens to this call, the state stays whole.
        let theta = state.theta.clone();
        let outer = state.outer.clone();
        let residual = state.residual.clone();
        let ctx = (
            self.spec.at_phase(state.phase),
            self.run_id_bytes,
            state.bases[round as usize].clone(),
            state.lengths.clone(),
        );
        let used_weight = (weights.iter().filter(|&&w| w > 0.0).count() as u64, weights.iter().sum::<f64>());
        let aggregation_started = std::time::Instant::now();
        let agg = tokio::task::spawn_blocking(move || {
            let mean = mean.map(|m| (m, used_weight.1, used_weight.0));
            aggregate(&ctx.0, ctx.1, round, &ctx.2, &ctx.3, &theta, &outer, &residual, &inputs, mean)
        })
        .await
        .map_err(|e| HubError::Corrupt(format!("aggregation task failed: {e}")))??;
        metrics::histogram!("tessera_hub_aggregation_seconds").record(aggregation_started.elapsed().as_secs_f64());
        // The last round of a phase publishes the next phase's model: grown, the same function.
        let finished = round + 1 >= self.spec.rounds;
        let losses: Vec<f64> = rows.iter().filter_map(|r| r.inner_loss).collect();
        let mean_inner_loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
        let planned = self.spec.phase_of(round + 1) > state.phase;
        let target_met = self.spec.until_loss(state.phase).zip(mean_inner_loss).is_some_and(|(t, l)| l <= t);
        let next_phase =
            (!finished && state.phase < self.spec.phases.len() && (planned || target_met)).then_some(state.phase + 1);
        if target_met && !planned && next_phase.is_some() {
            tracing::info!(round, loss = ?mean_inner_loss, "the phase reached its loss target: growing early");
        }
        let agg = match next_phase {
            Some(next) => self.grow(agg, state.phase, next, round + 1).await?,
            None => agg,
        };

        let hash = hex::encode(weights_hash(&agg.weights_bytes));
        self.store.put(&checkpoint_key(&hash), Bytes::from(agg.weights_bytes)).await?;
        self.store.put(&update_key(round + 1), Bytes::from(agg.update_bytes)).await?;
        self.store.put(&outer_key(round + 1), Bytes::from(agg.outer_bytes)).await?;
        // The phase boundary: the leaderboard after this round decides who moves on, among those
        // who earned something (a contributor whose every submission was refused or worthless
        // never qualifies, however few others there are).
        let qualified: Vec<u64> = match &self.spec.contest {
            Some(c) if round + 1 == c.boundary(self.spec.rounds) => {
                let earned: std::collections::HashSet<u64> = (self.db.scores().await?.iter())
                    .chain(&score_rows)
                    .filter(|s| s.reward > 0)
                    .map(|s| s.contributor)
                    .collect();
                let ratings = rated.as_ref().unwrap_or(&state.ratings);
                let ids = self.db.contributors().await?.into_iter().map(|c| c.0).filter(|id| earned.contains(id));
                ratings.leaderboard(ids).into_iter().take(c.promote_top as usize).map(|(id, _)| id).collect()
            }
            _ => Vec::new(),
        };
        // A phase that admits only the top of the leaderboard: who that is now, among those the
        // ending phase admitted (the best of each phase move up; nobody comes back).
        let members: Option<Vec<u64>> = match next_phase.and_then(|k| self.spec.phases[k - 1].qualify_top) {
            Some(top) => {
                let ratings = rated.as_ref().unwrap_or(&state.ratings);
                let ids = self.db.contributors().await?.into_iter().map(|c| c.0);
                let admitted = ids.filter(|id| state.members.as_ref().is_none_or(|m| m.contains(id)));
                Some(ratings.leaderboard(admitted).into_iter().take(top as usize).map(|(id, _)| id).collect())
            }
            None => None,
        };
        let changed: Vec<(u64, tessera_contest::Rating)> = rated.as_ref().map_or_else(Vec::new, |r| {
            r.0.iter().filter(|(id, v)| state.ratings.0.get(id) != Some(v)).map(|(id, v)| (*id, *v)).collect()
        });
        self.db
            .publish(&Publication {
                round,
                result_checkpoint: &hash,
                closed_by,
                closed_ms: now_ms(),
                accepted: agg.used,
                weight: agg.weight,
                mean_inner_loss,
                bytes_up: rows.iter().map(|r| r.bytes).sum(),
                finished,
                scores: &score_rows,
                ratings: &changed,
                qualified: &qualified,
                ledger: &ledger,
                members: next_phase.zip(members.as_deref()).map(|(k, m)| (k as u64, m)),
                phase_start: next_phase.map(|k| (k as u64, round + 1)),
            })
            .await?;
        if let Some(next) = next_ledger
            && let Ok(mut l) = self.ledger.write()
        {
            *l = *next;
        }
        if let Some(r) = rated {
            state.ratings = r;
        }
        for row in &score_rows {
            note_fit(&mut state.fit_record, row);
        }
        state.scoring = None;
        if !finished {
            state.commitment = self.db.eval_seed(round + 1).await?.1;
        }
        state.theta = agg.theta;
        state.outer = agg.outer;
        state.residual = agg.residual;
        state.round = round + 1;
        state.finished = finished;
        state.bases.push(hash.clone());
        state.accepted = 0;
        state.first_accept_ms = None;
        if let Some(next) = next_phase {
            if let Some(m) = &members {
                tracing::info!(phase = next, members = ?m, "the next phase admits the top of the leaderboard");
            }
            state.members = members.map(|m| m.into_iter().collect());
            state.starts.push(round + 1);
            state.tensors = self.spec.at_phase(next).tensors;
            state.lengths = state.tensors.iter().map(|t| t.numel() as usize).collect();
            state.phase = next;
            tracing::info!(
                phase = next,
                name = %self.spec.phases[next - 1].name,
                params = self.spec.at_phase(next).num_params(),
                "the run grew into its next phase"
            );
        }
        self.round_tx.send_replace(round + 1);
        tracing::info!(round, closed_by, submissions = agg.used, checkpoint = %hash, finished, "round published");
        metrics::counter!("tessera_hub_rounds_published_total").increment(1);
        metrics::gauge!("tessera_hub_round").set((round + 1) as f64);
        Ok(())
    }

    /// A phase's last round, aggregated, grown into phase `next`'s model: weights, outer momentum
    /// and broadcast residual, re-encoded (the published update stays the pre-growth one, so a
    /// contributor following updates falls back to downloading the grown checkpoint).
    async fn grow(&self, agg: Aggregated, phase: usize, next: usize, step: u64) -> Result<Aggregated, HubError> {
        let grower =
            self.grower.read().ok().and_then(|g| g.clone()).ok_or_else(|| {
                HubError::Config(format!("the run grows into phase {next} but this hub has no grower"))
            })?;
        let (from, to) = (self.spec.at_phase(phase), self.spec.at_phase(next));
        let seed = self.spec.phases[next - 1].seed;
        let outer_config = OuterConfig { lr: to.outer.lr, momentum: to.outer.momentum, nesterov: to.outer.nesterov };
        tokio::task::spawn_blocking(move || {
            let grown = grower
                .grow(&from, &to, seed, &agg.theta, agg.outer.momentum(), &agg.residual)
                .map_err(|e| HubError::Corrupt(format!("growing into phase {next}: {e}")))?;
            let lengths: Vec<usize> = to.tensors.iter().map(|t| t.numel() as usize).collect();
            let mut outer = OuterOptimizer::new(outer_config, &lengths);
            outer.set_momentum(step, grown.momentum.clone())?;
            let mut saved = grown.momentum;
            saved.extend(grown.residual.iter().cloned());
            Ok(Aggregated {
                weights_bytes: encode_weights(&to.tensors, &grown.theta)?,
                outer_bytes: encode_weights(&outer_table(&to.tensors), &saved)?,
                theta: grown.theta,
                outer,
                residual: grown.residual,
                ..agg
            })
        })
        .await
        .map_err(|e| HubError::Corrupt(format!("growth task failed: {e}")))?
    }

    /// Weights for `rows` (arrival order); with scores, also their rows (flags, rewards) and
    /// the ratings after this round.
    async fn judge_round(
        &self,
        state: &State,
        rows: &[SubmissionRow],
        judgement: &Judgement<'_>,
    ) -> Result<(Vec<f64>, Vec<ScoreRow>, Option<Ratings>), HubError> {
        let row_of =
            |r: &SubmissionRow, score: Option<f64>, data_fit: Option<f64>, flag: Option<&str>, weight, reward| {
                ScoreRow {
                    contributor: r.contributor,
                    base_round: r.base_round,
                    round: r.round,
                    score,
                    data_fit,
                    flag: flag.map(str::to_owned),
                    weight,
                    reward,
                }
            };
        if let Judgement::Sealed { verdict, .. } = judgement {
            let standings: Vec<Standing> = rows
                .iter()
                .zip(&verdict.settled)
                .map(|(r, s)| Standing { contributor: r.contributor, score: s.effective })
                .chain(self.refused_standings(state.round).await?)
                .collect();
            let mut ratings = state.ratings.clone();
            ratings.update(&standings);
            let score_rows = rows
                .iter()
                .zip(&verdict.report.scores)
                .zip(&verdict.settled)
                .map(|((r, sc), st): ((&SubmissionRow, _), &Settled)| {
                    row_of(r, Some(sc.score), sc.data_fit, st.flag.as_deref(), st.weight, st.reward)
                })
                .collect();
            return Ok((verdict.settled.iter().map(|s| s.weight).collect(), score_rows, Some(ratings)));
        }
        let (Some(contest), Judgement::Scored(report)) = (&self.spec.contest, judgement) else {
            let weights: Vec<f64> = rows.iter().map(|r| r.weight).collect();
            let scored_run = self.spec.contest.is_some();
            let score_rows = if scored_run {
                rows.iter().map(|r| row_of(r, None, None, Some("unscored"), r.weight, 0)).collect()
            } else {
                Vec::new()
            };
            return Ok((weights, score_rows, None));
        };
        let history: Vec<(f64, u64)> =
            rows.iter().map(|r| state.fit_record.get(&r.contributor).copied().unwrap_or_default()).collect();
        let scored: Vec<Scored> = rows
            .iter()
            .zip(&report.scores)
            .map(|(r, s)| Scored {
                contributor: r.contributor,
                score: s.score,
                data_fit: s.data_fit,
                copy_of: s.copy_of.map(|j| j as usize),
                weight: r.weight,
                fit_factor: 1.0,
            })
            .collect();
        let policy = Policy { reward_power: contest.reward_power, top: contest.top.map(|t| t as usize) };
        let Settlement { scored, judged, rewards } = settle(scored, &history, &policy, contest.reward_units);
        let standings: Vec<Standing> = scored
            .iter()
            .zip(&judged)
            .map(|(s, j)| Standing { contributor: s.contributor, score: j.effective })
            .chain(self.refused_standings(state.round).await?)
            .collect();
        for ((s, j), reward) in scored.iter().zip(&judged).zip(&rewards) {
            tracing::debug!(
                round = state.round,
                contributor = s.contributor,
                score = s.score,
                data_fit = s.data_fit,
                fit_factor = s.fit_factor,
                weight = j.weight,
                reward,
                flag = j.flag.map(|f| f.as_str()),
                "judged"
            );
        }
        let mut ratings = state.ratings.clone();
        ratings.update(&standings);
        let score_rows = rows
            .iter()
            .zip(&scored)
            .zip(judged.iter().zip(&rewards))
            .map(|((r, s), (j, &reward))| {
                row_of(r, Some(s.score), s.data_fit, j.flag.map(|f| f.as_str()), j.weight, reward)
            })
            .collect();
        Ok((judged.iter().map(|j| j.weight).collect(), score_rows, Some(ratings)))
    }

    /// A contributor whose submission was refused this round takes part in its rating, in last
    /// place (not for a repeat of an accepted submission or the hub's own trouble).
    async fn refused_standings(&self, round: u64) -> Result<Vec<Standing>, HubError> {
        Ok(self
            .db
            .rejections(round)
            .await?
            .into_iter()
            .filter(|(_, code, _)| {
                !matches!(code.as_str(), "duplicate" | "internal" | "run_finished" | "busy" | "replayed_request")
            })
            .map(|(contributor, _, _)| Standing { contributor, score: None })
            .collect())
    }

    /// Contributors ranked by rating, with their records, and who qualified for the next phase
    /// (fixed at the phase boundary).
    pub async fn leaderboard(&self) -> Result<Leaderboard, HubError> {
        let (round, finished, ratings) = {
            let s = self.state.lock().await;
            (s.round, s.finished, s.ratings.clone())
        };
        let contributors = self.db.contributors().await?;
        let scores = self.db.scores().await?;
        let subs = self.db.submissions(None).await?;
        let rejections = self.db.all_rejections().await?;
        let promote_top = self.spec.contest.as_ref().map_or(0, |c| c.promote_top);
        let promote_at = self.spec.contest.as_ref().map_or(self.spec.rounds, |c| c.boundary(self.spec.rounds));
        let qualified = self.db.qualified().await?;
        let names: HashMap<u64, String> = contributors.iter().map(|(id, n, _)| (*id, n.clone())).collect();
        // Per contributor, in one pass each: accepted, rejected, rewards, (score sum, scored).
        #[derive(Default)]
        struct Record {
            accepted: u64,
            rejected: u64,
            rewards: u64,
            score_sum: f64,
            scored: u64,
        }
        let mut records: HashMap<u64, Record> = HashMap::new();
        for s in &subs {
            records.entry(s.contributor).or_default().accepted += 1;
        }
        for r in &rejections {
            records.entry(r.0).or_default().rejected += 1;
        }
        for s in &scores {
            let rec = records.entry(s.contributor).or_default();
            rec.rewards += s.reward;
            if let Some(x) = s.score {
                rec.score_sum += x;
                rec.scored += 1;
            }
        }
        let qualified: std::collections::HashSet<u64> = qualified.into_iter().collect();
        let rows = ratings
            .leaderboard(contributors.iter().map(|c| c.0))
            .into_iter()
            .enumerate()
            .map(|(i, (id, r))| {
                let rec = records.remove(&id).unwrap_or_default();
                LeaderRow {
                    rank: i as u64 + 1,
                    id,
                    name: names.get(&id).cloned().unwrap_or_default(),
                    mu: r.mu,
                    sigma: r.sigma,
                    ordinal: r.ordinal(),
                    rounds: r.rounds,
                    accepted: rec.accepted,
                    rejected: rec.rejected,
                    rewards: rec.rewards,
                    mean_score: (rec.scored > 0).then(|| rec.score_sum / rec.scored as f64),
                    qualified: qualified.contains(&id),
                }
            })
            .collect();
        Ok(Leaderboard {
            run_id: self.run_id.clone(),
            round,
            finished,
            promote_top,
            promote_at,
            promoted: round >= promote_at,
            rows,
        })
    }

    pub fn note_download(&self, bytes: u64) {
        self.bytes_down.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!("tessera_hub_bytes_total", "direction" => "down").increment(bytes);
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub async fn status(&self) -> Result<HubStatus, HubError> {
        let (round, finished) = {
            let s = self.state.lock().await;
            (s.round, s.finished)
        };
        let rounds = self.db.rounds().await?;
        let subs = self.db.submissions(None).await?;
        let mut by_contributor: HashMap<u64, Vec<&SubmissionRow>> = HashMap::new();
        for s in &subs {
            by_contributor.entry(s.contributor).or_default().push(s);
        }
        let rejected: HashMap<u64, u64> = self.db.rejection_counts().await?.into_iter().collect();
        let contributors = self
            .db
            .contributors()
            .await?
            .into_iter()
            .map(|(id, name, _)| {
                let mine = by_contributor.remove(&id).unwrap_or_default();
                let losses: Vec<f64> = mine.iter().filter_map(|s| s.inner_loss).collect();
                ContributorStats {
                    id,
                    name,
                    accepted: mine.len() as u64,
                    rejected: rejected.get(&id).copied().unwrap_or(0),
                    submitted_rounds: {
                        let mut r: Vec<u64> = mine.iter().map(|s| s.base_round).collect();
                        r.sort_unstable();
                        r
                    },
                    bytes_up: mine.iter().map(|s| s.bytes).sum(),
                    mean_inner_loss: (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                    last_seen_ms: mine.iter().map(|s| s.received_ms).max(),
                }
            })
            .collect();
        let history = rounds
            .into_iter()
            .map(|r| RoundSummary {
                round: r.round,
                state: r.state,
                base_checkpoint: r.base_checkpoint,
                result_checkpoint: r.result_checkpoint,
                accepted: r.accepted,
                weight: r.weight,
                mean_inner_loss: r.mean_inner_loss,
                bytes_up: r.bytes_up,
                closed_by: r.closed_by,
                opened_ms: r.opened_ms,
                closed_ms: r.closed_ms,
            })
            .collect();
        Ok(HubStatus {
            run_id: self.run_id.clone(),
            round,
            rounds: self.spec.rounds,
            finished,
            num_params: self.spec.num_params(),
            bytes_up: subs.iter().map(|s| s.bytes).sum(),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            history,
            contributors,
        })
    }
}

/// Averages the round's pseudo-gradients (weighted; or takes `given`, a sealed run's mean from
/// the validator), takes the outer step, and quantises the
/// resulting weight change with the broadcast codec (error feedback in `residual`). The new
/// global weights are θ + decode(update), exactly what a contributor computes from the update.
#[allow(clippy::too_many_arguments)]
fn aggregate(
    spec: &RunSpec,
    run_id: [u8; 16],
    round: u64,
    base: &str,
    lengths: &[usize],
    theta: &[Vec<f32>],
    outer: &OuterOptimizer,
    residual: &[Vec<f32>],
    inputs: &[(f32, Bytes)],
    given: Option<Mean>,
) -> Result<Aggregated, HubError> {
    let (mean, weight, used) = match given {
        Some(m) => m,
        None if spec.aggregation == Aggregation::Mean => streaming_mean(lengths, inputs)?,
        None => robust_mean(&spec.aggregation, lengths, inputs)?,
    };
    let mut target = theta.to_vec();
    let mut outer = outer.clone();
    outer.step_to(&mut target, &mean)?;

    let mut base_hash = [0u8; 32];
    hex::decode_to_slice(base, &mut base_hash).map_err(|e| HubError::Corrupt(format!("base checkpoint hash: {e}")))?;
    let codec = spec.broadcast_codec;
    let mut new_theta = theta.to_vec();
    let mut new_residual = residual.to_vec();
    let encoded = broadcast_step(&codec, &mut new_theta, &target, &mut new_residual)?;
    let entries = spec
        .tensors
        .iter()
        .zip(encoded)
        .map(|(t, encoded)| TensorEntry { name: t.name.clone(), shape: t.shape.clone(), encoded })
        .collect();
    let update = PseudoGradient { codec, run_id, round: round + 1, base_checkpoint: base_hash, tensors: entries };
    let weights_bytes = encode_weights(&spec.tensors, &new_theta)?;
    let mut saved: Vec<Vec<f32>> = outer.momentum().to_vec();
    saved.extend(new_residual.iter().cloned());
    let outer_bytes = encode_weights(&outer_table(&spec.tensors), &saved)?;
    Ok(Aggregated {
        theta: new_theta,
        outer,
        residual: new_residual,
        weights_bytes,
        update_bytes: update.to_bytes(),
        outer_bytes,
        weight,
        used,
    })
}

/// Adds a scored submission's data fit, if measured, to its contributor's record.
fn note_fit(record: &mut HashMap<u64, (f64, u64)>, row: &ScoreRow) {
    if let Some(f) = row.data_fit.filter(|f| f.is_finite()) {
        let e = record.entry(row.contributor).or_default();
        *e = (e.0 + f, e.1 + 1);
    }
}

/// Δ̄ of the submissions (zero if none), their total weight and how many were used.
type Mean = (Vec<Vec<f32>>, f64, u64);

/// The weighted mean, one submission at a time. Every submission was checked on arrival, so one
/// decode pass each; should one fail after all (a damaged blob), start again without it rather
/// than fail or poison the round.
fn streaming_mean(lengths: &[usize], inputs: &[(f32, Bytes)]) -> Result<Mean, HubError> {
    let mut left_out = vec![false; inputs.len()];
    let (acc, weight) = 'accumulate: loop {
        let mut acc = Accumulator::new(lengths);
        let mut weight = 0.0f64;
        for (k, (w, bytes)) in inputs.iter().enumerate() {
            if left_out[k] {
                continue;
            }
            let added = MessageView::parse(bytes).map_err(AggregateError::from).and_then(|v| acc.add_checked(*w, &v));
            match added {
                Ok(()) => weight += f64::from(*w),
                Err(e) => {
                    tracing::error!(error = %e, "a stored submission no longer decodes; aggregating without it");
                    left_out[k] = true;
                    continue 'accumulate;
                }
            }
        }
        break (acc, weight);
    };
    let used = acc.count() as u64;
    let mean = if used == 0 { lengths.iter().map(|&n| vec![0.0; n]).collect() } else { acc.finish()? };
    Ok((mean, weight, used))
}

/// A layer-sharded round's mean: every tensor averaged (weighted) over the submissions whose
/// fragment carries it; a tensor nobody trained stays at zero. A blob that no longer decodes is
/// left out.
fn fragment_mean(lengths: &[usize], inputs: &[(f32, Bytes)], fragments: &[Vec<usize>]) -> Vec<Vec<f32>> {
    let mut sum: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
    let mut weight_of = vec![0.0f64; lengths.len()];
    for ((w, bytes), keep) in inputs.iter().zip(fragments) {
        let subset: Vec<usize> = keep.iter().map(|&i| lengths[i]).collect();
        let decoded = MessageView::parse(bytes).map_err(AggregateError::from).and_then(|v| decode_view(&subset, &v));
        match decoded {
            Ok(d) => {
                for (&i, values) in keep.iter().zip(d) {
                    for (s, v) in sum[i].iter_mut().zip(values) {
                        *s += w * v;
                    }
                    weight_of[i] += f64::from(*w);
                }
            }
            Err(e) => tracing::error!(error = %e, "a stored submission no longer decodes; aggregating without it"),
        }
    }
    for (t, &w) in sum.iter_mut().zip(&weight_of) {
        if w > 0.0 {
            let inv = (1.0 / w) as f32;
            t.iter_mut().for_each(|v| *v *= inv);
        }
    }
    sum
}

/// The run's robust rule over every submission, decoded at once; a blob that no longer decodes
/// is left out.
fn robust_mean(rule: &Aggregation, lengths: &[usize], inputs: &[(f32, Bytes)]) -> Result<Mean, HubError> {
    let mut decoded = Vec::with_capacity(inputs.len());
    let mut weights = Vec::with_capacity(inputs.len());
    for (w, bytes) in inputs {
        match MessageView::parse(bytes).map_err(AggregateError::from).and_then(|v| decode_view(lengths, &v)) {
            Ok(d) => {
                decoded.push(d);
                weights.push(*w);
            }
            Err(e) => tracing::error!(error = %e, "a stored submission no longer decodes; aggregating without it"),
        }
    }
    if decoded.is_empty() {
        return Ok((lengths.iter().map(|&n| vec![0.0; n]).collect(), 0.0, 0));
    }
    let views: Vec<Vec<&[f32]>> = decoded.iter().map(|d| d.iter().map(Vec::as_slice).collect()).collect();
    let (mean, report) = tessera_aggregate::robust::aggregate(rule, &views, &weights)?;
    tracing::info!(rule = %rule, clipped = report.clipped, radius = ?report.radius, "robust aggregation");
    let weight = weights.iter().map(|&w| f64::from(w)).sum();
    Ok((mean, weight, decoded.len() as u64))
}

/// The phase round `round` belongs to, given the round each phase began at.
fn phase_at(starts: &[u64], round: u64) -> usize {
    starts.iter().rposition(|&s| s <= round).unwrap_or(0)
}

/// Loads and verifies the run's ledger, writing its genesis (signed by `identity`) if it has
/// none; the validator submissions are sealed to is the last one it registered.
async fn open_ledger(
    db: &Db,
    run_id: &str,
    spec: &RunSpec,
    identity: &Identity,
) -> Result<(Ledger, Option<CurrentValidator>), HubError> {
    let mut raw = Vec::new();
    for entry in db.ledger().await? {
        raw.extend(hex::decode(&entry).map_err(|e| HubError::Corrupt(format!("ledger entry: {e}")))?);
    }
    let mut ledger = Ledger::default();
    ledger.extend(&raw).map_err(|e| HubError::Corrupt(format!("the run's ledger does not verify: {e}")))?;
    if ledger.is_empty() {
        let policy = spec.trust.clone().unwrap_or_default();
        let genesis = LedgerBody::Genesis { run_id: run_id.to_owned(), policy };
        let bytes = ledger
            .append(0, now_ms(), false, genesis, identity)
            .map_err(|e| HubError::Corrupt(format!("ledger genesis: {e}")))?;
        let mut rows = vec![(0, hex::encode(bytes))];
        // The run's allocations are part of it from the start.
        for (holder, amount) in spec.economy.iter().flat_map(|e| e.allocations.iter()) {
            let body = LedgerBody::Allocation { holder: holder.clone(), amount: *amount };
            let bytes = ledger
                .append(0, now_ms(), false, body, identity)
                .map_err(|e| HubError::Config(format!("allocation to {holder:?}: {e}")))?;
            rows.push((ledger.len() - 1, hex::encode(bytes)));
        }
        if ledger.len() > 1 {
            let root = LedgerBody::Root { size: ledger.len(), root: ledger.root() };
            let bytes =
                ledger.append(0, now_ms(), false, root, identity).map_err(|e| HubError::Corrupt(e.to_string()))?;
            rows.push((ledger.len() - 1, hex::encode(bytes)));
        }
        db.append_ledger(&rows).await?;
    } else if ledger.hub() != Some(identity.public()) {
        return Err(HubError::Config(format!(
            "this hub's key {} is not the key {} that signed the run's ledger: start it with the run's key file",
            identity.public(),
            ledger.hub().map(|k| k.hex()).unwrap_or_default()
        )));
    }
    // The last validator registered; the ledger verified its attestation when it was read.
    let last = ledger.entries().into_iter().rev().find_map(|e| match e.body {
        LedgerBody::Validator { attestation } => Some((e.seq, attestation)),
        _ => None,
    });
    let mut validator = None;
    if let Some((seq, attestation)) = last {
        let corrupt = |m: String| HubError::Corrupt(format!("ledger validator {seq}: {m}"));
        let key = PublicKey::parse(&attestation.signing_key).map_err(|e| corrupt(e.to_string()))?;
        let verified = ledger.validator(&key).ok_or_else(|| corrupt("not known to the ledger".into()))?.verified();
        let recipient = tessera_trust::SealingKey::parse(&attestation.sealing_key)
            .map_err(|e| corrupt(e.to_string()))?
            .fingerprint();
        validator = Some(CurrentValidator { attestation, verified, recipient, seq });
    }
    Ok((ledger, validator))
}
