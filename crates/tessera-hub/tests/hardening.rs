//! The hub against strangers: requests are authenticated from their headers before any body
//! byte is read, signatures are bound to one hub and one run, and a key's request rate is
//! limited.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use common::*;

/// Sends a request head declaring a body of `length` bytes, then only `sent` of them, and
/// returns the status answered (None: no answer within 5 s, as when the hub waits for the rest).
fn answer_before_body(url: &str, head: &str, length: usize, sent: usize) -> Option<u16> {
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{head}host: {addr}\r\ncontent-length: {length}\r\n\r\n").unwrap();
    s.write_all(&vec![0u8; sent]).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n]).split(' ').nth(1)?.parse().ok()
}

/// A submission's body is not read until its signature, key and nonce are checked: an
/// unsigned request, a key that is not registered, and a validator post without its token
/// are all refused while most of their body is still unsent (before, the hub buffered up to
/// a whole submission first).
#[test]
fn requests_are_refused_before_their_body_is_read() {
    let Some(b) = backend("sqlite") else { return };
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let limit = server.hub.max_submission_bytes();
    let started = Instant::now();
    assert_eq!(answer_before_body(&url, "POST /v1/submissions HTTP/1.1\r\n", limit - 1, limit / 2), Some(401));
    assert_eq!(
        answer_before_body(&url, "POST /v1/validator/aggregate/0 HTTP/1.1\r\n", limit - 1, limit / 2),
        Some(401)
    );
    assert_eq!(answer_before_body(&url, "POST /v1/validator/verdict HTTP/1.1\r\n", 60 << 20, 4096), Some(401));
    // Signed, but by a key the hub does not know.
    let stranger = Client::with_key(&url, Arc::new(tessera_trust::Identity::generate().unwrap()));
    let body = vec![0u8; limit - 1];
    let signed = stranger.signature("/v1/submissions", &body);
    let head: String = std::iter::once("POST /v1/submissions HTTP/1.1\r\n".to_owned())
        .chain(signed.iter().map(|(k, v)| format!("{k}: {v}\r\n")))
        .collect();
    assert_eq!(answer_before_body(&url, &head, limit - 1, limit / 2), Some(401));
    assert!(started.elapsed() < Duration::from_secs(4), "refusals took {:?}", started.elapsed());
    // A registered key whose body is not the one it signed.
    let a = Client::register(&url, "a");
    let run = info(&url);
    let base = run.checkpoint.clone();
    let signed_body = message(&run, run.spec.codec, 0, &base, &delta(1.0));
    let other_body = message(&run, run.spec.codec, 0, &base, &delta(2.0));
    let r = post_signed(&a.hub, "/v1/submissions", &a.signature("/v1/submissions", &signed_body), other_body);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: ApiError = r.json().unwrap();
    assert!(e.message.contains("not the one signed"), "{}", e.message);
    // Nothing was accepted, and the right body still is.
    a.submit(&run, 0, &base, &delta(1.0)).unwrap();
    server.stop();
}

/// A registration and an assignment request signed for one hub are refused by another
/// (before, the signature covered neither the hub nor the run).
#[test]
fn requests_signed_for_another_hub_or_run_are_refused() {
    let (Some(b1), Some(b2)) = (backend("sqlite"), backend("sqlite")) else { return };
    let (one, two) = (Server::start(&b1, spec(2)), Server::start(&b2, spec(2)));
    let a = Client::register(&one.url, "a");
    let on_two = client(&two.url);
    let body = serde_json::to_vec(&serde_json::json!({"name": "a"})).unwrap();
    let r = post_signed(&on_two, "/v1/contributors", &a.signature("/v1/contributors", &body), body);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: ApiError = r.json().unwrap();
    assert!(e.message.contains("signature"), "{}", e.message);
    let r = post_signed(&on_two, "/v1/assignments?wait_ms=0", &a.signature("/v1/assignments?wait_ms=0", b""), vec![]);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The same key, signing for the second hub, registers there.
    let again = Client::register_key(&two.url, "a", a.key.clone());
    assert_eq!(again.key.public(), a.key.public());
    one.stop();
    two.stop();
}

/// A key that makes requests faster than its rate is refused with 429 `rate_limited` past its
/// burst; another key is not.
#[test]
fn a_key_past_its_rate_is_limited() {
    let Some(b) = backend("sqlite") else { return };
    let config = HubConfig {
        validator_token: Some(VALIDATOR.into()),
        key_rate: Some(tessera_edge::Rate { per_second: 1, burst: 4 }),
        ..HubConfig::default()
    };
    let server = Server::start_with(&b, spec(2), initial(), config);
    let a = Client::register(&server.url, "a");
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = a.post("/v1/assignments?wait_ms=0", Vec::new());
        codes.push(r.status().as_u16());
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.json::<ApiError>().unwrap().code, ErrorCode::RateLimited);
        }
    }
    // Registration was the first of the burst; a token comes back each second, so a slow
    // machine may see one more pass.
    assert_eq!(codes[..3], [200, 200, 200], "{codes:?}");
    assert!(codes[3..].iter().filter(|&&c| c == 429).count() >= 2, "{codes:?}");
    let c = Client::register(&server.url, "c");
    assert_eq!(c.post("/v1/assignments?wait_ms=0", Vec::new()).status(), StatusCode::OK);
    server.stop();
}
