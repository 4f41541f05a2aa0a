//! The edge against the attacks it exists for, on real sockets: slow heads, idle sockets from
//! one address, floods, oversized and stalled bodies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use tessera_edge::{BodyBudget, Limits, Rate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn app(budget: Arc<BodyBudget>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/upload",
            post(|State(budget): State<Arc<BodyBudget>>, headers: HeaderMap, body: Body| async move {
                match budget.read("someone", &headers, body, 1 << 20).await {
                    Ok(held) => {
                        // Hold the bytes a while, as a handler storing them would.
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        (StatusCode::OK, held.bytes.len().to_string())
                    }
                    Err(e) => (e.status(), e.to_string()),
                }
            }),
        )
        .with_state(budget)
}

async fn start(limits: Limits, budget: Arc<BodyBudget>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tessera_edge::serve(listener, app(budget), limits, std::future::pending()));
    addr
}

/// A connection from `source` (a loopback address) to `to`.
async fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Sends `request` and reads the answer's status line (None: the connection closed first).
async fn status_of(stream: &mut TcpStream, request: &[u8]) -> Option<u16> {
    stream.write_all(request).await.ok()?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split(' ').nth(1)?.parse().ok()
}

/// Whether the server closed `stream` within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(within, stream.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

fn limits() -> Limits {
    Limits { header_timeout: Duration::from_millis(500), ..Limits::default() }
}

fn budget() -> Arc<BodyBudget> {
    Arc::new(BodyBudget::new(4 << 20, 1 << 20).waiting(Duration::from_millis(200)))
}

/// A head that never ends, and a connection that never sends one, are both closed after the
/// header timeout (under `axum::serve` they are held for as long as the peer likes).
#[tokio::test]
async fn slow_and_idle_heads_are_closed() {
    let addr = start(limits(), budget()).await;
    let mut partial = TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut partial, Duration::from_secs(5)).await, "a partial head was held open");
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await, "an idle connection was held open");
    assert!(started.elapsed() < Duration::from_secs(3), "closed only after {:?}", started.elapsed());
    // A whole request is still answered.
    let mut ok = TcpStream::connect(addr).await.unwrap();
    assert_eq!(status_of(&mut ok, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await, Some(200));
}

/// One address holding idle sockets cannot take every slot: past its cap its connections are
/// closed, and another address is still served.
#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let limits = Limits {
        max_connections: 40,
        max_connections_per_address: 8,
        header_timeout: Duration::from_secs(30),
        ..Limits::default()
    };
    let addr = start(limits, budget()).await;
    let mut held = Vec::new();
    for _ in 0..60 {
        held.push(connect_from("127.0.0.1", addr).await);
    }
    // The first 8 are kept; the rest are closed at once.
    let mut closed = 0;
    for s in held.iter_mut() {
        if closed_within(s, Duration::from_millis(100)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 52, "connections past the per-address cap are closed");
    let mut other = connect_from("127.0.0.2", addr).await;
    let started = Instant::now();
    assert_eq!(status_of(&mut other, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await, Some(200));
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A flood from one address is answered 429 past its burst; another address is not.
#[tokio::test]
async fn a_flood_from_one_address_is_limited() {
    let limits = Limits { per_address: Some(Rate { per_second: 1, burst: 5 }), ..Limits::default() };
    let addr = start(limits, budget()).await;
    let mut s = connect_from("127.0.0.1", addr).await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        codes.push(status_of(&mut s, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await);
    }
    // (A token comes back each second: a slow machine may let one more through.)
    assert!(codes[..5].iter().all(|c| *c == Some(200)), "{codes:?}");
    assert!(codes[5..].iter().filter(|c| **c == Some(429)).count() >= 2, "{codes:?}");
    let mut other = connect_from("127.0.0.3", addr).await;
    assert_eq!(status_of(&mut other, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await, Some(200));
}

/// A body declared too large is refused before it is sent; one that stalls times out; a key
/// with a body in flight cannot start another; bodies past the global budget wait, then are
/// refused as busy — and what was held is released.
#[tokio::test]
async fn bodies_are_bounded_before_they_are_read() {
    let budget = budget();
    let limits = Limits { body_timeout: Duration::from_millis(300), ..Limits::default() };
    let addr = start(limits, budget.clone()).await;
    // 1 GiB declared, nothing sent: refused at once.
    let mut big = TcpStream::connect(addr).await.unwrap();
    let head = b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1073741824\r\n\r\n";
    assert_eq!(status_of(&mut big, head).await, Some(413));
    // Half a body, then silence.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n").await.unwrap();
    assert_eq!(status_of(&mut stalled, &[1u8; 500]).await, Some(408));
    assert_eq!(budget.held(), 0, "a refused body holds nothing");
    // Two at once from one key: the second is refused while the first is held.
    let body = vec![7u8; 600 << 10];
    let send = |body: Vec<u8>| async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut request =
            format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        request.extend_from_slice(&body);
        status_of(&mut s, &request).await
    };
    let (a, b) = tokio::join!(send(body.clone()), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        send(body.clone()).await
    });
    assert_eq!((a, b), (Some(200), Some(429)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(budget.held(), 0);
}

/// The global budget: other keys' bodies wait for room and are refused as busy past the wait.
#[tokio::test]
async fn the_global_budget_refuses_past_its_wait() {
    let budget = Arc::new(BodyBudget::new(1 << 20, 1 << 20).waiting(Duration::from_millis(100)));
    let headers = |n: usize| {
        let mut h = HeaderMap::new();
        h.insert("content-length", n.into());
        h
    };
    let first = budget.read("a", &headers(800 << 10), Body::from(vec![0u8; 800 << 10]), 1 << 20).await.unwrap();
    assert_eq!(budget.held(), 800 << 10);
    let second = budget.read("b", &headers(800 << 10), Body::from(vec![0u8; 800 << 10]), 1 << 20).await;
    assert_eq!(second.err(), Some(tessera_edge::BodyError::Busy));
    drop(first);
    assert_eq!(budget.held(), 0);
    let third = budget.read("b", &headers(800 << 10), Body::from(vec![0u8; 800 << 10]), 1 << 20).await.unwrap();
    assert_eq!(third.bytes.len(), 800 << 10);
    // A body longer than it declared is refused.
    let liar = budget.read("c", &headers(10), Body::from(vec![0u8; 100]), 1 << 20).await;
    assert!(matches!(liar.err(), Some(tessera_edge::BodyError::TooLarge { .. })));
}
