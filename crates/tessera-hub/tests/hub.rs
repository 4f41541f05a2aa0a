//! The hub over real HTTP, on SQLite and a local store, and, where the test command provides
//! them, on PostgreSQL (`TESSERA_TEST_POSTGRES`) and an S3-compatible server (`TESSERA_TEST_S3`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::Response;
use tessera_client::{ClientError, HubClient};
use tessera_hub::{Db, Hub, HubConfig, NewRun, Store};
use tessera_protocol::api::{
    Assignment, ContestSpec, DataSource, DataSpec, EvalSeed, HubStatus, InnerSpec, Leaderboard, OuterSpec, Receipt,
    RunInfo, ScoreReport, ScoringJob, SubmissionScore,
};
use tessera_protocol::{
    Aggregation, ApiError, Codec, ErrorCode, MessageView, PseudoGradient, RunSpec, TensorSpec, decode_weights,
    weights_hash,
};

fn spec(quorum: u32) -> RunSpec {
    RunSpec {
        name: "test".into(),
        model: serde_json::json!({"model_type": "llama"}),
        tensors: vec![
            TensorSpec { name: "b".into(), shape: vec![8] },
            TensorSpec { name: "w".into(), shape: vec![4, 8] },
        ],
        data: DataSpec {
            name: "embedded".into(),
            fingerprint: "f".into(),
            source: DataSource::Embedded { seed: 1, train_chars: 100, val_chars: 10 },
            loss_floor: None,
        },
        inner: InnerSpec {
            batch_size: 2,
            seq_len: 8,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            grad_clip: 1.0,
            weight_decay: 0.1,
        },
        inner_steps: 5,
        rounds: 3,
        outer: OuterSpec { lr: 1.0, momentum: 0.0, nesterov: true },
        codec: Codec::F32,
        feedback_decay: 1.0,
        broadcast_codec: Codec::F32,
        quorum,
        round_deadline_ms: 60_000,
        max_staleness: 1,
        staleness_decay: 0.5,
        seed: 7,
        aggregation: tessera_protocol::Aggregation::Mean,
        contest: None,
        trust: None,
        phases: Vec::new(),
        fragments: 0,
        until_loss: None,
        economy: None,
    }
}

#[test]
fn a_spec_without_feedback_decay_means_plain_error_feedback() {
    let mut json = serde_json::to_value(spec(1)).unwrap();
    json.as_object_mut().unwrap().remove("feedback_decay");
    let back: RunSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back.feedback_decay, 1.0);
    for bad in [0.0, -0.5, 1.5, f32::NAN] {
        assert!(RunSpec { feedback_decay: bad, ..spec(1) }.validate().is_err(), "{bad} accepted");
    }
    assert!(RunSpec { feedback_decay: 0.95, ..spec(1) }.validate().is_ok());
}

fn initial() -> Vec<Vec<f32>> {
    vec![(0..8).map(|i| i as f32 * 0.5).collect(), (0..32).map(|i| (i as f32 * 0.37).sin()).collect()]
}

/// Where a test hub keeps its state: SQLite + a directory, or the external services.
struct Backend {
    db: String,
    store: String,
    /// The hub's key file: a restarted hub serves the run with the key it was created with.
    key: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn backend(kind: &str) -> Option<Backend> {
    let dir = tempfile::tempdir().unwrap();
    let unique = format!(
        "t{}",
        hex::encode(blake3::hash(format!("{:?}{:?}", std::time::SystemTime::now(), dir.path()).as_bytes()).as_bytes())
            [..16]
            .to_owned()
    );
    let required = std::env::var("TESSERA_TEST_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
    let db = match kind {
        "postgres" => match std::env::var("TESSERA_TEST_POSTGRES") {
            Ok(admin) => {
                sqlx::any::install_default_drivers();
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let pool = sqlx::AnyPool::connect(&admin).await.expect("connect to TESSERA_TEST_POSTGRES");
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {unique}")))
                        .execute(&pool)
                        .await
                        .unwrap();
                });
                let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_owned();
                format!("{base}/{unique}")
            }
            Err(_) if required => panic!("TESSERA_TEST_POSTGRES is not set"),
            Err(_) => {
                eprintln!("skipped: TESSERA_TEST_POSTGRES is not set (scripts/test provides it)");
                return None;
            }
        },
        _ => format!("sqlite://{}/hub.db", dir.path().display()),
    };
    let store = match kind {
        "s3" => match std::env::var("TESSERA_TEST_S3") {
            Ok(bucket) => format!("{bucket}/{unique}"),
            Err(_) if required => panic!("TESSERA_TEST_S3 is not set"),
            Err(_) => {
                eprintln!("skipped: TESSERA_TEST_S3 is not set (scripts/test provides it)");
                return None;
            }
        },
        _ => dir.path().join("store").display().to_string(),
    };
    let key = dir.path().join("hub-key.pem");
    Some(Backend { db, store, key, _dir: dir })
}

struct Server {
    url: String,
    hub: Arc<Hub>,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    fn start(b: &Backend, spec: RunSpec) -> Server {
        Server::start_with(
            b,
            spec,
            initial(),
            HubConfig { validator_token: Some(VALIDATOR.into()), ..HubConfig::default() },
        )
    }

    fn start_with(b: &Backend, spec: RunSpec, weights: Vec<Vec<f32>>, config: HubConfig) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (hub, listener) = rt.block_on(async {
            let db = Db::connect(&b.db).await.unwrap();
            let store = Store::open(&b.store).unwrap();
            let key = tessera_trust::Identity::load_or_create(&b.key).unwrap();
            let hub = Hub::open(db, store, Some(NewRun { spec, weights }), key, config).await.unwrap();
            (hub, tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap())
        });
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = hub.clone();
        let task = rt.spawn(async move {
            tessera_hub::serve(h, listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server { url, hub, rt, stop: Some(tx), task: Some(task) }
    }

    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self.rt.block_on(task);
        }
    }
}

/// A contributor: a client signing with its key, pinning the hub's.
struct Client {
    hub: HubClient,
    id: u64,
    key: Arc<tessera_trust::Identity>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A client of `url` with no retries: every refusal and failure shows.
fn client(url: &str) -> HubClient {
    HubClient::new(url).unwrap().with_patience(Duration::ZERO)
}

/// A refusal's HTTP status and body; anything else fails the test.
fn refused(e: ClientError) -> (StatusCode, ApiError) {
    match e {
        ClientError::Refused { status, error } => (StatusCode::from_u16(status).unwrap(), error),
        other => panic!("not a refusal: {other}"),
    }
}

/// The status an answer came with: `ok` if it succeeded.
fn status<T>(r: Result<T, ClientError>, ok: StatusCode) -> StatusCode {
    r.map_or_else(|e| refused(e).0, |_| ok)
}

/// A POST of `path` with exactly these headers (a signature to replay or to tamper with).
fn post_signed(hub: &HubClient, path: &str, headers: &[(&'static str, String)], body: Vec<u8>) -> Response {
    let mut b = hub.request(reqwest::Method::POST, path);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(body).send().unwrap()
}

impl Client {
    fn register(url: &str, name: &str) -> Client {
        Client::register_key(url, name, Arc::new(tessera_trust::Identity::generate().unwrap()))
    }

    fn register_key(url: &str, name: &str, key: Arc<tessera_trust::Identity>) -> Client {
        let hub = client(url);
        let hub_key = tessera_trust::PublicKey::parse(&hub.run().unwrap().hub_key).unwrap();
        let hub = hub.signed_by(key.clone()).pinning(hub_key);
        let reg = hub.register(name).unwrap();
        assert_eq!(reg.public_key, key.public().hex());
        Client { hub, id: reg.contributor_id, key }
    }

    /// A client of `url` that signs with `key`, registered or not.
    fn with_key(url: &str, key: Arc<tessera_trust::Identity>) -> Client {
        Client { hub: client(url).signed_by(key.clone()), id: u64::MAX, key }
    }

    /// The signature headers of a POST of `path` with `body`, now.
    fn signature(&self, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        self.hub.signature("POST", path, body, now_ms()).unwrap()
    }

    fn post(&self, path: &str, body: Vec<u8>) -> Response {
        post_signed(&self.hub, path, &self.signature(path, &body), body)
    }

    fn assignment(&self, wait_ms: u64) -> Assignment {
        self.hub.assignment(Duration::from_millis(wait_ms)).unwrap()
    }

    fn submit_raw(&self, body: Vec<u8>) -> Result<Receipt, (StatusCode, ApiError)> {
        self.hub.submit(Arc::new(body), None).map_err(refused)
    }

    fn submit(
        &self,
        info: &RunInfo,
        round: u64,
        base: &str,
        delta: &[Vec<f32>],
    ) -> Result<Receipt, (StatusCode, ApiError)> {
        self.submit_raw(message(info, info.spec.codec, round, base, delta))
    }
}

fn message(info: &RunInfo, codec: Codec, round: u64, base: &str, delta: &[Vec<f32>]) -> Vec<u8> {
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&info.run_id, &mut run_id).unwrap();
    let mut base_hash = [0u8; 32];
    hex::decode_to_slice(base, &mut base_hash).unwrap();
    let tensors = info.spec.tensors.iter().zip(delta).map(|(t, d)| (t.name.as_str(), t.shape.as_slice(), d.as_slice()));
    PseudoGradient::build(codec, run_id, round, base_hash, tensors).unwrap().to_bytes()
}

fn info(url: &str) -> RunInfo {
    client(url).run().unwrap()
}

fn status_of(url: &str) -> HubStatus {
    client(url).status().unwrap()
}

/// A published checkpoint's weights.
fn weights(url: &str, hash: &str, tensors: &[TensorSpec]) -> Vec<Vec<f32>> {
    decode_weights(&client(url).checkpoint(hash, None).unwrap(), tensors).unwrap()
}

fn leaderboard(url: &str) -> Leaderboard {
    client(url).leaderboard().unwrap()
}

fn delta(scale: f32) -> Vec<Vec<f32>> {
    vec![(0..8).map(|i| scale * (i as f32 - 3.0)).collect(), (0..32).map(|i| scale * (i as f32 * 0.11).cos()).collect()]
}

/// A full round: quorum closes it, the new weights are θ − mean Δ (outer lr 1, no momentum),
/// the published update reproduces the checkpoint bit for bit, and range requests work.
fn lifecycle(kind: &str) {
    let Some(b) = backend(kind) else { return };
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    assert_eq!(run.round, 0);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    assert_ne!(a.id, c.id);
    let asg = a.assignment(0);
    assert_eq!((asg.round, asg.base_checkpoint.as_str(), asg.finished), (0, run.checkpoint.as_str(), false));
    let ra = a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    assert_eq!((ra.round, ra.staleness, ra.weight), (0, 0, 1.0));
    // Already submitted for the open round: the assignment waits, then repeats the round.
    assert_eq!(a.assignment(200).round, 0);
    c.submit(&run, 0, &run.checkpoint, &delta(-3.0)).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    assert_eq!(a.assignment(0).base_checkpoint, after.checkpoint);

    let bytes = client(&url).checkpoint(&after.checkpoint, None).unwrap();
    assert_eq!(hex::encode(weights_hash(&bytes)), after.checkpoint);
    let theta = decode_weights(&bytes, &run.spec.tensors).unwrap();
    let (d1, d2, t0) = (delta(1.0), delta(-3.0), initial());
    for i in 0..2 {
        for j in 0..t0[i].len() {
            let want = t0[i][j] - (d1[i][j] + d2[i][j]) / 2.0;
            assert!((theta[i][j] - want).abs() < 1e-6, "tensor {i}[{j}]: {} vs {want}", theta[i][j]);
        }
    }
    // The update into round 1 turns the round-0 weights into exactly the round-1 checkpoint.
    let update = client(&url).update(1).unwrap();
    let view = MessageView::parse(&update).unwrap();
    assert_eq!((view.round, hex::encode(view.base_checkpoint)), (1, run.checkpoint.clone()));
    let rebuilt = view.apply_to(&t0).unwrap();
    let rebuilt_bytes = tessera_protocol::encode_weights(&run.spec.tensors, &rebuilt).unwrap();
    assert_eq!(rebuilt_bytes, bytes);

    let http = client(&url);
    let path = format!("/v1/checkpoints/{}", after.checkpoint);
    let r = http.get(&path).header("range", "bytes=10-19").send().unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], format!("bytes 10-19/{}", bytes.len()).as_str());
    assert_eq!(r.bytes().unwrap().as_ref(), &bytes[10..20]);
    let r = http.get(&path).header("range", format!("bytes={}-", bytes.len() - 5)).send().unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), &bytes[bytes.len() - 5..]);
    let r = http.get(&path).header("range", format!("bytes={}-", bytes.len() + 5)).send().unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(http.get("/v1/updates/2").send().unwrap().status(), StatusCode::NOT_FOUND);

    let st = status_of(&url);
    assert_eq!(st.history[0].accepted, 2);
    assert_eq!(st.history[0].closed_by.as_deref(), Some("quorum"));
    assert_eq!(st.contributors.len(), 2);
    server.stop();
}

#[test]
fn lifecycle_sqlite() {
    lifecycle("sqlite");
}

#[test]
fn lifecycle_postgres() {
    lifecycle("postgres");
}

#[test]
fn lifecycle_s3() {
    lifecycle("s3");
}

#[test]
fn bad_submissions_get_typed_refusals() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let base = run.checkpoint.clone();

    let mut garbage = message(&run, Codec::F32, 0, &base, &delta(1.0));
    garbage[100] ^= 1;
    let (s, e) = a.submit_raw(garbage).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage));
    let (_, e) = a.submit_raw(b"hello".to_vec()).unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedMessage);
    let (s, e) = a.submit_raw(vec![0u8; server.hub.max_submission_bytes() + 1]).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge));

    let (s, e) = a.submit_raw(message(&run, Codec::Bf16, 0, &base, &delta(1.0))).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::CodecMismatch));
    let (_, e) = a.submit(&run, 0, &"ab".repeat(32), &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::BaseMismatch);
    let (_, e) = a.submit(&run, 1, &base, &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::FutureRound);
    let mut other = run.clone();
    other.run_id = "00".repeat(16);
    let (_, e) = a.submit(&other, 0, &base, &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongRun);
    let mut reshaped = run.clone();
    reshaped.spec.tensors[1].shape = vec![8, 4];
    let (_, e) = a.submit(&reshaped, 0, &base, &delta(1.0)).unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);

    // Well-formed, correctly checksummed, but a NaN inside: refused on arrival, never aggregated.
    let mut poisoned = PseudoGradient::from_bytes(&message(&run, Codec::F32, 0, &base, &delta(1.0))).unwrap();
    poisoned.tensors[1].encoded[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let (s, e) = a.submit_raw(poisoned.to_bytes()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage));
    assert!(e.message.contains("non-finite"), "{}", e.message);

    a.submit(&run, 0, &base, &delta(1.0)).unwrap();
    let (s, e) = a.submit(&run, 0, &base, &delta(2.0)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Duplicate));

    // An unregistered key; a request signed by one key but claiming another; no signature; a
    // replayed request (same nonce); a request from a clock far off.
    let stranger = Client::with_key(&url, Arc::new(tessera_trust::Identity::generate().unwrap()));
    let (s, e) = stranger.submit(&run, 0, &base, &delta(1.0)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    assert!(e.message.contains("not registered"), "{}", e.message);
    let body = message(&run, Codec::F32, 0, &base, &delta(3.0));
    let mut forged = stranger.signature("/v1/submissions", &body);
    forged[0].1 = a.key.public().hex();
    let r = post_signed(&a.hub, "/v1/submissions", &forged, body.clone());
    let e: ApiError = r.json().unwrap();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("signature"), "{}", e.message);
    let r = client(&url).request(reqwest::Method::POST, "/v1/assignments").send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: ApiError = r.json().unwrap();
    assert!(e.message.contains("x-tessera-key"), "{}", e.message);
    let x = Client::register(&url, "y");
    let once = x.signature("/v1/assignments?wait_ms=0", b"");
    let r = post_signed(&x.hub, "/v1/assignments?wait_ms=0", &once, Vec::new());
    assert_eq!(r.status(), StatusCode::OK);
    let r = post_signed(&x.hub, "/v1/assignments?wait_ms=0", &once, Vec::new());
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<ApiError>().unwrap().code, ErrorCode::ReplayedRequest);
    let stale = x.hub.signature("POST", "/v1/assignments", b"", now_ms() - 3_600_000).unwrap();
    let r = post_signed(&x.hub, "/v1/assignments", &stale, Vec::new());
    let e: ApiError = r.json().unwrap();
    assert!(e.code == ErrorCode::Unauthorized && e.message.contains("clock"), "{e:?}");

    // Nothing refused was counted: the round still waits for its second submission.
    let st = status_of(&url);
    assert_eq!((st.round, st.history[0].accepted), (0, 0));
    assert!(st.contributors.iter().find(|c| c.id == a.id).unwrap().rejected >= 8);
    assert_eq!(server.rt.block_on(server.hub.info()).round, 0);
    server.stop();
}

/// A finite but huge pseudo-gradient is refused on arrival: summed with another, or alone
/// through the outer step, it would overflow to infinity, and a round whose update cannot be
/// encoded would never publish (nor could the hub restart past it).
#[test]
fn huge_finite_values_are_refused_and_cannot_stop_the_run() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    for scale in [5e37f32, 1e20] {
        let (s, e) = a.submit(&run, 0, &run.checkpoint, &delta(scale)).unwrap_err();
        assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage), "{scale}");
        assert!(e.message.contains("beyond"), "{}", e.message);
    }
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    c.submit(&run, 0, &run.checkpoint, &delta(2.0)).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    assert!(theta.iter().flatten().all(|v| v.is_finite()));
    server.stop();
}

/// The inner loss can end a phase early, so it is signed: it travels in the signed path, the
/// unsigned header of protocol 1 is refused, and a loss changed after signing breaks the
/// signature.
#[test]
fn the_inner_loss_is_covered_by_the_signature() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, spec(2));
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let body = message(&run, run.spec.codec, 0, &run.checkpoint, &delta(1.0));
    let mut h = a.signature("/v1/submissions", &body);
    h.push(("x-tessera-inner-loss", "0.01".into()));
    let r = post_signed(&a.hub, "/v1/submissions", &h, body.clone());
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<ApiError>().unwrap().message.contains("signature"));
    let h = a.signature("/v1/submissions?inner_loss=0.7", &body);
    let r = post_signed(&a.hub, "/v1/submissions?inner_loss=0.01", &h, body.clone());
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "a changed loss must break the signature");
    let r = post_signed(&a.hub, "/v1/submissions?inner_loss=0.7", &h, body);
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let body = message(&run, run.spec.codec, 0, &run.checkpoint, &delta(2.0));
    let r = c.post("/v1/submissions?inner_loss=0.5", body);
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let st = status_of(&url);
    assert!(st.history[0].mean_inner_loss.is_some_and(|l| (l - 0.6).abs() < 1e-12), "{:?}", st.history[0]);
    server.stop();
}

#[test]
fn late_submissions_are_down_weighted_then_refused() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, RunSpec { rounds: 5, ..spec(1) });
    let url = server.url.clone();
    let run0 = info(&url);
    let (a, slow, slower) =
        (Client::register(&url, "a"), Client::register(&url, "slow"), Client::register(&url, "slower"));
    a.submit(&run0, 0, &run0.checkpoint, &delta(1.0)).unwrap();
    let run1 = info(&url);
    assert_eq!(run1.round, 1);
    // One round stale: accepted at half weight, and alone it makes round 1's whole update.
    let r = slow.submit(&run0, 0, &run0.checkpoint, &delta(2.0)).unwrap();
    assert_eq!((r.round, r.base_round, r.staleness, r.weight), (1, 0, 1, 0.5));
    let run2 = info(&url);
    assert_eq!(run2.round, 2);
    let (s, e) = slower.submit(&run0, 0, &run0.checkpoint, &delta(3.0)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Stale));
    assert!(e.message.contains("2 rounds stale"), "{}", e.message);
    let t1 = weights(&url, &run1.checkpoint, &run0.spec.tensors);
    let t2 = weights(&url, &run2.checkpoint, &run0.spec.tensors);
    // A weighted mean of one submission is that submission, whatever its weight.
    let d = delta(2.0);
    assert!((t2[1][5] - (t1[1][5] - d[1][5])).abs() < 1e-6);
    server.stop();
}

#[test]
fn a_round_closes_at_its_deadline_without_the_missing() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, RunSpec { round_deadline_ms: 300, ..spec(3) });
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let _vanished = Client::register(&url, "vanished");
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    let next = a.assignment(5_000);
    assert_eq!(next.round, 1, "the deadline should have closed round 0");
    let st = status_of(&url);
    assert_eq!(st.history[0].closed_by.as_deref(), Some("deadline"));
    assert_eq!(st.history[0].accepted, 1);
    server.stop();
}

#[test]
fn a_restarted_hub_keeps_accepted_submissions_and_keys() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, RunSpec { broadcast_codec: Codec::Int8 { block: 16 }, ..spec(2) });
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    let c = Client::register(&url, "c");
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).unwrap();
    server.stop();

    // The same database and store; the spec passed now is ignored in favour of the stored run.
    let server = Server::start(&b, spec(99));
    let url2 = server.url.clone();
    let resumed = info(&url2);
    assert_eq!((resumed.run_id.as_str(), resumed.spec.quorum), (run.run_id.as_str(), 2));
    assert_eq!(status_of(&url2).history[0].accepted, 0, "not closed yet");
    let c = Client::register_key(&url2, "c", c.key.clone());
    // A key registers once: registering again gets the same id.
    assert_eq!(Client::register_key(&url2, "c again", c.key.clone()).id, c.id);
    c.submit(&run, 0, &run.checkpoint, &delta(-1.0)).unwrap();
    let after = info(&url2);
    assert_eq!(after.round, 1);
    let st = status_of(&url2);
    assert_eq!(st.history[0].accepted, 2, "the submission from before the restart counts");
    // With a lossy broadcast codec the update still reproduces the checkpoint exactly.
    let update = client(&url2).update(1).unwrap();
    let view = MessageView::parse(&update).unwrap();
    assert_eq!(view.codec, Codec::Int8 { block: 16 });
    let rebuilt = view.apply_to(&initial()).unwrap();
    let bytes = tessera_protocol::encode_weights(&run.spec.tensors, &rebuilt).unwrap();
    assert_eq!(hex::encode(weights_hash(&bytes)), after.checkpoint);
    drop(a);
    server.stop();
}

#[test]
fn the_run_finishes_after_its_rounds() {
    let b = backend("sqlite").unwrap();
    let server = Server::start(&b, RunSpec { rounds: 2, ..spec(1) });
    let url = server.url.clone();
    let a = Client::register(&url, "a");
    for round in 0..2 {
        let asg = a.assignment(0);
        assert_eq!((asg.round, asg.finished), (round, false));
        a.submit(&info(&url), round, &asg.base_checkpoint, &delta(0.1)).unwrap();
    }
    let asg = a.assignment(0);
    assert!(asg.finished);
    let run = info(&url);
    assert!(run.finished);
    // Every round's evaluation seed is public now; there is no round 2 to ask about.
    let seed: EvalSeed = client(&url).eval_seed(1).unwrap();
    assert!(seed.seed.is_some());
    assert_eq!(status(client(&url).eval_seed(2), StatusCode::OK), StatusCode::NOT_FOUND);
    let (s, e) = a.submit(&run, 1, &status_of(&url).history[1].base_checkpoint, &delta(0.1)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::RunFinished));
    // Prometheus counts rounds and submissions by outcome (other tests in this process too).
    let metrics = client(&url).metrics().unwrap();
    for needle in [
        "tessera_hub_rounds_published_total",
        "outcome=\"accepted\"",
        "outcome=\"run_finished\"",
        "tessera_hub_aggregation_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from {metrics}");
    }
    std::thread::sleep(Duration::from_millis(10));
    server.stop();
}

const VALIDATOR: &str = "validator-secret";

fn validator_get(url: &str, path: &str, token: Option<&str>) -> Response {
    let mut r = client(url).get(path);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().unwrap()
}

fn post_scores(url: &str, report: &ScoreReport) -> StatusCode {
    status(client(url).with_validator_token(VALIDATOR).post_scores(report), StatusCode::NO_CONTENT)
}

/// A scored round end to end over HTTP: the seed commitment, its reveal when submissions close,
/// contributors told to retry while scoring, the validator's job and blobs behind its token,
/// scores checked against the job, exact rewards, ratings and the leaderboard — which survive a
/// restart — and a replayed message refused with a recorded reason.
fn scored_rounds(kind: &str) {
    let Some(b) = backend(kind) else { return };
    let contest = ContestSpec { reward_units: 1000, promote_top: 2, promote_at: Some(1), ..ContestSpec::default() };
    let spec = RunSpec { rounds: 3, aggregation: Aggregation::DEFAULT, contest: Some(contest), ..spec(3) };
    let server = Server::start(&b, spec.clone());
    let url = server.url.clone();
    let run = info(&url);
    let clients = [Client::register(&url, "a"), Client::register(&url, "b"), Client::register(&url, "c")];
    let late = Client::register(&url, "late");
    let commitment = clients[0].assignment(0).eval_commitment.expect("a scored run commits to its seed");
    let seed: EvalSeed = client(&url).eval_seed(0).unwrap();
    assert_eq!((seed.commitment.as_str(), seed.seed), (commitment.as_str(), None), "revealed before the round closed");
    assert_eq!(validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).status(), StatusCode::NO_CONTENT);

    let bodies: Vec<Vec<u8>> =
        [0.1f32, 0.2, -0.3].iter().map(|&s| message(&run, run.spec.codec, 0, &run.checkpoint, &delta(s))).collect();
    for (c, body) in clients.iter().zip(&bodies) {
        c.submit_raw(body.clone()).unwrap();
    }
    // Quorum closed the submissions; the round waits for scores.
    assert_eq!(info(&url).round, 0);
    let (s, e) = late.submit(&run, 0, &run.checkpoint, &delta(0.05)).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Busy));
    let seed: EvalSeed = client(&url).eval_seed(0).unwrap();
    let mut seed_bytes = [0u8; 32];
    hex::decode_to_slice(seed.seed.expect("revealed once submissions closed"), &mut seed_bytes).unwrap();
    let mut commitment_bytes = [0u8; 32];
    hex::decode_to_slice(&commitment, &mut commitment_bytes).unwrap();
    assert!(tessera_contest::commit::verify(&commitment_bytes, &seed_bytes));

    assert_eq!(validator_get(&url, "/v1/validator/job", None).status(), StatusCode::UNAUTHORIZED);
    assert_eq!(validator_get(&url, "/v1/validator/job", Some("guess")).status(), StatusCode::UNAUTHORIZED);
    let job: ScoringJob = validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).json().unwrap();
    assert_eq!(job.round, 0);
    let order: Vec<u64> = job.submissions.iter().map(|s| s.contributor).collect();
    assert_eq!(order, clients.iter().map(|c| c.id).collect::<Vec<_>>());
    let blob = validator_get(&url, &format!("/v1/validator/submissions/{}", job.submissions[1].blob), Some(VALIDATOR));
    assert_eq!(blob.bytes().unwrap().to_vec(), bodies[1]);
    let blob = validator_get(&url, &format!("/v1/validator/submissions/{}", job.submissions[1].blob), None);
    assert_eq!(blob.status(), StatusCode::UNAUTHORIZED);

    let score = |contributor, score| SubmissionScore { contributor, score, data_fit: Some(0.01), copy_of: None };
    let mut report = ScoreReport {
        round: 0,
        scores: vec![score(clients[1].id, 0.01), score(clients[0].id, 0.02), score(clients[2].id, -0.5)],
        held_out_loss: Some(2.5),
    };
    assert_eq!(post_scores(&url, &report), StatusCode::CONFLICT, "scores out of the job's order");
    report.scores.swap(0, 1);
    report.scores[2].copy_of = Some(2);
    assert_eq!(post_scores(&url, &report), StatusCode::BAD_REQUEST, "a copy of itself");
    report.scores[2].copy_of = None;
    assert_eq!(post_scores(&url, &report), StatusCode::NO_CONTENT);
    assert_eq!(post_scores(&url, &report), StatusCode::CONFLICT, "the round is no longer scoring");
    let after = info(&url);
    assert_eq!(after.round, 1);
    // Only the two positive scores were aggregated: centred clipping of two inputs stays between them.
    let theta = weights(&url, &after.checkpoint, &spec.tensors);
    let (lo, hi) = (initial()[0][7] - 0.2 * 4.0, initial()[0][7] - 0.1 * 4.0);
    assert!((lo - 1e-5..=hi + 1e-5).contains(&theta[0][7]), "{} not in [{lo}, {hi}]", theta[0][7]);

    let board: Leaderboard = leaderboard(&url);
    let played: Vec<_> = board.rows.iter().filter(|r| r.id != late.id).collect();
    assert_eq!(played.iter().map(|r| r.id).collect::<Vec<_>>(), clients.iter().map(|c| c.id).collect::<Vec<_>>());
    let rewards: Vec<u64> = played.iter().map(|r| r.rewards).collect();
    // Shares ∝ score²: 0.02² : 0.01² = 4 : 1 of 1000 units; the negative score earns nothing.
    assert_eq!((rewards[0], rewards[1], rewards[2], rewards.iter().sum::<u64>()), (800, 200, 0, 1000));
    // Round 0 was the phase boundary: the top two qualified, and the run goes on.
    assert!(board.promoted && board.promote_at == 1);
    let qualified: Vec<u64> = board.rows.iter().filter(|r| r.qualified).map(|r| r.id).collect();
    assert_eq!(qualified, vec![clients[0].id, clients[1].id]);

    // Round 1: someone else's round-0 bytes (staleness 1 would be accepted) are a replay, refused
    // and recorded; its own bytes again are its accepted submission (what a retry after a lost
    // answer sends); being told to retry while scoring was not a refusal.
    let (s, e) = clients[1].submit_raw(bodies[0].clone()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Replay));
    let (s, e) = clients[0].submit_raw(bodies[0].clone()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Duplicate));
    let st = status_of(&url);
    let rejected = |id: u64| st.contributors.iter().find(|c| c.id == id).map(|c| c.rejected);
    assert_eq!((rejected(clients[1].id), rejected(late.id)), (Some(1), Some(0)));
    let board: Leaderboard = leaderboard(&url);
    server.stop();

    // Ratings, rewards and the leaderboard come back after a restart.
    let server = Server::start(&b, spec.clone());
    let board2: Leaderboard = leaderboard(&server.url);
    assert_eq!(board2.rows, board.rows);
    server.stop();
}

#[test]
fn scored_rounds_sqlite() {
    scored_rounds("sqlite");
}

#[test]
fn scored_rounds_postgres() {
    scored_rounds("postgres");
}

/// A scored round whose validator never reports is aggregated unscored after its timeout:
/// staleness weights, no rewards, ratings unchanged.
#[test]
fn scores_that_never_come() {
    let b = backend("sqlite").unwrap();
    let contest = ContestSpec { score_timeout_ms: 400, ..ContestSpec::default() };
    let server = Server::start(&b, RunSpec { contest: Some(contest), ..spec(1) });
    let url = server.url.clone();
    let run = info(&url);
    let a = Client::register(&url, "a");
    a.submit(&run, 0, &run.checkpoint, &delta(0.1)).unwrap();
    assert_eq!(info(&url).round, 0, "waiting for scores");
    server.rt.block_on(server.hub.tick()).unwrap();
    assert_eq!(info(&url).round, 0, "not yet timed out");
    std::thread::sleep(Duration::from_millis(500));
    server.rt.block_on(server.hub.tick()).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    assert!((theta[0][7] - (initial()[0][7] - 0.4)).abs() < 1e-6, "the unscored mean was applied");
    let board: Leaderboard = leaderboard(&url);
    assert_eq!((board.rows[0].rewards, board.rows[0].rounds), (0, 0));
    server.stop();
}

/// The validator's side of a sealed run, done by hand with the trust crate (the real validator
/// needs libtorch to score; its tests drive it end to end).
struct TestValidator {
    opening: tessera_trust::OpeningKey,
    signing: tessera_trust::Identity,
    attestation: tessera_trust::ValidatorAttestation,
    ledger: tessera_trust::ledger::Ledger,
}

impl TestValidator {
    fn new() -> TestValidator {
        let opening = tessera_trust::OpeningKey::generate().unwrap();
        let signing = tessera_trust::Identity::generate().unwrap();
        let data = tessera_trust::report_data(&opening.public().0, &signing.public().0);
        let attestation = tessera_trust::ValidatorAttestation {
            sealing_key: hex::encode(opening.public().0),
            signing_key: signing.public().hex(),
            evidence: tessera_trust::Evidence::insecure_dev(&data, "test"),
        };
        TestValidator { opening, signing, attestation, ledger: tessera_trust::ledger::Ledger::default() }
    }

    fn sync(&mut self, url: &str) {
        let bytes = client(url).ledger(self.ledger.len()).unwrap();
        self.ledger.extend(&bytes).unwrap();
    }

    fn register(&mut self, url: &str, attestation: &tessera_trust::ValidatorAttestation) -> StatusCode {
        self.sync(url);
        let mut next = self.ledger.clone();
        let body = tessera_trust::ledger::Body::Validator { attestation: self.attestation.clone() };
        let entry = next.append(0, now_ms(), true, body, &self.signing).unwrap();
        let r = client(url).with_validator_token(VALIDATOR).post_attestation(attestation, &hex::encode(entry));
        if r.is_ok() {
            self.ledger = next;
        }
        status(r, StatusCode::CREATED)
    }
}

fn seal(v: &TestValidator, c: &Client, run: &RunInfo, plain: &[u8]) -> Vec<u8> {
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&run.run_id, &mut run_id).unwrap();
    let mut base = [0u8; 32];
    hex::decode_to_slice(&run.checkpoint, &mut base).unwrap();
    let header = tessera_trust::SealedHeader {
        run_id,
        base_round: 0,
        base_checkpoint: base,
        contributor: c.key.public(),
        recipient: [0; 32],
    };
    v.opening.public().seal(header, plain).unwrap()
}

/// Every file under `dir` and the database file: does any contain `needle`?
fn anywhere(dir: &std::path::Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).unwrap().flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            anywhere(&p, needle)
        } else {
            std::fs::read(&p).unwrap_or_default().windows(needle.len()).any(|w| w == needle)
        }
    })
}

/// A sealed run over HTTP: nothing is accepted before a validator attests; an attestation that
/// does not bind its keys is refused; the hub stores only ciphertext (no submission's plaintext
/// is anywhere in its database or store); another contributor can neither claim nor open one;
/// the validator's verdict must pay exactly what its signed receipts say; and the published
/// ledger verifies, with inclusion proofs under the validator's root.
#[test]
fn sealed_rounds() {
    use tessera_protocol::api::{Settled, Verdict};
    use tessera_trust::ledger::{Body, Ledger, verify_proof};

    let b = backend("sqlite").unwrap();
    let trust = tessera_protocol::api::AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    let contest = ContestSpec { reward_units: 1000, ..ContestSpec::default() };
    let sealed = RunSpec { rounds: 2, contest: Some(contest), trust: Some(trust), ..spec(2) };
    let server = Server::start(&b, sealed);
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let (plain_a, plain_c) = (
        message(&run, Codec::F32, 0, &run.checkpoint, &delta(0.5)),
        message(&run, Codec::F32, 0, &run.checkpoint, &delta(-0.25)),
    );

    // No validator yet: nothing can be sealed to one.
    assert_eq!(status(client(&url).validator(), StatusCode::OK), StatusCode::SERVICE_UNAVAILABLE);
    let mut v = TestValidator::new();
    let (_, e) = a.submit_raw(seal(&v, &a, &run, &plain_a)).unwrap_err();
    assert_eq!(e.code, ErrorCode::NoValidator);
    // An attestation whose report data commits to other keys is refused.
    let mut lying = v.attestation.clone();
    lying.sealing_key = hex::encode(tessera_trust::OpeningKey::generate().unwrap().public().0);
    assert_eq!(v.register(&url, &lying), StatusCode::UNAUTHORIZED);
    let honest = v.attestation.clone();
    assert_eq!(v.register(&url, &honest), StatusCode::CREATED);
    let shown = client(&url).pinning(tessera_trust::PublicKey::parse(&run.hub_key).unwrap()).validator().unwrap();
    assert!(shown.insecure, "the development attester is shown as insecure");

    // Plaintext is refused; someone else's envelope cannot be claimed.
    let (_, e) = a.submit_raw(plain_a.clone()).unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedMessage);
    let sealed_a = seal(&v, &a, &run, &plain_a);
    let (s, e) = c.submit_raw(sealed_a.clone()).unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    // …and rewriting its header to claim it makes it unreadable.
    let mut claimed = sealed_a.clone();
    claimed[62..94].copy_from_slice(&c.key.public().0);
    assert!(v.opening.open(&claimed).is_err());
    // Sealed to a key that is not the validator's: refused by name.
    let other = TestValidator::new();
    let (_, e) = a.submit_raw(seal(&other, &a, &run, &plain_a)).unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongValidator);

    a.submit_raw(sealed_a.clone()).unwrap();
    let (_, e) = a.submit_raw(sealed_a.clone()).unwrap_err();
    assert_eq!(e.code, ErrorCode::Duplicate, "its own envelope again: already accepted");
    c.submit_raw(seal(&v, &c, &run, &plain_c)).unwrap();

    // Contributors cannot fetch submissions: that takes the validator's token.
    let job_blob = blake3::hash(&sealed_a).to_hex().to_string();
    let r = validator_get(&url, &format!("/v1/validator/submissions/{job_blob}"), None);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // What the hub publishes is signed with the key its run info names: the checkpoint (over its
    // BLAKE3) and the round's announcement.
    let hub_key = tessera_trust::PublicKey::parse(&run.hub_key).unwrap();
    let r = client(&url).get(&format!("/v1/checkpoints/{}", run.checkpoint)).send().unwrap();
    let sig = r.headers()["x-tessera-hub-signature"].to_str().unwrap().to_owned();
    let bytes = r.bytes().unwrap();
    hub_key.verify_hex(&tessera_trust::identity::publication_message(&bytes), &sig).unwrap();
    let r = client(&url).get("/v1/rounds/0").send().unwrap();
    let sig = r.headers()["x-tessera-hub-signature"].to_str().unwrap().to_owned();
    let bytes = r.bytes().unwrap();
    hub_key.verify_hex(&tessera_trust::identity::publication_message(&bytes), &sig).unwrap();
    let round0: tessera_protocol::api::RoundAnnouncement = serde_json::from_slice(&bytes).unwrap();
    assert_eq!((round0.base_checkpoint.as_str(), round0.eval_commitment.is_some()), (run.checkpoint.as_str(), true));
    assert_eq!(status(client(&url).pinning(hub_key).announcement(7), StatusCode::OK), StatusCode::NOT_FOUND);

    // Only ciphertext at rest: no submission's tensor bytes in the database or the store.
    let needle_a = &plain_a[plain_a.len() - 32 - 64..plain_a.len() - 32];
    let needle_c = &plain_c[plain_c.len() - 32 - 64..plain_c.len() - 32];
    for needle in [needle_a, needle_c] {
        assert!(!anywhere(b._dir.path(), needle), "plaintext found at rest");
    }

    // The validator's round: open, settle, aggregate, sign.
    let job: ScoringJob = validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).json().unwrap();
    assert_eq!(job.submissions.len(), 2);
    let mut deltas = Vec::new();
    for s in &job.submissions {
        let env = validator_get(&url, &format!("/v1/validator/submissions/{}", s.blob), Some(VALIDATOR));
        let (header, msg) = v.opening.open(&env.bytes().unwrap()).unwrap();
        assert_eq!(header.contributor.hex(), s.contributor_key);
        deltas.push(MessageView::parse(&msg).unwrap().apply_to(&[vec![0.0; 8], vec![0.0; 32]]).unwrap());
    }
    let mean: Vec<Vec<f32>> =
        (0..2).map(|t| deltas[0][t].iter().zip(&deltas[1][t]).map(|(x, y)| 0.5 * (x + y)).collect()).collect();
    let agg = message(&run, Codec::F32, 0, &run.checkpoint, &mean);
    let validator = client(&url).with_validator_token(VALIDATOR);
    assert_eq!(status(validator.post_aggregate(0, agg), StatusCode::NO_CONTENT), StatusCode::NO_CONTENT);
    let rewards = [700u64, 300];
    v.sync(&url);
    let entries = |signer: &tessera_trust::Identity, pay: [u64; 2], ledger: &Ledger| {
        let mut next = ledger.clone();
        for (s, units) in job.submissions.iter().zip(pay) {
            let body = Body::Receipt {
                contributor: s.contributor_key.clone(),
                submission: s.blob.clone(),
                score: 0.01,
                data_fit: None,
                flag: String::new(),
                units,
            };
            next.append(0, now_ms(), true, body, signer).unwrap();
        }
        next.append(0, now_ms(), true, Body::Emission { units: pay.iter().sum() }, signer).unwrap();
        let root = Body::Root { size: next.len(), root: next.root() };
        next.append(0, now_ms(), true, root, signer).unwrap();
        (ledger.len(), hex::encode(next.bytes_from(ledger.len())))
    };
    let verdict = |(from, ledger): (u64, String)| Verdict {
        report: ScoreReport {
            round: 0,
            scores: job
                .submissions
                .iter()
                .map(|s| SubmissionScore { contributor: s.contributor, score: 0.01, data_fit: None, copy_of: None })
                .collect(),
            held_out_loss: None,
        },
        settled: rewards
            .iter()
            .map(|&r| Settled { weight: 1.0, reward: r, effective: Some(0.01), flag: None })
            .collect(),
        ledger_from: from,
        ledger,
    };
    // Receipts paying other amounts than the verdict, or signed by anyone but the validator.
    let wrong = verdict(entries(&v.signing, [300, 700], &v.ledger));
    assert_eq!(status(validator.post_verdict(&wrong), StatusCode::NO_CONTENT), StatusCode::BAD_REQUEST);
    let rogue = tessera_trust::Identity::generate().unwrap();
    let body = Body::Receipt {
        contributor: job.submissions[0].contributor_key.clone(),
        submission: job.submissions[0].blob.clone(),
        score: 9.0,
        data_fit: None,
        flag: String::new(),
        units: 1000,
    };
    let raw = tessera_trust::ledger::encode_entry(v.ledger.len(), 0, now_ms(), &v.ledger.head(), true, &body, &rogue)
        .unwrap();
    let forged = verdict((v.ledger.len(), hex::encode(raw)));
    let (_, e) = refused(validator.post_verdict(&forged).unwrap_err());
    assert!(e.message.contains("unknown") || e.message.contains("may not sign"), "{}", e.message);
    let good = verdict(entries(&v.signing, rewards, &v.ledger));
    let r = validator.post_verdict(&good);
    assert!(r.is_ok(), "{r:?}");

    // Published: θ − mean, rewards on the leaderboard, and a ledger anyone can verify.
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    assert!((theta[0][7] - (initial()[0][7] - mean[0][7])).abs() < 1e-6);
    let board: Leaderboard = leaderboard(&url);
    assert_eq!(board.rows.iter().map(|r| r.rewards).sum::<u64>(), 1000);
    let ledger = Ledger::from_bytes(&client(&url).ledger(0).unwrap()).unwrap();
    assert_eq!(ledger.units.get(&a.key.public().hex()), Some(&700));
    assert_eq!(ledger.hub(), Some(tessera_trust::PublicKey::parse(&run.hub_key).unwrap()));
    for seq in 0..ledger.len() - 1 {
        let proof: tessera_trust::ledger::Proof =
            serde_json::from_value(client(&url).ledger_proof(seq).unwrap()).unwrap();
        assert_eq!(verify_proof(&proof, &v.signing.public()).unwrap().seq, seq);
    }
    for needle in [needle_a, needle_c] {
        assert!(!anywhere(b._dir.path(), needle), "plaintext found at rest after publishing");
    }
    server.stop();

    // The ledger survives a restart, and so does the validator sealed to.
    let server = Server::start(&b, RunSpec { trust: None, ..spec(2) });
    let resumed = client(&server.url).pinning(hub_key).validator().unwrap();
    assert_eq!(resumed.attestation["signing_key"], v.signing.public().hex());
    assert_eq!(Ledger::from_bytes(&client(&server.url).ledger(0).unwrap()).unwrap().len(), ledger.len());
    server.stop();
}

/// A layer-sharded run: each contributor submits only its fragment (its layers plus the shared
/// tensors); the whole model is refused; each tensor is averaged over the submissions that
/// carry it.
#[test]
fn layer_sharded_rounds_average_each_tensor_over_its_trainers() {
    let b = backend("sqlite").unwrap();
    let tensors = vec![
        TensorSpec { name: "model.layers.0.w".into(), shape: vec![4] },
        TensorSpec { name: "model.layers.1.w".into(), shape: vec![4] },
        TensorSpec { name: "model.norm.weight".into(), shape: vec![4] },
    ];
    let sharded = RunSpec { tensors, fragments: 2, ..spec(2) };
    sharded.validate().unwrap();
    assert!(RunSpec { fragments: 3, ..sharded.clone() }.validate().unwrap_err().contains("fragments"));
    let server = Server::start_with(&b, sharded, vec![vec![1.0; 4]; 3], HubConfig::default());
    let url = server.url.clone();
    let run = info(&url);
    let (a, c) = (Client::register(&url, "a"), Client::register(&url, "c"));
    let (fa, fc) = (a.assignment(0).fragment, c.assignment(0).fragment);
    assert_eq!((fa, fc), (Some(0), Some(1)));
    let partial = |keep: &[usize], values: &[f32]| {
        let mut run_id = [0u8; 16];
        hex::decode_to_slice(&run.run_id, &mut run_id).unwrap();
        let mut base = [0u8; 32];
        hex::decode_to_slice(&run.checkpoint, &mut base).unwrap();
        let deltas: Vec<Vec<f32>> = values.iter().map(|&v| vec![v; 4]).collect();
        let t = keep
            .iter()
            .zip(&deltas)
            .map(|(&i, d)| (run.spec.tensors[i].name.as_str(), run.spec.tensors[i].shape.as_slice(), d.as_slice()));
        PseudoGradient::build(Codec::F32, run_id, 0, base, t).unwrap().to_bytes()
    };
    // The whole model, or another fragment's tensors, is not this contributor's fragment.
    let (_, e) = a.submit(&run, 0, &run.checkpoint, &[vec![0.1; 4], vec![0.1; 4], vec![0.1; 4]]).unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);
    let (_, e) = a.submit_raw(partial(&[1, 2], &[0.1, 0.1])).unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);
    a.submit_raw(partial(&[0, 2], &[0.5, 0.25])).unwrap();
    c.submit_raw(partial(&[1, 2], &[0.75, -0.25])).unwrap();
    let after = info(&url);
    assert_eq!(after.round, 1);
    let theta = weights(&url, &after.checkpoint, &run.spec.tensors);
    // Outer lr 1, no momentum: θ − mean, each tensor over those that trained it.
    assert_eq!((theta[0][0], theta[1][0], theta[2][0]), (0.5, 0.25, 1.0));
    server.stop();
}

/// Only the run's operator may close an epoch; the hub writes usage, the closing, exact payouts
/// and a root, which verify from the ledger's bytes alone; an epoch closes once.
#[test]
fn epochs_of_usage_close_into_the_ledger_with_exact_payouts() {
    let b = backend("sqlite").unwrap();
    let operator = Arc::new(tessera_trust::Identity::generate().unwrap());
    let economy = tessera_protocol::api::EconomySpec {
        operator: operator.public().hex(),
        funding_ppm: 100_000,
        allocations: vec![("alice".into(), 2), ("bob".into(), 1)],
    };
    let server = Server::start(&b, RunSpec { economy: Some(economy), ..spec(2) });
    let path = "/v1/economy/epochs";
    let report = |epoch: u64, revenue: u64| tessera_protocol::api::EpochReport {
        epoch,
        usage: vec![tessera_protocol::api::AccountUsage {
            account: "key-a".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            revenue,
        }],
    };
    // Anyone else, even a registered contributor, is refused.
    let stranger = Client::register(&server.url, "stranger");
    let r = stranger.post(path, serde_json::to_vec(&report(0, 1000)).unwrap());
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let operator = client(&server.url).signed_by(operator);
    let settled = operator.close_epoch(&report(0, 1000)).unwrap();
    // 1000 revenue, 10% funding; 900 split 2:1.
    assert_eq!((settled.revenue, settled.funding, settled.payable), (1000, 100, 900));
    assert_eq!(settled.payouts, vec![("alice".to_string(), 600), ("bob".to_string(), 300)]);
    assert_eq!(status(operator.close_epoch(&report(0, 5)), StatusCode::CREATED), StatusCode::CONFLICT);
    let ledger = tessera_trust::ledger::Ledger::from_bytes(&client(&server.url).ledger(0).unwrap()).unwrap();
    assert_eq!(ledger.payouts.values().sum::<u64>(), 900);
    assert_eq!(ledger.allocations.len(), 2);
    server.stop();
}
