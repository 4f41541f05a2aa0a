//! The HTTP side: OpenAI's routes, auth, rate limits, streaming, metering.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tessera_data::TessTokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

use tessera_trust::SealingKey;
use tessera_trust::serving;

use crate::attested::Attested;
use crate::engine::{Engine, Event, Finish, Job, TokenLogprobs};
use crate::keys::{KeyInfo, Store, hash_key};
use crate::openai::{self, ApiError, Generation};

/// The model served now, and the engine running it. `--follow-hub` replaces it with each new
/// checkpoint: a request keeps the one it resolved, so requests in flight finish on the model
/// they began with (and name it), and the old engine's thread ends when its last one has.
#[derive(Clone)]
pub struct Served {
    /// The id clients name it with.
    pub id: String,
    /// BLAKE3 of its weights (`model.safetensors`), which an attestation binds.
    pub blake3: [u8; 32],
    /// When it was loaded (Unix seconds), for `/v1/models`.
    pub created: u64,
    pub engine: Engine,
    /// The model's context length, in tokens.
    pub context: usize,
}

impl Served {
    pub fn new(id: String, blake3: [u8; 32], engine: Engine, context: usize) -> Served {
        Served { id, blake3, created: unix_seconds(), engine, context }
    }
}

/// Everything a request handler needs.
pub struct AppState {
    pub tokenizer: TessTokenizer,
    served: std::sync::RwLock<Served>,
    /// Other names requests may use for the served model (refused in strict mode).
    pub aliases: Vec<String>,
    pub store: Store,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Keys made in a TEE and its evidence (`--tee`): responses are signed, requests may be
    /// sealed, and `/v1/attestation/report` answers.
    pub attested: Option<Arc<Attested>>,
    /// One GCRA limiter per key (`governor`), at the key's own rate; rebuilt if it changes.
    limiter: Mutex<HashMap<i64, (u32, Arc<governor::DefaultDirectRateLimiter>)>>,
    /// Request bodies held at once: in all, and per key.
    bodies: tessera_edge::BodyBudget,
}

impl AppState {
    pub fn new(
        engine: Engine,
        tokenizer: TessTokenizer,
        model_id: String,
        context: usize,
        store: Store,
        body_limit: usize,
    ) -> AppState {
        // Metrics are recorded from the start (GET /metrics renders them).
        let _ = tessera_telemetry::prometheus();
        AppState {
            tokenizer,
            served: std::sync::RwLock::new(Served::new(model_id, [0; 32], engine, context)),
            aliases: Vec::new(),
            store,
            body_limit,
            attested: None,
            limiter: Mutex::new(HashMap::new()),
            // Room for 64 requests of the largest size at once; one key sends one at a time.
            bodies: tessera_edge::BodyBudget::new((body_limit as u64).saturating_mul(64), body_limit as u64),
        }
    }

    /// The served weights' BLAKE3 (what an attestation binds).
    pub fn with_model_blake3(self, blake3: [u8; 32]) -> AppState {
        if let Ok(mut s) = self.served.write() {
            s.blake3 = blake3;
        }
        self
    }

    pub fn with_aliases(mut self, aliases: Vec<String>) -> AppState {
        self.aliases = aliases;
        self
    }

    pub fn with_attestation(mut self, attested: Arc<Attested>) -> AppState {
        self.attested = Some(attested);
        self
    }

    /// The model served now.
    pub fn served(&self) -> Served {
        match self.served.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Switches the model new requests are answered with.
    pub fn set_served(&self, served: Served) {
        match self.served.write() {
            Ok(mut s) => *s = served,
            Err(poisoned) => *poisoned.into_inner() = served,
        }
    }

    /// The served model's id for a request naming `requested`: the id itself, or an alias
    /// unless the request is strict.
    fn resolve(&self, requested: &str, strict: bool) -> Result<Served, ApiError> {
        let served = self.served();
        if requested == served.id {
            return Ok(served);
        }
        if self.aliases.iter().any(|a| a == requested) {
            if strict {
                return Err(ApiError {
                    status: 400,
                    message: format!(
                        "`{requested}` is an alias of `{}`, and this request is strict ({}): name the model \
                         the attestation binds",
                        served.id,
                        serving::STRICT_HEADER
                    ),
                    kind: "invalid_request_error",
                    param: Some("model".into()),
                    code: Some("model_alias_refused"),
                });
            }
            return Ok(served);
        }
        Err(ApiError::model_not_found(requested))
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.body())).into_response()
    }
}

/// A refusal the edge makes before a handler runs (a rate limit), in OpenAI's error format.
pub fn edge_refusal(status: StatusCode, message: String) -> Response {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS { "rate_limit_error" } else { "invalid_request_error" };
    ApiError { status: status.as_u16(), message, kind, param: None, code: None }.into_response()
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/attestation/report", get(attestation_report))
        .route("/v1/signature/{id}", get(get_signature))
        .fallback(|| async {
            ApiError {
                status: 404,
                message: "Unknown route.".into(),
                kind: "invalid_request_error",
                param: None,
                code: None,
            }
        })
        .with_state(state)
}

/// The caller's key, checked against the store and its rate limit.
async fn authorize(state: &AppState, headers: &HeaderMap) -> Result<KeyInfo, ApiError> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let key = header.strip_prefix("Bearer ").map(str::trim).filter(|k| !k.is_empty()).ok_or_else(|| {
        ApiError::unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' (create one with `tessera keys create`).",
        )
    })?;
    let info = state
        .store
        .find_key(&hash_key(key))
        .await
        .map_err(|e| ApiError::server(e.to_string()))?
        .ok_or_else(|| ApiError::unauthorized("Incorrect API key provided, or the key was revoked."))?;
    let limiter = {
        let mut limiters = state.limiter.lock().map_err(|_| ApiError::server("rate limiter poisoned"))?;
        let rpm = info.requests_per_minute;
        match limiters.get(&info.id) {
            Some((at, l)) if *at == rpm => l.clone(),
            _ => {
                // A burst of `rpm`, refilled evenly over a minute.
                let per_minute = NonZeroU32::new(rpm).ok_or_else(|| ApiError::rate_limited(rpm))?;
                let l = Arc::new(governor::RateLimiter::direct(governor::Quota::per_minute(per_minute)));
                limiters.insert(info.id, (rpm, l.clone()));
                l
            }
        }
    };
    if limiter.check().is_err() {
        return Err(ApiError::rate_limited(info.requests_per_minute));
    }
    Ok(info)
}

/// Prometheus metrics of this process (`tessera_serve_*`: requests by endpoint and status,
/// latencies, tokens served, decoding steps).
async fn metrics_text() -> impl IntoResponse {
    tessera_telemetry::exposition()
}

fn model_object(state: &AppState) -> Value {
    let served = state.served();
    json!({
        "id": served.id, "object": "model", "created": served.created, "owned_by": "tessera",
        "verifiable": state.attested.is_some(), "aliases": state.aliases,
    })
}

async fn list_models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers).await?;
    Ok(Json(json!({"object": "list", "data": [model_object(&state)]})))
}

async fn get_model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers).await?;
    state.resolve(&id, strict(&headers))?;
    Ok(Json(model_object(&state)))
}

/// Whether the request asks for strict mode (no aliases).
fn strict(headers: &HeaderMap) -> bool {
    headers.get(serving::STRICT_HEADER).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let v = v.trim();
        v == "1" || v.eq_ignore_ascii_case("true")
    })
}

/// Fresh evidence binding this server's keys, the model it serves now, its binary and the
/// caller's nonce. Needs no API key: a client checks the server before sending it anything.
async fn attestation_report(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
) -> Result<Json<serving::ServerAttestation>, ApiError> {
    let attested = state.attested.as_ref().ok_or_else(|| ApiError {
        status: 404,
        message: "This server is not attested: it was not started with --tee.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_attested"),
    })?;
    let mut nonce = [0u8; 32];
    // Read by hand, so that any query string gets an answer in OpenAI's error shape.
    let raw = query.as_deref().unwrap_or("").split('&').find_map(|kv| kv.strip_prefix("nonce=")).unwrap_or("");
    hex::decode_to_slice(raw, &mut nonce)
        .map_err(|_| ApiError::invalid("nonce", "Send a fresh nonce of 32 random bytes as 64 hex digits: ?nonce=…."))?;
    let served = state.served();
    let report = attested
        .report(&served.id, served.blake3, nonce)
        .await
        .map_err(|e| ApiError::server(format!("the TEE gave no evidence: {e}")))?;
    metrics::counter!("tessera_serve_attestations_total").increment(1);
    Ok(Json(report))
}

/// The signature of one of the caller's own completions.
async fn get_signature(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = authorize(&state, &headers).await?;
    let attested = state.attested.as_ref().ok_or_else(|| ApiError {
        status: 404,
        message: "This server is not attested (no --tee): its responses are not signed.".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_attested"),
    })?;
    let s = attested.signature(key.id, &id).ok_or_else(|| ApiError {
        status: 404,
        message: format!(
            "No signature for `{id}`: it is not one of this key's completions, or older than the last {} kept.",
            crate::attested::SIGNATURES_KEPT
        ),
        kind: "invalid_request_error",
        param: None,
        code: Some("signature_not_found"),
    })?;
    Ok(Json(json!({
        "id": s.id, "request_blake3": s.request_blake3, "response_blake3": s.response_blake3,
        "signature": s.signature, "signing_algo": "ed25519", "signing_key": attested.signing_key().hex(),
    })))
}

/// The body of a request whose key was checked, read within the server's budget of bytes in
/// flight (a key sends one body at a time).
async fn body_bytes(state: &AppState, key: &KeyInfo, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let held = state.bodies.read(&key.id.to_string(), headers, body, state.body_limit).await.map_err(|e| match e {
        tessera_edge::BodyError::TooLarge { .. } => ApiError::too_large(state.body_limit),
        tessera_edge::BodyError::KeyBusy | tessera_edge::BodyError::Busy => ApiError {
            status: e.status().as_u16(),
            message: e.to_string(),
            kind: "rate_limit_error",
            param: None,
            code: None,
        },
        other => ApiError::bad_request(format!("We could not read the request body: {other}")),
    })?;
    // Parsed at once; a body is small (at most `body_limit`), its reservation ends here.
    Ok(held.bytes.clone())
}

async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    exchange(state, headers, body, "completions").await
}

async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    exchange(state, headers, body, "chat.completions").await
}

/// One completion exchange: the key is checked before any body byte is read; a sealed body is
/// opened; the answer (or the refusal made after opening) is sealed back, and signed when it is
/// a completion and the server is attested.
async fn exchange(state: Arc<AppState>, headers: HeaderMap, body: Body, endpoint: &'static str) -> Response {
    let opened = async {
        let key = authorize(&state, &headers).await?;
        let seal = sealed_to(&state, &headers)?;
        let wire = body_bytes(&state, &key, &headers, body).await?;
        let plain = match (&seal, &state.attested) {
            (Some(client), Some(attested)) => Bytes::from(attested.open_request(client, &wire).map_err(|e| {
                ApiError::bad_request(format!("The sealed request does not open: {e}")).with_code("unsealable")
            })?),
            _ => wire.clone(),
        };
        Ok::<_, ApiError>((key, seal, wire, plain))
    }
    .await;
    let (key, seal, wire, plain) = match opened {
        Ok(o) => o,
        Err(e) => return counted(endpoint, e.status, e.into_response()),
    };
    let answer = match endpoint {
        "completions" => {
            async {
                let request = openai::parse_completion(&plain)?;
                let served = state.resolve(&request.generation.model, strict(&headers))?;
                let kind = Kind::Completion { echo: request.echo };
                run(state.clone(), &key, served, kind, &request.prompts, request.n, request.generation).await
            }
            .await
        }
        _ => {
            async {
                let mut request = openai::parse_chat(&plain)?;
                let served = state.resolve(&request.generation.model, strict(&headers))?;
                if request.generation.stop.is_empty() {
                    request.generation.stop.push(openai::CHAT_STOP.to_owned());
                }
                let prompt = openai::chat_prompt(&request.messages);
                run(state.clone(), &key, served, Kind::Chat, &[prompt], request.n, request.generation).await
            }
            .await
        }
    };
    let answer = answer.unwrap_or_else(|e| Answer::Whole {
        status: StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body: e.body().to_string().into_bytes(),
        id: None,
    });
    let status = match &answer {
        Answer::Whole { status, .. } => status.as_u16(),
        Answer::Stream { .. } => 200,
    };
    counted(endpoint, status, respond(&state, key.id, wire, seal, answer))
}

/// The client's response key, when it sealed its request.
fn sealed_to(state: &AppState, headers: &HeaderMap) -> Result<Option<SealingKey>, ApiError> {
    let Some(value) = headers.get(serving::SEAL_TO_HEADER) else { return Ok(None) };
    if state.attested.is_none() {
        return Err(ApiError::bad_request(
            "This server has no attested key to seal to (it was not started with --tee); send the request in the clear.",
        )
        .with_code("not_attested"));
    }
    let key = value.to_str().ok().and_then(|v| SealingKey::parse(v.trim()).ok()).ok_or_else(|| {
        ApiError::bad_request(format!("`{}` must be your X25519 public key as 64 hex digits.", serving::SEAL_TO_HEADER))
    })?;
    Ok(Some(key))
}

fn counted(endpoint: &'static str, status: u16, response: Response) -> Response {
    metrics::counter!("tessera_serve_requests_total", "endpoint" => endpoint, "status" => status.to_string())
        .increment(1);
    response
}

/// What a completion request produced, before it is sealed and signed.
enum Answer {
    /// A JSON body: a completion (with its id) or a refusal.
    Whole { status: StatusCode, body: Vec<u8>, id: Option<String> },
    /// Server-sent events: each item one event's data.
    Stream { id: String, events: futures::stream::BoxStream<'static, String> },
}

/// The exact bytes sent: sealed to the client if it sealed its request, and signed over the
/// request bytes received (`wire`) and these by the attested key.
fn respond(state: &AppState, key_id: i64, wire: Bytes, seal: Option<SealingKey>, answer: Answer) -> Response {
    use futures::StreamExt as _;
    let attested = state.attested.clone();
    match answer {
        Answer::Whole { status, body, id } => {
            let (body, content_type) = match &seal {
                Some(client) => match serving::seal_response(client, &wire, 0, &body) {
                    Ok(sealed) => (sealed, serving::SEALED_CONTENT_TYPE),
                    Err(e) => return ApiError::server(format!("sealing the response: {e}")).into_response(),
                },
                None => (body, "application/json"),
            };
            let response_hash = blake3::hash(&body);
            let mut response = (status, body).into_response();
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            if let (Some(attested), Some(id)) = (&attested, id) {
                let signature = attested.sign(key_id, &id, &blake3::hash(&wire), &response_hash);
                for (name, value) in
                    [(serving::SIGNATURE_HEADER, signature.signature), (serving::RESPONSE_ID_HEADER, id)]
                {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        headers.insert(name, v);
                    }
                }
            }
            response
        }
        Answer::Stream { id, events } => {
            /// A stream's events as sent: sealed if asked, hashed as they go, signed at the end.
            struct Signing {
                events: futures::stream::BoxStream<'static, String>,
                seal: Option<SealingKey>,
                wire: Bytes,
                attested: Option<Arc<Attested>>,
                id: String,
                index: u64,
                hasher: blake3::Hasher,
                done: bool,
            }
            let signing = Signing {
                events,
                seal,
                wire,
                attested,
                id: id.clone(),
                index: 0,
                hasher: blake3::Hasher::new(),
                done: false,
            };
            let frames = futures::stream::unfold(signing, move |mut s| async move {
                if s.done {
                    return None;
                }
                let frame = match s.events.next().await {
                    Some(data) => {
                        let data = match &s.seal {
                            Some(client) => match serving::seal_response(client, &s.wire, s.index, data.as_bytes()) {
                                Ok(sealed) => hex::encode(sealed),
                                Err(e) => {
                                    tracing::error!(error = %e, "sealing a streamed event failed");
                                    return None;
                                }
                            },
                            None => data,
                        };
                        s.index += 1;
                        let frame = format!("data: {data}\n\n");
                        s.hasher.update(frame.as_bytes());
                        frame
                    }
                    None => {
                        s.done = true;
                        let attested = s.attested.as_ref()?;
                        let signature = attested.sign(key_id, &s.id, &blake3::hash(&s.wire), &s.hasher.finalize());
                        format!("{}{}\n\n", serving::STREAM_SIGNATURE_PREFIX, signature.signature)
                    }
                };
                Some((Ok::<_, std::convert::Infallible>(Bytes::from(frame)), s))
            });
            let mut response = Response::new(Body::from_stream(frames));
            let headers = response.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(serving::RESPONSE_ID_HEADER, v);
            }
            response
        }
    }
}

#[derive(Clone)]
enum Kind {
    /// With `echo`, each completion's text begins with its prompt.
    Completion {
        echo: bool,
    },
    Chat,
}

/// A prompt tokenized and checked against the context, with its token budget.
struct Prepared {
    tokens: Vec<u32>,
    max_tokens: usize,
}

fn prepare(state: &AppState, served: &Served, kind: &Kind, prompt: &str, g: &Generation) -> Result<Prepared, ApiError> {
    let tokens = state.tokenizer.encode(prompt).map_err(|e| ApiError::invalid("prompt", e.to_string()))?;
    let prompt_tokens = tokens.len().max(1);
    let max_tokens = g.max_tokens.unwrap_or(served.context.saturating_sub(prompt_tokens));
    if prompt_tokens + max_tokens > served.context || max_tokens == 0 {
        let param = match kind {
            Kind::Completion { .. } => "prompt",
            Kind::Chat => "messages",
        };
        return Err(ApiError::invalid(
            param,
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the \
                 prompt, {} for the completion). Please reduce the length of the prompt or of max_tokens.",
                served.context,
                prompt_tokens + max_tokens.max(1),
                prompt_tokens,
                max_tokens.max(1)
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(Prepared { tokens, max_tokens })
}

/// Hands one generation to the engine; its events come back on the receiver.
fn submit(served: &Served, p: &Prepared, g: &Generation, seed: u64) -> Result<UnboundedReceiver<Event>, ApiError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    served
        .engine
        .submit(Job {
            prompt: p.tokens.clone(),
            max_tokens: p.max_tokens,
            temperature: g.temperature,
            top_p: g.top_p,
            seed,
            ignore_eos: g.ignore_eos,
            adjust: crate::engine::Adjust {
                presence: g.presence_penalty,
                frequency: g.frequency_penalty,
                bias: g.logit_bias.clone(),
            },
            logprobs: g.logprobs,
            events: tx,
        })
        .map_err(|e| ApiError::server(e.to_string()))?;
    Ok(rx)
}

/// Checks, tokenizes and submits a request's generations — `n` for each of its prompts (a
/// completions request may batch several) — and answers in one body, or streams a request of
/// one prompt and one choice. Choice `i` is prompt `i / n`'s `i mod n`-th, sampled with the
/// request's seed plus `i`; usage counts each prompt once and every choice's tokens.
async fn run(
    state: Arc<AppState>,
    key: &KeyInfo,
    served: Served,
    kind: Kind,
    prompts: &[String],
    n: usize,
    g: Generation,
) -> Result<Answer, ApiError> {
    let prepared = prompts.iter().map(|p| prepare(&state, &served, &kind, p, &g)).collect::<Result<Vec<_>, _>>()?;
    if let Some((id, _)) = g.logit_bias.iter().find(|(id, _)| *id as usize >= state.tokenizer.vocab_size()) {
        return Err(ApiError::invalid(
            "logit_bias",
            format!(
                "token {id} in 'logit_bias' is not in this model's vocabulary of {}.",
                state.tokenizer.vocab_size()
            ),
        ));
    }
    if matches!(kind, Kind::Completion { echo: true }) && g.logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs",
            "Log probabilities of an echoed prompt are not computed: ask for 'logprobs' without 'echo'.",
        )
        .with_code("unsupported_parameter"));
    }
    let seed = match g.seed {
        Some(s) => s,
        None => {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).map_err(|e| ApiError::server(format!("no OS randomness: {e}")))?;
            u64::from_le_bytes(b)
        }
    };
    let meta = Meta {
        started: std::time::Instant::now(),
        id: response_id(&kind),
        created: unix_seconds(),
        model: served.id.clone(),
        kind,
        key_id: key.id,
        prompt_tokens: prepared.iter().map(|p| p.tokens.len().max(1)).sum(),
    };
    if g.stream {
        // One stream of events per choice, merged; the last to end sends the usage and [DONE].
        let id = meta.id.clone();
        let shared = Arc::new(StreamBill::new(state.clone(), meta, prepared.len() * n));
        let mut choices = Vec::with_capacity(prepared.len() * n);
        for (pi, p) in prepared.iter().enumerate() {
            for j in 0..n {
                let index = pi * n + j;
                let rx = submit(&served, p, &g, seed.wrapping_add(index as u64))?;
                let streamer = Streamer {
                    shared: shared.clone(),
                    index,
                    rx: Some(rx),
                    text: Text::new(state.tokenizer.clone(), g.stop.clone()),
                    queue: VecDeque::new(),
                    started: false,
                    echo: Some(prompts[pi].clone()),
                    logprobs: g.logprobs.is_some(),
                    ended: false,
                };
                choices.push(futures::stream::unfold(streamer, |mut s| async move { s.next().await.map(|e| (e, s)) }));
            }
        }
        let events = futures::stream::select_all(choices.into_iter().map(Box::pin));
        return Ok(Answer::Stream { id, events: Box::pin(events) });
    }
    let mut receivers = Vec::with_capacity(prepared.len() * n);
    for (pi, p) in prepared.iter().enumerate() {
        for j in 0..n {
            receivers.push(submit(&served, p, &g, seed.wrapping_add((pi * n + j) as u64))?);
        }
    }
    // Billed in a task of its own once generation ends: a caller who hangs up meanwhile
    // still pays for what was generated.
    let results = {
        let state = state.clone();
        let meta = meta.clone();
        let (tokenizer, stop, logprobs) = (state.tokenizer.clone(), g.stop.clone(), g.logprobs.is_some());
        tokio::spawn(async move {
            let all = futures::future::join_all(
                receivers.into_iter().map(|rx| collect(rx, Text::new(tokenizer.clone(), stop.clone()), logprobs, 0)),
            )
            .await;
            // Every choice's tokens are billed, even if another choice failed.
            let completion_tokens: usize = all.iter().map(|r| r.as_ref().map_or(0, |c| c.tokens)).sum();
            bill(&state, &meta, completion_tokens).await?;
            all.into_iter().collect::<Result<Vec<_>, ApiError>>()
        })
        .await
        .map_err(|e| ApiError::server(e.to_string()))??
    };
    let completion_tokens = results.iter().map(|c| c.tokens).sum();
    let usage = openai::usage(meta.prompt_tokens, completion_tokens);
    let choices: Vec<Value> = results
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let logprobs = c.logprobs.as_deref().map_or(Value::Null, |e| logprobs_json(&state.tokenizer, &meta.kind, e));
            let (text, finish) = (c.text, c.finish);
            match &meta.kind {
                Kind::Completion { echo: true } => json!({
                    "text": format!("{}{text}", prompts[i / n]), "index": i, "logprobs": logprobs, "finish_reason": finish,
                }),
                Kind::Completion { echo: false } => {
                    json!({"text": text, "index": i, "logprobs": logprobs, "finish_reason": finish})
                }
                Kind::Chat => json!({
                    "index": i, "message": {"role": "assistant", "content": text, "refusal": null},
                    "logprobs": logprobs, "finish_reason": finish,
                }),
            }
        })
        .collect();
    let object = match meta.kind {
        Kind::Completion { .. } => "text_completion",
        Kind::Chat => "chat.completion",
    };
    let body = json!({
        "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
        "choices": choices, "usage": usage,
    });
    Ok(Answer::Whole { status: StatusCode::OK, body: body.to_string().into_bytes(), id: Some(meta.id) })
}

#[derive(Clone)]
struct Meta {
    started: std::time::Instant,
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    key_id: i64,
    prompt_tokens: usize,
}

fn response_id(kind: &Kind) -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    let prefix = match kind {
        Kind::Completion { .. } => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    format!("{prefix}-{}", hex::encode(b))
}

async fn bill(state: &AppState, meta: &Meta, completion_tokens: usize) -> Result<(), ApiError> {
    let endpoint = match meta.kind {
        Kind::Completion { .. } => "completions",
        Kind::Chat => "chat.completions",
    };
    metrics::histogram!("tessera_serve_request_seconds", "endpoint" => endpoint)
        .record(meta.started.elapsed().as_secs_f64());
    metrics::counter!("tessera_serve_tokens_total", "kind" => "prompt").increment(meta.prompt_tokens as u64);
    metrics::counter!("tessera_serve_tokens_total", "kind" => "completion").increment(completion_tokens as u64);
    state
        .store
        .record(meta.key_id, endpoint, meta.prompt_tokens as u64, completion_tokens as u64)
        .await
        .map_err(|e| ApiError::server(e.to_string()))
}

/// The completion's text as tokens arrive: decoded whole each time (so multi-byte characters
/// appear only when complete), cut at the first stop sequence, and never releasing a tail
/// that might still become one. Each token's log probabilities (if asked for) are released
/// with the text that token ends, and dropped with the tokens of a stop sequence.
struct Text {
    tokenizer: TessTokenizer,
    stops: Vec<String>,
    tokens: Vec<u32>,
    /// Bytes of the text already handed out.
    released: usize,
    stopped: bool,
    /// Per token: its log probabilities, and where its text ends (bytes of the decoded text
    /// when it was added, never less than the token before's).
    logprobs: Vec<Option<Box<TokenLogprobs>>>,
    ends: Vec<usize>,
    /// Tokens whose log probabilities were handed out.
    logprobs_out: usize,
    /// The whole text decoded so far (kept only when log probabilities are asked for).
    decoded: String,
}

/// One token's log probabilities, as released: the token, its decoded text, where that text
/// begins in the completion (characters), and the numbers.
struct TokenEntry {
    text: String,
    offset: usize,
    lp: Box<TokenLogprobs>,
}

impl Text {
    fn new(tokenizer: TessTokenizer, stops: Vec<String>) -> Text {
        Text {
            tokenizer,
            stops,
            tokens: Vec::new(),
            released: 0,
            stopped: false,
            logprobs: Vec::new(),
            ends: Vec::new(),
            logprobs_out: 0,
            decoded: String::new(),
        }
    }

    /// Adds a token; returns the text that may be released now. Linear in the stop sequences'
    /// length: a stop can only begin in the text not yet released (whatever might begin one
    /// is held back), and what to hold back is found with one pass of a prefix automaton.
    fn push(&mut self, token: u32, logprobs: Option<Box<TokenLogprobs>>) -> Result<String, ApiError> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens).map_err(|e| ApiError::server(e.to_string()))?;
        if logprobs.is_some() {
            self.ends.push(text.len().max(self.ends.last().copied().unwrap_or(0)));
            self.logprobs.push(logprobs);
            self.decoded.clone_from(&text);
        }
        let (from, unreleased) = match text.get(self.released..) {
            Some(rest) => (self.released, rest),
            None => (0, text.as_str()),
        };
        if let Some(cut) = self.stops.iter().filter_map(|s| unreleased.find(s.as_str())).min() {
            self.stopped = true;
            return Ok(self.release(&text, from + cut));
        }
        let mut safe = text.len();
        if text.ends_with('\u{FFFD}') {
            safe -= '\u{FFFD}'.len_utf8();
        }
        // Hold back the longest tail that is a proper prefix of a stop sequence.
        let held = self.stops.iter().map(|stop| held_back(&text.as_bytes()[..safe], stop.as_bytes())).max();
        Ok(self.release(&text, safe - held.unwrap_or(0)))
    }

    /// Everything not yet released (at the end of generation).
    fn finish(&mut self) -> Result<String, ApiError> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode(&self.tokens).map_err(|e| ApiError::server(e.to_string()))?;
        let end = text.len();
        Ok(self.release(&text, end))
    }

    fn release(&mut self, text: &str, upto: usize) -> String {
        let mut upto = upto.max(self.released).min(text.len());
        while !text.is_char_boundary(upto) {
            upto -= 1;
        }
        let out = text.get(self.released..upto).unwrap_or("").to_owned();
        self.released = self.released.max(upto);
        out
    }

    /// The log probabilities of the tokens whose text is now released; at the `end`, of every
    /// token that began before the released text ends (the rest formed a stop sequence).
    /// Offsets are in characters, from `base` (the echoed prompt's length).
    fn take_logprobs(&mut self, end: bool, base: usize) -> Result<Vec<TokenEntry>, ApiError> {
        let mut out = Vec::new();
        while self.logprobs_out < self.logprobs.len() {
            let i = self.logprobs_out;
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            if !(self.ends[i] <= self.released || (end && start < self.released)) {
                break;
            }
            self.logprobs_out += 1;
            let Some(lp) = self.logprobs[i].take() else { continue };
            let text = self.tokenizer.decode(&self.tokens[i..=i]).map_err(|e| ApiError::server(e.to_string()))?;
            let mut at = start.min(self.decoded.len());
            while !self.decoded.is_char_boundary(at) {
                at -= 1;
            }
            out.push(TokenEntry { text, offset: base + self.decoded[..at].chars().count(), lp });
        }
        if end {
            self.logprobs_out = self.logprobs.len();
        }
        Ok(out)
    }
}

/// -inf (a banned token) as OpenAI writes it: JSON has no infinity.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { -9999.0 }
}

/// Log probabilities in the shape of the endpoint: chat's `{"content": [...]}` or the legacy
/// completions' parallel arrays.
fn logprobs_json(tokenizer: &TessTokenizer, kind: &Kind, entries: &[TokenEntry]) -> Value {
    let token = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    match kind {
        Kind::Chat => {
            let content: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let top: Vec<Value> = e
                        .lp
                        .top
                        .iter()
                        .map(|&(id, lp)| {
                            let t = token(id);
                            json!({"token": t, "logprob": finite(lp), "bytes": t.as_bytes()})
                        })
                        .collect();
                    json!({"token": e.text, "logprob": finite(e.lp.logprob), "bytes": e.text.as_bytes(), "top_logprobs": top})
                })
                .collect();
            json!({"content": content, "refusal": null})
        }
        Kind::Completion { .. } => {
            let top: Vec<Value> = entries
                .iter()
                .map(|e| {
                    let mut m = serde_json::Map::new();
                    for &(id, lp) in &e.lp.top {
                        m.entry(token(id)).or_insert(json!(finite(lp)));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": entries.iter().map(|e| e.text.clone()).collect::<Vec<_>>(),
                "token_logprobs": entries.iter().map(|e| finite(e.lp.logprob)).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            })
        }
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with, in O(len(stop))
/// (Knuth–Morris–Pratt over the last len(stop) − 1 bytes of `text`).
fn held_back(text: &[u8], stop: &[u8]) -> usize {
    let m = stop.len();
    if m < 2 {
        return 0;
    }
    // fail[i]: the longest proper prefix of stop[..=i] that is also its suffix.
    let mut fail = vec![0usize; m];
    let mut k = 0;
    for i in 1..m {
        while k > 0 && stop[i] != stop[k] {
            k = fail[k - 1];
        }
        if stop[i] == stop[k] {
            k += 1;
        }
        fail[i] = k;
    }
    // Fewer than m bytes: the match can never be all of `stop`.
    let mut q = 0;
    for &c in &text[text.len().saturating_sub(m - 1)..] {
        while q > 0 && stop[q] != c {
            q = fail[q - 1];
        }
        if stop[q] == c {
            q += 1;
        }
    }
    q
}

fn finish_reason(finish: Finish, stopped: bool) -> &'static str {
    match (finish, stopped) {
        (_, true) | (Finish::EndOfText, _) => "stop",
        (Finish::Length, false) => "length",
    }
}

/// A whole completion: its text, finish reason, tokens, and log probabilities if asked for.
struct Completed {
    text: String,
    finish: &'static str,
    tokens: usize,
    logprobs: Option<Vec<TokenEntry>>,
}

/// Waits for the whole completion. `base`: characters before it (an echoed prompt).
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    mut text: Text,
    logprobs: bool,
    base: usize,
) -> Result<Completed, ApiError> {
    let mut out = String::new();
    let finish = loop {
        match rx.recv().await {
            Some(Event::Token(t, lp)) => {
                out.push_str(&text.push(t, lp)?);
                if text.stopped {
                    break "stop";
                }
            }
            Some(Event::Done(f)) => {
                out.push_str(&text.finish()?);
                break finish_reason(f, false);
            }
            Some(Event::Failed(e)) => return Err(ApiError::server(format!("generation failed: {e}"))),
            None => return Err(ApiError::server("the engine dropped the request")),
        }
    };
    let logprobs = if logprobs { Some(text.take_logprobs(true, base)?) } else { None };
    Ok(Completed { text: out, finish, tokens: text.tokens.len(), logprobs })
}

/// What the choices of one streamed request share: its metadata, and the bill, written once
/// when the last choice ends — or, if the caller hung up, when the last is dropped, for what was
/// generated by then.
struct StreamBill {
    state: Arc<AppState>,
    meta: Meta,
    /// (choices not yet ended or dropped, completion tokens of those that have).
    pending: Mutex<(usize, usize)>,
}

impl StreamBill {
    fn new(state: Arc<AppState>, meta: Meta, choices: usize) -> StreamBill {
        StreamBill { state, meta, pending: Mutex::new((choices, 0)) }
    }

    /// Counts one choice's tokens in; the total once it was the last.
    fn close(&self, tokens: usize) -> Option<usize> {
        let mut p = match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        p.0 = p.0.saturating_sub(1);
        p.1 += tokens;
        (p.0 == 0).then_some(p.1)
    }
}

/// Server-sent events for one choice of a streamed request, in OpenAI's chunk format; the last
/// choice to end adds a chunk that carries `usage` and then `[DONE]`.
struct Streamer {
    shared: Arc<StreamBill>,
    /// The choice's index.
    index: usize,
    rx: Option<UnboundedReceiver<Event>>,
    text: Text,
    queue: VecDeque<String>,
    started: bool,
    /// The prompt, sent first when the completion echoes it.
    echo: Option<String>,
    /// Whether each chunk carries its tokens' log probabilities.
    logprobs: bool,
    /// Whether it reached its end (its tokens are in the bill); if not when it is dropped — the
    /// caller hung up — what was generated by then is counted in.
    ended: bool,
}

impl Drop for Streamer {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Tokens sent by the engine but not yet streamed were generated all the same.
        let mut tokens = self.text.tokens.len();
        if let Some(rx) = self.rx.as_mut() {
            while let Ok(e) = rx.try_recv() {
                tokens += usize::from(matches!(e, Event::Token(..)));
            }
        }
        metrics::counter!("tessera_serve_streams_abandoned_total").increment(1);
        let Some(total) = self.shared.close(tokens) else { return };
        let shared = self.shared.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = bill(&shared.state, &shared.meta, total).await {
                        let key = shared.meta.key_id;
                        tracing::error!(key, error = %e.message, "could not bill an abandoned stream");
                    }
                });
            }
            Err(_) => {
                tracing::error!(key = shared.meta.key_id, total, "an abandoned stream went unbilled: no runtime")
            }
        }
    }
}

impl Streamer {
    fn chunk(&self, delta: Option<&str>, finish: Option<&str>, role: bool) -> String {
        self.chunk_with(delta, finish, role, &[])
    }

    /// A chunk with the log probabilities of the tokens its text completes (if asked for).
    fn chunk_with(&self, delta: Option<&str>, finish: Option<&str>, role: bool, entries: &[TokenEntry]) -> String {
        let (m, index) = (&self.shared.meta, self.index);
        let logprobs = match self.logprobs && !entries.is_empty() {
            true => logprobs_json(&self.shared.state.tokenizer, &m.kind, entries),
            false => Value::Null,
        };
        let body = match &m.kind {
            Kind::Completion { .. } => json!({
                "id": m.id, "object": "text_completion", "created": m.created, "model": m.model,
                "choices": [{"text": delta.unwrap_or(""), "index": index, "logprobs": logprobs, "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta {
                    d.insert("content".into(), json!(t));
                }
                json!({
                    "id": m.id, "object": "chat.completion.chunk", "created": m.created, "model": m.model,
                    "choices": [{"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}],
                })
            }
        };
        body.to_string()
    }

    fn usage_chunk(&self, completion_tokens: usize) -> String {
        let m = &self.shared.meta;
        let object = match m.kind {
            Kind::Completion { .. } => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let body = json!({
            "id": m.id, "object": object, "created": m.created, "model": m.model, "choices": [],
            "usage": openai::usage(m.prompt_tokens, completion_tokens),
        });
        body.to_string()
    }

    fn error_event(e: &ApiError) -> String {
        e.body().to_string()
    }

    async fn end(&mut self, finish: &str) {
        self.rx = None;
        self.queue.push_back(self.chunk(None, Some(finish), false));
        self.ended = true;
        let Some(total) = self.shared.close(self.text.tokens.len()) else { return };
        // In a task of its own, so a hang-up now cannot cancel it half-way.
        let shared = self.shared.clone();
        let billing = tokio::spawn(async move { bill(&shared.state, &shared.meta, total).await });
        match billing.await.map_err(|e| ApiError::server(e.to_string())).and_then(|r| r) {
            Ok(()) => self.queue.push_back(self.usage_chunk(total)),
            Err(e) => self.queue.push_back(Streamer::error_event(&e)),
        }
        self.queue.push_back("[DONE]".to_owned());
    }

    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some(e);
            }
            if !self.started {
                self.started = true;
                let first = match (&self.shared.meta.kind, self.echo.take()) {
                    (Kind::Chat, _) => Some(self.chunk(Some(""), None, true)),
                    (Kind::Completion { echo: true }, Some(p)) => Some(self.chunk(Some(&p), None, false)),
                    (Kind::Completion { .. }, _) => None,
                };
                if let Some(first) = first {
                    return Some(first);
                }
            }
            let rx = self.rx.as_mut()?;
            match rx.recv().await {
                Some(Event::Token(t, lp)) => match self.text.push(t, lp).and_then(|delta| {
                    let entries =
                        if self.logprobs { self.text.take_logprobs(self.text.stopped, 0)? } else { Vec::new() };
                    Ok((delta, entries))
                }) {
                    Ok((delta, entries)) => {
                        if !delta.is_empty() || !entries.is_empty() {
                            self.queue.push_back(self.chunk_with(Some(&delta), None, false, &entries));
                        }
                        if self.text.stopped {
                            self.end("stop").await;
                        }
                    }
                    Err(e) => {
                        self.rx = None;
                        self.queue.push_back(Streamer::error_event(&e));
                    }
                },
                Some(Event::Done(f)) => {
                    let rest = self.text.finish().and_then(|rest| {
                        let entries = if self.logprobs { self.text.take_logprobs(true, 0)? } else { Vec::new() };
                        Ok((rest, entries))
                    });
                    match rest {
                        Ok((rest, entries)) if !rest.is_empty() || !entries.is_empty() => {
                            self.queue.push_back(self.chunk_with(Some(&rest), None, false, &entries))
                        }
                        Ok(_) => {}
                        Err(e) => {
                            self.rx = None;
                            self.queue.push_back(Streamer::error_event(&e));
                            continue;
                        }
                    }
                    self.end(finish_reason(f, false)).await;
                }
                Some(Event::Failed(e)) => {
                    self.rx = None;
                    self.queue.push_back(Streamer::error_event(&ApiError::server(format!("generation failed: {e}"))));
                }
                None => {
                    self.rx = None;
                    self.queue.push_back(Streamer::error_event(&ApiError::server("the engine dropped the request")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(stops: &[&str]) -> Text {
        Text::new(TessTokenizer::byte_level(), stops.iter().map(|s| s.to_string()).collect())
    }

    fn feed(t: &mut Text, s: &str) -> String {
        let tok = TessTokenizer::byte_level();
        let mut out = String::new();
        for id in tok.encode(s).unwrap() {
            out.push_str(&t.push(id, None).unwrap());
            if t.stopped {
                break;
            }
        }
        out
    }

    #[test]
    fn text_is_cut_at_a_stop_and_holds_back_what_might_become_one() {
        let mut t = text(&["\nUser:"]);
        assert_eq!(feed(&mut t, "Hello\nUs"), "Hello");
        assert_eq!(feed(&mut t, "ed to"), "\nUsed to");
        assert!(!t.stopped);
        assert_eq!(feed(&mut t, " it\nUser: more"), " it");
        assert!(t.stopped);
        assert_eq!(t.finish().unwrap(), "");
        // Without a stop the tail comes out at the end; multi-byte characters arrive whole.
        let mut t = text(&["###"]);
        let mut out = feed(&mut t, "é#");
        out.push_str(&t.finish().unwrap());
        assert_eq!(out, "é#");
    }

    /// A long stop sequence costs each token time linear in its length: 6,000 tokens against
    /// a 4,096-byte stop that the text keeps almost matching (the quadratic scan this replaced
    /// took about 8 × 10⁶ byte comparisons a token here).
    #[test]
    fn long_stops_are_held_back_and_cut_exactly() {
        let stop = "a".repeat(4095) + "b";
        let mut t = text(&[&stop]);
        let body = "a".repeat(6_000);
        assert_eq!(feed(&mut t, &body), "a".repeat(6_000 - 4095));
        assert_eq!(feed(&mut t, "b tail"), "");
        assert!(t.stopped);
    }

    proptest::proptest! {
        /// The automaton holds back exactly what checking every prefix of the stop would.
        #[test]
        fn held_back_is_the_longest_proper_prefix_the_text_ends_with(
            text in "[abé]{0,12}",
            stop in "[abé]{0,6}",
        ) {
            let naive = (1..stop.len()).rev().find(|&i| text.as_bytes().ends_with(&stop.as_bytes()[..i])).unwrap_or(0);
            proptest::prop_assert_eq!(held_back(text.as_bytes(), stop.as_bytes()), naive);
        }
    }
}
