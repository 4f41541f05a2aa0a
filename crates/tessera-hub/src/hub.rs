//! The run's state machine. Every round moves open → collecting → aggregating → published:
//! open when its base checkpoint is published, collecting from its first accepted submission,
//! aggregating at quorum or when its deadline passes, published when the new checkpoint, the
//! compressed update and the outer-optimizer state are in the store and one database
//! transaction has closed the round and opened the next.
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
use tessera_aggregate::{Accumulator, AggregateError, OuterConfig, OuterOptimizer, broadcast_step, check_view};
use tessera_protocol::api::{
    Assignment, ContributorStats, HubStatus, Receipt, Registration, RoundState, RoundSummary, RunInfo,
};
use tessera_protocol::{
    ApiError, ErrorCode, MessageView, PROTOCOL_VERSION, PseudoGradient, RunSpec, TensorEntry, TensorSpec,
    decode_weights, encode_weights, weights_hash,
};
use tokio::sync::{Mutex, watch};

use crate::HubError;
use crate::db::{Db, Publication, SubmissionRow};
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
}

pub struct Hub {
    db: Db,
    store: Store,
    pub spec: RunSpec,
    pub run_id: String,
    run_id_bytes: [u8; 16],
    lengths: Vec<usize>,
    state: Mutex<State>,
    tokens: std::sync::RwLock<HashMap<u64, String>>,
    round_tx: watch::Sender<u64>,
    bytes_down: AtomicU64,
}

/// What the hub checks of a submission before it looks at the run's state.
struct Header {
    round: u64,
    base: String,
    run_id: [u8; 16],
    codec: tessera_protocol::Codec,
    table: Vec<(String, Vec<u64>)>,
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
    pub async fn open(db: Db, store: Store, new: Option<NewRun>) -> Result<Arc<Hub>, HubError> {
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
        let lengths: Vec<usize> = spec.tensors.iter().map(|t| t.numel() as usize).collect();

        let rounds = db.rounds().await?;
        let bases: Vec<String> = rounds.iter().map(|r| r.base_checkpoint.clone()).collect();
        let current = bases.last().ok_or_else(|| HubError::Corrupt("run has no rounds".into()))?.clone();
        let theta = decode_weights(&store.get(&checkpoint_key(&current)).await?, &spec.tensors)?;
        let outer_config =
            OuterConfig { lr: spec.outer.lr, momentum: spec.outer.momentum, nesterov: spec.outer.nesterov };
        let mut outer = OuterOptimizer::new(outer_config, &lengths);
        let mut residual: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
        let last_published = rounds.iter().rev().find(|r| r.state == RoundState::Published).map(|r| r.round + 1);
        if let Some(r) = last_published {
            let mut saved = decode_weights(&store.get(&outer_key(r)).await?, &outer_table(&spec.tensors))?;
            residual = saved.split_off(lengths.len());
            outer.set_momentum(r, saved)?;
        }
        let round = run.round;
        let pending = if run.finished { Vec::new() } else { db.submissions(Some(round)).await? };
        let mut tokens = HashMap::new();
        for (id, _, hash) in db.contributors().await? {
            tokens.insert(id, hash);
        }
        let state = State {
            round,
            finished: run.finished,
            bases,
            theta,
            outer,
            residual,
            accepted: pending.len() as u64,
            first_accept_ms: pending.iter().map(|s| s.received_ms).min(),
        };
        let hub = Arc::new(Hub {
            db,
            store,
            spec,
            run_id: run.id,
            run_id_bytes,
            lengths,
            state: Mutex::new(state),
            tokens: std::sync::RwLock::new(tokens),
            round_tx: watch::Sender::new(round),
            bytes_down: AtomicU64::new(0),
        });
        {
            let mut state = hub.state.lock().await;
            let aggregating = rounds.iter().any(|r| r.round == round && r.state == RoundState::Aggregating);
            if !state.finished && (aggregating || state.accepted >= u64::from(hub.spec.quorum)) {
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
            spec: self.spec.clone(),
            round: state.round,
            checkpoint: state.bases.last().cloned().unwrap_or_default(),
            finished: state.finished,
        }
    }

    pub async fn register(&self, name: &str) -> Result<Registration, ApiError> {
        let name: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| api(ErrorCode::Internal, format!("no randomness: {e}")))?;
        let token = hex::encode(raw);
        let hash = token_hash(&token);
        // Serialise registrations so ids are dense.
        let _state = self.state.lock().await;
        let id = self.db.register(&name, &hash, now_ms()).await.map_err(internal)?;
        self.tokens.write().map_err(|_| api(ErrorCode::Internal, "token table poisoned"))?.insert(id, hash);
        tracing::info!(contributor = id, name, "registered");
        Ok(Registration { contributor_id: id, token })
    }

    pub fn authenticate(&self, contributor: u64, token: &str) -> Result<(), ApiError> {
        let tokens = self.tokens.read().map_err(|_| api(ErrorCode::Internal, "token table poisoned"))?;
        match tokens.get(&contributor) {
            Some(h) if *h == token_hash(token) => Ok(()),
            _ => Err(api(ErrorCode::Unauthorized, format!("unknown contributor {contributor} or wrong token"))),
        }
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
        })
    }

    /// Largest acceptable submission: an f32 message plus its table.
    pub fn max_submission_bytes(&self) -> usize {
        let table: usize = self.spec.tensors.iter().map(|t| t.name.len() + 16 + 8 * t.shape.len()).sum();
        4 * self.spec.num_params() as usize + table + 4096
    }

    /// Validates, stores and records one submission. Closes the round at quorum.
    pub async fn submit(
        self: &Arc<Self>,
        contributor: u64,
        body: Bytes,
        inner_loss: Option<f64>,
    ) -> Result<Receipt, ApiError> {
        let result = self.submit_inner(contributor, body, inner_loss).await;
        if let Err(e) = &result {
            let code =
                serde_json::to_value(e.code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            if let Err(db) = self.db.insert_rejection(contributor, &code, &e.message, now_ms()).await {
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
        // Parsing verifies the checksum of the whole body: off the async workers.
        let checked = body.clone();
        let lengths = self.lengths.clone();
        let (header, decoded) = tokio::task::spawn_blocking(move || {
            let view = MessageView::parse(&checked)?;
            let header = Header {
                round: view.round,
                base: hex::encode(view.base_checkpoint),
                run_id: view.run_id,
                codec: view.codec,
                table: view.tensors.iter().map(|t| (t.name.to_owned(), t.shape.clone())).collect(),
            };
            Ok::<_, tessera_protocol::WireError>((header, check_view(&lengths, &view)))
        })
        .await
        .map_err(|e| api(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| api(ErrorCode::MalformedMessage, e.to_string()))?;
        self.check_header(&header)?;
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

    fn check_header(&self, h: &Header) -> Result<(), ApiError> {
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
        if table.len() != self.spec.tensors.len() {
            return Err(api(
                ErrorCode::TensorMismatch,
                format!("message has {} tensors, the model {}", table.len(), self.spec.tensors.len()),
            ));
        }
        for ((name, shape), s) in table.iter().zip(&self.spec.tensors) {
            if *name != s.name || *shape != s.shape {
                return Err(api(
                    ErrorCode::TensorMismatch,
                    format!("tensor {name} {shape:?} where the model has {} {:?}", s.name, s.shape),
                ));
            }
        }
        Ok(())
    }

    /// Closes the round if its deadline has passed. Called periodically.
    pub async fn tick(&self) -> Result<(), HubError> {
        let mut state = self.state.lock().await;
        let due = state.first_accept_ms.is_some_and(|t| now_ms() >= t + self.spec.round_deadline_ms as i64);
        if !state.finished && state.accepted > 0 && due {
            self.close_round(&mut state, "deadline").await?;
        }
        Ok(())
    }

    async fn close_round(&self, state: &mut State, closed_by: &str) -> Result<(), HubError> {
        let round = state.round;
        self.db.set_round_state(round, RoundState::Aggregating).await?;
        let rows = self.db.submissions(Some(round)).await?;
        let mut inputs = Vec::with_capacity(rows.len());
        for row in &rows {
            match self.store.get(&submission_key(&row.blob)).await {
                Ok(bytes) => inputs.push((row.weight as f32, bytes)),
                Err(e) => {
                    tracing::error!(contributor = row.contributor, error = %e, "submission blob unreadable; left out")
                }
            }
        }
        // Copies, not moves: whatever happens to this call, the state stays whole.
        let theta = state.theta.clone();
        let outer = state.outer.clone();
        let residual = state.residual.clone();
        let ctx = (self.spec.clone(), self.run_id_bytes, state.bases[round as usize].clone(), self.lengths.clone());
        let agg = tokio::task::spawn_blocking(move || {
            aggregate(&ctx.0, ctx.1, round, &ctx.2, &ctx.3, &theta, &outer, &residual, &inputs)
        })
        .await
        .map_err(|e| HubError::Corrupt(format!("aggregation task failed: {e}")))??;

        let hash = hex::encode(weights_hash(&agg.weights_bytes));
        self.store.put(&checkpoint_key(&hash), Bytes::from(agg.weights_bytes)).await?;
        self.store.put(&update_key(round + 1), Bytes::from(agg.update_bytes)).await?;
        self.store.put(&outer_key(round + 1), Bytes::from(agg.outer_bytes)).await?;
        let losses: Vec<f64> = rows.iter().filter_map(|r| r.inner_loss).collect();
        let finished = round + 1 >= self.spec.rounds;
        self.db
            .publish(&Publication {
                round,
                result_checkpoint: &hash,
                closed_by,
                closed_ms: now_ms(),
                accepted: agg.used,
                weight: agg.weight,
                mean_inner_loss: (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                bytes_up: rows.iter().map(|r| r.bytes).sum(),
                finished,
            })
            .await?;
        state.theta = agg.theta;
        state.outer = agg.outer;
        state.residual = agg.residual;
        state.round = round + 1;
        state.finished = finished;
        state.bases.push(hash.clone());
        state.accepted = 0;
        state.first_accept_ms = None;
        self.round_tx.send_replace(round + 1);
        tracing::info!(round, closed_by, submissions = agg.used, checkpoint = %hash, finished, "round published");
        Ok(())
    }

    pub fn note_download(&self, bytes: u64) {
        self.bytes_down.fetch_add(bytes, Ordering::Relaxed);
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

/// Averages the round's pseudo-gradients (weighted), takes the outer step, and quantises the
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
) -> Result<Aggregated, HubError> {
    // Every submission was checked on arrival, so one decode pass each; should one fail after
    // all (a damaged blob), start again without it rather than fail or poison the round.
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
    let mut target = theta.to_vec();
    let mut outer = outer.clone();
    outer.apply(&mut target, acc)?;

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
