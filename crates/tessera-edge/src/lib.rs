//! What every listening Tessera process puts between the internet and its handlers.
//!
//! [`serve`] runs an axum [`Router`] on a listener the way `axum::serve` does, plus what a
//! server facing strangers needs and `axum::serve` leaves out (it starts hyper without a timer,
//! so hyper's header-read timeout is silently off):
//!
//! - a **connection cap**, total and per address: at the total cap, new connections wait in
//!   the kernel's backlog; past the per-address cap they are closed at once, so one address
//!   cannot hold every slot;
//! - a **header read timeout** (a connection that has not sent a whole request head within it,
//!   idle keep-alive ones included, is closed) and a **body read timeout** between body frames;
//! - a **rate limit per address** (`governor`'s GCRA, through `tower_governor`);
//! - HTTP/2 with a bounded number of streams per connection and keep-alive pings.
//!
//! [`BodyBudget`] bounds the request-body bytes held at once, in all and per key, and reads a
//! body only after its caller has authenticated the request from its headers. [`KeyedLimits`]
//! rate-limits authenticated keys.
//!
//! Cost: one task and one socket per connection (at most [`Limits::max_connections`]); one
//! entry per address with an open connection; one rate-limit cell (16 bytes and its key) per
//! address or key seen recently ([`KeyedLimits::forget_idle`] drops idle ones); body bytes held
//! at most [`BodyBudget`]'s capacity.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, Response, StatusCode, header};
use bytes::{Bytes, BytesMut};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt as _;

/// How a process's listener treats its peers. [`Limits::default`] suits a public hub or server.
#[derive(Clone)]
pub struct Limits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections open at once from one IP address; more are closed at once.
    pub max_connections_per_address: usize,
    /// A connection must send a whole request head within this (from when it opens, or from
    /// its previous response); else it is closed.
    pub header_timeout: Duration,
    /// A request body must send each frame within this of the last; else its read fails.
    pub body_timeout: Duration,
    /// Requests per second from one address, and the burst allowed; `None`: unlimited.
    pub per_address: Option<Rate>,
    /// Most request-head bytes a connection may buffer (HTTP/1) or send (HTTP/2).
    pub max_header_bytes: usize,
    /// Streams an HTTP/2 connection may have open at once.
    pub max_streams: u32,
    /// Formats a refusal made here (rate limit, …) in the caller's error dialect.
    pub refusal: fn(StatusCode, String) -> Response<Body>,
    /// Terminate TLS here (rustls), so nothing between the client and this process sees
    /// plaintext; the handshake must finish within `header_timeout`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A steady rate with a burst: `per_second` requests a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst)?;
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 512,
            max_connections_per_address: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            per_address: Some(Rate { per_second: 100, burst: 400 }),
            max_header_bytes: 64 << 10,
            max_streams: 64,
            refusal: plain_refusal,
            tls: None,
        }
    }
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("max_connections", &self.max_connections)
            .field("max_connections_per_address", &self.max_connections_per_address)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("per_address", &self.per_address)
            .finish_non_exhaustive()
    }
}

/// A refusal as plain text.
pub fn plain_refusal(status: StatusCode, message: String) -> Response<Body> {
    let mut r = Response::new(Body::from(message));
    *r.status_mut() = status;
    r
}

/// Connections open per address; an entry goes when its last connection closes.
#[derive(Default)]
struct Addresses(Mutex<HashMap<IpAddr, usize>>);

/// One open connection's place in [`Addresses`].
struct AddressSlot {
    addresses: Arc<Addresses>,
    ip: IpAddr,
}

impl Addresses {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot { addresses: self.clone(), ip })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.addresses.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves, then lets open
/// requests finish (for at most 10 s). Handlers see each request's peer as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = match limits.per_address.and_then(Rate::quota) {
        Some(quota) => {
            let mut config = tower_governor::governor::GovernorConfigBuilder::default();
            config.period(quota.replenish_interval()).burst_size(quota.burst_size().get());
            let config = config.finish().ok_or_else(|| std::io::Error::other("a zero rate limit"))?;
            let limiter = config.limiter().clone();
            // Addresses not seen for a while are forgotten, so the table holds recent ones only.
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(60));
                loop {
                    every.tick().await;
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            });
            let refusal = limits.refusal;
            router.layer(tower_governor::GovernorLayer::new(config).error_handler(move |e| {
                let (status, message) = match e {
                    tower_governor::GovernorError::TooManyRequests { wait_time, .. } => {
                        metrics::counter!("tessera_edge_refused_total", "why" => "rate").increment(1);
                        (
                            StatusCode::TOO_MANY_REQUESTS,
                            format!("too many requests from this address: try again in {wait_time} s"),
                        )
                    }
                    other => (StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
                };
                let mut r = refusal(status, message);
                if status == StatusCode::TOO_MANY_REQUESTS {
                    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
                }
                r
            }))
        }
        None => router,
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let body_timeout = tower_http::timeout::RequestBodyTimeoutLayer::new(limits.body_timeout);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let addresses = Arc::new(Addresses::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A slot first: at the cap, connections wait in the backlog rather than being served.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(std::io::Error::other)?,
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: the
                    // listener itself is fine.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(address) = addresses.take(peer.ip(), limits.max_connections_per_address) else {
            metrics::counter!("tessera_edge_refused_total", "why" => "address_connections").increment(1);
            tracing::debug!(%peer, "too many connections from one address: closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = tower::ServiceBuilder::new()
            .layer(body_timeout.clone())
            .map_request(move |mut request: Request<_>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            })
            .service(router.clone());
        let service = hyper_util::service::TowerToHyperService::new(service.map_err(|e| match e {}));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_timeout;
        let tls = limits.tls.clone();
        metrics::gauge!("tessera_edge_connections").increment(1.0);
        tokio::spawn(async move {
            // The auto builder reads a first byte to tell HTTP/1 from HTTP/2 before hyper's
            // header timeout starts: a connection that sends nothing is closed here instead.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(header_timeout, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                metrics::gauge!("tessera_edge_connections").decrement(1.0);
                return drop((slot, address));
            }
            let served = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err("the TLS handshake took longer than the header timeout".into()),
                },
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            metrics::gauge!("tessera_edge_connections").decrement(1.0);
            drop((slot, address));
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still open 10 s after shutdown began: dropped");
    }
    Ok(())
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("the body is larger than the {limit} bytes this endpoint takes")]
    TooLarge { limit: usize },
    #[error("a body of more than {0} bytes needs a Content-Length header")]
    LengthRequired(usize),
    #[error("the server is reading as many bodies as it holds at once: try again shortly")]
    Busy,
    #[error("this key already has a body in flight: send one at a time")]
    KeyBusy,
    #[error("reading the body took too long")]
    TimedOut,
    #[error("reading the body failed: {0}")]
    Read(String),
}

impl BodyError {
    /// The HTTP status this refusal is sent with.
    pub fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::LengthRequired(_) => StatusCode::LENGTH_REQUIRED,
            BodyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::KeyBusy => StatusCode::TOO_MANY_REQUESTS,
            BodyError::TimedOut => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// Bodies up to this size may come without a Content-Length (they reserve their limit).
const UNDECLARED: usize = 1 << 20;
/// The budget is counted in KiB (a semaphore takes at most `u32::MAX` permits at once).
const UNIT: u64 = 1024;

/// A bound on the request-body bytes held at once: in all, and per key. A body is read only
/// once its size (from Content-Length) is reserved; the reservation lasts as long as the
/// [`HeldBody`] does, so a handler that keeps the bytes while it works keeps them counted.
pub struct BodyBudget {
    global: Arc<Semaphore>,
    capacity: u64,
    per_key: u64,
    keys: Arc<Mutex<HashMap<String, u64>>>,
    /// How long a body waits for room before it is refused as [`BodyError::Busy`].
    wait: Duration,
    /// The slowest average rate a body may arrive at (bytes/s), after a grace of 30 s.
    min_rate: u64,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget").field("capacity", &self.capacity).field("per_key", &self.per_key).finish()
    }
}

/// A body read within a [`BodyBudget`]; its bytes stay counted until this is dropped.
pub struct HeldBody {
    pub bytes: Bytes,
    _global: OwnedSemaphorePermit,
    _key: KeyShare,
}

struct KeyShare {
    keys: Arc<Mutex<HashMap<String, u64>>>,
    key: String,
    bytes: u64,
}

impl Drop for KeyShare {
    fn drop(&mut self) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = keys.get_mut(&self.key) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl BodyBudget {
    /// At most `capacity` bytes of bodies held at once, `per_key` of them by one key.
    pub fn new(capacity: u64, per_key: u64) -> BodyBudget {
        let units = capacity.div_ceil(UNIT).max(1);
        BodyBudget {
            global: Arc::new(Semaphore::new(usize::try_from(units).unwrap_or(Semaphore::MAX_PERMITS))),
            capacity: units * UNIT,
            per_key: per_key.max(1),
            keys: Arc::default(),
            wait: Duration::from_secs(30),
            min_rate: 64 << 10,
        }
    }

    /// Wait at most this long for room before refusing a body as busy.
    pub fn waiting(mut self, wait: Duration) -> BodyBudget {
        self.wait = wait;
        self
    }

    /// Bytes reserved now (for gauges and tests).
    pub fn held(&self) -> u64 {
        self.capacity - self.global.available_permits() as u64 * UNIT
    }

    /// Reads `body` (at most `limit` bytes) for `key`, an authenticated caller, after
    /// reserving room for it: a body that cannot fit is refused before any of it is read.
    pub async fn read(&self, key: &str, headers: &HeaderMap, body: Body, limit: usize) -> Result<HeldBody, BodyError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .map(|v| {
                v.to_str().ok().and_then(|s| s.parse::<u64>().ok()).ok_or(BodyError::Read("bad Content-Length".into()))
            })
            .transpose()?;
        let reserve = match declared {
            Some(n) if n > limit as u64 => return Err(BodyError::TooLarge { limit }),
            Some(n) => n,
            None if limit > UNDECLARED => return Err(BodyError::LengthRequired(UNDECLARED)),
            None => limit as u64,
        };
        if reserve > self.capacity {
            return Err(BodyError::TooLarge { limit: usize::try_from(self.capacity).unwrap_or(usize::MAX) });
        }
        let share = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let held = keys.entry(key.to_owned()).or_insert(0);
            if *held > 0 && *held + reserve > self.per_key {
                metrics::counter!("tessera_edge_refused_total", "why" => "key_bytes").increment(1);
                return Err(BodyError::KeyBusy);
            }
            *held += reserve;
            KeyShare { keys: self.keys.clone(), key: key.to_owned(), bytes: reserve }
        };
        let units = u32::try_from(reserve.div_ceil(UNIT)).map_err(|_| BodyError::TooLarge { limit })?;
        let permit = match tokio::time::timeout(self.wait, self.global.clone().acquire_many_owned(units)).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) | Err(_) => {
                metrics::counter!("tessera_edge_refused_total", "why" => "bytes_in_flight").increment(1);
                return Err(BodyError::Busy);
            }
        };
        let deadline = Duration::from_secs(30) + Duration::from_secs(reserve / self.min_rate);
        let bytes = tokio::time::timeout(deadline, collect(body, reserve as usize))
            .await
            .map_err(|_| BodyError::TimedOut)??;
        Ok(HeldBody { bytes, _global: permit, _key: share })
    }
}

/// A body's bytes, refusing more than `limit`.
async fn collect(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut out = BytesMut::with_capacity(limit.min(UNDECLARED));
    while let Some(frame) = stream.frame().await {
        let frame = frame.map_err(|e| {
            let text = e.to_string();
            match e.into_inner().downcast::<tower_http::timeout::TimeoutError>() {
                Ok(_) => BodyError::TimedOut,
                Err(_) => BodyError::Read(text),
            }
        })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > limit {
                return Err(BodyError::TooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out.freeze())
}

/// A rate limit per authenticated key (`governor`'s GCRA), for keys a handler has verified.
pub struct KeyedLimits<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
}

impl<K: Hash + Eq + Clone> KeyedLimits<K> {
    /// `None` when `rate` is zero (no limit).
    pub fn new(rate: Rate) -> Option<KeyedLimits<K>> {
        Some(KeyedLimits { limiter: RateLimiter::keyed(rate.quota()?) })
    }

    /// Whether `key` may make one more request now; `Err` holds the seconds until it may.
    pub fn check(&self, key: &K) -> Result<(), u64> {
        self.limiter.check_key(key).map_err(|not_until| {
            let clock = governor::clock::DefaultClock::default();
            not_until.wait_time_from(governor::clock::Clock::now(&clock)).as_secs().max(1)
        })
    }

    /// Forgets keys idle long enough to be back at a full burst.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// The peer of a request served by [`serve`].
pub fn peer<B>(request: &Request<B>) -> Option<SocketAddr> {
    request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}
