//! The hub over real HTTP, on SQLite and a local store, and, where the test command provides
//! them, on PostgreSQL (`TESSERA_TEST_POSTGRES`) and an S3-compatible server (`TESSERA_TEST_S3`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tessera_hub::{Db, Hub, NewRun, Store};
use tessera_protocol::api::{
    Assignment, ContestSpec, DataSource, DataSpec, EvalSeed, HubStatus, InnerSpec, Leaderboard, OuterSpec, Receipt,
    Registration, RunInfo, ScoreReport, ScoringJob, SubmissionScore,
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

async fn backend(kind: &str) -> Option<Backend> {
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
                let pool = sqlx::AnyPool::connect(&admin).await.expect("connect to TESSERA_TEST_POSTGRES");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {unique}"))).execute(&pool).await.unwrap();
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
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(b: &Backend, spec: RunSpec) -> Server {
        let db = Db::connect(&b.db).await.unwrap();
        let store = Store::open(&b.store).unwrap();
        let key = tessera_trust::Identity::load_or_create(&b.key).unwrap();
        let hub = Hub::open(db, store, Some(NewRun { spec, weights: initial() }), key).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = hub.clone();
        let task = tokio::spawn(async move {
            tessera_hub::serve(h, listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server { url, hub, stop: Some(tx), task }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = self.task.await;
    }
}

struct Client {
    http: reqwest::Client,
    url: String,
    id: u64,
    key: Arc<tessera_trust::Identity>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A POST to `url` + `path` signed by `key`: the headers, to send again as they are if wanted.
fn signed_headers(key: &tessera_trust::Identity, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    key.sign_request("POST", path, body, now_ms()).unwrap()
}

async fn post_signed(
    http: &reqwest::Client,
    url: &str,
    path: &str,
    headers: &[(&'static str, String)],
    body: Vec<u8>,
) -> reqwest::Response {
    let mut b = http.post(format!("{url}{path}"));
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(body).send().await.unwrap()
}

impl Client {
    async fn register(url: &str, name: &str) -> Client {
        Client::register_key(url, name, Arc::new(tessera_trust::Identity::generate().unwrap())).await
    }

    async fn register_key(url: &str, name: &str, key: Arc<tessera_trust::Identity>) -> Client {
        let http = reqwest::Client::new();
        let body = serde_json::to_vec(&serde_json::json!({"name": name})).unwrap();
        let h = signed_headers(&key, "/v1/contributors", &body);
        let r = post_signed(&http, url, "/v1/contributors", &h, body).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let reg: Registration = r.json().await.unwrap();
        assert_eq!(reg.public_key, key.public().hex());
        Client { http, url: url.to_owned(), id: reg.contributor_id, key }
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> reqwest::Response {
        let h = signed_headers(&self.key, path, &body);
        post_signed(&self.http, &self.url, path, &h, body).await
    }

    async fn assignment(&self, wait_ms: u64) -> Assignment {
        let r = self.post(&format!("/v1/assignments?wait_ms={wait_ms}"), Vec::new()).await;
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    async fn submit_raw(&self, body: Vec<u8>) -> Result<Receipt, (StatusCode, ApiError)> {
        let r = self.post("/v1/submissions", body).await;
        let status = r.status();
        if status == StatusCode::ACCEPTED {
            Ok(r.json().await.unwrap())
        } else {
            Err((status, r.json().await.unwrap()))
        }
    }

    async fn submit(
        &self,
        info: &RunInfo,
        round: u64,
        base: &str,
        delta: &[Vec<f32>],
    ) -> Result<Receipt, (StatusCode, ApiError)> {
        self.submit_raw(message(info, info.spec.codec, round, base, delta)).await
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

async fn info(url: &str) -> RunInfo {
    reqwest::get(format!("{url}/v1/run")).await.unwrap().json().await.unwrap()
}

async fn status(url: &str) -> HubStatus {
    reqwest::get(format!("{url}/v1/status")).await.unwrap().json().await.unwrap()
}

async fn download(url: &str, path: &str) -> Vec<u8> {
    let r = reqwest::get(format!("{url}{path}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    r.bytes().await.unwrap().to_vec()
}

fn delta(scale: f32) -> Vec<Vec<f32>> {
    vec![(0..8).map(|i| scale * (i as f32 - 3.0)).collect(), (0..32).map(|i| scale * (i as f32 * 0.11).cos()).collect()]
}

/// A full round: quorum closes it, the new weights are θ − mean Δ (outer lr 1, no momentum),
/// the published update reproduces the checkpoint bit for bit, and range requests work.
async fn lifecycle(kind: &str) {
    let Some(b) = backend(kind).await else { return };
    let server = Server::start(&b, spec(2)).await;
    let url = server.url.clone();
    let run = info(&url).await;
    assert_eq!(run.round, 0);
    let (a, c) = (Client::register(&url, "a").await, Client::register(&url, "c").await);
    assert_ne!(a.id, c.id);
    let asg = a.assignment(0).await;
    assert_eq!((asg.round, asg.base_checkpoint.as_str(), asg.finished), (0, run.checkpoint.as_str(), false));
    let ra = a.submit(&run, 0, &run.checkpoint, &delta(1.0)).await.unwrap();
    assert_eq!((ra.round, ra.staleness, ra.weight), (0, 0, 1.0));
    // Already submitted for the open round: the assignment waits, then repeats the round.
    assert_eq!(a.assignment(200).await.round, 0);
    c.submit(&run, 0, &run.checkpoint, &delta(-3.0)).await.unwrap();
    let after = info(&url).await;
    assert_eq!(after.round, 1);
    assert_eq!(a.assignment(0).await.base_checkpoint, after.checkpoint);

    let bytes = download(&url, &format!("/v1/checkpoints/{}", after.checkpoint)).await;
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
    let update = download(&url, "/v1/updates/1").await;
    let view = MessageView::parse(&update).unwrap();
    assert_eq!((view.round, hex::encode(view.base_checkpoint)), (1, run.checkpoint.clone()));
    let rebuilt = view.apply_to(&t0).unwrap();
    let rebuilt_bytes = tessera_protocol::encode_weights(&run.spec.tensors, &rebuilt).unwrap();
    assert_eq!(rebuilt_bytes, bytes);

    let http = reqwest::Client::new();
    let path = format!("{url}/v1/checkpoints/{}", after.checkpoint);
    let r = http.get(&path).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], format!("bytes 10-19/{}", bytes.len()).as_str());
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[10..20]);
    let r = http.get(&path).header("range", format!("bytes={}-", bytes.len() - 5)).send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes[bytes.len() - 5..]);
    let r = http.get(&path).header("range", format!("bytes={}-", bytes.len() + 5)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(http.get(format!("{url}/v1/updates/2")).send().await.unwrap().status(), StatusCode::NOT_FOUND);

    let st = status(&url).await;
    assert_eq!(st.history[0].accepted, 2);
    assert_eq!(st.history[0].closed_by.as_deref(), Some("quorum"));
    assert_eq!(st.contributors.len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn lifecycle_sqlite() {
    lifecycle("sqlite").await;
}

#[tokio::test]
async fn lifecycle_postgres() {
    lifecycle("postgres").await;
}

#[tokio::test]
async fn lifecycle_s3() {
    lifecycle("s3").await;
}

#[tokio::test]
async fn bad_submissions_get_typed_refusals() {
    let b = backend("sqlite").await.unwrap();
    let server = Server::start(&b, spec(2)).await;
    let url = server.url.clone();
    let run = info(&url).await;
    let a = Client::register(&url, "a").await;
    let base = run.checkpoint.clone();

    let mut garbage = message(&run, Codec::F32, 0, &base, &delta(1.0));
    garbage[100] ^= 1;
    let (s, e) = a.submit_raw(garbage).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage));
    let (_, e) = a.submit_raw(b"hello".to_vec()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedMessage);
    let (s, e) = a.submit_raw(vec![0u8; server.hub.max_submission_bytes() + 1]).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge));

    let (s, e) = a.submit_raw(message(&run, Codec::Bf16, 0, &base, &delta(1.0))).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::CodecMismatch));
    let (_, e) = a.submit(&run, 0, &"ab".repeat(32), &delta(1.0)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::BaseMismatch);
    let (_, e) = a.submit(&run, 1, &base, &delta(1.0)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::FutureRound);
    let mut other = run.clone();
    other.run_id = "00".repeat(16);
    let (_, e) = a.submit(&other, 0, &base, &delta(1.0)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongRun);
    let mut reshaped = run.clone();
    reshaped.spec.tensors[1].shape = vec![8, 4];
    let (_, e) = a.submit(&reshaped, 0, &base, &delta(1.0)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);

    // Well-formed, correctly checksummed, but a NaN inside: refused on arrival, never aggregated.
    let mut poisoned = PseudoGradient::from_bytes(&message(&run, Codec::F32, 0, &base, &delta(1.0))).unwrap();
    poisoned.tensors[1].encoded[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    let (s, e) = a.submit_raw(poisoned.to_bytes()).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::BAD_REQUEST, ErrorCode::MalformedMessage));
    assert!(e.message.contains("non-finite"), "{}", e.message);

    a.submit(&run, 0, &base, &delta(1.0)).await.unwrap();
    let (s, e) = a.submit(&run, 0, &base, &delta(2.0)).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Duplicate));

    // An unregistered key; a request signed by one key but claiming another; no signature; a
    // replayed request (same nonce); a request from a clock far off.
    let stranger =
        Client { key: Arc::new(tessera_trust::Identity::generate().unwrap()), ..Client::register(&url, "x").await };
    let (s, e) = stranger.submit(&run, 0, &base, &delta(1.0)).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    assert!(e.message.contains("not registered"), "{}", e.message);
    let body = message(&run, Codec::F32, 0, &base, &delta(3.0));
    let mut forged = signed_headers(&stranger.key, "/v1/submissions", &body);
    forged[0].1 = a.key.public().hex();
    let r = post_signed(&a.http, &url, "/v1/submissions", &forged, body.clone()).await;
    let e: ApiError = r.json().await.unwrap();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    assert!(e.message.contains("signature"), "{}", e.message);
    let r = reqwest::Client::new().post(format!("{url}/v1/assignments")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: ApiError = r.json().await.unwrap();
    assert!(e.message.contains("x-tessera-key"), "{}", e.message);
    let x = Client::register(&url, "y").await;
    let once = signed_headers(&x.key, "/v1/assignments?wait_ms=0", b"");
    let r = post_signed(&x.http, &url, "/v1/assignments?wait_ms=0", &once, Vec::new()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = post_signed(&x.http, &url, "/v1/assignments?wait_ms=0", &once, Vec::new()).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.json::<ApiError>().await.unwrap().code, ErrorCode::ReplayedRequest);
    let stale = x.key.sign_request("POST", "/v1/assignments", b"", now_ms() - 3_600_000).unwrap();
    let r = post_signed(&x.http, &url, "/v1/assignments", &stale, Vec::new()).await;
    let e: ApiError = r.json().await.unwrap();
    assert!(e.code == ErrorCode::Unauthorized && e.message.contains("clock"), "{e:?}");

    // Nothing refused was counted: the round still waits for its second submission.
    let st = status(&url).await;
    assert_eq!((st.round, st.history[0].accepted), (0, 0));
    assert!(st.contributors.iter().find(|c| c.id == a.id).unwrap().rejected >= 8);
    assert_eq!(server.hub.info().await.round, 0);
    server.stop().await;
}

#[tokio::test]
async fn late_submissions_are_down_weighted_then_refused() {
    let b = backend("sqlite").await.unwrap();
    let server = Server::start(&b, RunSpec { rounds: 5, ..spec(1) }).await;
    let url = server.url.clone();
    let run0 = info(&url).await;
    let (a, slow, slower) = (
        Client::register(&url, "a").await,
        Client::register(&url, "slow").await,
        Client::register(&url, "slower").await,
    );
    a.submit(&run0, 0, &run0.checkpoint, &delta(1.0)).await.unwrap();
    let run1 = info(&url).await;
    assert_eq!(run1.round, 1);
    // One round stale: accepted at half weight, and alone it makes round 1's whole update.
    let r = slow.submit(&run0, 0, &run0.checkpoint, &delta(2.0)).await.unwrap();
    assert_eq!((r.round, r.base_round, r.staleness, r.weight), (1, 0, 1, 0.5));
    let run2 = info(&url).await;
    assert_eq!(run2.round, 2);
    let (s, e) = slower.submit(&run0, 0, &run0.checkpoint, &delta(3.0)).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Stale));
    assert!(e.message.contains("2 rounds stale"), "{}", e.message);
    let t1 = decode_weights(&download(&url, &format!("/v1/checkpoints/{}", run1.checkpoint)).await, &run0.spec.tensors)
        .unwrap();
    let t2 = decode_weights(&download(&url, &format!("/v1/checkpoints/{}", run2.checkpoint)).await, &run0.spec.tensors)
        .unwrap();
    // A weighted mean of one submission is that submission, whatever its weight.
    let d = delta(2.0);
    assert!((t2[1][5] - (t1[1][5] - d[1][5])).abs() < 1e-6);
    server.stop().await;
}

#[tokio::test]
async fn a_round_closes_at_its_deadline_without_the_missing() {
    let b = backend("sqlite").await.unwrap();
    let server = Server::start(&b, RunSpec { round_deadline_ms: 300, ..spec(3) }).await;
    let url = server.url.clone();
    let run = info(&url).await;
    let a = Client::register(&url, "a").await;
    let _vanished = Client::register(&url, "vanished").await;
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).await.unwrap();
    let next = a.assignment(5_000).await;
    assert_eq!(next.round, 1, "the deadline should have closed round 0");
    let st = status(&url).await;
    assert_eq!(st.history[0].closed_by.as_deref(), Some("deadline"));
    assert_eq!(st.history[0].accepted, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_hub_keeps_accepted_submissions_and_keys() {
    let b = backend("sqlite").await.unwrap();
    let server = Server::start(&b, RunSpec { broadcast_codec: Codec::Int8 { block: 16 }, ..spec(2) }).await;
    let url = server.url.clone();
    let run = info(&url).await;
    let a = Client::register(&url, "a").await;
    let c = Client::register(&url, "c").await;
    a.submit(&run, 0, &run.checkpoint, &delta(1.0)).await.unwrap();
    server.stop().await;

    // The same database and store; the spec passed now is ignored in favour of the stored run.
    let server = Server::start(&b, spec(99)).await;
    let url2 = server.url.clone();
    let resumed = info(&url2).await;
    assert_eq!((resumed.run_id.as_str(), resumed.spec.quorum), (run.run_id.as_str(), 2));
    assert_eq!(status(&url2).await.history[0].accepted, 0, "not closed yet");
    let c = Client { url: url2.clone(), ..c };
    // A key registers once: registering again gets the same id.
    assert_eq!(Client::register_key(&url2, "c again", c.key.clone()).await.id, c.id);
    c.submit(&run, 0, &run.checkpoint, &delta(-1.0)).await.unwrap();
    let after = info(&url2).await;
    assert_eq!(after.round, 1);
    let st = status(&url2).await;
    assert_eq!(st.history[0].accepted, 2, "the submission from before the restart counts");
    // With a lossy broadcast codec the update still reproduces the checkpoint exactly.
    let update = download(&url2, "/v1/updates/1").await;
    let view = MessageView::parse(&update).unwrap();
    assert_eq!(view.codec, Codec::Int8 { block: 16 });
    let rebuilt = view.apply_to(&initial()).unwrap();
    let bytes = tessera_protocol::encode_weights(&run.spec.tensors, &rebuilt).unwrap();
    assert_eq!(hex::encode(weights_hash(&bytes)), after.checkpoint);
    drop(a);
    server.stop().await;
}

#[tokio::test]
async fn the_run_finishes_after_its_rounds() {
    let b = backend("sqlite").await.unwrap();
    let server = Server::start(&b, RunSpec { rounds: 2, ..spec(1) }).await;
    let url = server.url.clone();
    let a = Client::register(&url, "a").await;
    for round in 0..2 {
        let asg = a.assignment(0).await;
        assert_eq!((asg.round, asg.finished), (round, false));
        a.submit(&info(&url).await, round, &asg.base_checkpoint, &delta(0.1)).await.unwrap();
    }
    let asg = a.assignment(0).await;
    assert!(asg.finished);
    let run = info(&url).await;
    assert!(run.finished);
    // Every round's evaluation seed is public now; there is no round 2 to ask about.
    let seed: EvalSeed = reqwest::get(format!("{url}/v1/rounds/1/eval-seed")).await.unwrap().json().await.unwrap();
    assert!(seed.seed.is_some());
    assert_eq!(reqwest::get(format!("{url}/v1/rounds/2/eval-seed")).await.unwrap().status(), StatusCode::NOT_FOUND);
    let (s, e) = a.submit(&run, 1, &status(&url).await.history[1].base_checkpoint, &delta(0.1)).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::RunFinished));
    // Prometheus counts rounds and submissions by outcome (other tests in this process too).
    let metrics = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    for needle in [
        "tessera_hub_rounds_published_total",
        "outcome=\"accepted\"",
        "outcome=\"run_finished\"",
        "tessera_hub_aggregation_seconds_bucket",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from {metrics}");
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    server.stop().await;
}

const VALIDATOR: &str = "validator-secret";

async fn validator_get(url: &str, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(format!("{url}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

async fn post_scores(url: &str, report: &ScoreReport) -> StatusCode {
    reqwest::Client::new()
        .post(format!("{url}/v1/validator/scores"))
        .bearer_auth(VALIDATOR)
        .json(report)
        .send()
        .await
        .unwrap()
        .status()
}

/// A scored round end to end over HTTP: the seed commitment, its reveal when submissions close,
/// contributors told to retry while scoring, the validator's job and blobs behind its token,
/// scores checked against the job, exact rewards, ratings and the leaderboard — which survive a
/// restart — and a replayed message refused with a recorded reason.
async fn scored_rounds(kind: &str) {
    let Some(b) = backend(kind).await else { return };
    let contest = ContestSpec { reward_units: 1000, promote_top: 2, promote_at: Some(1), ..ContestSpec::default() };
    let spec = RunSpec { rounds: 3, aggregation: Aggregation::DEFAULT, contest: Some(contest), ..spec(3) };
    let server = Server::start(&b, spec.clone()).await;
    server.hub.set_validator_token(VALIDATOR);
    let url = server.url.clone();
    let run = info(&url).await;
    let clients =
        [Client::register(&url, "a").await, Client::register(&url, "b").await, Client::register(&url, "c").await];
    let late = Client::register(&url, "late").await;
    let commitment = clients[0].assignment(0).await.eval_commitment.expect("a scored run commits to its seed");
    let seed: EvalSeed = reqwest::get(format!("{url}/v1/rounds/0/eval-seed")).await.unwrap().json().await.unwrap();
    assert_eq!((seed.commitment.as_str(), seed.seed), (commitment.as_str(), None), "revealed before the round closed");
    assert_eq!(validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).await.status(), StatusCode::NO_CONTENT);

    let bodies: Vec<Vec<u8>> =
        [0.1f32, 0.2, -0.3].iter().map(|&s| message(&run, run.spec.codec, 0, &run.checkpoint, &delta(s))).collect();
    for (c, body) in clients.iter().zip(&bodies) {
        c.submit_raw(body.clone()).await.unwrap();
    }
    // Quorum closed the submissions; the round waits for scores.
    assert_eq!(info(&url).await.round, 0);
    let (s, e) = late.submit(&run, 0, &run.checkpoint, &delta(0.05)).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Busy));
    let seed: EvalSeed = reqwest::get(format!("{url}/v1/rounds/0/eval-seed")).await.unwrap().json().await.unwrap();
    let mut seed_bytes = [0u8; 32];
    hex::decode_to_slice(seed.seed.expect("revealed once submissions closed"), &mut seed_bytes).unwrap();
    let mut commitment_bytes = [0u8; 32];
    hex::decode_to_slice(&commitment, &mut commitment_bytes).unwrap();
    assert!(tessera_contest::commit::verify(&commitment_bytes, &seed_bytes));

    assert_eq!(validator_get(&url, "/v1/validator/job", None).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(validator_get(&url, "/v1/validator/job", Some("guess")).await.status(), StatusCode::UNAUTHORIZED);
    let job: ScoringJob = validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).await.json().await.unwrap();
    assert_eq!(job.round, 0);
    let order: Vec<u64> = job.submissions.iter().map(|s| s.contributor).collect();
    assert_eq!(order, clients.iter().map(|c| c.id).collect::<Vec<_>>());
    let blob =
        validator_get(&url, &format!("/v1/validator/submissions/{}", job.submissions[1].blob), Some(VALIDATOR)).await;
    assert_eq!(blob.bytes().await.unwrap().to_vec(), bodies[1]);
    let blob = validator_get(&url, &format!("/v1/validator/submissions/{}", job.submissions[1].blob), None).await;
    assert_eq!(blob.status(), StatusCode::UNAUTHORIZED);

    let score = |contributor, score| SubmissionScore { contributor, score, data_fit: Some(0.01), copy_of: None };
    let mut report = ScoreReport {
        round: 0,
        scores: vec![score(clients[1].id, 0.01), score(clients[0].id, 0.02), score(clients[2].id, -0.5)],
    };
    assert_eq!(post_scores(&url, &report).await, StatusCode::CONFLICT, "scores out of the job's order");
    report.scores.swap(0, 1);
    report.scores[2].copy_of = Some(2);
    assert_eq!(post_scores(&url, &report).await, StatusCode::BAD_REQUEST, "a copy of itself");
    report.scores[2].copy_of = None;
    assert_eq!(post_scores(&url, &report).await, StatusCode::NO_CONTENT);
    assert_eq!(post_scores(&url, &report).await, StatusCode::CONFLICT, "the round is no longer scoring");
    let after = info(&url).await;
    assert_eq!(after.round, 1);
    // Only the two positive scores were aggregated: centred clipping of two inputs stays between them.
    let theta =
        decode_weights(&download(&url, &format!("/v1/checkpoints/{}", after.checkpoint)).await, &spec.tensors).unwrap();
    let (lo, hi) = (initial()[0][7] - 0.2 * 4.0, initial()[0][7] - 0.1 * 4.0);
    assert!((lo - 1e-5..=hi + 1e-5).contains(&theta[0][7]), "{} not in [{lo}, {hi}]", theta[0][7]);

    let board: Leaderboard = reqwest::get(format!("{url}/api/leaderboard")).await.unwrap().json().await.unwrap();
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
    let (s, e) = clients[1].submit_raw(bodies[0].clone()).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Replay));
    let (s, e) = clients[0].submit_raw(bodies[0].clone()).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Duplicate));
    let st = status(&url).await;
    let rejected = |id: u64| st.contributors.iter().find(|c| c.id == id).map(|c| c.rejected);
    assert_eq!((rejected(clients[1].id), rejected(late.id)), (Some(1), Some(0)));
    let board: Leaderboard = reqwest::get(format!("{url}/api/leaderboard")).await.unwrap().json().await.unwrap();
    server.stop().await;

    // Ratings, rewards and the leaderboard come back after a restart.
    let server = Server::start(&b, spec.clone()).await;
    let board2: Leaderboard =
        reqwest::get(format!("{}/api/leaderboard", server.url)).await.unwrap().json().await.unwrap();
    assert_eq!(board2.rows, board.rows);
    server.stop().await;
}

#[tokio::test]
async fn scored_rounds_sqlite() {
    scored_rounds("sqlite").await;
}

#[tokio::test]
async fn scored_rounds_postgres() {
    scored_rounds("postgres").await;
}

/// A scored round whose validator never reports is aggregated unscored after its timeout:
/// staleness weights, no rewards, ratings unchanged.
#[tokio::test]
async fn scores_that_never_come() {
    let b = backend("sqlite").await.unwrap();
    let contest = ContestSpec { score_timeout_ms: 400, ..ContestSpec::default() };
    let server = Server::start(&b, RunSpec { contest: Some(contest), ..spec(1) }).await;
    let url = server.url.clone();
    let run = info(&url).await;
    let a = Client::register(&url, "a").await;
    a.submit(&run, 0, &run.checkpoint, &delta(0.1)).await.unwrap();
    assert_eq!(info(&url).await.round, 0, "waiting for scores");
    server.hub.tick().await.unwrap();
    assert_eq!(info(&url).await.round, 0, "not yet timed out");
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.hub.tick().await.unwrap();
    let after = info(&url).await;
    assert_eq!(after.round, 1);
    let theta =
        decode_weights(&download(&url, &format!("/v1/checkpoints/{}", after.checkpoint)).await, &run.spec.tensors)
            .unwrap();
    assert!((theta[0][7] - (initial()[0][7] - 0.4)).abs() < 1e-6, "the unscored mean was applied");
    let board: Leaderboard = reqwest::get(format!("{url}/api/leaderboard")).await.unwrap().json().await.unwrap();
    assert_eq!((board.rows[0].rewards, board.rows[0].rounds), (0, 0));
    server.stop().await;
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

    async fn sync(&mut self, url: &str) {
        let bytes = download(url, &format!("/v1/ledger?from={}", self.ledger.len())).await;
        self.ledger.extend(&bytes).unwrap();
    }

    async fn register(&mut self, url: &str, attestation: &tessera_trust::ValidatorAttestation) -> StatusCode {
        self.sync(url).await;
        let mut next = self.ledger.clone();
        let body = tessera_trust::ledger::Body::Validator { attestation: self.attestation.clone() };
        let entry = next.append(0, now_ms(), true, body, &self.signing).unwrap();
        let post = serde_json::json!({ "attestation": attestation, "entry": hex::encode(entry) });
        let r = reqwest::Client::new()
            .post(format!("{url}/v1/validator/attestation"))
            .bearer_auth(VALIDATOR)
            .json(&post)
            .send()
            .await
            .unwrap();
        if r.status().is_success() {
            self.ledger = next;
        }
        r.status()
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
#[tokio::test]
async fn sealed_rounds() {
    use tessera_protocol::api::{Settled, Verdict};
    use tessera_trust::ledger::{Body, Ledger, verify_proof};

    let b = backend("sqlite").await.unwrap();
    let trust = tessera_protocol::api::AttestationPolicy { allow_insecure_dev: true, ..Default::default() };
    let contest = ContestSpec { reward_units: 1000, ..ContestSpec::default() };
    let sealed = RunSpec { rounds: 2, contest: Some(contest), trust: Some(trust), ..spec(2) };
    let server = Server::start(&b, sealed).await;
    server.hub.set_validator_token(VALIDATOR);
    let url = server.url.clone();
    let run = info(&url).await;
    let (a, c) = (Client::register(&url, "a").await, Client::register(&url, "c").await);
    let (plain_a, plain_c) = (
        message(&run, Codec::F32, 0, &run.checkpoint, &delta(0.5)),
        message(&run, Codec::F32, 0, &run.checkpoint, &delta(-0.25)),
    );

    // No validator yet: nothing can be sealed to one.
    assert_eq!(reqwest::get(format!("{url}/v1/validator")).await.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    let mut v = TestValidator::new();
    let (_, e) = a.submit_raw(seal(&v, &a, &run, &plain_a)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::NoValidator);
    // An attestation whose report data commits to other keys is refused.
    let mut lying = v.attestation.clone();
    lying.sealing_key = hex::encode(tessera_trust::OpeningKey::generate().unwrap().public().0);
    assert_eq!(v.register(&url, &lying).await, StatusCode::UNAUTHORIZED);
    let honest = v.attestation.clone();
    assert_eq!(v.register(&url, &honest).await, StatusCode::CREATED);
    let shown: tessera_protocol::api::ValidatorInfo =
        reqwest::get(format!("{url}/v1/validator")).await.unwrap().json().await.unwrap();
    assert!(shown.insecure, "the development attester is shown as insecure");

    // Plaintext is refused; someone else's envelope cannot be claimed.
    let (_, e) = a.submit_raw(plain_a.clone()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedMessage);
    let sealed_a = seal(&v, &a, &run, &plain_a);
    let (s, e) = c.submit_raw(sealed_a.clone()).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    // …and rewriting its header to claim it makes it unreadable.
    let mut claimed = sealed_a.clone();
    claimed[62..94].copy_from_slice(&c.key.public().0);
    assert!(v.opening.open(&claimed).is_err());
    // Sealed to a key that is not the validator's: refused by name.
    let other = TestValidator::new();
    let (_, e) = a.submit_raw(seal(&other, &a, &run, &plain_a)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::WrongValidator);

    a.submit_raw(sealed_a.clone()).await.unwrap();
    let (_, e) = a.submit_raw(sealed_a.clone()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Duplicate, "its own envelope again: already accepted");
    c.submit_raw(seal(&v, &c, &run, &plain_c)).await.unwrap();

    // Contributors cannot fetch submissions: that takes the validator's token.
    let job_blob = blake3::hash(&sealed_a).to_hex().to_string();
    let r = validator_get(&url, &format!("/v1/validator/submissions/{job_blob}"), None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // What the hub publishes is signed with the key its run info names: the checkpoint (over its
    // BLAKE3) and the round's announcement.
    let hub_key = tessera_trust::PublicKey::parse(&run.hub_key).unwrap();
    let r = reqwest::get(format!("{url}/v1/checkpoints/{}", run.checkpoint)).await.unwrap();
    let sig = r.headers()["x-tessera-hub-signature"].to_str().unwrap().to_owned();
    let bytes = r.bytes().await.unwrap();
    hub_key.verify_hex(&tessera_trust::identity::publication_message(&bytes), &sig).unwrap();
    let r = reqwest::get(format!("{url}/v1/rounds/0")).await.unwrap();
    let sig = r.headers()["x-tessera-hub-signature"].to_str().unwrap().to_owned();
    let bytes = r.bytes().await.unwrap();
    hub_key.verify_hex(&tessera_trust::identity::publication_message(&bytes), &sig).unwrap();
    let round0: tessera_protocol::api::RoundAnnouncement = serde_json::from_slice(&bytes).unwrap();
    assert_eq!((round0.base_checkpoint.as_str(), round0.eval_commitment.is_some()), (run.checkpoint.as_str(), true));
    assert_eq!(reqwest::get(format!("{url}/v1/rounds/7")).await.unwrap().status(), StatusCode::NOT_FOUND);

    // Only ciphertext at rest: no submission's tensor bytes in the database or the store.
    let needle_a = &plain_a[plain_a.len() - 32 - 64..plain_a.len() - 32];
    let needle_c = &plain_c[plain_c.len() - 32 - 64..plain_c.len() - 32];
    for needle in [needle_a, needle_c] {
        assert!(!anywhere(b._dir.path(), needle), "plaintext found at rest");
    }

    // The validator's round: open, settle, aggregate, sign.
    let job: ScoringJob = validator_get(&url, "/v1/validator/job", Some(VALIDATOR)).await.json().await.unwrap();
    assert_eq!(job.submissions.len(), 2);
    let mut deltas = Vec::new();
    for s in &job.submissions {
        let env = validator_get(&url, &format!("/v1/validator/submissions/{}", s.blob), Some(VALIDATOR)).await;
        let (header, msg) = v.opening.open(&env.bytes().await.unwrap()).unwrap();
        assert_eq!(header.contributor.hex(), s.contributor_key);
        deltas.push(MessageView::parse(&msg).unwrap().apply_to(&[vec![0.0; 8], vec![0.0; 32]]).unwrap());
    }
    let mean: Vec<Vec<f32>> =
        (0..2).map(|t| deltas[0][t].iter().zip(&deltas[1][t]).map(|(x, y)| 0.5 * (x + y)).collect()).collect();
    let agg = message(&run, Codec::F32, 0, &run.checkpoint, &mean);
    let post = |path: String, body: Vec<u8>| {
        let url = url.clone();
        async move {
            reqwest::Client::new().post(format!("{url}{path}")).bearer_auth(VALIDATOR).body(body).send().await.unwrap()
        }
    };
    assert_eq!(post("/v1/validator/aggregate/0".into(), agg).await.status(), StatusCode::NO_CONTENT);
    let rewards = [700u64, 300];
    v.sync(&url).await;
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
    let r = post("/v1/validator/verdict".into(), serde_json::to_vec(&wrong).unwrap()).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
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
    let r = post("/v1/validator/verdict".into(), serde_json::to_vec(&forged).unwrap()).await;
    let e: ApiError = r.json().await.unwrap();
    assert!(e.message.contains("unknown") || e.message.contains("may not sign"), "{}", e.message);
    let good = verdict(entries(&v.signing, rewards, &v.ledger));
    let r = post("/v1/validator/verdict".into(), serde_json::to_vec(&good).unwrap()).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT, "{}", r.text().await.unwrap());

    // Published: θ − mean, rewards on the leaderboard, and a ledger anyone can verify.
    let after = info(&url).await;
    assert_eq!(after.round, 1);
    let theta =
        decode_weights(&download(&url, &format!("/v1/checkpoints/{}", after.checkpoint)).await, &run.spec.tensors)
            .unwrap();
    assert!((theta[0][7] - (initial()[0][7] - mean[0][7])).abs() < 1e-6);
    let board: Leaderboard = reqwest::get(format!("{url}/api/leaderboard")).await.unwrap().json().await.unwrap();
    assert_eq!(board.rows.iter().map(|r| r.rewards).sum::<u64>(), 1000);
    let ledger = Ledger::from_bytes(&download(&url, "/v1/ledger").await).unwrap();
    assert_eq!(ledger.units.get(&a.key.public().hex()), Some(&700));
    assert_eq!(ledger.hub(), Some(tessera_trust::PublicKey::parse(&run.hub_key).unwrap()));
    for seq in 0..ledger.len() - 1 {
        let proof: tessera_trust::ledger::Proof =
            reqwest::get(format!("{url}/v1/ledger/proof/{seq}")).await.unwrap().json().await.unwrap();
        assert_eq!(verify_proof(&proof, &v.signing.public()).unwrap().seq, seq);
    }
    for needle in [needle_a, needle_c] {
        assert!(!anywhere(b._dir.path(), needle), "plaintext found at rest after publishing");
    }
    server.stop().await;

    // The ledger survives a restart, and so does the validator sealed to.
    let server = Server::start(&b, RunSpec { trust: None, ..spec(2) }).await;
    let resumed: tessera_protocol::api::ValidatorInfo =
        reqwest::get(format!("{}/v1/validator", server.url)).await.unwrap().json().await.unwrap();
    assert_eq!(resumed.attestation["signing_key"], v.signing.public().hex());
    assert_eq!(Ledger::from_bytes(&download(&server.url, "/v1/ledger").await).unwrap().len(), ledger.len());
    server.stop().await;
}

/// A layer-sharded run: each contributor submits only its fragment (its layers plus the shared
/// tensors); the whole model is refused; each tensor is averaged over the submissions that
/// carry it.
#[tokio::test]
async fn layer_sharded_rounds_average_each_tensor_over_its_trainers() {
    let b = backend("sqlite").await.unwrap();
    let tensors = vec![
        TensorSpec { name: "model.layers.0.w".into(), shape: vec![4] },
        TensorSpec { name: "model.layers.1.w".into(), shape: vec![4] },
        TensorSpec { name: "model.norm.weight".into(), shape: vec![4] },
    ];
    let sharded = RunSpec { tensors, fragments: 2, ..spec(2) };
    sharded.validate().unwrap();
    assert!(RunSpec { fragments: 3, ..sharded.clone() }.validate().unwrap_err().contains("fragments"));
    let db = Db::connect(&b.db).await.unwrap();
    let store = Store::open(&b.store).unwrap();
    let key = tessera_trust::Identity::load_or_create(&b.key).unwrap();
    let hub = Hub::open(db, store, Some(NewRun { spec: sharded, weights: vec![vec![1.0; 4]; 3] }), key).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tessera_hub::serve(hub, listener, async move {
        let _ = rx.await;
    }));
    let run = info(&url).await;
    let (a, c) = (Client::register(&url, "a").await, Client::register(&url, "c").await);
    let (fa, fc) = (a.assignment(0).await.fragment, c.assignment(0).await.fragment);
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
    let (_, e) = a.submit(&run, 0, &run.checkpoint, &[vec![0.1; 4], vec![0.1; 4], vec![0.1; 4]]).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);
    let (_, e) = a.submit_raw(partial(&[1, 2], &[0.1, 0.1])).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::TensorMismatch);
    a.submit_raw(partial(&[0, 2], &[0.5, 0.25])).await.unwrap();
    c.submit_raw(partial(&[1, 2], &[0.75, -0.25])).await.unwrap();
    let after = info(&url).await;
    assert_eq!(after.round, 1);
    let theta =
        decode_weights(&download(&url, &format!("/v1/checkpoints/{}", after.checkpoint)).await, &run.spec.tensors)
            .unwrap();
    // Outer lr 1, no momentum: θ − mean, each tensor over those that trained it.
    assert_eq!((theta[0][0], theta[1][0], theta[2][0]), (0.5, 0.25, 1.0));
    let _ = tx.send(());
    let _ = task.await;
}

/// Only the run's operator may close an epoch; the hub writes usage, the closing, exact payouts
/// and a root, which verify from the ledger's bytes alone; an epoch closes once.
#[tokio::test]
async fn epochs_of_usage_close_into_the_ledger_with_exact_payouts() {
    let b = backend("sqlite").await.unwrap();
    let operator = Arc::new(tessera_trust::Identity::generate().unwrap());
    let economy = tessera_protocol::api::EconomySpec {
        operator: operator.public().hex(),
        funding_ppm: 100_000,
        allocations: vec![("alice".into(), 2), ("bob".into(), 1)],
    };
    let server = Server::start(&b, RunSpec { economy: Some(economy), ..spec(2) }).await;
    let http = reqwest::Client::new();
    let path = "/v1/economy/epochs";
    let report = |epoch: u64, revenue: u64| {
        serde_json::to_vec(&tessera_protocol::api::EpochReport {
            epoch,
            usage: vec![tessera_protocol::api::AccountUsage {
                account: "key-a".into(),
                prompt_tokens: 10,
                completion_tokens: 5,
                revenue,
            }],
        })
        .unwrap()
    };
    // Anyone else, even a registered contributor, is refused.
    let stranger = Client::register(&server.url, "stranger").await;
    let r = stranger.post(path, report(0, 1000)).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body = report(0, 1000);
    let r = post_signed(&http, &server.url, path, &signed_headers(&operator, path, &body), body).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let settled: tessera_protocol::api::EpochSettled = r.json().await.unwrap();
    // 1000 revenue, 10% funding; 900 split 2:1.
    assert_eq!((settled.revenue, settled.funding, settled.payable), (1000, 100, 900));
    assert_eq!(settled.payouts, vec![("alice".to_string(), 600), ("bob".to_string(), 300)]);
    let body = report(0, 5);
    let r = post_signed(&http, &server.url, path, &signed_headers(&operator, path, &body), body).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let bytes = http.get(format!("{}/v1/ledger", server.url)).send().await.unwrap().bytes().await.unwrap();
    let ledger = tessera_trust::ledger::Ledger::from_bytes(&bytes).unwrap();
    assert_eq!(ledger.payouts.values().sum::<u64>(), 900);
    assert_eq!(ledger.allocations.len(), 2);
    server.stop().await;
}
