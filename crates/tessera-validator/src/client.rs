//! The validator against a hub over HTTP (`tessera validate`): wait for a round whose
//! submissions have closed, check the revealed evaluation seed against the commitment the round
//! was opened with, download the round's weights and submissions, score them, report.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client;
use tch::Device;
use tessera_data::Dataset;
use tessera_model::LlamaConfig;
use tessera_protocol::api::{ApiError, RunInfo, ScoringJob};
use tessera_protocol::{decode_weights, weights_hash};

use crate::{Candidate, ScoreConfig, ScoreCost, Scorer};

#[derive(Debug, thiserror::Error)]
pub enum ValidatorError {
    #[error("hub {url}: {message}")]
    Http { url: String, message: String },
    #[error("the hub refused: {0}")]
    Refused(ApiError),
    #[error("the run is not scored (started without --scored)")]
    NotScored,
    #[error("round {round}: {message}")]
    Bad { round: u64, message: String },
    #[error(transparent)]
    Train(#[from] tessera_train::TrainError),
    #[error(transparent)]
    Model(#[from] tessera_model::ModelError),
    #[error(transparent)]
    Contributor(#[from] tessera_contributor::ContributorError),
    #[error(transparent)]
    Wire(#[from] tessera_protocol::WireError),
    #[error(transparent)]
    Weights(#[from] tessera_protocol::WeightsError),
    #[error(transparent)]
    Aggregate(#[from] tessera_aggregate::AggregateError),
}

type Result<T> = std::result::Result<T, ValidatorError>;

pub struct ValidatorConfig {
    pub hub: String,
    pub token: String,
    pub device: Device,
    /// Training data for runs whose data source is external.
    pub data: Option<Dataset>,
    /// How often to ask for a job when there is none.
    pub poll: Duration,
    /// How long to keep retrying while the hub is unreachable or failing (5xx).
    pub patience: Duration,
}

/// One scored round, for progress output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundScored {
    pub round: u64,
    pub submissions: usize,
    pub copies: usize,
    pub best: Option<f64>,
    pub cost: ScoreCost,
}

pub struct Validator {
    config: ValidatorConfig,
    http: Client,
    run: RunInfo,
    scorer: Scorer,
}

impl Validator {
    pub fn connect(config: ValidatorConfig) -> Result<Validator> {
        let http = Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .map_err(|e| ValidatorError::Http { url: config.hub.clone(), message: e.to_string() })?;
        let run: RunInfo = patiently(config.patience, || get_json(&http, &format!("{}/v1/run", config.hub), None))?;
        let contest = run.spec.contest.clone().ok_or(ValidatorError::NotScored)?;
        let dataset = tessera_contributor::run_dataset(&run, config.data.clone())?;
        let model_config = LlamaConfig::from_json(run.spec.model.clone())
            .map_err(|e| ValidatorError::Bad { round: run.round, message: format!("the run's model config: {e}") })?;
        let score =
            ScoreConfig { eval_windows: contest.eval_windows as usize, fit_windows: contest.fit_windows as usize };
        let inner = tessera_contributor::inner_config(&run, 0);
        let scorer = Scorer::new(inner, &model_config, dataset, config.device, score)?;
        Ok(Validator { config, http, run, scorer })
    }

    /// Scores rounds until the run finishes (or `max_rounds` are scored).
    pub fn run(&mut self, max_rounds: Option<u64>, mut on_round: impl FnMut(&RoundScored)) -> Result<u64> {
        let mut done = 0;
        while max_rounds.is_none_or(|m| done < m) {
            match self.job()? {
                Some(job) => {
                    let scored = self.score(&job)?;
                    on_round(&scored);
                    done += 1;
                }
                None => {
                    let url = format!("{}/v1/run", self.config.hub);
                    let info: RunInfo = patiently(self.config.patience, || get_json(&self.http, &url, None))?;
                    if info.finished {
                        break;
                    }
                    std::thread::sleep(self.config.poll);
                }
            }
        }
        Ok(done)
    }

    fn job(&self) -> Result<Option<ScoringJob>> {
        let url = format!("{}/v1/validator/job", self.config.hub);
        patiently(self.config.patience, || {
            let r = self.http.get(&url).bearer_auth(&self.config.token).send().map_err(|e| http_err(&url, e))?;
            if r.status() == StatusCode::NO_CONTENT {
                return Ok(None);
            }
            parse(&url, r).map(Some)
        })
    }

    fn bytes(&self, url: &str, auth: bool) -> Result<Vec<u8>> {
        let mut req = self.http.get(url);
        if auth {
            req = req.bearer_auth(&self.config.token);
        }
        let r = req.send().map_err(|e| http_err(url, e))?;
        let status = r.status();
        let body = r.bytes().map_err(|e| http_err(url, e))?;
        if !status.is_success() {
            return Err(refusal(url, status, &body));
        }
        Ok(body.to_vec())
    }

    /// Scores one job and reports it.
    pub fn score(&mut self, job: &ScoringJob) -> Result<RoundScored> {
        let round = job.round;
        let bad = |message: String| ValidatorError::Bad { round, message };
        let seed = crate::revealed_seed(job).map_err(bad)?;
        let hub = &self.config.hub;
        let weights = self.bytes(&format!("{hub}/v1/checkpoints/{}", job.base_checkpoint), false)?;
        if hex::encode(weights_hash(&weights)) != job.base_checkpoint {
            return Err(bad("the base checkpoint arrived with a different hash".into()));
        }
        let theta = decode_weights(&weights, &self.run.spec.tensors)?;
        let lengths: Vec<usize> = self.run.spec.tensors.iter().map(|t| t.numel() as usize).collect();
        let mut candidates = Vec::with_capacity(job.submissions.len());
        for s in &job.submissions {
            let bytes = self.bytes(&format!("{hub}/v1/validator/submissions/{}", s.blob), true)?;
            candidates.push(Candidate::from_job(s, &bytes, &lengths)?);
        }
        let (scores, cost) = self.scorer.score(&theta, &candidates, &seed)?;
        let report = crate::report(round, &scores);
        let url = format!("{hub}/v1/validator/scores");
        let started = Instant::now();
        let r =
            self.http.post(&url).bearer_auth(&self.config.token).json(&report).send().map_err(|e| http_err(&url, e))?;
        let status = r.status();
        if !status.is_success() {
            let body = r.bytes().map_err(|e| http_err(&url, e))?;
            return Err(refusal(&url, status, &body));
        }
        tracing::debug!(round, post_s = started.elapsed().as_secs_f64(), "scores reported");
        Ok(RoundScored {
            round,
            submissions: scores.len(),
            copies: scores.iter().filter(|s| s.copy_of.is_some()).count(),
            best: scores.iter().map(|s| s.score).reduce(f64::max),
            cost,
        })
    }
}

/// Retries `f` while the hub is unreachable or answers 5xx, with backoff, for `patience`;
/// a refusal (4xx) is final.
fn patiently<T>(patience: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match f() {
            Err(e @ ValidatorError::Http { .. }) if started.elapsed() < patience => {
                tracing::warn!(error = %e, retry_in = ?delay, "hub unavailable; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

fn http_err(url: &str, e: impl std::fmt::Display) -> ValidatorError {
    ValidatorError::Http { url: url.to_owned(), message: e.to_string() }
}

fn refusal(url: &str, status: StatusCode, body: &[u8]) -> ValidatorError {
    match serde_json::from_slice::<ApiError>(body) {
        // The hub's own trouble is worth retrying; a refusal is not.
        Ok(e) if !status.is_server_error() => ValidatorError::Refused(e),
        _ => http_err(url, format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)]))),
    }
}

fn parse<T: serde::de::DeserializeOwned>(url: &str, r: reqwest::blocking::Response) -> Result<T> {
    let status = r.status();
    let body = r.bytes().map_err(|e| http_err(url, e))?;
    if !status.is_success() {
        return Err(refusal(url, status, &body));
    }
    serde_json::from_slice(&body).map_err(|e| http_err(url, format!("unexpected answer: {e}")))
}

fn get_json<T: serde::de::DeserializeOwned>(http: &Client, url: &str, token: Option<&str>) -> Result<T> {
    let mut req = http.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    parse(url, req.send().map_err(|e| http_err(url, e))?)
}
