//! The HTTP face of the hub (`docs/protocol.md`, "HTTP API"). Handlers translate between HTTP
//! and [`Hub`]; every refusal is an [`ApiError`] JSON body with a matching status code.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tessera_edge::HeldBody;
use tessera_protocol::api::governance::Signed;
use tessera_protocol::api::{
    DataAssignment, RegisterRequest, ScoreReport, ScoringFailure, UNSIGNED_INNER_LOSS_HEADER, UploadCommit,
    UploadRequest, Verdict,
};
use tessera_protocol::{ApiError, ErrorCode};
use tessera_trust::identity::HUB_SIGNATURE_HEADER;
use tessera_trust::{SignedBy, SignedHead, ValidatorAttestation};

use crate::hub::Hub;
use crate::store::{checkpoint_key, update_key};

/// An [`ApiError`] on its way out.
pub struct Refusal(pub ApiError);

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        Refusal(e)
    }
}

pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::MalformedMessage => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::WrongRun
        | ErrorCode::CodecMismatch
        | ErrorCode::TensorMismatch
        | ErrorCode::BaseMismatch
        | ErrorCode::WrongData
        | ErrorCode::FutureRound => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Stale
        | ErrorCode::Duplicate
        | ErrorCode::Replay
        | ErrorCode::RunFinished
        | ErrorCode::NotScoring
        | ErrorCode::ReplayedRequest
        | ErrorCode::WrongValidator => StatusCode::CONFLICT,
        ErrorCode::NoValidator => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::NotQualified => StatusCode::FORBIDDEN,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (status_of(self.0.code), Json(self.0)).into_response()
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal(ApiError { code, message: message.into() })
}

/// A refusal the edge makes before a handler runs (a rate limit), in the hub's dialect.
pub(crate) fn edge_refusal(status: StatusCode, message: String) -> Response {
    let code = match status {
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Busy,
        s if s.is_client_error() => ErrorCode::BadRequest,
        _ => ErrorCode::Internal,
    };
    (status, Json(ApiError { code, message })).into_response()
}

/// The largest body of a contributor's JSON request (registration, assignment, upload).
const SMALL_BODY: usize = 64 << 10;
/// The largest report: a validator's scores or attestation (TDX collateral holds certificate
/// chains and revocation lists), an operator's epoch of usage per account.
const REPORT_BODY: usize = 16 << 20;
/// The largest verdict body.
const VERDICT_BODY: usize = 64 << 20;

pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/", get(dashboard_page))
        .route("/assets/{file}", get(dashboard_asset))
        .route("/v1/economy", get(economy))
        .route("/v1/governance/proposals", get(proposals).post(propose))
        .route("/v1/governance/votes", post(vote))
        .route("/v1/contributors/{id}/history", get(contributor_history))
        .route("/v1/contributors/{id}/rewards", get(contributor_rewards))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_text))
        .route("/v1/run", get(run_info))
        .route("/v1/status", get(status))
        .route("/v1/contributors", post(register))
        .route("/v1/assignments", post(assignment))
        .route("/v1/submissions", post(submit))
        .route("/v1/uploads", post(grant_upload))
        .route("/v1/uploads/{blob}", post(commit_upload))
        .route("/v1/checkpoints/{hash}", get(checkpoint))
        .route("/v1/updates/{round}", get(update))
        .route("/v1/leaderboard", get(leaderboard))
        .route("/api/leaderboard", get(leaderboard))
        .route("/v1/rounds/{round}", get(round_announcement))
        .route("/v1/rounds/{round}/eval-seed", get(eval_seed))
        .route("/v1/rounds/{round}/audit", get(round_audit))
        .route("/v1/rounds/{round}/submissions/{blob}", get(published_submission))
        .route("/v1/validator/job", get(validator_job))
        .route("/v1/validator/submissions/{blob}", get(validator_blob))
        .route("/v1/validator/scores", post(validator_scores))
        .route("/v1/validator/failed", post(validator_failed))
        .route("/v1/validator", get(validator_info))
        .route("/v1/validator/attestation", post(validator_attestation))
        .route("/v1/validator/aggregate/{round}", post(validator_aggregate))
        .route("/v1/validator/verdict", post(validator_verdict))
        .route("/v1/validator/commitment", post(validator_commitment))
        .route("/v1/ledger", get(ledger))
        .route("/v1/ledger/proof/{seq}", get(ledger_proof))
        .route("/v1/economy/epochs", post(close_epoch))
        .fallback(|| async { refuse(ErrorCode::NotFound, "no such endpoint") })
        .with_state(hub)
}

/// JSON the hub publishes, signed: `x-tessera-hub-signature` over the body's BLAKE3.
fn signed_json(hub: &Hub, value: &impl serde::Serialize) -> Result<Response, Refusal> {
    let body = serde_json::to_vec(value).map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
    let signature = hub.sign_publication(&body);
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::HeaderName::from_static(HUB_SIGNATURE_HEADER), signature),
        ],
        body,
    )
        .into_response())
}

async fn run_info(State(hub): State<Arc<Hub>>) -> Result<Response, Refusal> {
    signed_json(&hub, &hub.info().await)
}

async fn status(State(hub): State<Arc<Hub>>) -> Result<impl IntoResponse, Refusal> {
    hub.status().await.map(Json).map_err(|e| refuse(ErrorCode::Internal, e.to_string()))
}

/// A request's method, URI and headers: all a signed request is checked on before its body.
type Head<'a> = (&'a Method, &'a Uri, &'a HeaderMap);

/// A signed request's verified head (signature for this hub and run, timestamp, fresh nonce,
/// key rate), before any of its body is read.
async fn signed_head(hub: &Hub, (method, uri, headers): Head<'_>) -> Result<SignedHead, Refusal> {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    Ok(hub.verify_head(get, method.as_str(), path).await?)
}

/// The body of a request whose head verified (at most `limit` bytes, within the replica's
/// budget of bytes in flight), held to the hash it was signed with.
async fn signed_body(
    hub: &Hub,
    signed: &SignedHead,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<HeldBody, Refusal> {
    let held = hub.read_body(&signed.by.key.hex(), headers, body, limit).await?;
    signed.check_body(&held.bytes).map_err(|e| refuse(ErrorCode::Unauthorized, e.to_string()))?;
    Ok(held)
}

/// A signed request's signer and its JSON body (`what` names it in a refusal).
async fn signed_json_body<T: serde::de::DeserializeOwned>(
    hub: &Hub,
    head: Head<'_>,
    (body, limit): (Body, usize),
    what: &str,
) -> Result<(SignedBy, T), Refusal> {
    let signed = signed_head(hub, head).await?;
    let held = signed_body(hub, &signed, head.2, body, limit).await?;
    let value =
        serde_json::from_slice(&held.bytes).map_err(|e| refuse(ErrorCode::BadRequest, format!("{what}: {e}")))?;
    Ok((signed.by, value))
}

async fn register(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let (signed, request): (_, RegisterRequest) =
        signed_json_body(&hub, (&method, &uri, &headers), (body, SMALL_BODY), "registration").await?;
    Ok((StatusCode::CREATED, Json(hub.register(&request.name, signed.key).await?)))
}

/// A holder's signed proposal (`Signed`; the request must be signed by the same key).
async fn propose(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let (signed, message): (_, Signed) =
        signed_json_body(&hub, (&method, &uri, &headers), (body, SMALL_BODY), "proposal").await?;
    Ok((StatusCode::ACCEPTED, Json(hub.propose(&signed.key, message).await?)))
}

/// A holder's signed vote.
async fn vote(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let (signed, message): (_, Signed) =
        signed_json_body(&hub, (&method, &uri, &headers), (body, SMALL_BODY), "vote").await?;
    Ok((StatusCode::ACCEPTED, Json(hub.vote(&signed.key, message).await?)))
}

/// The run's governance rules and every proposal with its tally.
async fn proposals(State(hub): State<Arc<Hub>>) -> Result<impl IntoResponse, Refusal> {
    Ok(Json(hub.proposals().await?))
}

/// The registered contributor who signed a request (checked before its body is read), its key,
/// and its body of at most `limit` bytes.
async fn contributor(
    hub: &Hub,
    head: Head<'_>,
    body: Body,
    limit: usize,
) -> Result<(u64, tessera_trust::PublicKey, HeldBody), Refusal> {
    let signed = signed_head(hub, head).await?;
    let id = hub.contributor_of(&signed.by.key).await?;
    let held = signed_body(hub, &signed, head.2, body, limit).await?;
    Ok((id, signed.by.key, held))
}

#[derive(serde::Deserialize)]
struct WaitQuery {
    /// Longest time to wait for the round to move on, in milliseconds (at most 30 s).
    wait_ms: Option<u64>,
}

async fn assignment(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<WaitQuery>,
    body: Body,
) -> Result<Response, Refusal> {
    let (id, _, _) = contributor(&hub, (&method, &uri, &headers), body, SMALL_BODY).await?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(20_000).min(30_000));
    signed_json(&hub, &hub.assign(id, wait).await?)
}

/// The dashboard (`dashboard/`): one page, its script and style, and the charting library that
/// build.rs fetched with npm — all embedded, so the hub serves it by itself.
async fn dashboard_page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("../dashboard/index.html"))
}

async fn dashboard_asset(Path(file): Path<String>) -> Result<impl IntoResponse, Refusal> {
    let (kind, body): (&str, &'static [u8]) = match file.as_str() {
        "app.js" => ("text/javascript", include_bytes!("../dashboard/app.js")),
        "style.css" => ("text/css", include_bytes!("../dashboard/style.css")),
        "uPlot.iife.min.js" => ("text/javascript", include_bytes!(concat!(env!("OUT_DIR"), "/uPlot.iife.min.js"))),
        "uPlot.min.css" => ("text/css", include_bytes!(concat!(env!("OUT_DIR"), "/uPlot.min.css"))),
        _ => return Err(refuse(ErrorCode::NotFound, format!("no asset {file:?}"))),
    };
    Ok(([(header::CONTENT_TYPE, kind)], body))
}

/// A contributor's scored submissions (with the reason any earned nothing) and rating history.
async fn contributor_history(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Refusal> {
    let id: u64 =
        id.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("contributor {id:?} is not a number")))?;
    Ok(Json(hub.contributor_history(id).await?))
}

#[derive(serde::Deserialize)]
struct RewardsQuery {
    /// Explain this many of the latest scored submissions (at most [`MAX_EXPLAINED`]).
    last: Option<usize>,
}

/// The most submissions one request explains: each costs a read of its round's rows.
const MAX_EXPLAINED: usize = 200;

/// How each of a contributor's latest scored submissions became reward units.
async fn contributor_rewards(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Query(q): Query<RewardsQuery>,
) -> Result<impl IntoResponse, Refusal> {
    let id: u64 =
        id.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("contributor {id:?} is not a number")))?;
    let last = q.last.unwrap_or(20);
    if last > MAX_EXPLAINED {
        return Err(refuse(ErrorCode::BadRequest, format!("explain at most {MAX_EXPLAINED} submissions at once")));
    }
    Ok(Json(hub.explain_rewards(id, last).await?))
}

/// The usage economy as the ledger records it: closed epochs, usage per account, balances,
/// allocations and payouts (`docs/economy.md`).
async fn economy(State(hub): State<Arc<Hub>>) -> Result<impl IntoResponse, Refusal> {
    Ok(Json(hub.economy()?))
}

/// Prometheus metrics of this process (`tessera_hub_*`: rounds, submissions by outcome, bytes,
/// aggregation time).
async fn metrics_text() -> impl IntoResponse {
    tessera_telemetry::exposition()
}

#[derive(serde::Deserialize)]
struct SubmitQuery {
    /// The mean training loss of the submission's inner steps (signed with the path).
    inner_loss: Option<f64>,
    /// A manifest run's data claim (`DataAssignment::query`), all three or none.
    data_slot: Option<u64>,
    epoch: Option<u64>,
    shard: Option<u32>,
    /// Which dataset of a mixture the claim names (absent: the run's own).
    data_source: Option<u32>,
}

impl SubmitQuery {
    fn claim(&self) -> Result<crate::Claim, Refusal> {
        let data = match (self.data_slot, self.epoch, self.shard) {
            (Some(slot), Some(epoch), Some(shard)) => {
                Some(DataAssignment { slot, epoch, shard, source: self.data_source.unwrap_or(0) })
            }
            (None, None, None) => None,
            _ => {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    "a submission's data claim needs all of data_slot, epoch and shard, or none of them",
                ));
            }
        };
        Ok(crate::Claim { inner_loss: self.inner_loss, data })
    }
}

async fn submit(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<SubmitQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let result = async {
        if headers.contains_key(UNSIGNED_INNER_LOSS_HEADER) {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "{UNSIGNED_INNER_LOSS_HEADER} is outside the request's signature: send the loss as \
                     ?inner_loss= in the signed path (protocol {})",
                    tessera_protocol::PROTOCOL_VERSION
                ),
            ));
        }
        let Query(query) = query.map_err(|e| refuse(ErrorCode::BadRequest, e.body_text()))?;
        let claim = query.claim()?;
        let limit = hub.max_submission_bytes();
        let (id, key, held) = contributor(&hub, (&method, &uri, &headers), body, limit).await?;
        let bytes = held.bytes.len() as u64;
        // The held body stays counted in the bytes in flight until the submission is recorded.
        let receipt = hub.submit(id, key, held.bytes.clone(), claim).await?;
        drop(held);
        metrics::counter!("tessera_hub_bytes_total", "direction" => "up").increment(bytes);
        Ok::<_, Refusal>(receipt)
    }
    .await;
    let outcome = match &result {
        Ok(_) => "accepted".to_owned(),
        Err(r) => r.0.code.wire_name(),
    };
    metrics::counter!("tessera_hub_submissions_total", "outcome" => outcome).increment(1);
    Ok((StatusCode::ACCEPTED, Json(result?)))
}

/// A contributor asks where to upload a submission: presigned URLs into the bucket, or none
/// (post it to `/v1/submissions`).
async fn grant_upload(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let (id, _, held) = contributor(&hub, (&method, &uri, &headers), body, SMALL_BODY).await?;
    let request: UploadRequest = serde_json::from_slice(&held.bytes)
        .map_err(|e| refuse(ErrorCode::BadRequest, format!("upload request: {e}")))?;
    let granted = hub.grant_upload(id, &request).await;
    if let Err(e) = &granted {
        // A submission refused before its bytes moved counts as one refused.
        metrics::counter!("tessera_hub_submissions_total", "outcome" => e.code.wire_name()).increment(1);
    }
    Ok(Json(granted?))
}

/// A direct upload is done: the hub checks the bytes in the bucket and submits them, with the
/// claim in the signed query as `POST /v1/submissions` takes it.
async fn commit_upload(
    State(hub): State<Arc<Hub>>,
    Path(blob): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<SubmitQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let result = async {
        let Query(query) = query.map_err(|e| refuse(ErrorCode::BadRequest, e.body_text()))?;
        let (id, key, held) = contributor(&hub, (&method, &uri, &headers), body, SMALL_BODY).await?;
        let commit: UploadCommit = if held.bytes.is_empty() {
            UploadCommit::default()
        } else {
            serde_json::from_slice(&held.bytes)
                .map_err(|e| refuse(ErrorCode::BadRequest, format!("upload commit: {e}")))?
        };
        Ok::<_, Refusal>(hub.commit_upload(id, key, &blob, commit, query.claim()?).await?)
    }
    .await;
    let outcome = match &result {
        Ok(_) => "accepted".to_owned(),
        Err(r) => r.0.code.wire_name(),
    };
    metrics::counter!("tessera_hub_submissions_total", "outcome" => outcome).increment(1);
    Ok((StatusCode::ACCEPTED, Json(result?)))
}

/// How long a presigned download URL stays good (a download must start within it).
const DOWNLOAD_TTL: Duration = Duration::from_secs(900);

/// Serves a stored blob, whole or the one byte range a `Range` header asks for, streamed. `counted`: its bytes count as
/// downloaded by contributors (`bytes_down`); the validator's fetches do not.
async fn serve_blob(hub: &Hub, key: &str, headers: &HeaderMap, counted: bool) -> Result<Response, Refusal> {
    let size = hub.store().size(key).await.map_err(|_| refuse(ErrorCode::NotFound, format!("no object {key}")))?;
    let range = match headers.get(header::RANGE).map(|v| v.to_str()) {
        None => None,
        Some(Err(_)) => return Err(refuse(ErrorCode::BadRequest, "Range header is not ASCII")),
        Some(Ok(spec)) => {
            let ranges = http_range_header::parse_range_header(spec)
                .and_then(|r| r.validate(size))
                .map_err(|e| refuse(ErrorCode::RangeNotSatisfiable, format!("range {spec:?} of {size} bytes: {e}")))?;
            match ranges.as_slice() {
                [one] => Some(one.clone()),
                _ => return Err(refuse(ErrorCode::RangeNotSatisfiable, "only a single byte range is served")),
            }
        }
    };
    let internal = |e: crate::HubError| refuse(ErrorCode::Internal, e.to_string());
    if let Some(url) = hub.store().presigned_get(key, DOWNLOAD_TTL).await.map_err(internal)? {
        // The bytes come from the bucket itself (the `Range` header goes along with the
        // redirect); the client checks them against their BLAKE3 as ever.
        if counted {
            hub.note_download(range.as_ref().map_or(size, |r| r.end() + 1 - r.start()));
        }
        let location = HeaderValue::from_str(url.as_str()).map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
        return Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response());
    }
    // Streamed from the store a chunk at a time: serving a checkpoint holds none of it whole.
    let bounds = range.as_ref().map(|r| *r.start()..*r.end() + 1);
    let length = bounds.as_ref().map_or(size, |b| b.end - b.start);
    let object = hub.store().stream(key, bounds).await.map_err(internal)?;
    if counted {
        hub.note_download(length);
    }
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let mut response = (status, Body::from_stream(object.into_stream())).into_response();
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Some(r) = &range {
        let content_range = format!("bytes {}-{}/{size}", r.start(), r.end());
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&content_range).map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?,
        );
    }
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    // Content-addressed or keyed by a published round: never changes once served.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    Ok(response)
}

async fn checkpoint(
    State(hub): State<Arc<Hub>>,
    Path(hash): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return Err(refuse(ErrorCode::BadRequest, "a checkpoint is named by 64 lowercase hex digits"));
    }
    // A published checkpoint whose blob was lost is rebuilt (an unknown name stays 404).
    if let Err(e) = hub.ensure_checkpoint(&hash).await {
        tracing::debug!(checkpoint = %hash, error = %e, "no such checkpoint, and none to rebuild");
    }
    let mut response = serve_blob(&hub, &checkpoint_key(&hash), &headers, true).await?;
    // The hub vouches for what it published: its signature over the checkpoint's BLAKE3 (its
    // name), checkable once the whole checkpoint is in hand.
    let signature = HeaderValue::from_str(&hub.sign_published_hash(&hash))
        .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
    response.headers_mut().insert(header::HeaderName::from_static(HUB_SIGNATURE_HEADER), signature);
    Ok(response)
}

/// A round's signed announcement.
async fn round_announcement(State(hub): State<Arc<Hub>>, Path(round): Path<String>) -> Result<Response, Refusal> {
    let round: u64 =
        round.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("round {round:?} is not a number")))?;
    signed_json(&hub, &hub.announcement(round).await?)
}

/// What a published round's scores can be recomputed from, and what it published (signed).
async fn round_audit(State(hub): State<Arc<Hub>>, Path(round): Path<String>) -> Result<Response, Refusal> {
    let round: u64 =
        round.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("round {round:?} is not a number")))?;
    signed_json(&hub, &hub.round_audit(round).await?)
}

/// A published round's submission, for anyone, in a run that publishes them.
/// A published round's submission: anyone's in a run that publishes them; a contributor's
/// own (a request it signed) in any run.
async fn published_submission(
    State(hub): State<Arc<Hub>>,
    Path((round, blob)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let round: u64 =
        round.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("round {round:?} is not a number")))?;
    let own = if headers.contains_key(tessera_trust::identity::KEY_HEADER) {
        Some(contributor(&hub, (&method, &uri, &headers), body, SMALL_BODY).await?.0)
    } else {
        None
    };
    let key = hub.published_submission_key(round, &blob, own).await?;
    serve_blob(&hub, &key, &headers, false).await
}

async fn update(
    State(hub): State<Arc<Hub>>,
    Path(round): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    let round: u64 =
        round.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("round {round:?} is not a number")))?;
    let current = hub.info().await.round;
    if round == 0 || round > current {
        return Err(refuse(
            ErrorCode::NotFound,
            format!("no update into round {round}: published rounds are 1..={current}"),
        ));
    }
    serve_blob(&hub, &update_key(round), &headers, true).await
}

async fn leaderboard(State(hub): State<Arc<Hub>>) -> Result<impl IntoResponse, Refusal> {
    let board = hub.leaderboard().await.map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
    let body = serde_json::to_vec(&*board).map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body))
}

/// A round's evaluation-seed commitment, and the seed itself once the round's submissions have
/// closed, so anyone can check the validator's evaluation data was fixed in advance.
async fn eval_seed(State(hub): State<Arc<Hub>>, Path(round): Path<String>) -> Result<impl IntoResponse, Refusal> {
    let round: u64 =
        round.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("round {round:?} is not a number")))?;
    Ok(Json(hub.eval_seed(round).await?))
}

/// Checks the validator's bearer token; returns the validator's name.
fn validator(hub: &Hub, headers: &HeaderMap) -> Result<String, Refusal> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| refuse(ErrorCode::Unauthorized, "missing `authorization: Bearer <validator token>` header"))?;
    Ok(hub.authenticate_validator(token.trim())?)
}

/// The round waiting for scores: 200 with the job, or 204 when there is none.
async fn validator_job(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Result<Response, Refusal> {
    let name = validator(&hub, &headers)?;
    match hub.scoring_job(&name).await.map_err(|e| refuse(ErrorCode::Internal, e.to_string()))? {
        Some(job) => Ok(Json(job).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

async fn validator_blob(
    State(hub): State<Arc<Hub>>,
    Path(blob): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    validator(&hub, &headers)?;
    let key = hub.submission_blob_key(&blob).await?;
    serve_blob(&hub, &key, &headers, false).await
}

async fn validator_scores(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let name = validator(&hub, &headers)?;
    let report: ScoreReport = validator_json(&hub, &headers, body, REPORT_BODY, "scores").await?;
    hub.post_scores(&name, report).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The validator cannot score the round waiting for scores.
async fn validator_failed(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let name = validator(&hub, &headers)?;
    let failure: ScoringFailure = validator_json(&hub, &headers, body, SMALL_BODY, "failure").await?;
    hub.post_failure(&name, failure).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The validator's JSON request body (its token already checked), or `bad_request` naming
/// what it should have been.
async fn validator_json<T: serde::de::DeserializeOwned>(
    hub: &Hub,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    what: &str,
) -> Result<T, Refusal> {
    let held = hub.read_body("validator", headers, body, limit).await?;
    serde_json::from_slice(&held.bytes).map_err(|e| refuse(ErrorCode::BadRequest, format!("{what}: {e}")))
}

/// The validator submissions are sealed to: its attestation, for contributors to verify.
async fn validator_info(State(hub): State<Arc<Hub>>) -> Result<Response, Refusal> {
    match hub.validator_info() {
        Some(v) => signed_json(&hub, &v),
        None => Err(refuse(ErrorCode::NoValidator, "no attested validator has registered")),
    }
}

#[derive(serde::Deserialize)]
struct AttestationPost {
    attestation: ValidatorAttestation,
    /// Its signed `Validator` ledger entry (hex).
    entry: String,
}

/// The API operator closes an epoch: its usage, the funding share and the payouts go into the
/// ledger, signed by the hub.
async fn close_epoch(
    State(hub): State<Arc<Hub>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    let (signer, report): (_, tessera_protocol::api::EpochReport) =
        signed_json_body(&hub, (&method, &uri, &headers), (body, REPORT_BODY), "the epoch report").await?;
    let settled = hub.close_epoch(&signer.key, report).await?;
    Ok((StatusCode::CREATED, Json(settled)))
}

async fn validator_attestation(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    validator(&hub, &headers)?;
    let post: AttestationPost = validator_json(&hub, &headers, body, REPORT_BODY, "attestation").await?;
    let seq = hub.register_validator(post.attestation, &post.entry).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "ledger_seq": seq }))))
}

async fn validator_aggregate(
    State(hub): State<Arc<Hub>>,
    Path(round): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    validator(&hub, &headers)?;
    let round: u64 =
        round.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("round {round:?} is not a number")))?;
    let held = hub.read_body("validator", &headers, body, hub.max_submission_bytes()).await?;
    hub.post_aggregate(round, held.bytes.clone()).await?;
    drop(held);
    Ok(StatusCode::NO_CONTENT)
}

async fn validator_verdict(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    validator(&hub, &headers)?;
    let verdict: Verdict = validator_json(&hub, &headers, body, VERDICT_BODY, "verdict").await?;
    hub.post_verdict(verdict).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A sealed run's validator commits the current round's evaluation seed.
async fn validator_commitment(
    State(hub): State<Arc<Hub>>,
    headers: HeaderMap,
    body: Body,
) -> Result<impl IntoResponse, Refusal> {
    validator(&hub, &headers)?;
    let c: tessera_protocol::api::SeedCommitment =
        validator_json(&hub, &headers, body, SMALL_BODY, "commitment").await?;
    hub.post_commitment(c).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
struct FromQuery {
    from: Option<u64>,
}

/// The ledger's entries (from `?from=N`), back to back: verify with `tessera ledger verify`.
async fn ledger(State(hub): State<Arc<Hub>>, Query(q): Query<FromQuery>) -> impl IntoResponse {
    let bytes = hub.ledger_bytes(q.from.unwrap_or(0));
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/octet-stream")], bytes)
}

async fn ledger_proof(State(hub): State<Arc<Hub>>, Path(seq): Path<String>) -> Result<impl IntoResponse, Refusal> {
    let seq: u64 = seq.parse().map_err(|_| refuse(ErrorCode::BadRequest, format!("entry {seq:?} is not a number")))?;
    Ok(Json(hub.ledger_proof(seq)?))
}
