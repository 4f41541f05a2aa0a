//! Talking to the hub: signed requests with the contributor's patience, submissions, and the
//! base weights (followed through published updates or downloaded as a checkpoint).
//!
//! [`Net`] holds only what a transfer needs and is cheap to clone, so that an overlapped
//! contributor can upload and download on a second thread while it trains.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use tessera_protocol::api::{Assignment, INNER_LOSS_HEADER, Receipt, RunInfo};
use tessera_protocol::{
    ApiError, ErrorCode, MessageView, PROTOCOL_VERSION, TensorSpec, decode_weights, encode_weights, weights_hash,
};
use tessera_trust::PublicKey;
use tessera_trust::identity::HUB_SIGNATURE_HEADER;

use crate::{ContributorError, Outcome, Progress, ProgressFn, Result, link, state_err, write_atomic};

/// HTTP with the contributor's patience: transport errors and 5xx are retried with backoff.
pub(crate) struct Hub<'a> {
    pub url: &'a str,
    pub patience: Duration,
}

impl Hub<'_> {
    pub fn send(&self, what: &str, build: impl Fn() -> reqwest::blocking::RequestBuilder) -> Result<Response> {
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
    pub fn body(&self, what: &str, r: Response) -> Result<Vec<u8>> {
        let status = r.status();
        let bytes = r.bytes().map_err(|e| self.http_err(what, e))?;
        if status.is_success() { Ok(bytes.to_vec()) } else { Err(self.refusal(what, status, &bytes)) }
    }

    /// Parses a success body as JSON, or a refusal as an [`ApiError`].
    pub fn json<T: serde::de::DeserializeOwned>(&self, what: &str, r: Response) -> Result<T> {
        let status = r.status();
        let bytes = r.bytes().map_err(|e| self.http_err(what, e))?;
        if status.is_success() {
            serde_json::from_slice(&bytes)
                .map_err(|e| self.http_err(what, format!("unexpected answer ({status}): {e}")))
        } else {
            Err(self.refusal(what, status, &bytes))
        }
    }

    pub fn refusal(&self, what: &str, status: StatusCode, body: &[u8]) -> ContributorError {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(e) => ContributorError::Refused(e),
            Err(_) => {
                self.http_err(what, format!("{status}: {}", String::from_utf8_lossy(&body[..body.len().min(200)])))
            }
        }
    }

    pub fn http_err(&self, what: &str, e: impl std::fmt::Display) -> ContributorError {
        ContributorError::Http { url: self.url.to_owned(), message: format!("{what}: {e}") }
    }
}

/// A submission body that reports how much of it has been read (sent), no faster than the
/// upload link allows.
struct Counted {
    bytes: Arc<Vec<u8>>,
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

#[derive(serde::Serialize, serde::Deserialize)]
struct BaseMeta {
    round: u64,
    hash: String,
}

/// The weights of one published round, verified against its hash.
pub(crate) struct Base {
    pub round: u64,
    pub hash: String,
    pub weights: Vec<Vec<f32>>,
}

/// Everything a transfer needs: the hub, the contributor's key, its links and its state
/// directory (for resumable downloads and the cached base).
#[derive(Clone)]
pub(crate) struct Net {
    pub url: String,
    pub patience: Duration,
    pub http: Client,
    pub key: Arc<tessera_trust::Identity>,
    /// The hub's key, pinned at registration: its answers must be signed by it.
    pub hub_key: PublicKey,
    pub state_dir: PathBuf,
    pub progress: Option<ProgressFn>,
    /// Emulated link limits, shared by every transfer in each direction.
    pub upload: Option<link::Link>,
    pub download: Option<link::Link>,
}

impl Net {
    pub fn hub(&self) -> Hub<'_> {
        Hub { url: &self.url, patience: self.patience }
    }

    /// A request signed with this contributor's key.
    pub fn signed(&self, method: &str, path: &str, body: Vec<u8>) -> reqwest::blocking::RequestBuilder {
        sign(&self.http, &self.key, &self.url, method, path, body)
    }

    /// The contributor's next round; if it already submitted for the current one, the hub holds
    /// the answer (up to 20 s) until that round closes.
    pub fn assignment(&self) -> Result<Assignment> {
        let path = "/v1/assignments?wait_ms=20000";
        let hub = self.hub();
        let r = hub.send("assignment", || self.signed("POST", path, Vec::new()))?;
        let signature = r.headers().get(HUB_SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = hub.body("assignment", r)?;
        check_hub_signature(&self.hub_key, &body, signature.as_deref())?;
        serde_json::from_slice(&body).map_err(|e| hub.http_err("assignment", e))
    }

    /// Contributor `id`'s row of the run's leaderboard and how many rows there are.
    pub fn standing(&self, id: u64) -> Result<Option<(tessera_protocol::api::LeaderRow, usize)>> {
        let url = format!("{}/v1/leaderboard", self.url);
        let hub = self.hub();
        let r = hub.send("leaderboard", || self.http.get(&url))?;
        let board: tessera_protocol::api::Leaderboard = hub.json("leaderboard", r)?;
        let total = board.rows.len();
        Ok(board.rows.into_iter().find(|r| r.id == id).map(|r| (r, total)))
    }

    /// Sends one submission. `busy_patience`: how long a scored run's hub may answer 503 `busy`
    /// while it waits for a round's scores (longer than patience alone might cover).
    /// `tolerant`: every refusal is an outcome, not an error (adversaries are refused by design).
    pub fn upload(
        &self,
        body: Vec<u8>,
        inner_loss: f64,
        busy_patience: Option<Duration>,
        tolerant: bool,
    ) -> Result<Outcome> {
        let mut hub = self.hub();
        if let Some(p) = busy_patience {
            hub.patience = hub.patience.max(p);
        }
        let shared = Arc::new(body);
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
            Err(ContributorError::Refused(e))
                if matches!(e.code, ErrorCode::Stale | ErrorCode::RunFinished) || tolerant =>
            {
                tracing::warn!(reason = %e.message, "submission not used");
                Ok(Outcome::NotUsed(e.message))
            }
            Err(e) => Err(e),
        }
    }

    /// The bytes of the update the hub published into `round`.
    pub fn fetch_update(&self, round: u64) -> Result<Vec<u8>> {
        let url = format!("{}/v1/updates/{round}", self.url);
        let hub = self.hub();
        let r = hub.send("update", || self.http.get(&url))?;
        let status = r.status();
        let bytes = link::read_all(r, self.download.as_ref()).map_err(|e| hub.http_err("update", e))?;
        if !status.is_success() {
            return Err(hub.refusal("update", status, &bytes));
        }
        Ok(bytes.to_vec())
    }

    /// Brings `base` to round `round`'s checkpoint `hash` and saves it in the state directory;
    /// returns it with the bytes downloaded. Follows published updates when it can, else
    /// downloads the checkpoint.
    pub fn ensure_base(
        &self,
        base: Option<Base>,
        round: u64,
        hash: &str,
        tensors: &[TensorSpec],
    ) -> Result<(Base, u64)> {
        let base = match base {
            Some(b) if b.hash == hash => return Ok((b, 0)),
            other => other,
        };
        let mut downloaded = 0;
        if let Some(mut base) = base.filter(|b| b.round < round) {
            let followed = (|| -> Result<Base> {
                for r in base.round + 1..=round {
                    let (next, n) = self.apply_update(&base, r, tensors)?;
                    downloaded += n;
                    base = next;
                }
                Ok(base)
            })();
            match followed {
                Ok(b) if b.hash == hash => {
                    self.save_base(&b, tensors)?;
                    return Ok((b, downloaded));
                }
                Ok(b) => tracing::warn!(got = %b.hash, want = hash, "updates did not reproduce the checkpoint"),
                Err(e) => tracing::warn!(error = %e, "could not follow the published updates"),
            }
        }
        let bytes = self.download_checkpoint(hash)?;
        downloaded += bytes.len() as u64;
        let weights = decode_weights(&bytes, tensors)?;
        let base = Base { round, hash: hash.to_owned(), weights };
        self.save_base(&base, tensors)?;
        Ok((base, downloaded))
    }

    fn apply_update(&self, base: &Base, round: u64, tensors: &[TensorSpec]) -> Result<(Base, u64)> {
        let bytes = self.fetch_update(round)?;
        let view = MessageView::parse(&bytes)?;
        if hex::encode(view.base_checkpoint) != base.hash || view.round != round {
            return Err(ContributorError::Data(format!("update {round} does not start from round {}", base.round)));
        }
        let weights = view.apply_to(&base.weights)?;
        let hash = hex::encode(weights_hash(&encode_weights(tensors, &weights)?));
        Ok((Base { round, hash, weights }, bytes.len() as u64))
    }

    /// Downloads a checkpoint into the state directory, resuming a partial download with a
    /// range request, and checks its hash.
    fn download_checkpoint(&self, hash: &str) -> Result<Vec<u8>> {
        let part = self.state_dir.join(format!("{hash}.part"));
        let url = format!("{}/v1/checkpoints/{hash}", self.url);
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

    fn save_base(&self, base: &Base, tensors: &[TensorSpec]) -> Result<()> {
        let dir = &self.state_dir;
        write_atomic(&dir.join("base.safetensors"), &encode_weights(tensors, &base.weights)?)?;
        let meta = BaseMeta { round: base.round, hash: base.hash.clone() };
        write_atomic(&dir.join("base.json"), &serde_json::to_vec(&meta).map_err(|e| state_err(dir, e))?)
    }
}

/// A request to `hub` + `path`, signed by `key` over its method, path and body.
pub(crate) fn sign(
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
pub(crate) fn fetch_run(hub: &Hub, http: &Client, pinned: Option<&PublicKey>) -> Result<RunInfo> {
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

/// Checks the hub's signature over an answer it published.
pub(crate) fn check_hub_signature(hub_key: &PublicKey, body: &[u8], signature: Option<&str>) -> Result<()> {
    let signature = signature.ok_or_else(|| ContributorError::Data("the hub's answer is not signed".into()))?;
    hub_key
        .verify_hex(&tessera_trust::identity::publication_message(body), signature)
        .map_err(|_| ContributorError::Data("the hub's signature on its answer does not verify".into()))
}

/// The cached base weights, if present and intact.
pub(crate) fn load_base(dir: &Path, table: &[TensorSpec]) -> Option<Base> {
    let meta: BaseMeta = serde_json::from_slice(&std::fs::read(dir.join("base.json")).ok()?).ok()?;
    let bytes = std::fs::read(dir.join("base.safetensors")).ok()?;
    if hex::encode(weights_hash(&bytes)) != meta.hash {
        tracing::warn!("cached base weights do not match their hash; ignoring them");
        return None;
    }
    let weights = decode_weights(&bytes, table).ok()?;
    Some(Base { round: meta.round, hash: meta.hash, weights })
}
