//! The hub: a thin shell around the round core ([`tessera_round::Run`]). It loads the run's
//! state from the database and the store, asks the core for every decision, persists what the
//! core returns in one transaction, and only then applies it.
//!
//! Every round moves open → collecting → (scoring) → published: collecting from its first
//! accepted submission; at quorum or when its deadline passes its submissions close, and in a
//! scored run it waits for the validator's scores (its evaluation seed is revealed then;
//! submissions arriving meanwhile are told to retry); then it is aggregated with the weights
//! the judgement gives, and published when the new checkpoint, the compressed update and the
//! outer state are in the store and one transaction has closed the round (scores, rewards,
//! ratings included) and opened the next.
//!
//! Crash safety: a submission is acknowledged only after its blob is stored and its row
//! committed; a round's outputs are written (content-addressed or keyed by round, so rewriting
//! is harmless) before the transaction that publishes them. A hub killed at any moment restarts
//! from the database: the current round's accepted submissions are all there, a closed round
//! is closed still, and an unscored round that was being aggregated is aggregated again from
//! the same inputs.
//!
//! The rest lives beside this file along its seams: `intake` (registration, assignments,
//! submissions), `rounds` (closing and publishing), `validator` (the validator's protocol),
//! `economy` (the ledger and the usage economy) and `views` (read-only answers).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;
use tessera_aggregate::round::{Grower, OuterState};
use tessera_protocol::api::RunInfo;
use tessera_protocol::{ApiError, ErrorCode, PROTOCOL_VERSION, RunSpec, encode_weights, weights_hash};
use tessera_round::{Event, Run, Snapshot};
use tessera_trust::ledger::Ledger;
use tessera_trust::{Identity, PublicKey, ValidatorAttestation, Verified};
use tokio::sync::{Mutex, watch};

use crate::HubError;
use crate::db::{Db, Journal, Seed};
use crate::store::{Store, checkpoint_key, outer_key};

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn api(code: ErrorCode, message: impl Into<String>) -> ApiError {
    ApiError { code, message: message.into() }
}

pub(crate) fn internal(e: HubError) -> ApiError {
    tracing::error!(error = %e, "internal error");
    api(ErrorCode::Internal, e.to_string())
}

/// A run to create when the database holds none.
pub struct NewRun {
    pub spec: RunSpec,
    /// Initial weights, one flat buffer per `spec.tensors` entry.
    pub weights: Vec<Vec<f32>>,
}

/// What a hub is given besides its storage and key.
#[derive(Default, Clone)]
pub struct HubConfig {
    /// Grows the run's state at a phase boundary. A run with later phases does not open
    /// without one.
    pub grower: Option<Arc<dyn Grower>>,
    /// The bearer token the validator presents (its name: `validator`). A scored run without
    /// any validator token can take no scores: each round is aggregated unscored after its score
    /// timeout.
    pub validator_token: Option<String>,
    /// More validators, each `(name, token)`: a run whose contest splits rounds into tasks
    /// shares each round among all of them; the name is what leases, results and the ledger's
    /// fault entries record.
    pub validator_tokens: Vec<(String, String)>,
    /// Direct uploads above this many bytes go up as a multipart upload of parts of the second
    /// (default [`DIRECT_MULTIPART`]; S3 takes a single PUT of at most 5 GiB, parts of at least
    /// 5 MiB).
    pub direct_multipart: Option<(u64, u64)>,
    /// Hands each round's aggregation to `tessera aggregate-worker` processes, split into this
    /// many tensor ranges ([`crate::workers`]; PostgreSQL only). 0: the hub aggregates itself.
    pub aggregate_shards: usize,
    /// At most this many bytes of decoded submissions held at once by a robust rule (here or
    /// in a worker): each stage reads the submissions a piece at a time (default
    /// [`tessera_aggregate::shard::PIECE_BYTES`]; at least one codec block of each is held).
    pub aggregate_memory: Option<usize>,
    /// At most this many bytes of request bodies held at once by this replica (default: the
    /// larger of [`BODY_BYTES`] and one whole submission); each key at most one submission's.
    pub body_bytes: Option<u64>,
    /// Signed requests one key may make: per second and burst (default [`KEY_RATE`]).
    pub key_rate: Option<tessera_edge::Rate>,
}

/// The request-body bytes a replica holds at once by default.
pub const BODY_BYTES: u64 = 1 << 30;
/// Signed requests per key by default: a contributor makes a few a round.
pub const KEY_RATE: tessera_edge::Rate = tessera_edge::Rate { per_second: 10, burst: 100 };

/// A direct upload above 4 GiB goes up in parts of 256 MiB.
pub const DIRECT_MULTIPART: (u64, u64) = (4 << 30, 256 << 20);

/// The attested validator submissions are sealed to.
#[derive(Clone)]
pub(crate) struct CurrentValidator {
    pub attestation: ValidatorAttestation,
    pub verified: Verified,
    /// BLAKE3 of its HPKE key: what a sealed header must name.
    pub recipient: [u8; 32],
    pub seq: u64,
}

/// The run as the core sees it, and what the shell keeps beside it.
pub(crate) struct Live {
    pub run: Run,
    /// The journal's sequence number `run` is up to date with (see [`crate::db`]).
    pub seq: u64,
    /// The published weights, outer momentum and broadcast residual (12 bytes a parameter):
    /// shared with the aggregation task, never copied whole. None after another replica
    /// published a round: read from the store when this one next aggregates.
    pub outer: Option<Arc<OuterState>>,
    /// A sealed run's aggregate for the round being scored, from the validator.
    pub sealed_mean: Option<(u64, Vec<Vec<f32>>)>,
    /// A run scored by many validators: the results of the round being scored read so far
    /// (each is read from the database once; another replica's are read when first seen).
    pub task_results: (u64, Vec<tessera_round::scoring::TaskResult>),
}

/// Contributors' keys, both ways.
#[derive(Default)]
pub(crate) struct Keys {
    pub ids: HashMap<PublicKey, u64>,
    pub keys: HashMap<u64, PublicKey>,
}

/// The ledger and the validator it names last.
pub(crate) struct Trust {
    pub ledger: Ledger,
    pub validator: Option<CurrentValidator>,
}

pub struct Hub {
    pub(crate) db: Db,
    pub(crate) store: Store,
    /// The run's spec as it stands (a steered run's changes at round boundaries replace it).
    spec: std::sync::RwLock<Arc<RunSpec>>,
    run_id: String,
    pub(crate) live: Mutex<Live>,
    pub(crate) keys: std::sync::RwLock<Keys>,
    pub(crate) trust: std::sync::RwLock<Trust>,
    /// Signs what the hub publishes and its ledger entries.
    pub(crate) identity: Identity,
    pub(crate) grower: Option<Arc<dyn Grower>>,
    /// Each validator's name and the BLAKE3 of its bearer token.
    validators: Vec<(String, String)>,
    pub(crate) direct_multipart: (u64, u64),
    pub(crate) aggregate_shards: usize,
    pub(crate) aggregate_memory: usize,
    pub(crate) round_tx: watch::Sender<u64>,
    pub(crate) bytes_down: AtomicU64,
    /// The task that sums the current round's submissions as they arrive ([`crate::running`]).
    pub(crate) summer: crate::running::Summer,
    /// Direct uploads read back and being checked or recorded at once, each holding one
    /// submission in memory: [`CHECKING_BYTES`] worth, at least one per core, at most 64.
    pub(crate) checking: tokio::sync::Semaphore,
    /// Whom contributors' signed requests must be for: this hub's key and run.
    pub(crate) audience: tessera_trust::Audience,
    /// Request bodies held at once, in all and per key.
    pub(crate) bodies: tessera_edge::BodyBudget,
    /// Signed requests per key (None: unlimited).
    pub(crate) key_rate: Option<tessera_edge::KeyedLimits<PublicKey>>,
    /// The whole-run views' last answers ([`crate::views`]).
    pub(crate) views: crate::views::Views,
}

/// The memory a replica gives to direct uploads being checked and recorded.
pub const CHECKING_BYTES: u64 = 4 << 30;

fn checking_slots(max_submission: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    ((CHECKING_BYTES / max_submission.max(1) as u64) as usize).clamp(cores, 64)
}

/// The run's state as the database holds it, and the journal's sequence number it is current
/// with (read before and after, so no decision falls between the two).
async fn load(db: &Db) -> Result<(Run, u64), HubError> {
    loop {
        let before = db.last_seq().await?;
        let run = db.load_run().await?.ok_or_else(|| HubError::Corrupt("the run vanished".into()))?;
        let spec: RunSpec =
            serde_json::from_str(&run.spec).map_err(|e| HubError::Corrupt(format!("stored run spec: {e}")))?;
        let snapshot: Snapshot = db.snapshot(&run, spec).await?;
        if db.last_seq().await? == before {
            return Ok((Run::restore(snapshot)?, before));
        }
    }
}

/// The outer state the current round aggregates from: its checkpoint (rebuilt if its blob was
/// lost) and saved momentum.
async fn load_outer(db: &Db, store: &Store, core: &Run) -> Result<OuterState, HubError> {
    let weights = crate::recover::checkpoint(db, store, core, core.checkpoint()).await?;
    let saved = match core.round() {
        0 => None,
        r => Some((r, store.get(&outer_key(r)).await?)),
    };
    Ok(OuterState::restore(core.current(), &weights, saved.as_ref().map(|(r, b)| (*r, b.as_ref())))?)
}

fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

impl Hub {
    /// Opens the run in `db` and `store`, creating it from `new` if the database holds none;
    /// finishes a round that was being aggregated when the hub stopped.
    pub async fn open(
        db: Db,
        store: Store,
        new: Option<NewRun>,
        identity: Identity,
        config: HubConfig,
    ) -> Result<Arc<Hub>, HubError> {
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
                let seed = if new.spec.trust.is_some() { Seed::from_validator() } else { Seed::fresh()? };
                db.create_run(&hex::encode(id), &spec, &hash, now_ms(), &seed).await?;
                tracing::info!(run = %hex::encode(id), checkpoint = %hash, "run created");
                db.load_run().await?.ok_or_else(|| HubError::Corrupt("run vanished after creation".into()))?
            }
        };
        let spec: RunSpec =
            serde_json::from_str(&run.spec).map_err(|e| HubError::Corrupt(format!("stored run spec: {e}")))?;
        if config.aggregate_shards > 0 && !db.shared() {
            return Err(HubError::Config(
                "aggregation workers take their jobs from PostgreSQL: --aggregate-shards needs --database postgres://…"
                    .into(),
            ));
        }
        if !spec.phases.is_empty() && config.grower.is_none() {
            return Err(HubError::Config(format!(
                "the run grows through {} later phase(s) but this hub was given no grower",
                spec.phases.len()
            )));
        }
        let (core, seq) = load(&db).await?;
        let outer = load_outer(&db, &store, &core).await?;
        let mut keys = Keys::default();
        for (id, _, key) in db.contributors().await? {
            if let Ok(k) = PublicKey::parse(&key) {
                keys.ids.insert(k, id);
                keys.keys.insert(id, k);
            }
        }
        let (ledger, validator) = crate::economy::open_ledger(&db, &run.id, &spec, &identity).await?;
        if let Err(e) = ledger.check_served_spec(&spec, 0) {
            tracing::warn!(
                "the run's spec in the database is not the one its ledger allows; `tessera ledger verify --hub` \
                 reports it to anyone who checks: {e}"
            );
        }
        for what in spec.operator_trust() {
            tracing::info!("this run trusts its operator with {what}");
        }
        let validators: Vec<(String, String)> = config
            .validator_token
            .iter()
            .map(|t| ("validator".to_owned(), token_hash(t)))
            .chain(config.validator_tokens.iter().map(|(n, t)| (n.clone(), token_hash(t))))
            .collect();
        let mut names = std::collections::HashSet::new();
        if let Some((name, _)) = validators.iter().find(|(n, _)| !names.insert(n.as_str())) {
            return Err(HubError::Config(format!("two validators are named {name:?}")));
        }
        if spec.contest.is_some() && validators.is_empty() {
            tracing::warn!(
                "a scored run without a validator token: no validator can report, so every round is aggregated \
                 unscored after its score timeout"
            );
        }
        let round = core.round();
        let max_submission = max_submission_bytes(&spec);
        let identity_key = identity.public();
        let run_id = run.id;
        let hub = Arc::new(Hub {
            db,
            store,
            spec: std::sync::RwLock::new(Arc::new(spec)),
            run_id: run_id.clone(),
            live: Mutex::new(Live {
                run: core,
                seq,
                outer: Some(Arc::new(outer)),
                sealed_mean: None,
                task_results: (0, Vec::new()),
            }),
            keys: std::sync::RwLock::new(keys),
            trust: std::sync::RwLock::new(Trust { ledger, validator }),
            identity,
            grower: config.grower,
            validators,
            direct_multipart: config.direct_multipart.unwrap_or(DIRECT_MULTIPART),
            aggregate_shards: config.aggregate_shards,
            aggregate_memory: config.aggregate_memory.unwrap_or(tessera_aggregate::shard::PIECE_BYTES),
            round_tx: watch::Sender::new(round),
            bytes_down: AtomicU64::new(0),
            summer: crate::running::Summer::start(),
            checking: tokio::sync::Semaphore::new(checking_slots(max_submission)),
            audience: tessera_trust::Audience { hub_key: identity_key, run_id: run_id.clone() },
            bodies: tessera_edge::BodyBudget::new(
                config.body_bytes.unwrap_or(BODY_BYTES).max(max_submission as u64),
                max_submission as u64,
            ),
            key_rate: tessera_edge::KeyedLimits::new(config.key_rate.unwrap_or(KEY_RATE)),
            views: crate::views::Views::default(),
        });
        // Metrics are recorded from the start (GET /metrics renders them).
        let _ = tessera_telemetry::prometheus();
        hub.tick().await?;
        Ok(hub)
    }

    /// The run's spec as it stands, every phase: as created, with the changes its holders
    /// voted (a steered run).
    pub fn spec(&self) -> Arc<RunSpec> {
        match self.spec.read() {
            Ok(s) => Arc::clone(&s),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the spec after a round boundary changed it (here or in another replica).
    pub(crate) fn set_spec(&self, spec: &RunSpec) {
        if *self.spec() != *spec
            && let Ok(mut s) = self.spec.write()
        {
            *s = Arc::new(spec.clone());
        }
    }

    /// Brings `live` up to date with decisions other replicas committed: applies the journal
    /// after `live.seq`; a published round (or a journal pruned past `live.seq`) reloads the
    /// whole state. Cost: one indexed range read, plus O(contributors + round) on a reload (at
    /// most once per round).
    pub(crate) async fn sync(&self, live: &mut Live) -> Result<(), HubError> {
        let Some(events) = self.db.events_since(live.seq).await? else { return self.reload(live).await };
        for (seq, event) in events {
            let applied = match event {
                Journal::Registered { contributor, key } => {
                    if let (Ok(k), Ok(mut keys)) = (PublicKey::parse(&key), self.keys.write()) {
                        keys.ids.insert(k, contributor);
                        keys.keys.insert(contributor, k);
                    }
                    Event::Registered { contributor }
                }
                Journal::Accepted(a) => Event::Accepted(a),
                Journal::Refused { contributor, round, code, message, at_ms } => {
                    Event::Refused { contributor, round, code, message, at_ms }
                }
                Journal::Closed { round, closed } => Event::Closed { round, closed },
                Journal::Committed { round, commitment } => Event::Committed { round, commitment },
                // The snapshot read now is later than `seq`: the rest of the list is in it.
                Journal::Published { .. } => return self.reload(live).await,
                Journal::Governance => {
                    live.seq = seq;
                    continue;
                }
                Journal::Ledger => {
                    let (ledger, validator) =
                        crate::economy::open_ledger(&self.db, &self.run_id, &self.spec(), &self.identity).await?;
                    if let Ok(mut t) = self.trust.write() {
                        *t = Trust { ledger, validator };
                    }
                    live.seq = seq;
                    continue;
                }
            };
            live.run.apply(&applied)?;
            live.seq = seq;
        }
        Ok(())
    }

    /// Reloads the run's state from the database (another replica published a round).
    async fn reload(&self, live: &mut Live) -> Result<(), HubError> {
        let (run, seq) = load(&self.db).await?;
        self.set_spec(run.spec());
        // The publication may have written ledger entries (a sealed round's, a steered run's):
        // read those after the ledger held here, and verify them.
        self.catch_up_ledger().await?;
        let round = run.round();
        tracing::debug!(round, seq, "caught up with another replica's publication");
        live.run = run;
        live.seq = seq;
        live.outer = None;
        live.sealed_mean = None;
        self.round_tx.send_replace(round);
        Ok(())
    }

    /// Extends the ledger held here with the entries another replica wrote after it; a new
    /// validator among them makes the whole ledger (and who submissions are sealed to) reload.
    /// Cost: one indexed range read of the new entries, each verified once.
    async fn catch_up_ledger(&self) -> Result<(), HubError> {
        let from = self.trust.read().map(|t| t.ledger.len()).map_err(|_| HubError::Corrupt("trust poisoned".into()))?;
        let rows = self.db.ledger_from(from).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut raw = Vec::new();
        for row in &rows {
            raw.extend(hex::decode(row).map_err(|e| HubError::Corrupt(format!("ledger entry: {e}")))?);
        }
        let validator_joined = {
            let mut t = self.trust.write().map_err(|_| HubError::Corrupt("trust poisoned".into()))?;
            if t.ledger.len() != from {
                return Ok(()); // Caught up meanwhile.
            }
            t.ledger
                .extend(&raw)
                .map_err(|e| HubError::Corrupt(format!("the ledger another replica wrote does not verify: {e}")))?;
            (from..t.ledger.len()).any(|s| {
                t.ledger.entry(s).is_some_and(|e| matches!(e.body, tessera_trust::ledger::Body::Validator { .. }))
            })
        };
        if validator_joined {
            let (ledger, validator) =
                crate::economy::open_ledger(&self.db, &self.run_id, &self.spec(), &self.identity).await?;
            if let Ok(mut t) = self.trust.write() {
                *t = Trust { ledger, validator };
            }
        }
        Ok(())
    }

    /// The outer state the current round aggregates from, read from the store if another
    /// replica published the round before.
    pub(crate) async fn outer(&self, live: &mut Live) -> Result<Arc<OuterState>, HubError> {
        if let Some(o) = &live.outer {
            return Ok(Arc::clone(o));
        }
        let outer = Arc::new(load_outer(&self.db, &self.store, &live.run).await?);
        live.outer = Some(Arc::clone(&outer));
        Ok(outer)
    }

    /// Makes sure the published checkpoint `hash` is in the store, rebuilding it from the one
    /// before and the update between if its blob was lost.
    pub(crate) async fn ensure_checkpoint(&self, hash: &str) -> Result<(), HubError> {
        if self.store.size(&checkpoint_key(hash)).await.is_ok() {
            return Ok(());
        }
        let live = self.live.lock().await;
        crate::recover::checkpoint(&self.db, &self.store, &live.run, hash).await.map(drop)
    }

    /// Catches up now (a replica's commit was notified).
    pub async fn catch_up(&self) -> Result<(), HubError> {
        let mut live = self.live.lock().await;
        self.sync(&mut live).await
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub async fn info(&self) -> RunInfo {
        let live = self.live.lock().await;
        RunInfo {
            protocol: PROTOCOL_VERSION,
            run_id: self.run_id.clone(),
            spec: live.run.current().clone(),
            phase: live.run.phase() as u32,
            round: live.run.round(),
            checkpoint: live.run.checkpoint().to_owned(),
            finished: live.run.finished(),
            hub_key: self.identity.public().hex(),
            operator_trusted_with: self.spec().operator_trust(),
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

    /// The name of the validator whose bearer token this is.
    pub fn authenticate_validator(&self, token: &str) -> Result<String, ApiError> {
        if self.validators.is_empty() {
            return Err(api(ErrorCode::Unauthorized, "this hub has no validator token configured"));
        }
        let hash = token_hash(token);
        match self.validators.iter().find(|(_, h)| *h == hash) {
            Some((name, _)) => Ok(name.clone()),
            None => Err(api(ErrorCode::Unauthorized, "wrong validator token")),
        }
    }

    /// How many validators this hub serves.
    pub(crate) fn validator_count(&self) -> usize {
        self.validators.len()
    }

    pub(crate) fn key_of(&self, contributor: u64) -> Option<PublicKey> {
        self.keys.read().ok()?.keys.get(&contributor).copied()
    }

    /// Largest acceptable submission: an f32 message of the run's largest model plus its table.
    pub fn max_submission_bytes(&self) -> usize {
        max_submission_bytes(&self.spec())
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// The largest submission a run takes: every parameter of its largest phase in f32, and the
/// tensor table.
fn max_submission_bytes(spec: &RunSpec) -> usize {
    let table = |tensors: &[tessera_protocol::TensorSpec]| -> usize {
        tensors.iter().map(|t| t.name.len() + 16 + 8 * t.shape.len()).sum()
    };
    let tables = spec.phases.iter().map(|p| table(&p.tensors)).chain([table(&spec.tensors)]).max().unwrap_or(0);
    4 * spec.max_params() as usize + tables + 4096
}
