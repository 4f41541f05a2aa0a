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
mod net;
pub mod overlap;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Device;
use tessera_client::{ClientError, HubClient, ShardCache};
use tessera_data::Dataset;
use tessera_model::{Llama, LlamaConfig};
use tessera_protocol::api::{Assignment, Receipt, RunInfo};
use tessera_protocol::{
    ApiError, Codec, ErrorCode, ErrorFeedback, MessageView, PseudoGradient, TensorEntry, TensorSpec, decode_weights,
    encode_weights,
};
use tessera_train::diloco::{read_params, write_params};
use tessera_train::run::{inner_config, run_dataset};
use tessera_train::{TrainError, Trainer};
use tessera_trust::{PublicKey, SealedHeader, SealingKey, ValidatorAttestation};

use net::{Base, Net, load_base};

#[derive(Debug, thiserror::Error)]
pub enum ContributorError {
    #[error(transparent)]
    Hub(#[from] ClientError),
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
    /// The devices to train on (at least one): one DiLoCo replica each, averaged before the
    /// round's one upload.
    pub devices: Vec<Device>,
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
    /// Upload each round and download the next checkpoint while the next round already trains
    /// (a one-round-delayed outer update; see [`overlap`]).
    pub overlap: bool,
    /// Runs on a published dataset: the most bytes of shards kept on disk.
    pub data_cache_bytes: u64,
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
    /// Overlapped rounds: how long training waited for this round's upload and the next base
    /// after the following round's inner steps were done (the transfers not hidden).
    pub waited_s: Option<f64>,
}

/// What [`Contributor::run`] added up to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Rounds submitted.
    pub rounds: u64,
    /// Seconds spent in the inner steps of submitted rounds (work dropped is not counted).
    pub training_s: f64,
    /// Seconds from the first inner step to the end: the steady state.
    pub wall_s: f64,
    /// Seconds before the first inner step: fetching the first base checkpoint.
    pub joining_s: f64,
}

impl Summary {
    /// Compute utilisation: training time over wall time, from the first inner step.
    pub fn utilisation(&self) -> f64 {
        self.training_s / self.wall_s.max(1e-9)
    }
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

/// A round's submission, ready to send.
struct Packaged {
    /// The message before sealing (a sealed run may have to seal it again).
    plain: Vec<u8>,
    /// What goes to the hub.
    body: Vec<u8>,
    /// Δ, before encoding.
    deltas: Vec<Vec<f32>>,
}

/// A verified validator this contributor seals to.
struct Recipient {
    key: SealingKey,
    ledger_seq: u64,
}

pub struct Contributor {
    config: ContributorConfig,
    /// The key this contributor signs with (its requests, and its sealed envelopes).
    key: PublicKey,
    signer: Arc<tessera_trust::Identity>,
    /// The hub, this contributor's key and links: what a transfer needs.
    net: Net,
    pub run: RunInfo,
    identity: Identity,
    recipient: Option<Recipient>,
    trainer: Trainer,
    /// Several devices: the replicas on the devices after the first (`trainer` is replica 0).
    /// Each trains its share of every step's windows; their weights are averaged at the end of
    /// the round, so the hub sees one submission.
    replicas: Vec<Trainer>,
    feedback: Vec<ErrorFeedback>,
    base: Option<Base>,
    /// The last base round this contributor submitted for.
    last_submitted: Option<u64>,
    /// The spec revision of the last assignment (`Assignment::revision`).
    revision: Option<u64>,
    /// Adversaries only: the last message sent (replay resends it).
    last_body: Option<Vec<u8>>,
    /// When this run's first inner step began.
    first_step: Option<Instant>,
    /// Runs on published datasets: their shards (the run's own dataset first, then its
    /// mixture's), fetched one assignment at a time. Empty for other runs.
    shards: Vec<Arc<ShardCache>>,
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

impl Contributor {
    /// Connects to the hub, registers (or reuses the identity in the state directory) and
    /// restores the inner trainer from the state directory if it holds one for this run.
    pub fn join(config: ContributorConfig) -> Result<Contributor> {
        let dir = &config.state_dir;
        std::fs::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
        let key_path = config.key.clone().unwrap_or_else(|| dir.join("identity.pem"));
        let key = Arc::new(tessera_trust::Identity::load_or_create(&key_path)?);
        let client = HubClient::new(&config.hub)?.with_patience(config.patience).signed_by(key.clone());
        let run = client.run()?;
        let hub_key = PublicKey::parse(&run.hub_key)?;
        let download = config.max_download_bps.map(tessera_client::Bucket::shared);
        let client = client
            .pinning(hub_key)
            .with_links(config.max_upload_bps.map(tessera_client::Bucket::shared), download.clone());
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
                let reg = client.register(&config.name)?;
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

        let shards: Vec<Arc<ShardCache>> = tessera_client::open_run_datasets(
            &run.spec.data.source,
            &run.spec.data.fingerprint,
            &dir.join("data"),
            config.data_cache_bytes,
            download,
        )?
        .into_iter()
        .map(Arc::new)
        .collect();
        let dataset = match shards.first() {
            // Until the first round swaps in its shard, the training tokens are a validation
            // shard's (fetched anyway): nothing is downloaded that no round assigned.
            Some(cache) => {
                let first = (0..cache.manifest.shards.len())
                    .find(|&i| cache.manifest.shards[i].split == tessera_data::Split::Validation)
                    .ok_or_else(|| ContributorError::Data("the run's dataset has no validation shard".into()))?;
                let validation = cache.shard(first)?;
                cache.dataset(validation.clone(), validation)?
            }
            None => run_dataset(&run, config.data.clone())?,
        };
        let model_config = LlamaConfig::from_json(run.spec.model.clone())
            .map_err(|e| ContributorError::Data(format!("the run's model config: {e}")))?;
        if config.devices.is_empty() {
            return Err(ContributorError::Data("no device to train on".into()));
        }
        let mut trainers = Vec::with_capacity(config.devices.len());
        for (r, &device) in config.devices.iter().enumerate() {
            let train_config = replica_config(&run, identity.contributor_id, r, config.devices.len());
            let trainer_dir = replica_dir(dir, r);
            let trainer = if Trainer::recover(&trainer_dir)? {
                let mut t = Trainer::resume(&trainer_dir, dataset.clone(), device, Some(train_config.steps))?;
                t.config.replica = train_config.replica;
                t.config.replicas = train_config.replicas;
                check_table(&t.model, &run.spec.tensors)?;
                t
            } else {
                fresh_replica(&model_config, &run, train_config, device, dataset.clone())?
            };
            trainers.push(trainer);
        }
        let trainer = trainers.remove(0);
        let replicas = trainers;
        let table = &run.spec.tensors;
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
        let net = Net { client, state_dir: config.state_dir.clone(), progress: None };
        let signer = key.clone();
        let key = key.public();
        Ok(Contributor {
            config,
            key,
            signer,
            net,
            run,
            identity,
            recipient: None,
            trainer,
            replicas,
            feedback,
            base,
            last_submitted,
            revision: None,
            last_body: None,
            first_step: None,
            shards,
        })
    }

    /// Reports live progress (round, phase, each inner step's loss, upload bytes) to `f`.
    pub fn on_progress(&mut self, f: ProgressFn) {
        self.net.progress = Some(f);
    }

    fn report(&self, p: Progress) {
        if let Some(f) = &self.net.progress {
            f(&p);
        }
    }

    /// This contributor's row of the run's leaderboard (rank, rating, rewards, mean score), and
    /// how many rows there are; `None` if it is not on the board yet.
    pub fn standing(&self) -> Result<Option<(tessera_protocol::api::LeaderRow, usize)>> {
        self.net.standing(self.identity.contributor_id)
    }

    pub fn id(&self) -> u64 {
        self.identity.contributor_id
    }

    /// The key this contributor signs with and is credited under.
    pub fn public_key(&self) -> PublicKey {
        self.key
    }

    /// The run has grown into a new phase: fetch its spec and start training the new model (from
    /// the grown checkpoint the next round downloads), with fresh inner optimizer state and error
    /// feedback. What was saved for the old model is dropped first, so a restart lands in the
    /// new phase too.
    fn switch_phase(&mut self) -> Result<()> {
        let run = self.net.client.run()?;
        let model_config = LlamaConfig::from_json(run.spec.model.clone())
            .map_err(|e| ContributorError::Data(format!("the run's model config: {e}")))?;
        let dir = self.config.state_dir.clone();
        for stale in ["trainer", "feedback.safetensors", "base.safetensors", "base.json"] {
            let p = dir.join(stale);
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
        let n = self.config.devices.len();
        let mut trainers = Vec::with_capacity(n);
        for (r, &device) in self.config.devices.iter().enumerate() {
            let _ = std::fs::remove_dir_all(replica_dir(&dir, r));
            let config = replica_config(&run, self.identity.contributor_id, r, n);
            trainers.push(fresh_replica(&model_config, &run, config, device, self.trainer.dataset.clone())?);
        }
        self.trainer = trainers.remove(0);
        self.replicas = trainers;
        let decay = run.spec.feedback_decay;
        self.feedback =
            run.spec.tensors.iter().map(|t| ErrorFeedback::new(t.numel() as usize).with_decay(decay)).collect();
        self.base = None;
        tracing::info!(phase = run.phase, params = run.spec.num_params(), "the run grew: training its new model");
        self.run = run;
        Ok(())
    }

    /// The run's validator, its attestation verified against the run's policy (once per
    /// validator the hub announces).
    fn recipient(&mut self) -> Result<SealingKey> {
        let Some(policy) = self.run.spec.trust.clone() else {
            return Err(ContributorError::Data("this run does not seal submissions".into()));
        };
        // 503 `no_validator` is retried with the rest of the hub's 5xx answers.
        let info = self.net.client.validator()?;
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
            contributor: self.key,
            recipient: key.fingerprint(),
        };
        Ok(key.seal(header, message, &self.signer)?)
    }

    /// Runs rounds until the run finishes (or `max_rounds`), calling `on_round` after each.
    /// With [`ContributorConfig::overlap`], each round's upload and the next download run while
    /// the next round trains (see [`overlap`]).
    pub fn run(&mut self, mut on_round: impl FnMut(&RoundReport)) -> Result<Summary> {
        let began = Instant::now();
        self.first_step = None;
        let mut training_s = 0.0;
        let mut count = |r: &RoundReport| {
            training_s += r.train_s;
            on_round(r);
        };
        let rounds = if self.config.overlap {
            self.run_overlapped(&mut count)?
        } else {
            let mut done = 0;
            while self.config.max_rounds.is_none_or(|m| done < m) {
                let Some(a) = self.next_assignment()? else { break };
                let report = self.round(&a)?;
                count(&report);
                done += 1;
            }
            done
        };
        let first = self.first_step.unwrap_or_else(Instant::now);
        Ok(Summary {
            rounds,
            training_s,
            wall_s: first.elapsed().as_secs_f64(),
            joining_s: first.saturating_duration_since(began).as_secs_f64(),
        })
    }

    /// The next round to train: one the hub has opened and this contributor has not submitted
    /// for, in the run's current phase (switching to it if the run grew). `None` once the run
    /// finished or did not admit this contributor to its new phase.
    fn next_assignment(&mut self) -> Result<Option<Assignment>> {
        loop {
            let a = match self.net.assignment() {
                Err(ContributorError::Hub(ClientError::Refused { error: e, .. }))
                    if e.code == ErrorCode::NotQualified =>
                {
                    not_admitted(&e);
                    return Ok(None);
                }
                other => other?,
            };
            if a.finished {
                tracing::info!("the run has finished");
                return Ok(None);
            }
            if a.phase != self.run.phase {
                self.switch_phase()?;
            } else if self.revision.is_some_and(|r| r != a.revision) {
                // Its holders changed the run's spec (H, the codec…): train by the new one.
                self.run = self.net.client.run()?;
                tracing::info!(revision = a.revision, "the run's spec changed by vote");
            }
            self.revision = Some(a.revision);
            if self.last_submitted == Some(a.round) {
                continue; // The hub's wait ran out; the round is still collecting.
            }
            if self.net.progress.is_some()
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
            return Ok(Some(a));
        }
    }

    /// One round: base weights, H inner steps, encode, upload, save.
    pub fn round(&mut self, a: &Assignment) -> Result<RoundReport> {
        let (base, bytes_down) =
            self.net.ensure_base(self.base.take(), a.round, &a.base_checkpoint, &self.run.spec.tensors)?;
        let (keep, inner_loss, train_s) = self.train_from(a, &base.weights)?;
        let Packaged { plain, mut body, .. } = self.package(a, &keep, &base.weights)?;
        self.base = Some(base);
        match self.config.adversary {
            Some(tessera_contest::Adversary::Replay) => {
                if let Some(old) = self.last_body.replace(body.clone()) {
                    body = old;
                }
            }
            Some(tessera_contest::Adversary::Stale) => self.wait_until_stale(a.round)?,
            _ => {}
        }
        let bytes_up = body.len() as u64;
        let sent = self.upload(a, body, inner_loss);
        let outcome = self.resend_if_resealed(a, &plain, inner_loss, sent)?;
        self.save_state()?;
        self.mark_submitted(a.round)?;
        Ok(RoundReport { round: a.round, inner_loss, bytes_up, bytes_down, outcome, train_s, waited_s: None })
    }

    /// Loads `start` into the model and trains round `a`'s inner steps from it. Returns the
    /// tensors this contributor trains (all, or its fragment's), the mean inner loss and the
    /// seconds the steps took.
    fn train_from(&mut self, a: &Assignment, start: &[Vec<f32>]) -> Result<(Vec<usize>, f64, f64)> {
        let began = Instant::now();
        let (keep, steps) = self.begin_round(a, start)?;
        let mut loss_sum = 0.0;
        // The other replicas train on their own threads (their own devices) while this one
        // reports progress; the losses of all of them make the round's mean.
        let replicas = std::mem::take(&mut self.replicas);
        let trained = std::thread::scope(|scope| {
            let others: Vec<_> = replicas
                .into_iter()
                .map(|mut t| {
                    scope.spawn(move || {
                        let mut sum = 0.0;
                        for _ in 0..steps {
                            sum += t.train_step()?.loss;
                        }
                        Ok::<_, TrainError>((t, sum))
                    })
                })
                .collect();
            let mine = (0..steps).try_for_each(|step| {
                loss_sum += self.inner_step(step)?;
                Ok::<_, ContributorError>(())
            });
            let mut back = Vec::with_capacity(others.len());
            let mut failed = mine.err();
            for h in others {
                match h.join() {
                    Ok(Ok((t, sum))) => {
                        loss_sum += sum;
                        back.push(t);
                    }
                    Ok(Err(e)) => failed = failed.or(Some(e.into())),
                    Err(_) => failed = failed.or(Some(ContributorError::Data("a replica's thread panicked".into()))),
                }
            }
            (back, failed)
        });
        // The replicas that came back are kept; one whose thread failed is rebuilt by a restart
        // from the saved state (the error ends the run).
        let (back, failed) = trained;
        self.replicas = back;
        if let Some(e) = failed {
            return Err(e);
        }
        let replicas = 1.0 + self.replicas.len() as f64;
        Ok((keep, loss_sum / (steps.max(1) as f64 * replicas), began.elapsed().as_secs_f64()))
    }

    /// Sets the trainer up for round `a` from the weights `start`: the schedule, the data slot,
    /// and which tensors learn. Returns those tensors (all, or its fragment's) and the number of
    /// inner steps to train.
    fn begin_round(&mut self, a: &Assignment, start: &[Vec<f32>]) -> Result<(Vec<usize>, u64)> {
        self.take_shard(a)?;
        self.first_step.get_or_insert_with(Instant::now);
        let adversary = self.config.adversary;
        for t in std::iter::once(&mut self.trainer).chain(&mut self.replicas) {
            write_params(&t.model, start)?;
            t.schedule_shift = a.schedule_step as i64 - t.step() as i64;
            if adversary == Some(tessera_contest::Adversary::WrongData) {
                t.config.worker = a.slot + 1_000_003; // Someone else's windows.
            }
        }
        // A layer-sharded run: only this contributor's fragment learns (the rest is frozen, so it
        // gets no gradients) and only it is submitted.
        let keep: Vec<usize> = match a.fragment {
            Some(f) => self.run.spec.fragment_tensors(f),
            None => (0..self.run.spec.tensors.len()).collect(),
        };
        for trainer in std::iter::once(&self.trainer).chain(&self.replicas) {
            for (i, (_, t)) in trainer.model.named_parameters().into_iter().enumerate() {
                let _ = t.set_requires_grad(keep.binary_search(&i).is_ok());
            }
        }
        let steps = adversary.map_or(a.inner_steps, |k| k.inner_steps(a.inner_steps));
        self.report(Progress::Round { round: a.round, phase: a.phase, steps });
        Ok((keep, steps))
    }

    /// Runs on a published dataset: trains round `a` on its assigned shard (fetched, or already
    /// prefetched) and starts fetching the next round's, which is this slot's pick for the next
    /// round.
    fn take_shard(&mut self, a: &Assignment) -> Result<()> {
        let Some(d) = &a.data else { return Ok(()) };
        let Some(cache) = self.shards.get(d.source as usize) else {
            return Err(ContributorError::Data(format!(
                "the round assigned dataset {} of a mixture this run lacks",
                d.source
            )));
        };
        let tokens = cache.shard(cache.train_index(d.shard)?)?;
        let need = self.trainer.config.seq_len + 2;
        if tokens.len() < need {
            return Err(ContributorError::Data(format!(
                "training shard {} holds {} tokens, fewer than one window of {need}",
                d.shard,
                tokens.len()
            )));
        }
        for t in &mut self.replicas {
            t.dataset.train = tokens.clone();
        }
        self.trainer.dataset.train = tokens;
        if let Some(next) =
            tessera_protocol::data::data_assignment(&self.run.spec, a.round + 1, self.identity.contributor_id)
        {
            // Detached: a failed prefetch is fetched again when the next round asks for it.
            if let Some(next_cache) = self.shards.get(next.source as usize) {
                drop(next_cache.prefetch(vec![next_cache.train_index(next.shard)?]));
            }
        }
        Ok(())
    }

    /// Inner step `step` (0-based) of the round; returns its loss.
    fn inner_step(&mut self, step: u64) -> Result<f64> {
        let loss = self.trainer.train_step()?.loss;
        self.report(Progress::Step { step: step + 1, loss });
        Ok(loss)
    }

    /// The round's submission: Δ = `start` − the trained weights, encoded with error feedback
    /// (tampered with, for an adversary), sealed in a sealed run.
    fn package(&mut self, a: &Assignment, keep: &[usize], start: &[Vec<f32>]) -> Result<Packaged> {
        let adversary = self.config.adversary;
        let local = self.local_weights()?;
        let mut deltas: Vec<Vec<f32>> =
            start.iter().zip(&local).map(|(b, l)| b.iter().zip(l).map(|(b, l)| b - l).collect()).collect();
        if let Some(kind) = adversary {
            // Alone, an attacker sees no one else's work: copies take the last published update
            // (the only other pseudo-gradient a contributor can download); ALIE and IPM estimate
            // the honest mean from its own Δ.
            let public = match kind {
                tessera_contest::Adversary::Copy
                | tessera_contest::Adversary::CopyNoise
                | tessera_contest::Adversary::CopySupport
                    if a.round > 0 =>
                {
                    Some(self.published_update(a.round)?)
                }
                // The last update as a pseudo-gradient: divided by the run's outer lr.
                tessera_contest::Adversary::Adaptive if a.round > 0 => {
                    let lr = self.run.spec.outer.lr;
                    let mut u = self.published_update(a.round)?;
                    u.iter_mut().flatten().for_each(|v| *v /= lr);
                    Some(u)
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
        let body = if self.run.spec.trust.is_some() { self.seal(a, &plain)? } else { plain.clone() };
        Ok(Packaged { plain, body, deltas })
    }

    /// Sends a submission with this run's patience (a scored run's hub answers 503 `busy` for
    /// as long as it waits for a round's scores, which patience alone might not cover).
    /// The submission claims the data `a` assigned.
    fn upload(&self, a: &Assignment, body: Vec<u8>, inner_loss: f64) -> Result<Outcome> {
        self.net.upload(body, inner_loss, a.data, self.busy_patience(), self.config.adversary.is_some())
    }

    fn busy_patience(&self) -> Option<Duration> {
        self.run.spec.contest.as_ref().map(|c| Duration::from_millis(c.score_timeout_ms) + Duration::from_secs(60))
    }

    /// `sent`: what sending round `a`'s sealed `plain` gave. If the validator changed since it
    /// was sealed, seals it to the new one and sends it once more.
    fn resend_if_resealed(
        &mut self,
        a: &Assignment,
        plain: &[u8],
        inner_loss: f64,
        sent: Result<Outcome>,
    ) -> Result<Outcome> {
        match sent {
            Err(ContributorError::Hub(ClientError::Refused { error: e, .. }))
                if self.run.spec.trust.is_some() && e.code == ErrorCode::WrongValidator =>
            {
                self.recipient = None;
                let resealed = self.seal(a, plain)?;
                self.upload(a, resealed, inner_loss)
            }
            other => other,
        }
    }

    /// Adversaries only: the decoded update the hub published into `round`.
    fn published_update(&self, round: u64) -> Result<Vec<Vec<f32>>> {
        let bytes = self.net.fetch_update(round)?;
        let view = MessageView::parse(&bytes)?;
        let zeros: Vec<Vec<f32>> = self.run.spec.tensors.iter().map(|t| vec![0.0; t.numel() as usize]).collect();
        // The update moves θ by +u; as a pseudo-gradient (θ − θ_local) that is −u.
        Ok(view.apply_to(&zeros)?.into_iter().map(|t| t.into_iter().map(|v| -v).collect()).collect())
    }

    /// Adversaries only: holds a finished round's work until the run has moved past the
    /// staleness it accepts.
    fn wait_until_stale(&self, base_round: u64) -> Result<()> {
        let target = base_round + self.run.spec.max_staleness + 1;
        let started = Instant::now();
        loop {
            let info: RunInfo = self.net.client.run()?;
            if info.round >= target || info.finished || started.elapsed() > self.config.patience {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The round's trained weights: the model's, or with several devices the mean of every
    /// replica's (one DiLoCo step among them, at no cost to the link).
    fn local_weights(&self) -> Result<Vec<Vec<f32>>> {
        let mut sum = read_params(&self.trainer.model)?;
        if self.replicas.is_empty() {
            return Ok(sum);
        }
        for t in &self.replicas {
            for (s, r) in sum.iter_mut().zip(read_params(&t.model)?) {
                s.iter_mut().zip(r).for_each(|(s, r)| *s += r);
            }
        }
        let n = 1.0 + self.replicas.len() as f32;
        sum.iter_mut().for_each(|t| t.iter_mut().for_each(|v| *v /= n));
        Ok(sum)
    }

    /// Persists what a restart needs after a trained round: the inner trainer and the
    /// error-feedback residuals.
    fn save_state(&mut self) -> Result<()> {
        let dir = self.config.state_dir.clone();
        self.trainer.save(&dir.join("trainer"))?;
        for (r, t) in self.replicas.iter().enumerate() {
            t.save(&replica_dir(&dir, r + 1))?;
        }
        if self.run.spec.codec != Codec::F32 {
            let residuals: Vec<Vec<f32>> = self.feedback.iter().map(|f| f.residual().to_vec()).collect();
            write_atomic(&dir.join("feedback.safetensors"), &encode_weights(&self.run.spec.tensors, &residuals)?)?;
        }
        Ok(())
    }

    /// Records that round `round`'s submission reached the hub.
    fn mark_submitted(&mut self, round: u64) -> Result<()> {
        write_atomic(&self.config.state_dir.join("last_submitted"), round.to_string().as_bytes())?;
        self.last_submitted = Some(round);
        Ok(())
    }
}

/// Where replica `r`'s inner trainer is saved: `trainer` for the first (as with one device),
/// `trainer-r` for the others.
fn replica_dir(dir: &Path, r: usize) -> PathBuf {
    if r == 0 { dir.join("trainer") } else { dir.join(format!("trainer-{r}")) }
}

/// A new replica on `device`: the run's model, zeroed (each round loads its base weights),
/// checked against the run's tensor table.
fn fresh_replica(
    model_config: &LlamaConfig,
    run: &RunInfo,
    config: tessera_train::TrainConfig,
    device: Device,
    dataset: Dataset,
) -> Result<Trainer> {
    let model = Llama::zeroed(model_config, device)?;
    check_table(&model, &run.spec.tensors)?;
    Ok(Trainer::from_model(config, model, dataset)?)
}

/// Replica `r` of `n`'s inner trainer: the contributor's, drawing its share of each step's
/// windows.
fn replica_config(run: &RunInfo, contributor: u64, r: usize, n: usize) -> tessera_train::TrainConfig {
    tessera_train::TrainConfig { replicas: n, replica: r, ..inner_config(run, contributor) }
}

fn not_admitted(e: &ApiError) {
    tracing::warn!(reason = %e.message, "not admitted to the run's new phase; stopping");
    eprintln!("not admitted to the run's new phase: {}", e.message);
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

fn hex_array<const N: usize>(s: &str) -> Result<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).map_err(|e| ContributorError::Data(format!("bad hex {s:?}: {e}")))?;
    Ok(out)
}
