//! Attested serving on a real socket with a real (small, random) model and the INSECURE
//! development attester (the vendors' evidence is checked in tessera-trust's tests): the
//! client's checks each pass on an honest server and each fail on what they guard against.

use std::sync::Arc;

use serde_json::{Value, json};
use tessera_data::TessTokenizer;
use tessera_model::{Llama, LlamaConfig, preset};
use tessera_serve::verify::{Verifier, VerifyError};
use tessera_serve::{AppState, Attested, Engine, Store};
use tessera_trust::serving::{self, ResponseSignature};
use tessera_trust::tee::Attester;
use tessera_trust::{AttestationPolicy, Identity, OpeningKey, SealingKey};

const WEIGHTS: [u8; 32] = [0xAB; 32];

struct Server {
    url: String,
    key: String,
    other_key: String,
    _dir: tempfile::TempDir,
}

/// A server attested by the stand-in; with `tls`, terminating TLS with a certificate whose key
/// is (`bind_tls`) or is not the attested one.
async fn start(tls: bool, bind_tls: bool, attested: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("serve.sqlite")).await.unwrap();
    let (key, _) = store.create_key("tester", 10_000).await.unwrap();
    let (other_key, _) = store.create_key("other", 10_000).await.unwrap();
    let tokenizer = TessTokenizer::byte_level();
    let config = LlamaConfig {
        vocab_size: tokenizer.vocab_size() as i64,
        max_position_embeddings: 64,
        ..preset("tiny").unwrap()
    };
    let engine = Engine::start(Llama::new(&config, tch::Device::Cpu, 7).unwrap(), 4, tokenizer.eos_id()).unwrap();
    let (acceptor, spki) = match tls {
        true => {
            let (a, spki) = tessera_serve::attested::tls(vec!["localhost".into()]).unwrap();
            let (_, other) = tessera_serve::attested::tls(vec!["localhost".into()]).unwrap();
            (Some(a), Some(if bind_tls { spki } else { other }))
        }
        false => (None, None),
    };
    let mut state = AppState::new(engine, tokenizer, "tiny-r3".into(), 64, store, 1 << 20)
        .with_model_blake3(WEIGHTS)
        .with_aliases(vec!["tiny".into()]);
    if attested {
        state = state.with_attestation(Arc::new(Attested::new(Attester::InsecureDev, [0xBB; 32], spki).unwrap()));
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let limits = tessera_edge::Limits { refusal: tessera_serve::edge_refusal, tls: acceptor, ..Default::default() };
    tokio::spawn(tessera_edge::serve(listener, tessera_serve::router(Arc::new(state)), limits, std::future::pending()));
    Server { url, key, other_key, _dir: dir }
}

fn dev() -> AttestationPolicy {
    AttestationPolicy { allow_insecure_dev: true, ..Default::default() }
}

fn chat(stream: bool) -> Value {
    json!({"model": "tiny-r3", "messages": [{"role": "user", "content": "a secret prompt"}], "max_tokens": 8,
           "temperature": 0, "stream": stream})
}

async fn connect(s: &Server) -> Result<Verifier, VerifyError> {
    Verifier::connect(&s.url, &s.key, &dev(), Some(hex::encode(WEIGHTS)), None, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_server_passes_every_check_plain_and_sealed_whole_and_streamed() {
    let s = start(false, false, true).await;
    let v = connect(&s).await.unwrap();
    assert!(v.verified.insecure && !v.tls());
    assert_eq!(v.attestation.model, "tiny-r3");
    let mut texts = Vec::new();
    for sealed in [false, true] {
        for stream in [false, true] {
            let c = v.complete("/v1/chat/completions", &chat(stream), sealed).await.unwrap();
            let text: String = if stream {
                c.events
                    .iter()
                    .filter(|e| *e != "[DONE]")
                    .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                    .filter_map(|e| e["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
                    .collect()
            } else {
                let body: Value = serde_json::from_str(&c.events[0]).unwrap();
                body["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
            };
            texts.push(text);
        }
    }
    // Greedy: sealing and streaming change nothing of what is generated.
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    let c = v.complete("/v1/completions", &json!({"model": "tiny-r3", "prompt": "x", "max_tokens": 4}), true).await;
    assert!(c.is_ok(), "{c:?}");
    // The model list says the model is verifiable and names its alias.
    let models: Value = reqwest::Client::new()
        .get(format!("{}/v1/models", s.url))
        .bearer_auth(&s.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["verifiable"], true);
    assert_eq!(models["data"][0]["aliases"], json!(["tiny"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_reports_foreign_weights_and_insecure_evidence_are_refused() {
    let s = start(false, false, true).await;
    // A report for someone else's nonce, presented to this client: a replay.
    let old: serving::ServerAttestation =
        reqwest::get(format!("{}/v1/attestation/report?nonce={}", s.url, "11".repeat(32)))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let expected = serving::Expected { nonce: [0x22; 32], ..Default::default() };
    assert!(old.verify(&dev(), &expected, 0).unwrap_err().to_string().contains("nonce"));
    let e = Verifier::connect(&s.url, &s.key, &dev(), Some(hex::encode([1u8; 32])), None, 0).await.err().unwrap();
    assert!(e.to_string().contains("weights"), "{e}");
    let e = Verifier::connect(&s.url, &s.key, &dev(), None, Some(hex::encode([1u8; 32])), 0).await.err().unwrap();
    assert!(e.to_string().contains("binary"), "{e}");
    let strict = AttestationPolicy { sev_snp_measurements: vec!["00".repeat(48)], ..Default::default() };
    let e = Verifier::connect(&s.url, &s.key, &strict, None, None, 0).await.err().unwrap();
    assert!(e.to_string().contains("INSECURE"), "{e}");
    // A missing or short nonce is a clear 400.
    let r = reqwest::get(format!("{}/v1/attestation/report?nonce=abc", s.url)).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = reqwest::get(format!("{}/v1/attestation/report", s.url)).await.unwrap();
    assert_eq!(r.status(), 400);
}

/// The raw exchange: (request bytes, response bytes, id, signature header).
async fn raw(s: &Server, body: &Value) -> (Vec<u8>, Vec<u8>, String, Option<String>) {
    let wire = serde_json::to_vec(body).unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth(&s.key)
        .header("content-type", "application/json")
        .body(wire.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    let (id, sig) = (h(serving::RESPONSE_ID_HEADER).unwrap(), h(serving::SIGNATURE_HEADER));
    (wire, r.bytes().await.unwrap().to_vec(), id, sig)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_bytes_and_other_keys_fail_the_signature() {
    let s = start(false, false, true).await;
    let v = connect(&s).await.unwrap();
    let (signing, _) = v.attestation.keys().unwrap();
    let (wire, body, id, header) = raw(&s, &chat(false)).await;
    let kept = v.signature(&id).await.unwrap();
    assert_eq!(Some(&kept.signature), header.as_ref());
    kept.verify(&signing, &id, &wire, &body).unwrap();
    for i in [0, body.len() / 2, body.len() - 1] {
        let mut altered = body.clone();
        altered[i] ^= 0x20;
        assert!(kept.verify(&signing, &id, &wire, &altered).unwrap_err().to_string().contains("altered"));
    }
    let mut other_request = wire.clone();
    other_request[2] ^= 0x20;
    assert!(kept.verify(&signing, &id, &other_request, &body).is_err());
    // Signed by another key (a proxy re-signing its own answer) is not the attested key's.
    let impostor = Identity::generate().unwrap();
    let forged = ResponseSignature::sign(&impostor, &id, &blake3::hash(&wire), &blake3::hash(&body));
    assert!(forged.verify(&signing, &id, &wire, &body).is_err());
    assert!(kept.verify(&impostor.public(), &id, &wire, &body).is_err());
    // A stream: the signature covers every event through [DONE]; one changed byte breaks it.
    let (wire, body, id, header) = raw(&s, &chat(true)).await;
    assert!(header.is_none(), "a stream's signature cannot be a header");
    let (signed, signature, events) = serving::split_stream(&body).unwrap();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let kept = v.signature(&id).await.unwrap();
    assert_eq!(kept.signature, signature);
    kept.verify(&signing, &id, &wire, &signed).unwrap();
    let mut altered = signed.clone();
    altered[10] ^= 0x01;
    assert!(kept.verify(&signing, &id, &wire, &altered).is_err());
    // Another key's completion's signature is not served to this key.
    let r = reqwest::Client::new()
        .get(format!("{}/v1/signature/{id}", s.url))
        .bearer_auth(&s.other_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_requests_carry_no_plaintext_and_bad_seals_are_refused() {
    let s = start(false, false, true).await;
    let v = connect(&s).await.unwrap();
    let (_, sealing) = v.attestation.keys().unwrap();
    let client = OpeningKey::generate().unwrap();
    let plain = serde_json::to_vec(&chat(false)).unwrap();
    let wire = serving::seal_request(&sealing, client.public(), &plain).unwrap();
    assert!(!wire.windows(6).any(|w| w == b"secret"));
    let send = |wire: Vec<u8>, seal_to: String| {
        let s = &s;
        async move {
            let r = reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", s.url))
                .bearer_auth(&s.key)
                .header(serving::SEAL_TO_HEADER, seal_to)
                .body(wire)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
        }
    };
    let (status, body) = send(wire.clone(), hex::encode(client.public().0)).await;
    assert_eq!(status, 200);
    assert!(!body.windows(15).any(|w| w == b"chat.completion"), "the response is sealed");
    let opened: Value = serde_json::from_slice(&serving::open_response(&client, &wire, 0, &body).unwrap()).unwrap();
    assert_eq!(opened["object"], "chat.completion");
    // Redirected to a gateway's key: the request does not open.
    let gateway = OpeningKey::generate().unwrap();
    let (status, body) = send(wire.clone(), hex::encode(gateway.public().0)).await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("unsealable"));
    // Sealed to another key than the attested one, or not sealed at all.
    let stranger = SealingKey(OpeningKey::generate().unwrap().public().0);
    let (status, _) =
        send(serving::seal_request(&stranger, client.public(), &plain).unwrap(), hex::encode(client.public().0)).await;
    assert_eq!(status, 400);
    let (status, _) = send(plain.clone(), "not hex".into()).await;
    assert_eq!(status, 400);
    // A refusal after opening is sealed too: it may echo what the request said.
    let bad = serving::seal_request(&sealing, client.public(), br#"{"model":"nope","messages":[]}"#).unwrap();
    let (status, body) = send(bad.clone(), hex::encode(client.public().0)).await;
    assert!(status >= 400);
    let opened: Value = serde_json::from_slice(&serving::open_response(&client, &bad, 0, &body).unwrap()).unwrap();
    assert!(opened["error"]["message"].is_string(), "{opened}");
    // An unattested server refuses sealed requests and has no report.
    let plain_server = start(false, false, false).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", plain_server.url))
        .bearer_auth(&plain_server.key)
        .header(serving::SEAL_TO_HEADER, hex::encode(client.public().0))
        .body(wire)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r =
        reqwest::get(format!("{}/v1/attestation/report?nonce={}", plain_server.url, "00".repeat(32))).await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_requests_refuse_aliases() {
    let s = start(false, false, true).await;
    let body = json!({"model": "tiny", "prompt": "x", "max_tokens": 2});
    let post = |strict: bool| {
        let (s, body) = (&s, body.clone());
        async move {
            let mut r =
                reqwest::Client::new().post(format!("{}/v1/completions", s.url)).bearer_auth(&s.key).json(&body);
            if strict {
                r = r.header(serving::STRICT_HEADER, "1");
            }
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, ok) = post(false).await;
    assert_eq!(status, 200);
    assert_eq!(ok["model"], "tiny-r3", "the answer names the model, not the alias");
    let (status, refused) = post(true).await;
    assert_eq!(status, 400);
    assert_eq!(refused["error"]["code"], "model_alias_refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_terminates_in_the_server_and_a_certificate_the_report_does_not_bind_is_refused() {
    let s = start(true, true, true).await;
    let v = connect(&s).await.unwrap();
    assert!(v.tls());
    v.complete("/v1/chat/completions", &chat(true), true).await.unwrap();
    // Something else holds the certificate (a proxy with its own key): refused before any
    // API key is sent.
    let s = start(true, false, true).await;
    let e = connect(&s).await.err().unwrap();
    assert!(e.to_string().contains("TLS"), "{e}");
}

/// A `tracing` writer that keeps everything logged.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Prompts and completions are neither logged (at any level) nor stored: after plain, sealed,
/// streamed and refused requests, neither the log nor the database file holds a byte of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_and_completions_are_never_logged_or_stored() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).finish();
    // Global: the engine thread and the runtime's workers log here too (no other test in this
    // binary installs a subscriber).
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let s = start(false, false, true).await;
    let v = connect(&s).await.unwrap();
    let secret = "zebra-quartz-7781";
    let body = |stream: bool| json!({"model": "tiny-r3", "messages": [{"role": "user", "content": secret}], "max_tokens": 8, "temperature": 0, "stream": stream});
    let mut completions = Vec::new();
    for sealed in [false, true] {
        for stream in [false, true] {
            completions.push(v.complete("/v1/chat/completions", &body(stream), sealed).await.unwrap());
        }
    }
    // Refused after parsing: a bad parameter next to the prompt.
    let bad = json!({"model": "tiny-r3", "messages": [{"role": "user", "content": secret}], "temperature": 9});
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.url))
        .bearer_auth(&s.key)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let whole: Value = serde_json::from_str(&completions[0].events[0]).unwrap();
    let answer = whole["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let logged = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(!logged.is_empty(), "the capture works (INSECURE attestation warnings at least)");
    assert!(!logged.contains(secret), "the prompt was logged");
    let db = std::fs::read(s._dir.path().join("serve.sqlite")).unwrap();
    let wal = std::fs::read(s._dir.path().join("serve.sqlite-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the prompt was stored");
        if answer.len() >= 6 {
            assert!(!bytes.windows(answer.len()).any(|w| w == answer.as_bytes()), "the completion was stored");
        }
    }
}
