//! `tessera-contributor`: one DiLoCo worker talking to a hub over HTTP.
//!
//! The loop: ask for an assignment (round, base checkpoint, data slot, seed); bring the cached
//! weights to the base checkpoint (applying the published compressed updates, or downloading
//! the checkpoint with resumable range requests), verified by hash; train H inner AdamW steps
//! on the slot's windows; encode Δ = θ_base − θ_local with error feedback; upload with retries;
//! save the inner optimizer state; repeat until the run finishes.
//!
//! Every request is signed with the contributor's Ed25519 key (`identity.pem` in the state
//! directory unless given); the hub's answers are checked against the hub key pinned at first
//! contact. In a sealed run the pseudo-gradient is sealed with HPKE to the validator, whose
//! attestation is verified against the run's policy first.
//!
//! Everything a restart needs lives in the state directory: identity (key, id, hub key), the inner
//! trainer (weights, AdamW moments, step), the error-feedback residuals and the cached base
//! weights. A contributor killed at any moment restarts from the last round it finished.

pub mod adversary;
pub mod link;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use tch::Device;
use tessera_data::Dataset;
use tessera_data::synthetic::SyntheticSpec;
use tessera_model::{Llama, LlamaConfig};
use tessera_protocol::api::{
    Assignment, DataSource, INNER_LOSS_HEADER, Receipt, RegisterRequest, Registration, RunInfo, ValidatorInfo,
};
use tessera_protocol::{
    ApiError, Codec, ErrorCode, ErrorFeedback, MessageView, PROTOCOL_VERSION, PseudoGradient, TensorEntry, TensorSpec,
    decode_weights, encode_weights, weights_hash,
};
use tessera_train::diloco::{read_params, write_params};
use tessera_train::{AdamWConfig, TrainConfig, TrainError, Trainer};
use tessera_trust::identity::HUB_SIGNATURE_HEADER;
use tessera_trust::{PublicKey, SealedHeader, SealingKey, ValidatorAttestation};

#[derive(Debug, thiserror::Error)]
pub enum ContributorError {
    #[error("hub {url}: {message}")]
    Http { url: String, message: String },
    #[error("hub refused: {0}")]
    Refused(ApiError),
    #[error("the hub speaks protocol {0}, this contributor {PROTOCOL_VERSION}")]
    Protocol(u32),
    #[error("{0}")]
    Data(String),
    #[error("state directory {path}: {message}")]
    State { path: String, message: String },
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error("weights: {0}")]
    Weights(#[from] tessera_protocol::WeightsError),
    #[error("wire: {0}")]
    Wire(#[from] tessera_protocol::WireError),
    #[error("codec: {0}")]
    Codec(#[from] tessera_protocol::CodecError),
    #[error(transparent)]
    Trust(#[from] tessera_trust::TrustError),
}

type Result<T> = std::result::Result<T, ContributorError>;

#[derive(Debug, Clone)]
pub struct ContributorConfig {
    /// Base URL of the hub, e.g. `http://127.0.0.1:7070`.
    pub hub: String,
    pub state_dir: PathBuf,
    pub name: String,
    /// The Ed25519 key file (`tessera keygen`); default `identity.pem` in the state directory,
    /// created if missing.
    pub key: Option<PathBuf>,
    pub device: Device,
    /// Training data for runs whose data source is external (checked by fingerprint).
    pub data: Option<Dataset>,
    /// Stop after submitting this many rounds (default: until the run finishes).
    pub max_rounds: Option<u64>,
    /// How long to keep retrying while the hub is unreachable or failing.
    pub patience: Duration,
    /// Testing tool: behave as this attack (see `tessera_contest::Adversary`). Never set in
    /// normal use.
    pub adversary: Option<tessera_contest::Adversary>,
    /// Emulated link limits, bytes per second (`None`: as fast as the network goes).
    pub max_upload_bps: Option<f64>,
    pub max_download_bps: Option<f64>,
}

/// What one finished round looked like from the contributor's side.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundReport {
    pub round: u64,
    pub inner_loss: f64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: Outcome,
    pub train_s: f64,
}

/// Live progress within a round, for a status display ([`Contributor::on_progress`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A round begins: its number, the run's phase, and the inner steps it will train.
    Round { round: u64, phase: u32, steps: u64 },
    /// Inner step `step` (1-based) finished with this training loss.
    Step { step: u64, loss: f64 },
    /// Bytes of the submission sent so far, of `total`.
    Upload { sent: u64, total: u64 },
    /// Scored runs, before each round: this contributor's place on the leaderboard.
    Standing { rank: u64, of: usize, mean_score: Option<f64>, rewards: u64 },
}

/// Receives [`Progress`]; called from the training thread and the upload, so it must be quick.
pub type ProgressFn = std::sync::Arc<dyn Fn(&Progress) + Send + Sync>;

/// A submission body that reports how much of it has been read (sent), no faster than the
/// upload link allows.
struct Counted {
    bytes: std::sync::Arc<Vec<u8>>,
    at: usize,
    progress: Option<ProgressFn>,
    link: Option<link::Link>,
}

impl std::io::Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.bytes.len() - self.at).min(link::chunk(self.link.as_ref()));
        link::pass(self.link.as_ref(), n);
        buf[..n].copy_from_slice(&self.bytes[self.at..self.at + n]);
        self.at += n;
        if let Some(p) = &self.progress {
            p(&Progress::Upload { sent: self.at as u64, total: self.bytes.len() as u64 });
        }
        Ok(n)
    }
}

/// What became of a round's submission.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Outcome {
    Accepted(Receipt),
    /// An earlier attempt was accepted but its answer was lost (the hub said `duplicate`).
    AlreadyAccepted,
    /// The hub did not use it (stale, or the run finished); the reason.
    NotUsed(String),
}

/// Who this contributor is to the hub it joined, and the hub key it pinned then.
#[derive(serde::Serialize, serde::Deserialize)]
struct Identity {
    hub_run: String,
    contributor_id: u64,
    public_key: String,
    hub_key: String,
}

/// A verified validator this contributor seals to.
struct Recipient {
    key: SealingKey,
    ledger_seq: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct BaseMeta {
    round: u64,
    hash: String,
}

/// The weights of one published round, verified against its hash.
struct Base {
    round: u64,
    hash: String,
    weights: Vec<Vec<f32>>,
}

pub struct Contributor {
    config: ContributorConfig,
    http: Client,
    pub run: RunInfo,
    identity: Identity,
    key: tessera_trust::Identity,
    /// The hub's key, pinned at registration: its answers must be signed by it.
    hub_key: PublicKey,
    recipient: Option<Recipient>,
    trainer: Trainer,
    feedback: Vec<ErrorFeedback>,
    base: Option<Base>,
    /// The last base round this contributor submitted for.
    last_submitted: Option<u64>,
    /// Adversaries only: the last message sent (replay resends it).
    last_body: Option<Vec<u8>>,
    progress: Option<ProgressFn>,
    /// Emulated link limits, shared by every transfer in each direction.
    upload: Option<link::Link>,
    download: Option<link::Link>,
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> ContributorError {
    ContributorError::State { path: path.display().to_string(), message: e.to_string() }
}

/// Writes `bytes` to `path` atomically (write a sibling, then rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| state_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| state_err(path, e))
}

/// Builds the run's dataset, or checks the one given, against the run's fingerprint.
pub fn run_dataset(run: &RunInfo, given: Option<Dataset>) -> Result<Dataset> {
    let data = &run.spec.data;
    let dataset = match (&data.source, given) {
        (_, Some(d)) => d,
        (DataSource::Embedded { seed, train_chars, val_chars }, None) => {
            let spec = SyntheticSpec { seed: *seed, ..SyntheticSpec::default() };
            Dataset::synthetic(spec, *train_chars as usize, *val_chars as usize)
                .map_err(|e| ContributorError::Data(e.to_string()))?
        }
        (DataSource::External, None) => {
            return Err(ContributorError::Data(format!(
                "the run trains on {:?}: pass the same data with --data (fingerprint {})",
                data.name, data.fingerprint
            )));
        }
    };
    if dataset.info.fingerprint != data.fingerprint {
        return Err(ContributorError::Data(format!(
            "this data ({}, fingerprint {}) is not the run's ({}, fingerprint {})",
            dataset.info.name, dataset.info.fingerprint, data.name, data.fingerprint
        )));
    }
    Ok(dataset)
}

/// The inner trainer's configuration for a run and data slot.
pub fn inner_config(run: &RunInfo, slot: u64) -> TrainConfig {
    let s = &run.spec;
    TrainConfig {
        steps: s.rounds * s.inner_steps,
        batch_size: s.inner.batch_size as usize,
        seq_len: s.inner.seq_len as usize,
        grad_accum: 1,
        lr: s.inner.lr,
        min_lr: s.inner.min_lr,
        warmup_steps: s.inner.warmup_steps,
        grad_clip: s.inner.grad_clip,
        adamw: AdamWConfig { weight_decay: s.inner.weight_decay, ..AdamWConfig::default() },
        seed: s.seed,
        worker: slot,
        ..TrainConfig::default()
    }
}

/// HTTP with the contributor's patience: transport errors and 5xx are retried with backoff.
struct Hub<'a> {
    url: &'a str,
    patience: Duration,
}

impl Hub<'_> {
    fn send(&self, what: &str, build: impl Fn() -> reqwest::blocking::RequestBuilder) -> Result<Response> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(200);
        loop {
            let failure = match build().send() {
                Ok(r) if r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    format!("{} {}", r.status(), r.text().unwrap_or_default())
                }
                Ok(r) => return Ok(r),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > self.patience {
                return Err(ContributorError::Http {
                    url: self.url.to_owned(),
                    message: format!("{what}: {failure} (gave up after {:.0?})", start.elapsed()),
                });
            }
            tracing::warn!(what, failure, retry_in = ?delay, "hub unavailable; retrying");
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// A success body's bytes, or a refusal as an [`ApiError`].
    fn body(&self, what: &str, r: Response) -> Result<Vec<u8>> {
        let status = r.status();
        let bytes = r.bytes().map_err(|e| self.http_err(what, e))?;
        if status.is_success() { Ok(bytes.to_vec()) } else { Err(self.refusal(what, status, &bytes)) }
    }

    /// Parses a success body as JSON, or a refusal as an [`ApiError`].
    fn json<T: serde::de::DeserializeOwned>(&self, what: &str, r: Response) -> Result<T> {
        let status = r.status();
        let bytes = r.bytes().map_err(|e| self.http_err(what, e))?;
        if status.is_success() {
            serde_json::from_slice(&bytes)
                .map_err(|e| self.http_err(what, format!("unexpected answer ({status}): {e}")))
        } else {
            Err(self.refusal(what, status, &bytes))
        }
    }

    fn refusal(&self, what: &str, status: StatusCode, body: &[u8]) -> ContributorError {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(e) => ContributorError::Refused(e),
            Err(_) => {
                self.http_err(what, format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
            }
        }
    }

    fn http_err(&self, what: &str, e: impl std::fmt::Display) -> ContributorError {
        ContributorError::Http { url: self.url.to_owned(), message: format!("{what}: {e}") }
    }
}

impl Contributor {
    /// Connects to the hub, registers (or reuses the identity in the state directory) and
    /// restores the inner trainer from the state directory if it holds one for this run.
    pub fn join(config: ContributorConfig) -> Result<Contributor> {
        let http = Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ContributorError::Http { url: config.hub.clone(), message: e.to_string() })?;
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
        let hub = Hub { url: &config.hub, patience: config.patience };
        let key_path = config.key.clone().unwrap_or_else(|| dir.join("identity.pem"));
        let key = tessera_trust::Identity::load_or_create(&key_path)?;
        let run = fetch_run(&hub, &http, None)?;
        let hub_key = PublicKey::parse(&run.hub_key)?;
        let id_path = dir.join("identity.json");
        let saved: Option<Identity> = std::fs::read(&id_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|i: &Identity| i.hub_run == run.run_id && i.public_key == key.public().hex());
        if let Some(i) = &saved
            && i.hub_key != run.hub_key
        {
            return Err(ContributorError::Data(format!(
                "the hub now signs with key {}, not the key {} it had when this contributor joined: refusing to trust it",
                run.hub_key, i.hub_key
            )));
        }
        let identity = match saved {
            Some(i) => {
                tracing::info!(contributor = i.contributor_id, "rejoining with the saved identity");
                i
            }
            None => {
                let request = serde_json::to_vec(&RegisterRequest { name: config.name.clone() })
                    .map_err(|e| ContributorError::Data(e.to_string()))?;
                let reg: Registration = hub.json(
                    "register",
                    hub.send("register", || {
                        sign(&http, &key, &config.hub, "POST", "/v1/contributors", request.clone())
                    })?,
                )?;
                let i = Identity {
                    hub_run: run.run_id.clone(),
                    contributor_id: reg.contributor_id,
                    public_key: key.public().hex(),
                    hub_key: run.hub_key.clone(),
                };
                write_atomic(&id_path, &serde_json::to_vec_pretty(&i).map_err(|e| state_err(&id_path, e))?)?;
                // A new identity starts from scratch: drop any state of another run.
                for stale in ["trainer", "feedback.safetensors", "base.safetensors", "base.json"] {
                    let p = dir.join(stale);
                    let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                }
                tracing::info!(contributor = i.contributor_id, key = %key.public(), "registered");
                i
            }
        };

        let dataset = run_dataset(&run, config.data.clone())?;
        let model_config = LlamaConfig::from_json(run.spec.model.clone())
            .map_err(|e| ContributorError::Data(format!("the run's model config: {e}")))?;
        let train_config = inner_config(&run, identity.contributor_id);
        let trainer_dir = dir.join("trainer");
        let trainer = if Trainer::recover(&trainer_dir)? {
            Trainer::resume(&trainer_dir, dataset, config.device, Some(train_config.steps))?
        } else {
            let model = Llama::zeroed(&model_config, config.device)?;
            Trainer::from_model(train_config, model, dataset)?
        };
        let table = &run.spec.tensors;
        check_table(&trainer.model, table)?;
        let decay = run.spec.feedback_decay;
        let feedback = match std::fs::read(dir.join("feedback.safetensors")) {
            Ok(bytes) => decode_weights(&bytes, table)?
                .into_iter()
                .map(|r| ErrorFeedback::from_residual(r).with_decay(decay))
                .collect(),
            Err(_) => table.iter().map(|t| ErrorFeedback::new(t.numel() as usize).with_decay(decay)).collect(),
        };
        let base = load_base(dir, table);
        let last_submitted =
            std::fs::read_to_string(dir.join("last_submitted")).ok().and_then(|s| s.trim().parse().ok());
        let upload = config.max_upload_bps.map(link::Bucket::shared);
        let download = config.max_download_bps.map(link::Bucket::shared);
        Ok(Contributor {
            config,
            http,
            run,
            identity,
            key,
            hub_key,
            recipient: None,
            trainer,
            feedback,
            base,
            last_submitted,
            last_body: None,
            progress: None,
            upload,
            download,
        })
    }

    /// Reports live progress (round, phase, each inner step's loss, upload bytes) to `f`.
    pub fn on_progress(&mut self, f: ProgressFn) {
        self.progress = Some(f);
    }

    fn report(&self, p: Progress) {
        if let Some(f) = &self.progress {
            f(&p);
        }
    }

    /// This contributor's row of the run's leaderboard (rank, rating, rewards, mean score), and
    /// how many rows there are; `None` if it is not on the board yet.
    pub fn standing(&self) -> Result<Option<(tessera_protocol::api::LeaderRow, usize)>> {
        let url = format!("{}/v1/leaderboard", self.config.hub);
        let hub = self.hub();
        let r = hub.send("leaderboard", || self.http.get(&url))?;
        let board: tessera_protocol::api::Leaderboard = hub.json("leaderboard", r)?;
        let total = board.rows.len();
        Ok(board.rows.into_iter().find(|r| r.id == self.identity.contributor_id).map(|r| (r, total)))
    }

    pub fn id(&self) -> u64 {
        self.identity.contributor_id
    }

    /// The key this contributor signs with and is credited under.
    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    fn hub(&self) -> Hub<'_> {
        Hub { url: &self.config.hub, patience: self.config.patience }
    }

    /// The run has grown into a new phase: fetch its spec and start training the new model (from
    /// the grown checkpoint the next round downloads), with fresh inner optimizer state and error
    /// feedback. What was saved for the old model is dropped first, so a restart lands in the
    /// new phase too.
    fn switch_phase(&mut self) -> Result<()> {
        let run = fetch_run(&self.hub(), &self.http, Some(&self.hub_key))?;
        let model_config = LlamaConfig::from_json(run.spec.model.clone())
            .map_err(|e| ContributorError::Data(format!("the run's model config: {e}")))?;
        let model = Llama::zeroed(&model_config, self.config.device)?;
        check_table(&model, &run.spec.tensors)?;
        let dir = self.config.state_dir.clone();
        for stale in ["trainer", "feedback.safetensors", "base.safetensors", "base.json"] {
            let p = dir.join(stale);
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
        let dataset = self.trainer.dataset.clone();
        self.trainer = Trainer::from_model(inner_config(&run, self.identity.contributor_id), model, dataset)?;
        let decay = run.spec.feedback_decay;
        self.feedback =
            run.spec.tensors.iter().map(|t| ErrorFeedback::new(t.numel() as usize).with_decay(decay)).collect();
        self.base = None;
        tracing::info!(phase = run.phase, params = run.spec.num_params(), "the run grew: training its new model");
        self.run = run;
        Ok(())
    }

    /// A request signed with this contributor's key.
    fn signed(&self, method: &str, path: &str, body: Vec<u8>) -> reqwest::blocking::RequestBuilder {
        sign(&self.http, &self.key, &self.config.hub, method, path, body)
    }

    fn assignment(&self) -> Result<Assignment> {
        let path = "/v1/assignments?wait_ms=20000";
        let hub = self.hub();
        let r = hub.send("assignment", || self.signed("POST", path, Vec::new()))?;
        let signature = r.headers().get(HUB_SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = hub.body("assignment", r)?;
        check_hub_signature(&self.hub_key, &body, signature.as_deref())?;
        serde_json::from_slice(&body).map_err(|e| hub.http_err("assignment", e))
    }

    /// The run's validator, its attestation verified against the run's policy (once per
    /// validator the hub announces).
    fn recipient(&mut self) -> Result<SealingKey> {
        let Some(policy) = self.run.spec.trust.clone() else {
            return Err(ContributorError::Data("this run does not seal submissions".into()));
        };
        let url = format!("{}/v1/validator", self.config.hub);
        let hub = self.hub();
        // 503 `no_validator` is retried with the rest of the hub's 5xx answers.
        let info: ValidatorInfo = hub.json("validator", hub.send("validator", || self.http.get(&url))?)?;
        if let Some(r) = &self.recipient
            && r.ledger_seq == info.ledger_seq
        {
            return Ok(r.key.clone());
        }
        let attestation: ValidatorAttestation = serde_json::from_value(info.attestation)
            .map_err(|e| ContributorError::Data(format!("the validator's attestation: {e}")))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let verified = attestation.verify(&policy, now)?;
        if verified.insecure {
            tracing::warn!(
                "the run's validator uses the INSECURE development attester: nothing proves who can read your \
                 submissions"
            );
        } else {
            tracing::info!(attestation = %verified, "validator attestation verified");
        }
        let key = SealingKey::parse(&attestation.sealing_key)?;
        self.recipient = Some(Recipient { key: key.clone(), ledger_seq: info.ledger_seq });
        Ok(key)
    }

    /// Seals a message to the run's attested validator.
    fn seal(&mut self, a: &Assignment, message: &[u8]) -> Result<Vec<u8>> {
        let key = self.recipient()?;
        let header = SealedHeader {
            run_id: hex_array(&self.run.run_id)?,
            base_round: a.round,
            base_checkpoint: hex_array(&a.base_checkpoint)?,
            contributor: self.key.public(),
            recipient: key.fingerprint(),
        };
        Ok(key.seal(header, message)?)
    }

    /// Runs rounds until the run finishes (or `max_rounds`), calling `on_round` after each.
    pub fn run(&mut self, mut on_round: impl FnMut(&RoundReport)) -> Result<u64> {
        let mut done = 0;
        while self.config.max_rounds.is_none_or(|m| done < m) {
            let a = match self.assignment() {
                Err(ContributorError::Refused(e)) if e.code == ErrorCode::NotQualified => {
                    tracing::warn!(reason = %e.message, "not admitted to the run's new phase; stopping");
                    eprintln!("not admitted to the run's new phase: {}", e.message);
                    break;
                }
                other => other?,
            };
            if a.finished {
                tracing::info!("the run has finished");
                break;
            }
            if a.phase != self.run.phase {
                self.switch_phase()?;
            }
            if self.last_submitted == Some(a.round) {
                continue; // The hub's wait ran out; the round is still collecting.
            }
            if self.progress.is_some()
                && self.run.spec.contest.is_some()
                && let Ok(Some((row, of))) = self.standing()
            {
                self.report(Progress::Standing {
                    rank: row.rank,
                    of,
                    mean_score: row.mean_score,
                    rewards: row.rewards,
                });
            }
            let report = self.round(&a)?;
            on_round(&report);
            done += 1;
        }
        Ok(done)
    }

    /// One round: base weights, H inner steps, encode, upload, save.
    pub fn round(&mut self, a: &Assignment) -> Result<RoundReport> {
        let bytes_down = self.ensure_base(a.round, &a.base_checkpoint)?;
        let base =
            self.base.as_ref().ok_or_else(|| ContributorError::Data("no base weights after fetching them".into()))?;
        write_params(&self.trainer.model, &base.weights)?;
        self.trainer.schedule_shift = a.schedule_step as i64 - self.trainer.step() as i64;
        let start = Instant::now();
        let adversary = self.config.adversary;
        if adversary == Some(tessera_contest::Adversary::WrongData) {
            self.trainer.config.worker = a.slot + 1_000_003; // Someone else's windows.
        }
        // A layer-sharded run: only this contributor's fragment learns (the rest is frozen, so it
        // gets no gradients) and only it is submitted.
        let keep: Vec<usize> = match a.fragment {
            Some(f) => self.run.spec.fragment_tensors(f),
            None => (0..self.run.spec.tensors.len()).collect(),
        };
        for (i, (_, t)) in self.trainer.model.named_parameters().into_iter().enumerate() {
            let _ = t.set_requires_grad(keep.binary_search(&i).is_ok());
        }
        let steps = adversary.map_or(a.inner_steps, |k| k.inner_steps(a.inner_steps));
        self.report(Progress::Round { round: a.round, phase: a.phase, steps });
        let mut loss_sum = 0.0;
        for step in 0..steps {
            let loss = self.trainer.train_step()?.loss;
            loss_sum += loss;
            self.report(Progress::Step { step: step + 1, loss });
        }
        let inner_loss = loss_sum / steps.max(1) as f64;
        let train_s = start.elapsed().as_secs_f64();
        let local = read_params(&self.trainer.model)?;
        let mut deltas: Vec<Vec<f32>> =
            base.weights.iter().zip(&local).map(|(b, l)| b.iter().zip(l).map(|(b, l)| b - l).collect()).collect();
        if let Some(kind) = adversary {
            // Alone, an attacker sees no one else's work: copies take the last published update
            // (the only other pseudo-gradient a contributor can download); ALIE and IPM estimate
            // the honest mean from its own Δ.
            let public = match kind {
                tessera_contest::Adversary::Copy | tessera_contest::Adversary::CopyNoise if a.round > 0 => {
                    Some(self.published_update(a.round)?)
                }
                _ => None,
            };
            let others: Vec<&[Vec<f32>]> = public.iter().map(Vec::as_slice).collect();
            let n = self.run.spec.quorum as usize;
            kind.tamper(&mut deltas, &others, n.max(2), 1, a.round ^ a.slot);
        }
        let spec = &self.run.spec;
        let mut tensors = Vec::with_capacity(spec.tensors.len());
        for (k, ((t, delta), ef)) in spec.tensors.iter().zip(&deltas).zip(&mut self.feedback).enumerate() {
            if keep.binary_search(&k).is_err() {
                continue;
            }
            let mut encoded = ef.encode(&spec.codec, delta)?;
            if k == 0 && adversary == Some(tessera_contest::Adversary::Nan) {
                adversary::poison(&spec.codec, &mut encoded);
            }
            tensors.push(TensorEntry { name: t.name.clone(), shape: t.shape.clone(), encoded });
        }
        let message = PseudoGradient {
            codec: spec.codec,
            run_id: hex_array(&self.run.run_id)?,
            round: a.round,
            base_checkpoint: hex_array(&a.base_checkpoint)?,
            tensors,
        };
        let plain = message.to_bytes();
        let sealed = self.run.spec.trust.is_some();
        let mut body = if sealed { self.seal(a, &plain)? } else { plain.clone() };
        match adversary {
            Some(tessera_contest::Adversary::Replay) => {
                if let Some(old) = self.last_body.replace(body.clone()) {
                    body = old;
                }
            }
            Some(tessera_contest::Adversary::Stale) => self.wait_until_stale(a.round)?,
            _ => {}
        }
        let bytes_up = body.len() as u64;
        let outcome = match self.upload(body, inner_loss) {
            // The validator changed since this was sealed: seal to the new one, once.
            Err(ContributorError::Refused(e)) if sealed && e.code == ErrorCode::WrongValidator => {
                self.recipient = None;
                let resealed = self.seal(a, &plain)?;
                self.upload(resealed, inner_loss)?
            }
            other => other?,
        };
        self.save_state(a.round)?;
        Ok(RoundReport { round: a.round, inner_loss, bytes_up, bytes_down, outcome, train_s })
    }

    /// The bytes of the update the hub published into `round`.
    fn fetch_update(&self, round: u64) -> Result<Vec<u8>> {
        let url = format!("{}/v1/updates/{round}", self.config.hub);
        let hub = self.hub();
        let r = hub.send("update", || self.http.get(&url))?;
        let status = r.status();
        let bytes = link::read_all(r, self.download.as_ref()).map_err(|e| hub.http_err("update", e))?;
        if !status.is_success() {
            return Err(hub.refusal("update", status, &bytes));
        }
        Ok(bytes.to_vec())
    }

    /// Adversaries only: the decoded update the hub published into `round`.
    fn published_update(&self, round: u64) -> Result<Vec<Vec<f32>>> {
        let bytes = self.fetch_update(round)?;
        let view = MessageView::parse(&bytes)?;
        let zeros: Vec<Vec<f32>> = self.run.spec.tensors.iter().map(|t| vec![0.0; t.numel() as usize]).collect();
        // The update moves θ by +u; as a pseudo-gradient (θ − θ_local) that is −u.
        Ok(view.apply_to(&zeros)?.into_iter().map(|t| t.into_iter().map(|v| -v).collect()).collect())
    }

    /// Adversaries only: holds a finished round's work until the run has moved past the
    /// staleness it accepts.
    fn wait_until_stale(&self, base_round: u64) -> Result<()> {
        let target = base_round + self.run.spec.max_staleness + 1;
        let url = format!("{}/v1/run", self.config.hub);
        let hub = self.hub();
        let started = Instant::now();
        loop {
            let info: RunInfo = hub.json("run", hub.send("run", || self.http.get(&url))?)?;
            if info.round >= target || info.finished || started.elapsed() > self.config.patience {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn upload(&self, body: Vec<u8>, inner_loss: f64) -> Result<Outcome> {
        // In a scored run the hub answers 503 `busy` while it waits for a round's scores: that
        // can last up to the run's score timeout, which patience alone might not cover.
        let mut hub = self.hub();
        if let Some(c) = &self.run.spec.contest {
            hub.patience = hub.patience.max(Duration::from_millis(c.score_timeout_ms) + Duration::from_secs(60));
        }
        let shared = std::sync::Arc::new(body);
        let response = hub.send("submit", || {
            let request = self
                .signed("POST", "/v1/submissions", shared.to_vec())
                .header(INNER_LOSS_HEADER, inner_loss.to_string());
            if self.progress.is_none() && self.upload.is_none() {
                return request;
            }
            // The same bytes, read through a counter and the link (the signature covers them).
            let body =
                Counted { bytes: shared.clone(), at: 0, progress: self.progress.clone(), link: self.upload.clone() };
            request.body(reqwest::blocking::Body::sized(body, shared.len() as u64))
        })?;
        match hub.json::<Receipt>("submit", response) {
            Ok(r) => Ok(Outcome::Accepted(r)),
            Err(ContributorError::Refused(e)) if e.code == ErrorCode::Duplicate => Ok(Outcome::AlreadyAccepted),
            // An adversary is refused by design; it goes on to the next round.
            Err(ContributorError::Refused(e))
                if matches!(e.code, ErrorCode::Stale | ErrorCode::RunFinished) || self.config.adversary.is_some() =>
            {
                tracing::warn!(reason = %e.message, "submission not used");
                Ok(Outcome::NotUsed(e.message))
            }
            Err(e) => Err(e),
        }
    }

    /// Persists what a restart needs after a finished round.
    fn save_state(&mut self, round: u64) -> Result<()> {
        let dir = self.config.state_dir.clone();
        self.trainer.save(&dir.join("trainer"))?;
        if self.run.spec.codec != Codec::F32 {
            let residuals: Vec<Vec<f32>> = self.feedback.iter().map(|f| f.residual().to_vec()).collect();
            write_atomic(&dir.join("feedback.safetensors"), &encode_weights(&self.run.spec.tensors, &residuals)?)?;
        }
        write_atomic(&dir.join("last_submitted"), round.to_string().as_bytes())?;
        self.last_submitted = Some(round);
        Ok(())
    }

    /// Brings the cached weights to round `round`'s base checkpoint `hash`; returns the bytes
    /// downloaded. Follows published updates when it can, else downloads the checkpoint.
    fn ensure_base(&mut self, round: u64, hash: &str) -> Result<u64> {
        if self.base.as_ref().is_some_and(|b| b.hash == hash) {
            return Ok(0);
        }
        let mut downloaded = 0;
        if let Some(mut base) = self.base.take().filter(|b| b.round < round) {
            let followed = (|| -> Result<Base> {
                for r in base.round + 1..=round {
                    let (next, n) = self.apply_update(&base, r)?;
                    downloaded += n;
                    base = next;
                }
                Ok(base)
            })();
            match followed {
                Ok(b) if b.hash == hash => {
                    self.base = Some(b);
                    self.save_base()?;
                    return Ok(downloaded);
                }
                Ok(b) => tracing::warn!(got = %b.hash, want = hash, "updates did not reproduce the checkpoint"),
                Err(e) => tracing::warn!(error = %e, "could not follow the published updates"),
            }
        }
        let bytes = self.download_checkpoint(hash)?;
        downloaded += bytes.len() as u64;
        let weights = decode_weights(&bytes, &self.run.spec.tensors)?;
        self.base = Some(Base { round, hash: hash.to_owned(), weights });
        self.save_base()?;
        Ok(downloaded)
    }

    fn apply_update(&self, base: &Base, round: u64) -> Result<(Base, u64)> {
        let bytes = self.fetch_update(round)?;
        let view = MessageView::parse(&bytes)?;
        if hex::encode(view.base_checkpoint) != base.hash || view.round != round {
            return Err(ContributorError::Data(format!("update {round} does not start from round {}", base.round)));
        }
        let weights = view.apply_to(&base.weights)?;
        let hash = hex::encode(weights_hash(&encode_weights(&self.run.spec.tensors, &weights)?));
        Ok((Base { round, hash, weights }, bytes.len() as u64))
    }

    /// Downloads a checkpoint into the state directory, resuming a partial download with a
    /// range request, and checks its hash.
    fn download_checkpoint(&self, hash: &str) -> Result<Vec<u8>> {
        let part = self.config.state_dir.join(format!("{hash}.part"));
        let url = format!("{}/v1/checkpoints/{hash}", self.config.hub);
        let hub = self.hub();
        let mut have = std::fs::read(&part).unwrap_or_default();
        let r = hub.send("checkpoint", || {
            let b = self.http.get(&url);
            if have.is_empty() { b } else { b.header(reqwest::header::RANGE, format!("bytes={}-", have.len())) }
        })?;
        let status = r.status();
        let body = link::read_all(r, self.download.as_ref()).map_err(|e| hub.http_err("checkpoint", e))?;
        match status {
            StatusCode::OK => have = body.to_vec(),
            StatusCode::PARTIAL_CONTENT => have.extend_from_slice(&body),
            // The partial file is longer than the object, or otherwise wrong: start over.
            StatusCode::RANGE_NOT_SATISFIABLE => {
                let _ = std::fs::remove_file(&part);
                return self.download_checkpoint(hash);
            }
            _ => return Err(hub.refusal("checkpoint", status, &body)),
        }
        let _ = std::fs::remove_file(&part);
        if hex::encode(weights_hash(&have)) != hash {
            return Err(ContributorError::Data(format!("checkpoint {hash} arrived with a different hash")));
        }
        Ok(have)
    }

    fn save_base(&self) -> Result<()> {
        let Some(base) = &self.base else { return Ok(()) };
        let dir = &self.config.state_dir;
        write_atomic(&dir.join("base.safetensors"), &encode_weights(&self.run.spec.tensors, &base.weights)?)?;
        let meta = BaseMeta { round: base.round, hash: base.hash.clone() };
        write_atomic(&dir.join("base.json"), &serde_json::to_vec(&meta).map_err(|e| state_err(dir, e))?)
    }
}

/// A request to `hub` + `path`, signed by `key` over its method, path and body.
fn sign(
    http: &Client,
    key: &tessera_trust::Identity,
    hub: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> reqwest::blocking::RequestBuilder {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::POST);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut b = http.request(m, format!("{hub}{path}"));
    match key.sign_request(method, path, &body, now) {
        Ok(headers) => {
            for (k, v) in headers {
                b = b.header(k, v);
            }
        }
        // The hub refuses the unsigned request with a clear error.
        Err(e) => tracing::error!(error = %e, "could not sign a request"),
    }
    b.body(body)
}

/// The hub's run, its signature checked (against `pinned`, or the key the answer names on first
/// contact) and its spec held to what a hub must check before serving it.
fn fetch_run(hub: &Hub, http: &Client, pinned: Option<&PublicKey>) -> Result<RunInfo> {
    let response = hub.send("run", || http.get(format!("{}/v1/run", hub.url)))?;
    let signature = response.headers().get(HUB_SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = hub.body("run", response)?;
    let run: RunInfo = serde_json::from_slice(&body).map_err(|e| hub.http_err("run", e))?;
    if run.protocol != PROTOCOL_VERSION {
        return Err(ContributorError::Protocol(run.protocol));
    }
    let key = match pinned {
        Some(k) => *k,
        None => PublicKey::parse(&run.hub_key)?,
    };
    check_hub_signature(&key, &body, signature.as_deref())?;
    run.spec.validate().map_err(|e| ContributorError::Data(format!("the hub's run spec: {e}")))?;
    Ok(run)
}

/// The run's tensor table must be exactly the model its config describes (names and shapes):
/// everything later indexes both in this order.
fn check_table(model: &Llama, table: &[TensorSpec]) -> Result<()> {
    let ours: Vec<TensorSpec> = model
        .named_parameters()
        .iter()
        .map(|(n, t)| TensorSpec { name: n.clone(), shape: t.size().iter().map(|&d| d as u64).collect() })
        .collect();
    if ours != table {
        return Err(ContributorError::Data("the run's tensor table does not match its model config".into()));
    }
    Ok(())
}

/// Checks the hub's signature over an answer it published.
fn check_hub_signature(hub_key: &PublicKey, body: &[u8], signature: Option<&str>) -> Result<()> {
    let signature = signature.ok_or_else(|| ContributorError::Data("the hub's answer is not signed".into()))?;
    hub_key
        .verify_hex(&tessera_trust::identity::publication_message(body), signature)
        .map_err(|_| ContributorError::Data("the hub's signature on its answer does not verify".into()))
}

/// The cached base weights, if present and intact.
fn load_base(dir: &Path, table: &[TensorSpec]) -> Option<Base> {
    let meta: BaseMeta = serde_json::from_slice(&std::fs::read(dir.join("base.json")).ok()?).ok()?;
    let bytes = std::fs::read(dir.join("base.safetensors")).ok()?;
    if hex::encode(weights_hash(&bytes)) != meta.hash {
        tracing::warn!("cached base weights do not match their hash; ignoring them");
        return None;
    }
    let weights = decode_weights(&bytes, table).ok()?;
    Some(Base { round: meta.round, hash: meta.hash, weights })
}

fn hex_array<const N: usize>(s: &str) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|e| ContributorError::Data(format!("bad hex {s:?}: {e}")))?;
    Ok(out)
}
