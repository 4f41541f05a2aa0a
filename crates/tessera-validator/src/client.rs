//! The validator against a hub over HTTP (`tessera validator`): wait for a round whose
//! submissions have closed, check the revealed evaluation seed against the commitment the round
//! was opened with, download the round's weights and submissions, score them, report.
//!
//! In a sealed run it first makes its keys (an HPKE key pair submissions are sealed to and an
//! Ed25519 signing key), obtains evidence binding both ([`crate::tee::Attester`]), and registers
//! with the hub by appending its signed `Validator` entry to the ledger. Each round it opens the
//! envelopes, scores, settles (weights and rewards, `tessera_contest::settle`, with the data-fit
//! records its own receipts hold), aggregates, and signs the round's receipts, emission and
//! Merkle root; the hub sees only the aggregate.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tch::Device;
use tessera_client::{ClientError, HubClient, ShardCache};
use tessera_contest::{Policy, Scored, Settlement, settle};
use tessera_data::Dataset;
use tessera_model::LlamaConfig;
use tessera_protocol::api::{DataSource, JobSubmission, RunInfo, ScoringJob, Settled, Verdict};
use tessera_protocol::{Codec, MessageView, PseudoGradient, TensorEntry, decode_weights};
use tessera_train::run::{inner_config, run_dataset};
use tessera_trust::ledger::{Body as LedgerBody, Ledger};
use tessera_trust::{OpeningKey, ValidatorAttestation, Verified};

use crate::{Candidate, ScoreConfig, ScoreCost, Scorer};

#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error(transparent)]
    Hub(#[from] ClientError),
    #[error("the run is not scored (started without --scored)")]
    NotScored,
    #[error("round {round}: {message}")]
    Bad { round: u64, message: String },
    #[error(transparent)]
    Train(#[from] tessera_train::TrainError),
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error(transparent)]
    Wire(#[from] tessera_protocol::WireError),
    #[error(transparent)]
    Weights(#[from] tessera_protocol::WeightsError),
    #[error(transparent)]
    Aggregate(#[from] tessera_aggregate::AggregateError),
    #[error(transparent)]
    Trust(#[from] tessera_trust::TrustError),
    #[error("attestation: {0}")]
    Attestation(String),
}

type Result<T> = std::result::Result<T, ValidatorError>;

pub struct ValidatorConfig {
    pub hub: String,
    pub token: String,
    pub device: Device,
    /// Where the scorer's data comes from.
    pub data: DataConfig,
    /// How often to ask for a job when there is none.
    pub poll: Duration,
    /// How long to keep retrying while the hub is unreachable or failing (5xx).
    pub patience: Duration,
    /// Where a sealed run's attestation comes from (`None`: refuse sealed runs).
    pub attester: Option<crate::tee::Attester>,
}

/// A sealed run's validator state: keys made here, the ledger as verified, and every
/// contributor's data-fit record from its receipts.
struct Sealed {
    opening: OpeningKey,
    signing: tessera_trust::Identity,
    verified: Verified,
    ledger: Ledger,
    fit: HashMap<String, (f64, u64)>,
}

/// One scored round, for progress output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundScored {
    pub round: u64,
    /// A run scored in tasks: the task scored.
    pub task: Option<u32>,
    pub submissions: usize,
    pub copies: usize,
    pub best: Option<f64>,
    pub cost: ScoreCost,
}

pub struct Validator {
    config: ValidatorConfig,
    hub: HubClient,
    run: RunInfo,
    scorer: Scorer,
    sealed: Option<Sealed>,
    /// A run on published datasets: their shards (its own dataset's first, then its
    /// mixture's), each cached on disk up to `data_cache_bytes`. Empty for other runs.
    shards: Vec<ShardCache>,
    /// The spec revision of the last job (`ScoringJob::revision`).
    revision: u64,
    /// A sealed run: the evaluation seeds this validator drew and committed, by round (kept in
    /// memory only: the hub learns each from the round's verdict).
    seeds: HashMap<u64, [u8; 32]>,
}

/// Where a scorer's data comes from.
#[derive(Debug, Clone, Default)]
pub struct DataConfig {
    /// Training data for runs whose data source is external.
    pub data: Option<Dataset>,
    /// A run on a published dataset: where its shards are cached (`None`: a directory in the
    /// system's temporary directory named by the dataset) and how many bytes they may take
    /// there (the least recently used go first).
    pub cache: Option<PathBuf>,
    pub cache_bytes: u64,
}

/// The scorer a scored run's validator uses, for the run's current phase. A run on a published
/// dataset also gives its shard cache: the scorer holds the validation shards (the held-out
/// windows come from all of them), and each submission's assigned shard is fetched by hash as
/// it is scored ([`attach_assigned`]).
pub fn scorer_for(run: &RunInfo, data: &DataConfig, device: Device) -> Result<(Scorer, Vec<ShardCache>)> {
    let contest = run.spec.contest.clone().ok_or(ValidatorError::NotScored)?;
    let (dataset, shards) = match &run.spec.data.source {
        DataSource::Manifest { .. } => {
            let cache_dir = match &data.cache {
                Some(dir) => dir.clone(),
                None => {
                    let key = blake3::hash(run.spec.data.fingerprint.as_bytes()).to_hex();
                    std::env::temp_dir().join(format!("tessera-validator-{}", &key.as_str()[..16]))
                }
            };
            let caches = tessera_client::open_run_datasets(
                &run.spec.data.source,
                &run.spec.data.fingerprint,
                &cache_dir,
                data.cache_bytes,
                None,
            )?;
            // The held-out data is the run's own dataset's validation split.
            let dataset = caches.first().ok_or(ValidatorError::NotScored)?.held_out()?;
            (dataset, caches)
        }
        _ => (run_dataset(run, data.data.clone())?, Vec::new()),
    };
    let model_config = LlamaConfig::from_json(run.spec.model.clone())
        .map_err(|e| ValidatorError::Bad { round: run.round, message: format!("the run's model config: {e}") })?;
    let score = ScoreConfig {
        eval_windows: contest.eval_windows as usize,
        fit_windows: contest.fit_windows as usize,
        step: contest.score_step,
    };
    let scorer = Scorer::new(inner_config(run, 0), &model_config, dataset, device, score)?;
    Ok((scorer, shards))
}

/// A run on a published dataset: each candidate given the tokens of its data-fit windows, cut
/// from the shard its base round assigned it (`data::data_assignment`), fetched by hash and
/// checked. Each shard the round names is read once, whoever shares it, and one is in memory
/// at a time. Nothing to do for other runs (`shards` is `None`).
pub fn attach_assigned(
    scorer: &Scorer,
    shards: &[ShardCache],
    run: &RunInfo,
    candidates: &mut [Candidate],
    seed: &[u8; 32],
) -> Result<()> {
    if shards.is_empty() {
        return Ok(());
    }
    let mut by_shard: std::collections::BTreeMap<(usize, usize), Vec<usize>> = std::collections::BTreeMap::new();
    for (i, k) in candidates.iter().enumerate() {
        let d = tessera_protocol::data::data_assignment(&run.spec, k.base_round, k.contributor).ok_or_else(|| {
            ValidatorError::Bad {
                round: k.base_round,
                message: format!("no data assignment for contributor {}", k.contributor),
            }
        })?;
        let source = d.source as usize;
        let cache = shards.get(source).ok_or_else(|| ValidatorError::Bad {
            round: k.base_round,
            message: format!("contributor {} was assigned dataset {source} of a mixture this run lacks", k.contributor),
        })?;
        by_shard.entry((source, cache.train_index(d.shard)?)).or_default().push(i);
    }
    for ((source, index), sharing) in by_shard {
        let shard = shards[source].shard(index)?;
        for i in sharing {
            candidates[i].assigned = Some(scorer.assigned_tokens(&candidates[i], seed, &shard)?);
        }
    }
    Ok(())
}

impl Validator {
    pub fn connect(config: ValidatorConfig) -> Result<Validator> {
        let hub = HubClient::new(&config.hub)?.with_patience(config.patience).with_validator_token(&config.token);
        let run = hub.run()?;
        let hub = hub.pinning(tessera_trust::PublicKey::parse(&run.hub_key)?);
        let (scorer, shards) = scorer_for(&run, &config.data, config.device)?;
        let mut v = Validator { config, hub, run, scorer, sealed: None, shards, seeds: HashMap::new(), revision: 0 };
        if v.run.spec.trust.is_some() {
            v.sealed = Some(v.attest()?);
            v.commit_current_seed()?;
        }
        Ok(v)
    }

    fn attach_assigned(&self, candidates: &mut [Candidate], seed: &[u8; 32]) -> Result<()> {
        attach_assigned(&self.scorer, &self.shards, &self.run, candidates, seed)
    }

    /// The run has grown: score with its new model from now on.
    fn switch_phase(&mut self) -> Result<()> {
        let run = self.hub.run()?;
        let model_config = LlamaConfig::from_json(run.spec.model.clone())
            .map_err(|e| ValidatorError::Bad { round: run.round, message: format!("the run's model config: {e}") })?;
        self.scorer = self.scorer.with_model(&model_config)?;
        tracing::info!(phase = run.phase, params = run.spec.num_params(), "the run grew: scoring with its new model");
        self.run = run;
        Ok(())
    }

    /// The validator's attestation, if the run is sealed (with what verifying it established).
    pub fn attestation(&self) -> Option<&Verified> {
        self.sealed.as_ref().map(|s| &s.verified)
    }

    /// A sealed run: the seed this validator drew for the job's round, checked against the
    /// commitment the round took submissions under.
    fn own_seed(&self, job: &ScoringJob) -> std::result::Result<[u8; 32], String> {
        let seed = self.seeds.get(&job.round).ok_or_else(|| {
            format!(
                "this validator did not draw round {}'s evaluation seed (it started after the round opened)",
                job.round
            )
        })?;
        if hex::encode(tessera_contest::commit::commitment(seed)) != job.eval_commitment {
            return Err(format!("round {}'s commitment is not the one this validator made", job.round));
        }
        Ok(*seed)
    }

    /// A sealed run: draws and commits the current round's evaluation seed if nobody has yet.
    /// The seed stays in this process; the hub sees only its commitment until the verdict.
    fn commit_current_seed(&mut self) -> Result<()> {
        let info = self.hub.run()?;
        if info.finished || self.seeds.contains_key(&info.round) {
            return Ok(());
        }
        if !self.hub.eval_seed(info.round)?.commitment.is_empty() {
            return Ok(());
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| ValidatorError::Attestation(format!("no randomness for the evaluation seed: {e}")))?;
        let commitment = hex::encode(tessera_contest::commit::commitment(&seed));
        let c = tessera_protocol::api::SeedCommitment { round: info.round, commitment: commitment.clone() };
        match self.hub.post_commitment(&c) {
            Ok(()) => {
                tracing::info!(round = info.round, %commitment, "committed the round's evaluation seed");
                self.seeds.insert(info.round, seed);
                self.seeds.retain(|&r, _| r + 2 >= info.round);
                Ok(())
            }
            // The round moved on, or another commitment landed first: nothing to do now.
            Err(ClientError::Refused { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the keys, gets them attested and registers them with the hub.
    fn attest(&self) -> Result<Sealed> {
        let policy = self.run.spec.trust.clone().unwrap_or_default();
        let attester = self.config.attester.as_ref().ok_or_else(|| {
            ValidatorError::Attestation(
                "this run seals submissions to an attested validator: run inside a SEV-SNP or TDX guest \
                 (or, for development only, pass --insecure-dev-tee)"
                    .into(),
            )
        })?;
        let opening = OpeningKey::generate()?;
        let signing = tessera_trust::Identity::generate()?;
        let data = tessera_trust::report_data(&opening.public().0, &signing.public().0);
        let evidence = attester.evidence(&data).map_err(ValidatorError::Attestation)?;
        let attestation = ValidatorAttestation {
            sealing_key: hex::encode(opening.public().0),
            signing_key: signing.public().hex(),
            evidence,
        };
        let verified = attestation.verify(&policy, unix_secs())?;
        if verified.insecure {
            tracing::warn!("INSECURE development attestation: no TEE protects this validator's keys");
        }
        let mut ledger = Ledger::default();
        for attempt in 0.. {
            self.sync_ledger(&mut ledger)?;
            let mut next = ledger.clone();
            let body = LedgerBody::Validator { attestation: attestation.clone() };
            let entry = next
                .append(self.run.round, now_ms(), verified.insecure, body, &signing)
                .map_err(tessera_trust::TrustError::from)?;
            match self.hub.post_attestation(&attestation, &hex::encode(entry)) {
                Ok(_) => {
                    ledger = next;
                    break;
                }
                // Another entry landed first: chain onto it and try again.
                Err(ClientError::Refused { .. }) if attempt < 3 => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut fit: HashMap<String, (f64, u64)> = HashMap::new();
        for e in ledger.entries() {
            if let LedgerBody::Receipt { contributor, data_fit: Some(f), .. } = e.body
                && f.is_finite()
            {
                let r = fit.entry(contributor).or_default();
                *r = (r.0 + f, r.1 + 1);
            }
        }
        tracing::info!(key = %signing.public(), attestation = %verified, "registered with the hub");
        Ok(Sealed { opening, signing, verified, ledger, fit })
    }

    /// Brings a ledger mirror up to the hub's, verifying every new entry.
    fn sync_ledger(&self, ledger: &mut Ledger) -> Result<()> {
        let bytes = self.hub.ledger(ledger.len())?;
        ledger
            .extend(&bytes)
            .map_err(|e| ValidatorError::Bad { round: self.run.round, message: format!("the hub's ledger: {e}") })
    }

    /// Scores rounds until the run finishes (or `max_rounds` are scored).
    pub fn run(&mut self, max_rounds: Option<u64>, mut on_round: impl FnMut(&RoundScored)) -> Result<u64> {
        let mut done = 0;
        while max_rounds.is_none_or(|m| done < m) {
            match self.hub.job()? {
                Some(job) => {
                    let started = std::time::Instant::now();
                    let scored = match self.score(&job) {
                        Ok(scored) => scored,
                        // The round moved on while it was being scored (aggregated unscored
                        // past its score timeout, say while this validator was down): its
                        // scores are of no use now, and the next round's are.
                        // So did a task that others settled meanwhile.
                        Err(ValidatorError::Hub(e))
                            if matches!(
                                e.code(),
                                Some(tessera_protocol::ErrorCode::NotScoring | tessera_protocol::ErrorCode::Duplicate)
                            ) =>
                        {
                            tracing::warn!(round = job.round, error = %e, "the round moved on before its scores arrived");
                            metrics::counter!("tessera_validator_rounds_missed_total").increment(1);
                            continue;
                        }
                        // Its own failure: the round should not wait out its score timeout for
                        // scores that will not come (nobody in it is rated or penalised).
                        Err(e) => {
                            if let Err(told) = self.hub.post_failure(job.round, &e.to_string()) {
                                tracing::warn!(round = job.round, error = %told, "could not report the failure");
                            }
                            return Err(e);
                        }
                    };
                    metrics::histogram!("tessera_validator_round_seconds").record(started.elapsed().as_secs_f64());
                    metrics::counter!("tessera_validator_rounds_scored_total").increment(1);
                    metrics::counter!("tessera_validator_submissions_scored_total")
                        .increment(scored.submissions as u64);
                    metrics::counter!("tessera_validator_copies_total").increment(scored.copies as u64);
                    metrics::gauge!("tessera_validator_round").set((scored.round + 1) as f64);
                    on_round(&scored);
                    done += 1;
                }
                None => {
                    if self.sealed.is_some() {
                        self.commit_current_seed()?;
                    }
                    let info: RunInfo = self.hub.run()?;
                    if info.finished {
                        break;
                    }
                    std::thread::sleep(self.config.poll);
                }
            }
        }
        Ok(done)
    }

    /// Scores one job and reports it.
    pub fn score(&mut self, job: &ScoringJob) -> Result<RoundScored> {
        let round = job.round;
        if job.phase != self.run.phase {
            self.switch_phase()?;
        } else if job.revision != self.revision {
            // Its holders changed the spec (H, the data mixture…): assignments follow the new one.
            let run = self.hub.run()?;
            tracing::info!(revision = job.revision, "the run's spec changed by vote");
            self.run = run;
        }
        self.revision = job.revision;
        let bad = |message: String| ValidatorError::Bad { round, message };
        let seed = if self.sealed.is_some() {
            self.own_seed(job).map_err(bad)?
        } else {
            crate::revealed_seed(job).map_err(bad)?
        };
        // Checked against its name (its BLAKE3) and the hub's signature.
        let weights = self.hub.checkpoint(&job.base_checkpoint, None)?;
        let theta = decode_weights(&weights, &self.run.spec.tensors)?;
        let lengths: Vec<usize> = self.run.spec.tensors.iter().map(|t| t.numel() as usize).collect();
        if self.sealed.is_some() {
            return self.settle_sealed(job, &theta, &lengths, &seed);
        }
        let mut candidates = Vec::with_capacity(job.submissions.len());
        for s in &job.submissions {
            let bytes = self.hub.submission(&s.blob)?;
            candidates.push(Candidate::from_job(s, &bytes, &lengths)?);
        }
        self.attach_assigned(&mut candidates, &seed)?;
        let crate::RoundScores { scored: scores, held_out_loss, cost, samples } =
            self.scorer.score(&theta, &candidates, &seed)?;
        let mut report = crate::report(round, &scores, Some(held_out_loss));
        if let Some(task) = &job.task {
            report.task = Some(task.id);
            report.samples = samples.iter().map(|s| tessera_contest::tasks::sample_hex(s)).collect();
        }
        let started = Instant::now();
        self.hub.post_scores(&report)?;
        tracing::debug!(round, post_s = started.elapsed().as_secs_f64(), "scores reported");
        Ok(RoundScored {
            round,
            task: job.task.as_ref().map(|t| t.id),
            submissions: scores.len(),
            copies: scores.iter().filter(|s| s.copy_of.is_some()).count(),
            best: scores.iter().map(|s| s.score).reduce(f64::max),
            cost,
        })
    }
}

impl Validator {
    /// A sealed round: open, score, settle, aggregate, sign, report.
    fn settle_sealed(
        &mut self,
        job: &ScoringJob,
        theta: &[Vec<f32>],
        lengths: &[usize],
        seed: &[u8; 32],
    ) -> Result<RoundScored> {
        // Long on purpose: a sealed round's steps in order (open, score, settle, aggregate,
        // sign, report), each needing what the one before produced.
        let round = job.round;
        let contest = self.run.spec.contest.clone().ok_or(ValidatorError::NotScored)?;
        // Open every envelope; one that does not open or decode is refused with its reason.
        let (mut candidates, mut index) = (Vec::new(), Vec::new());
        let mut malformed: Vec<Option<String>> = vec![None; job.submissions.len()];
        for (i, s) in job.submissions.iter().enumerate() {
            let bytes = self.hub.submission(&s.blob)?;
            match self.open(s, &bytes, lengths) {
                Ok(c) => {
                    candidates.push(c);
                    index.push(i);
                }
                Err(reason) => {
                    tracing::warn!(round, contributor = s.contributor, reason, "sealed submission refused");
                    malformed[i] = Some(reason);
                }
            }
        }
        self.attach_assigned(&mut candidates, seed)?;
        let (scores, held_out_loss, cost) = if candidates.is_empty() {
            (Vec::new(), None, ScoreCost::default())
        } else {
            let r = self.scorer.score(theta, &candidates, seed)?;
            (r.scored, Some(r.held_out_loss), r.cost)
        };
        let mut all: Vec<Scored> = job
            .submissions
            .iter()
            .map(|s| Scored {
                contributor: s.contributor,
                score: 0.0,
                data_fit: None,
                copy_of: None,
                weight: s.weight,
                fit_factor: 1.0,
                score_se: None,
                norm_bound: None,
            })
            .collect();
        for (k, sc) in scores.into_iter().enumerate() {
            all[index[k]] = Scored { copy_of: sc.copy_of.map(|j| index[j]), ..sc };
        }
        let sealed = self.sealed.as_mut().ok_or(ValidatorError::NotScored)?;
        let history: Vec<(f64, u64)> =
            job.submissions.iter().map(|s| sealed.fit.get(&s.contributor_key).copied().unwrap_or_default()).collect();
        let policy = Policy { reward_power: contest.reward_power, top: contest.top.map(|t| t as usize) };
        let Settlement { scored, judged, rewards } = settle(all, &history, &[], &policy, contest.reward_units);
        let flags: Vec<Option<String>> = judged
            .iter()
            .zip(&malformed)
            .map(|(j, m)| {
                m.as_ref().map(|r| format!("malformed: {r}")).or_else(|| j.flag.map(|f| f.as_str().to_owned()))
            })
            .collect();

        // The aggregate: the run's rule over the opened submissions, with the settled weights.
        let mut views = Vec::new();
        let mut weights = Vec::new();
        for (k, c) in candidates.iter().enumerate() {
            let w = judged[index[k]].weight;
            if w > 0.0 {
                views.push(c.delta.iter().map(Vec::as_slice).collect::<Vec<&[f32]>>());
                weights.push(w as f32);
            }
        }
        let mean = if views.is_empty() {
            lengths.iter().map(|&n| vec![0.0; n]).collect()
        } else {
            tessera_aggregate::robust::aggregate(&self.run.spec.aggregation, &views, &weights)?.0
        };
        let message = aggregate_message(&self.run, job, &mean)?;
        self.hub.post_aggregate(round, message)?;

        // The ledger: one receipt per submission, the round's emission, a signed root.
        let sealed = self.sealed.as_mut().ok_or(ValidatorError::NotScored)?;
        let mut mirror = std::mem::take(&mut sealed.ledger);
        let synced = self.sync_ledger(&mut mirror);
        let sealed = self.sealed.as_mut().ok_or(ValidatorError::NotScored)?;
        sealed.ledger = mirror;
        synced?;
        let mut next = sealed.ledger.clone();
        let from = next.len();
        let (now, insecure) = (now_ms(), sealed.verified.insecure);
        let append = |next: &mut Ledger, body: LedgerBody, signing: &tessera_trust::Identity| {
            next.append(round, now, insecure, body, signing).map_err(tessera_trust::TrustError::from)
        };
        for (i, s) in job.submissions.iter().enumerate() {
            let body = LedgerBody::Receipt {
                contributor: s.contributor_key.clone(),
                submission: s.blob.clone(),
                score: scored[i].score,
                data_fit: scored[i].data_fit,
                flag: flags[i].clone().unwrap_or_default(),
                units: rewards[i],
            };
            append(&mut next, body, &sealed.signing)?;
        }
        append(&mut next, LedgerBody::Emission { units: rewards.iter().sum() }, &sealed.signing)?;
        let root = LedgerBody::Root { size: next.len(), root: next.root() };
        append(&mut next, root, &sealed.signing)?;
        let verdict = Verdict {
            report: crate::report(round, &scored, held_out_loss),
            settled: judged
                .iter()
                .zip(&rewards)
                .zip(&flags)
                .map(|((j, &reward), flag)| Settled {
                    weight: j.weight,
                    reward,
                    effective: j.effective,
                    flag: flag.clone(),
                })
                .collect(),
            ledger_from: from,
            ledger: hex::encode(next.bytes_from(from)),
            eval_seed: Some(hex::encode(seed)),
        };
        self.hub.post_verdict(&verdict)?;
        let sealed = self.sealed.as_mut().ok_or(ValidatorError::NotScored)?;
        sealed.ledger = next;
        for (s, sc) in job.submissions.iter().zip(&scored) {
            if let Some(f) = sc.data_fit.filter(|f| f.is_finite()) {
                let r = sealed.fit.entry(s.contributor_key.clone()).or_default();
                *r = (r.0 + f, r.1 + 1);
            }
        }
        Ok(RoundScored {
            round,
            task: None,
            submissions: scored.len(),
            copies: scored.iter().filter(|s| s.copy_of.is_some()).count(),
            best: scored.iter().map(|s| s.score).reduce(f64::max),
            cost,
        })
    }

    /// Opens one sealed submission and checks it says what its clear header and the job say.
    fn open(&self, s: &JobSubmission, envelope: &[u8], lengths: &[usize]) -> std::result::Result<Candidate, String> {
        let sealed = self.sealed.as_ref().ok_or("not a sealed run")?;
        let (header, plain) = sealed.opening.open(envelope).map_err(|e| e.to_string())?;
        if hex::encode(header.run_id) != self.run.run_id
            || header.base_round != s.base_round
            || header.contributor.hex() != s.contributor_key
        {
            return Err("the envelope's header does not match the submission the hub recorded".into());
        }
        let view = MessageView::parse(&plain).map_err(|e| e.to_string())?;
        if view.run_id != header.run_id
            || view.round != header.base_round
            || view.base_checkpoint != header.base_checkpoint
        {
            return Err("the sealed message contradicts its envelope's header".into());
        }
        if view.codec != self.run.spec.codec {
            return Err(format!("codec {} where the run uses {}", view.codec, self.run.spec.codec));
        }
        let table_ok = view.tensors.len() == self.run.spec.tensors.len()
            && view.tensors.iter().zip(&self.run.spec.tensors).all(|(t, s)| t.name == s.name && t.shape == s.shape);
        if !table_ok {
            return Err("its tensors are not the model's".into());
        }
        Candidate::from_job(s, &plain, lengths).map_err(|e| e.to_string())
    }
}

/// A round's aggregate Δ̄ as an f32 message on the round's base.
fn aggregate_message(run: &RunInfo, job: &ScoringJob, mean: &[Vec<f32>]) -> Result<Vec<u8>> {
    let bad = |message: String| ValidatorError::Bad { round: job.round, message };
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&run.run_id, &mut run_id).map_err(|e| bad(format!("run id: {e}")))?;
    let mut base = [0u8; 32];
    hex::decode_to_slice(&job.base_checkpoint, &mut base).map_err(|e| bad(format!("base: {e}")))?;
    let mut tensors = Vec::with_capacity(mean.len());
    for (t, values) in run.spec.tensors.iter().zip(mean) {
        let encoded = Codec::F32.encode(values).map_err(|e| bad(e.to_string()))?;
        tensors.push(TensorEntry { name: t.name.clone(), shape: t.shape.clone(), encoded });
    }
    Ok(PseudoGradient { codec: Codec::F32, run_id, round: job.round, base_checkpoint: base, tensors }.to_bytes())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn unix_secs() -> u64 {
    (now_ms() / 1000) as u64
}
