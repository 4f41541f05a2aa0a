//! `tessera-client`: the one typed client of a hub's HTTP API (`docs/protocol.md`), used by
//! the contributor, the validator, the command line and the tests. Nobody else builds hub URLs,
//! request signatures or retry loops.
//!
//! - Every endpoint is a method returning its typed answer; a refusal comes back as
//!   [`ClientError::Refused`] with the hub's [`ErrorCode`].
//! - One retry policy ([`HubClient::with_patience`]): transport failures, 5xx (`busy` and
//!   `no_validator` are 503) and 429 are retried with exponential backoff (0.2 s doubling to
//!   5 s) until the patience is spent; any other refusal is final. A signed request is signed
//!   afresh on every attempt, so a retry never replays a nonce.
//! - Answers the hub signs (run info, assignments, announcements, the validator's attestation,
//!   checkpoints) are checked against its key: pinned at first contact, or given.
//! - [`link`] emulates a slower connection in each direction for the transfers that carry
//!   model-sized bodies.
//! - [`dataset`] fetches a published dataset's manifest and only the shards asked for, checked
//!   by hash, resumable, into a capped disk cache, with prefetching.
//!
//! Blocking (reqwest's blocking client): the contributor and the validator do their work on
//! threads; async callers move a client onto a blocking thread.

pub mod dataset;
pub mod link;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use backon::{BlockingRetryable, ExponentialBuilder};
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use tessera_protocol::api::governance::{GovernanceReceipt, ProposalMessage, Proposals, VoteMessage};
use tessera_protocol::api::{
    Assignment, ContributorHistory, DataAssignment, EpochReport, EpochSettled, EvalSeed, HubStatus, INNER_LOSS_PARAM,
    Leaderboard, Receipt, RegisterRequest, Registration, RewardExplanation, RoundAnnouncement, RoundAudit, RunInfo,
    ScoreReport, ScoringJob, UploadCommit, UploadGrant, UploadPart, UploadRequest, ValidatorInfo, Verdict,
};
use tessera_protocol::{ApiError, ErrorCode, PROTOCOL_VERSION, weights_hash};
use tessera_trust::identity::HUB_SIGNATURE_HEADER;
use tessera_trust::{Audience, Identity, PublicKey, ValidatorAttestation};

pub use dataset::{FetchStats, ShardCache, open_run_datasets};
pub use link::{Bucket, Link};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub could not be reached, or kept failing (5xx), for longer than the patience.
    #[error("hub {url}: {message}")]
    Unavailable { url: String, message: String },
    /// The hub refused the request, with its reason (and the HTTP status it came with).
    #[error("the hub refused ({status}): {error}")]
    Refused { status: u16, error: ApiError },
    /// The hub's answer is not what the protocol says (undecodable, unsigned, a wrong hash).
    #[error("hub {url}: {message}")]
    BadAnswer { url: String, message: String },
    #[error("the hub speaks protocol {0}, this client {PROTOCOL_VERSION}")]
    Protocol(u32),
    /// What this client was asked to do cannot be done as configured.
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {message}")]
    Io { path: String, message: String },
}

impl ClientError {
    /// The hub's refusal code, if it refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Reports the bytes of an upload sent so far, of its total.
pub type UploadProgress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A client of one hub. Cheap to clone (the connection pool is shared), so a second thread can
/// hold its own.
#[derive(Clone)]
pub struct HubClient {
    url: String,
    http: Client,
    patience: Duration,
    /// Signs contributor (and operator) requests.
    key: Option<Arc<Identity>>,
    /// The hub's key: answers it signs must verify under it.
    hub_key: Option<PublicKey>,
    /// Whom signed requests are for (the hub's key and run), learnt from the signed
    /// `GET /v1/run` before the first one; shared by clones.
    audience: Arc<std::sync::OnceLock<Audience>>,
    /// The validator's bearer token.
    token: Option<Arc<String>>,
    upload: Option<Link>,
    download: Option<Link>,
    progress: Option<UploadProgress>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient").field("url", &self.url).field("patience", &self.patience).finish_non_exhaustive()
    }
}

/// What a request's transient failure looked like, for the retry loop: what went wrong, and
/// the hub's refusal if it sent one (a 5xx or 429 with an error body).
enum Attempt {
    Transient(String, Option<(u16, ApiError)>),
    Final(ClientError),
}

/// How long one request (a whole checkpoint download included) may take by default.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long to keep retrying an unreachable or failing hub by default.
pub const PATIENCE: Duration = Duration::from_secs(300);
/// How long the hub may hold an assignment while the round it was asked for closes.
pub const ASSIGNMENT_WAIT: Duration = Duration::from_secs(20);

impl HubClient {
    /// A client of the hub at `url` (e.g. `http://127.0.0.1:7070`).
    pub fn new(url: &str) -> Result<HubClient> {
        HubClient::with_timeout(url, REQUEST_TIMEOUT)
    }

    /// A client whose every request must finish within `timeout`.
    pub fn with_timeout(url: &str, timeout: Duration) -> Result<HubClient> {
        let url = url.trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ClientError::Usage(format!("the hub's URL {url:?} must start with http:// or https://")));
        }
        let http = Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| ClientError::Unavailable { url: url.clone(), message: e.to_string() })?;
        Ok(HubClient {
            url,
            http,
            patience: PATIENCE,
            key: None,
            hub_key: None,
            audience: Arc::default(),
            token: None,
            upload: None,
            download: None,
            progress: None,
        })
    }

    /// Keep retrying transient failures this long (zero: try once).
    pub fn with_patience(mut self, patience: Duration) -> HubClient {
        self.patience = patience;
        self
    }

    /// Sign requests with `key` (a contributor's identity, or the API operator's).
    pub fn signed_by(mut self, key: Arc<Identity>) -> HubClient {
        self.key = Some(key);
        self
    }

    /// Check the hub's signed answers against `hub_key`.
    pub fn pinning(mut self, hub_key: PublicKey) -> HubClient {
        self.hub_key = Some(hub_key);
        self.audience = Arc::default();
        self
    }

    /// Present this bearer token on the validator's endpoints.
    pub fn with_validator_token(mut self, token: &str) -> HubClient {
        self.token = Some(Arc::new(token.to_owned()));
        self
    }

    /// Limit uploads and downloads to these links (shared by every transfer in a direction).
    pub fn with_links(mut self, upload: Option<Link>, download: Option<Link>) -> HubClient {
        self.upload = upload;
        self.download = download;
        self
    }

    /// Report each submission's upload progress here.
    pub fn on_upload(mut self, progress: Option<UploadProgress>) -> HubClient {
        self.progress = progress;
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// The key answers are checked against, once pinned.
    pub fn hub_key(&self) -> Option<PublicKey> {
        self.hub_key
    }

    /// `GET` of `path` on this hub, unsent: for tests of what the hub does with odd requests.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.http.get(self.endpoint(path))
    }

    /// `method` of `path`, unsent and unsigned: for tests of what the hub does with odd requests.
    pub fn request(&self, method: reqwest::Method, path: &str) -> RequestBuilder {
        self.http.request(method, self.endpoint(path))
    }

    /// The signature headers of a request (method, path with its query, body) at `now_ms`: for
    /// tests that replay or alter a signed request.
    pub fn signature(&self, method: &str, path: &str, body: &[u8], now_ms: i64) -> Result<Vec<(&'static str, String)>> {
        let key = self.key.as_ref().ok_or_else(|| ClientError::Usage("this client has no key to sign with".into()))?;
        let audience = self.audience()?;
        key.sign_request(&audience, method, path, body, now_ms).map_err(|e| ClientError::Usage(format!("signing: {e}")))
    }

    /// Whom this client's signed requests are for: the hub's key and its run, from its signed
    /// `GET /v1/run` (fetched once).
    pub fn audience(&self) -> Result<Audience> {
        if let Some(a) = self.audience.get() {
            return Ok(a.clone());
        }
        let run = self.run()?;
        let hub_key = match self.hub_key {
            Some(k) => k,
            None => PublicKey::parse(&run.hub_key).map_err(|e| self.bad_answer("run", e))?,
        };
        Ok(self.audience.get_or_init(|| Audience { hub_key, run_id: run.run_id }).clone())
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// A request carrying the signature of `body`, which the caller attaches.
    fn signed_for(&self, method: reqwest::Method, path: &str, body: &[u8]) -> Result<RequestBuilder> {
        let headers = self.signature(method.as_str(), path, body, now_ms())?;
        let mut b = self.http.request(method, self.endpoint(path));
        for (k, v) in headers {
            b = b.header(k, v);
        }
        Ok(b)
    }

    fn signed(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> Result<RequestBuilder> {
        Ok(self.signed_for(method, path, &body)?.body(body))
    }

    fn authorized(&self, b: RequestBuilder) -> Result<RequestBuilder> {
        let token =
            self.token.as_ref().ok_or_else(|| ClientError::Usage("this client has no validator token".into()))?;
        Ok(b.bearer_auth(token.as_str()))
    }

    fn unavailable(&self, what: &str, message: impl std::fmt::Display) -> ClientError {
        ClientError::Unavailable { url: self.url.clone(), message: format!("{what}: {message}") }
    }

    fn bad_answer(&self, what: &str, message: impl std::fmt::Display) -> ClientError {
        ClientError::BadAnswer { url: self.url.clone(), message: format!("{what}: {message}") }
    }

    /// Sends what `build` makes (again on each attempt) under the retry policy; returns the
    /// first answer that is not a transient failure.
    fn send(&self, what: &str, build: impl Fn() -> Result<RequestBuilder>) -> Result<Response> {
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .with_total_delay(Some(self.patience));
        let attempt = || -> std::result::Result<Response, Attempt> {
            let request = build().map_err(Attempt::Final)?;
            match request.send() {
                Ok(r) if r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let status = r.status();
                    let body = r.bytes().unwrap_or_default();
                    let refusal = serde_json::from_slice::<ApiError>(&body).ok().map(|e| (status.as_u16(), e));
                    let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                    Err(Attempt::Transient(format!("{status} {text}"), refusal))
                }
                Ok(r) => Ok(r),
                Err(e) => Err(Attempt::Transient(e.to_string(), None)),
            }
        };
        let started = std::time::Instant::now();
        attempt
            .retry(policy)
            .sleep(std::thread::sleep)
            .when(|e| matches!(e, Attempt::Transient(..)))
            .notify(|e, delay| {
                if let Attempt::Transient(failure, _) = e {
                    tracing::warn!(what, failure, retry_in = ?delay, "hub unavailable; retrying");
                }
            })
            .call()
            .map_err(|e| match e {
                Attempt::Final(e) => e,
                // The hub answered, but not yet: its own reason is the most useful error.
                Attempt::Transient(_, Some((status, error))) => ClientError::Refused { status, error },
                Attempt::Transient(failure, None) => {
                    self.unavailable(what, format!("{failure} (gave up after {:.0?})", started.elapsed()))
                }
            })
    }

    /// A success body's bytes (read through the download link), or the refusal.
    fn body(&self, what: &str, r: Response) -> Result<Vec<u8>> {
        let status = r.status();
        let bytes = link::read_all(r, self.download.as_ref()).map_err(|e| self.unavailable(what, e))?;
        if status.is_success() { Ok(bytes) } else { Err(self.refusal(what, status, &bytes)) }
    }

    fn json<T: DeserializeOwned>(&self, what: &str, r: Response) -> Result<T> {
        let bytes = self.body(what, r)?;
        serde_json::from_slice(&bytes).map_err(|e| self.bad_answer(what, format!("unexpected answer: {e}")))
    }

    /// A success answer with no body worth reading, or the refusal.
    fn done(&self, what: &str, r: Response) -> Result<()> {
        self.body(what, r).map(|_| ())
    }

    fn refusal(&self, what: &str, status: StatusCode, body: &[u8]) -> ClientError {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(error) => ClientError::Refused { status: status.as_u16(), error },
            Err(_) => {
                self.bad_answer(what, format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
            }
        }
    }

    /// A body the hub signed, checked against its key (`key`, else the pinned one).
    fn check_signed(&self, what: &str, r: Response, key: Option<PublicKey>) -> Result<Vec<u8>> {
        let signature = r.headers().get(HUB_SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = self.body(what, r)?;
        let key =
            key.or(self.hub_key).ok_or_else(|| ClientError::Usage(format!("{what}: no hub key to check against")))?;
        let signature = signature.ok_or_else(|| self.bad_answer(what, "the answer is not signed"))?;
        key.verify_hex(&tessera_trust::identity::publication_message(&body), &signature)
            .map_err(|_| self.bad_answer(what, "the hub's signature on its answer does not verify"))?;
        Ok(body)
    }

    fn signed_json<T: DeserializeOwned>(&self, what: &str, r: Response) -> Result<T> {
        let body = self.check_signed(what, r, None)?;
        serde_json::from_slice(&body).map_err(|e| self.bad_answer(what, format!("unexpected answer: {e}")))
    }

    // ---- The run -----------------------------------------------------------------------

    /// The hub's run: its signature checked (against the pinned key, or on first contact the
    /// key it names), its protocol, and its spec held to what a hub must check before serving.
    pub fn run(&self) -> Result<RunInfo> {
        let r = self.send("run", || Ok(self.get("/v1/run")))?;
        let signature = r.headers().get(HUB_SIGNATURE_HEADER).cloned();
        let body = self.body("run", r)?;
        let run: RunInfo = serde_json::from_slice(&body).map_err(|e| self.bad_answer("run", e))?;
        if run.protocol != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(run.protocol));
        }
        let key = match self.hub_key {
            Some(k) => k,
            None => PublicKey::parse(&run.hub_key).map_err(|e| self.bad_answer("run", e))?,
        };
        let signature = signature.and_then(|v| v.to_str().ok().map(str::to_owned));
        let signature = signature.ok_or_else(|| self.bad_answer("run", "the answer is not signed"))?;
        key.verify_hex(&tessera_trust::identity::publication_message(&body), &signature)
            .map_err(|_| self.bad_answer("run", "the hub's signature on its answer does not verify"))?;
        run.spec.validate().map_err(|e| self.bad_answer("run", format!("the run's spec: {e}")))?;
        Ok(run)
    }

    pub fn status(&self) -> Result<HubStatus> {
        let r = self.send("status", || Ok(self.get("/v1/status")))?;
        self.json("status", r)
    }

    pub fn leaderboard(&self) -> Result<Leaderboard> {
        let r = self.send("leaderboard", || Ok(self.get("/v1/leaderboard")))?;
        self.json("leaderboard", r)
    }

    /// The leaderboard exactly as the hub sent it (for `--json` output).
    pub fn leaderboard_text(&self) -> Result<String> {
        let r = self.send("leaderboard", || Ok(self.get("/v1/leaderboard")))?;
        let body = self.body("leaderboard", r)?;
        String::from_utf8(body).map_err(|e| self.bad_answer("leaderboard", e))
    }

    /// Round `round` as announced (signed): its base, seed commitment and result.
    pub fn announcement(&self, round: u64) -> Result<RoundAnnouncement> {
        let r = self.send("round", || Ok(self.get(&format!("/v1/rounds/{round}"))))?;
        self.signed_json("round", r)
    }

    /// Round `round`'s seed commitment, and the seed once its submissions closed.
    pub fn eval_seed(&self, round: u64) -> Result<EvalSeed> {
        let r = self.send("eval seed", || Ok(self.get(&format!("/v1/rounds/{round}/eval-seed"))))?;
        self.json("eval seed", r)
    }

    pub fn contributor_history(&self, id: u64) -> Result<ContributorHistory> {
        let r = self.send("history", || Ok(self.get(&format!("/v1/contributors/{id}/history"))))?;
        self.json("history", r)
    }

    /// What published round `round`'s scores can be recomputed from, and what it published
    /// (signed by the hub).
    pub fn round_audit(&self, round: u64) -> Result<RoundAudit> {
        let r = self.send("audit", || Ok(self.get(&format!("/v1/rounds/{round}/audit"))))?;
        self.signed_json("audit", r)
    }

    /// A published round's submission, in a run that publishes them: a message whose trailing
    /// BLAKE3 is its name (parsing the message checks that hash against its bytes).
    pub fn published_submission(&self, round: u64, blob: &str) -> Result<Vec<u8>> {
        self.round_submission(round, blob, false)
    }

    /// This client's own submission `blob` of published round `round`, in any run (a request
    /// signed with its key).
    pub fn own_submission(&self, round: u64, blob: &str) -> Result<Vec<u8>> {
        self.round_submission(round, blob, true)
    }

    fn round_submission(&self, round: u64, blob: &str, signed: bool) -> Result<Vec<u8>> {
        let path = format!("/v1/rounds/{round}/submissions/{blob}");
        let r = self.send("submission", || {
            if signed { self.signed(reqwest::Method::GET, &path, Vec::new()) } else { Ok(self.get(&path)) }
        })?;
        let bytes = self.body("submission", r)?;
        if bytes.len() < 32 || hex::encode(&bytes[bytes.len() - 32..]) != blob {
            return Err(self.bad_answer("submission", format!("the message served as {blob} is named otherwise")));
        }
        Ok(bytes)
    }

    /// How contributor `id`'s latest `last` scored submissions became reward units.
    pub fn rewards(&self, id: u64, last: usize) -> Result<Vec<RewardExplanation>> {
        let path = format!("/v1/contributors/{id}/rewards?last={last}");
        let r = self.send("rewards", || Ok(self.get(&path)))?;
        self.json("rewards", r)
    }

    /// The economy the ledger records (`GET /v1/economy`), as the hub renders it.
    pub fn economy(&self) -> Result<serde_json::Value> {
        let r = self.send("economy", || Ok(self.get("/v1/economy")))?;
        self.json("economy", r)
    }

    /// The hub's Prometheus metrics, as text.
    pub fn metrics(&self) -> Result<String> {
        let r = self.send("metrics", || Ok(self.get("/metrics")))?;
        String::from_utf8(self.body("metrics", r)?).map_err(|e| self.bad_answer("metrics", e))
    }

    // ---- Weights -----------------------------------------------------------------------

    /// A checkpoint's bytes, checked against its name (its BLAKE3) and the hub's signature
    /// when a key is pinned. With `partial`, a download cut short resumes from that file with
    /// a range request (the file is kept while incomplete and removed once done).
    pub fn checkpoint(&self, hash: &str, partial: Option<&Path>) -> Result<Vec<u8>> {
        let path = format!("/v1/checkpoints/{hash}");
        let mut have = partial.and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
        let r = self.send("checkpoint", || {
            let b = self.get(&path);
            Ok(if have.is_empty() { b } else { b.header(reqwest::header::RANGE, format!("bytes={}-", have.len())) })
        })?;
        let status = r.status();
        let signature = r.headers().get(HUB_SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = link::read_all(r, self.download.as_ref()).map_err(|e| self.unavailable("checkpoint", e))?;
        match status {
            StatusCode::OK => have = body,
            StatusCode::PARTIAL_CONTENT => have.extend_from_slice(&body),
            // The partial file is longer than the object, or otherwise wrong: start over.
            StatusCode::RANGE_NOT_SATISFIABLE if !have.is_empty() => {
                if let Some(p) = partial {
                    let _ = std::fs::remove_file(p);
                }
                return self.checkpoint(hash, partial);
            }
            _ => return Err(self.refusal("checkpoint", status, &body)),
        }
        if hex::encode(weights_hash(&have)) != hash {
            if let Some(p) = partial {
                let _ = std::fs::remove_file(p);
            }
            return Err(self.bad_answer("checkpoint", format!("checkpoint {hash} arrived with a different hash")));
        }
        if let Some(p) = partial {
            let _ = std::fs::remove_file(p);
        }
        if let (Some(key), Some(sig)) = (self.hub_key, signature) {
            key.verify_hex(&tessera_trust::identity::publication_message_for(hash), &sig)
                .map_err(|_| self.bad_answer("checkpoint", "the hub's signature on the checkpoint does not verify"))?;
        }
        Ok(have)
    }

    /// Bytes `range` of a checkpoint (for tests of range requests): the status and the body.
    pub fn checkpoint_range(&self, hash: &str, range: &str) -> Result<(StatusCode, Vec<u8>)> {
        let r = self.send("checkpoint", || {
            Ok(self.get(&format!("/v1/checkpoints/{hash}")).header(reqwest::header::RANGE, range))
        })?;
        let status = r.status();
        let body = r.bytes().map_err(|e| self.unavailable("checkpoint", e))?;
        Ok((status, body.to_vec()))
    }

    /// The update the hub published into `round` (a pseudo-gradient message in the broadcast
    /// codec whose base is round − 1's checkpoint).
    pub fn update(&self, round: u64) -> Result<Vec<u8>> {
        let r = self.send("update", || Ok(self.get(&format!("/v1/updates/{round}"))))?;
        self.body("update", r)
    }

    // ---- Contributors ------------------------------------------------------------------

    /// Registers this client's key under `name` (the same key gets the same id again).
    pub fn register(&self, name: &str) -> Result<Registration> {
        let body = serde_json::to_vec(&RegisterRequest { name: name.to_owned() })
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let r = self.send("register", || self.signed(reqwest::Method::POST, "/v1/contributors", body.clone()))?;
        self.json("register", r)
    }

    /// This contributor's assignment (signed by the hub). If it already submitted for the
    /// current round, the hub holds the answer up to `wait` for the round to close.
    pub fn assignment(&self, wait: Duration) -> Result<Assignment> {
        let path = format!("/v1/assignments?wait_ms={}", wait.as_millis());
        let r = self.send("assignment", || self.signed(reqwest::Method::POST, &path, Vec::new()))?;
        self.signed_json("assignment", r)
    }

    /// Sends a submission (a pseudo-gradient message, or a sealed envelope) with the mean
    /// loss of its inner steps and, in a manifest run, the data it was trained on (its
    /// assignment's `data`), both of which the signature covers. Uploads through the upload
    /// link, reporting progress: straight into the run's bucket on the URLs the hub presigns
    /// (`POST /v1/uploads`, the PUTs, then the commit), or to the hub itself where its store
    /// signs no URLs.
    pub fn submit(&self, body: Arc<Vec<u8>>, inner_loss: Option<f64>, data: Option<DataAssignment>) -> Result<Receipt> {
        let mut query: Vec<String> = Vec::new();
        if let Some(l) = inner_loss.filter(|l| l.is_finite()) {
            query.push(format!("{INNER_LOSS_PARAM}={l}"));
        }
        if let Some(d) = data {
            query.push(d.query());
        }
        let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        let blob = blob_name(&body);
        let grant = self.upload_grant(&blob, &body)?;
        if grant.parts.is_empty() {
            return self.post_submission(&format!("/v1/submissions{query}"), body);
        }
        let mut etags = Vec::with_capacity(grant.parts.len());
        for part in &grant.parts {
            etags.push(self.put_part(part, &body)?);
        }
        let commit = UploadCommit { upload_id: grant.upload_id.clone(), etags };
        let commit = serde_json::to_vec(&commit).map_err(|e| ClientError::Usage(e.to_string()))?;
        let path = format!("/v1/uploads/{blob}{query}");
        let r = self.send("submit", || self.signed(reqwest::Method::POST, &path, commit.clone()))?;
        self.json("submit", r)
    }

    /// Where to upload a submission named `blob`: presigned parts, or none (post it to the
    /// hub, as a hub that predates direct uploads also answers).
    fn upload_grant(&self, blob: &str, body: &[u8]) -> Result<UploadGrant> {
        use sha2::Digest as _;
        let request = UploadRequest {
            blob: blob.to_owned(),
            bytes: body.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(body)),
        };
        let request = serde_json::to_vec(&request).map_err(|e| ClientError::Usage(e.to_string()))?;
        let r = self.send("upload", || self.signed(reqwest::Method::POST, "/v1/uploads", request.clone()))?;
        match self.json::<UploadGrant>("upload", r) {
            Err(ClientError::Refused { error, .. }) if error.code == ErrorCode::NotFound => {
                Ok(UploadGrant { upload_id: None, parts: Vec::new(), expires_ms: 0 })
            }
            other => other,
        }
    }

    /// One presigned PUT of bytes `part.offset..` of `body`, through the upload link; returns
    /// the part's ETag. Already there (`412`, a retry after a lost answer) counts as done.
    fn put_part(&self, part: &UploadPart, body: &Arc<Vec<u8>>) -> Result<String> {
        let start = usize::try_from(part.offset).map_err(|e| self.bad_answer("upload", e))?;
        let end = start.saturating_add(usize::try_from(part.bytes).map_err(|e| self.bad_answer("upload", e))?);
        if end > body.len() || start >= end {
            return Err(self.bad_answer("upload", format!("a part of bytes {start}..{end} of {}", body.len())));
        }
        let r = self.send("upload", || {
            let counted = link::Counted::range(body.clone(), start..end, self.progress.clone(), self.upload.clone());
            let mut b = self.http.put(&part.url).body(reqwest::blocking::Body::sized(counted, (end - start) as u64));
            for (k, v) in &part.headers {
                b = b.header(k, v);
            }
            Ok(b)
        })?;
        let status = r.status();
        let etag = r.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let text = r.text().unwrap_or_default();
        if status.is_success() || status == StatusCode::PRECONDITION_FAILED {
            return Ok(etag);
        }
        Err(self.bad_answer("upload", format!("the bucket answered {status}: {}", &text[..text.len().min(300)])))
    }

    /// The submission's bytes posted to the hub itself.
    fn post_submission(&self, path: &str, body: Arc<Vec<u8>>) -> Result<Receipt> {
        let r = self.send("submit", || {
            let request = self.signed_for(reqwest::Method::POST, path, &body)?;
            if self.progress.is_none() && self.upload.is_none() {
                return Ok(request.body(body.to_vec()));
            }
            // The same bytes, read through a counter and the link (the signature covers them),
            // without a copy of the submission.
            let counted = link::Counted::new(body.clone(), self.progress.clone(), self.upload.clone());
            Ok(request.body(reqwest::blocking::Body::sized(counted, body.len() as u64)))
        })?;
        self.json("submit", r)
    }

    /// The operator closes an epoch of served usage into the run's ledger.
    pub fn close_epoch(&self, report: &EpochReport) -> Result<EpochSettled> {
        let body = serde_json::to_vec(report).map_err(|e| ClientError::Usage(e.to_string()))?;
        let r = self.send("close epoch", || self.signed(reqwest::Method::POST, "/v1/economy/epochs", body.clone()))?;
        self.json("close epoch", r)
    }

    // ---- Governance --------------------------------------------------------------------

    /// Proposes a change to a steered run as the holder whose key signs this client's requests
    /// (the message is signed by that key too, which is what the ledger records).
    pub fn propose(&self, message: &ProposalMessage) -> Result<GovernanceReceipt> {
        self.governance("propose", "/v1/governance/proposals", message)
    }

    /// Votes on a proposal as the holder whose key signs this client's requests.
    pub fn vote(&self, message: &VoteMessage) -> Result<GovernanceReceipt> {
        self.governance("vote", "/v1/governance/votes", message)
    }

    fn governance<T: serde::Serialize>(&self, what: &str, path: &str, message: &T) -> Result<GovernanceReceipt> {
        let key = self.key.as_ref().ok_or_else(|| ClientError::Usage(format!("{what}: no key to sign with")))?;
        let bytes = serde_json::to_vec(message).map_err(|e| ClientError::Usage(e.to_string()))?;
        let signed = tessera_trust::ledger::sign_governance(key, &bytes);
        let body = serde_json::to_vec(&signed).map_err(|e| ClientError::Usage(e.to_string()))?;
        let r = self.send(what, || self.signed(reqwest::Method::POST, path, body.clone()))?;
        self.json(what, r)
    }

    /// The run's governance rules and every proposal with its tally as it stands.
    pub fn proposals(&self) -> Result<Proposals> {
        let r = self.send("proposals", || Ok(self.get("/v1/governance/proposals")))?;
        self.json("proposals", r)
    }

    // ---- The ledger --------------------------------------------------------------------

    /// The ledger's entries from entry `from` on, back to back.
    pub fn ledger(&self, from: u64) -> Result<Vec<u8>> {
        let r = self.send("ledger", || Ok(self.get(&format!("/v1/ledger?from={from}"))))?;
        self.body("ledger", r)
    }

    /// An inclusion proof of ledger entry `seq`, as the hub renders it.
    pub fn ledger_proof(&self, seq: u64) -> Result<serde_json::Value> {
        let r = self.send("ledger proof", || Ok(self.get(&format!("/v1/ledger/proof/{seq}"))))?;
        self.json("ledger proof", r)
    }

    /// The validator submissions are sealed to (signed by the hub); `no_validator` (503) is
    /// retried with the rest of the hub's transient answers.
    pub fn validator(&self) -> Result<ValidatorInfo> {
        let r = self.send("validator", || Ok(self.get("/v1/validator")))?;
        self.signed_json("validator", r)
    }

    // ---- The validator -----------------------------------------------------------------

    /// The round waiting for scores, if any.
    pub fn job(&self) -> Result<Option<ScoringJob>> {
        let r = self.send("job", || self.authorized(self.get("/v1/validator/job")))?;
        if r.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        self.json("job", r).map(Some)
    }

    /// A stored submission's bytes.
    pub fn submission(&self, blob: &str) -> Result<Vec<u8>> {
        let path = format!("/v1/validator/submissions/{blob}");
        let r = self.send("submission", || self.authorized(self.get(&path)))?;
        self.body("submission", r)
    }

    /// Tells the hub this validator cannot score `round`: it is aggregated unscored at once.
    pub fn post_failure(&self, round: u64, reason: &str) -> Result<()> {
        let failure = tessera_protocol::api::ScoringFailure { round, reason: reason.to_owned() };
        let r = self.send("failure", || {
            self.authorized(self.request(reqwest::Method::POST, "/v1/validator/failed").json(&failure))
        })?;
        self.done("failure", r)
    }

    pub fn post_scores(&self, report: &ScoreReport) -> Result<()> {
        let r = self.send("scores", || {
            self.authorized(self.request(reqwest::Method::POST, "/v1/validator/scores").json(report))
        })?;
        self.done("scores", r)
    }

    /// Registers an attested validator with its signed `Validator` ledger entry (hex); returns
    /// the entry's position in the ledger.
    pub fn post_attestation(&self, attestation: &ValidatorAttestation, entry: &str) -> Result<u64> {
        let post = serde_json::json!({ "attestation": attestation, "entry": entry });
        let r = self.send("attestation", || {
            self.authorized(self.request(reqwest::Method::POST, "/v1/validator/attestation").json(&post))
        })?;
        let answer: serde_json::Value = self.json("attestation", r)?;
        answer["ledger_seq"].as_u64().ok_or_else(|| self.bad_answer("attestation", "no ledger_seq in the answer"))
    }

    /// A sealed round's aggregate Δ̄ (an f32 message on the round's base).
    pub fn post_aggregate(&self, round: u64, message: Vec<u8>) -> Result<()> {
        let path = format!("/v1/validator/aggregate/{round}");
        let r = self.send("aggregate", || {
            let b = self
                .request(reqwest::Method::POST, &path)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
            self.authorized(b.body(message.clone()))
        })?;
        self.done("aggregate", r)
    }

    /// A sealed run's validator commits a round's evaluation seed.
    pub fn post_commitment(&self, c: &tessera_protocol::api::SeedCommitment) -> Result<()> {
        let r = self.send("commitment", || {
            self.authorized(self.request(reqwest::Method::POST, "/v1/validator/commitment").json(c))
        })?;
        self.done("commitment", r)
    }

    pub fn post_verdict(&self, verdict: &Verdict) -> Result<()> {
        let r = self.send("verdict", || {
            self.authorized(self.request(reqwest::Method::POST, "/v1/validator/verdict").json(verdict))
        })?;
        self.done("verdict", r)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A submission's name in the run's store: a pseudo-gradient message ends with the BLAKE3 of
/// the rest (checked here by parsing it); a sealed envelope is named by the BLAKE3 of the whole.
pub fn blob_name(body: &[u8]) -> String {
    match tessera_protocol::MessageView::parse(body) {
        Ok(_) => hex::encode(&body[body.len() - 32..]),
        Err(_) => blake3::hash(body).to_hex().to_string(),
    }
}
