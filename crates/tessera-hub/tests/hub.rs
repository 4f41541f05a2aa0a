//! The hub over real HTTP, on SQLite and a local store, and, where the test command provides
//! them, on PostgreSQL (`TESSERA_TEST_POSTGRES`) and an S3-compatible server (`TESSERA_TEST_S3`).

use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use tessera_hub::{Db, Hub, NewRun, Store};
use tessera_protocol::api::{
    Assignment, CONTRIBUTOR_HEADER, ContestSpec, DataSource, DataSpec, EvalSeed, HubStatus, InnerSpec, Leaderboard,
    OuterSpec, Receipt, Registration, RunInfo, ScoreReport, ScoringJob, SubmissionScore,
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
    Some(Backend { db, store, _dir: dir })
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
        let hub = Hub::open(db, store, Some(NewRun { spec, weights: initial() })).await.unwrap();
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
    token: String,
}

impl Client {
    async fn register(url: &str, name: &str) -> Client {
        let http = reqwest::Client::new();
        let r =
            http.post(format!("{url}/v1/contributors")).json(&serde_json::json!({"name": name})).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let reg: Registration = r.json().await.unwrap();
        Client { http, url: url.to_owned(), id: reg.contributor_id, token: reg.token }
    }

    async fn assignment(&self, wait_ms: u64) -> Assignment {
        let r = self
            .http
            .post(format!("{}/v1/assignments?wait_ms={wait_ms}", self.url))
            .header(CONTRIBUTOR_HEADER, self.id.to_string())
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    async fn submit_raw(&self, body: Vec<u8>) -> Result<Receipt, (StatusCode, ApiError)> {
        let r = self
            .http
            .post(format!("{}/v1/submissions", self.url))
            .header(CONTRIBUTOR_HEADER, self.id.to_string())
            .bearer_auth(&self.token)
            .body(body)
            .send()
            .await
            .unwrap();
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

    let impostor = Client { token: "0".repeat(64), ..Client::register(&url, "x").await };
    let (s, e) = impostor.submit(&run, 0, &base, &delta(1.0)).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized));
    let r = reqwest::Client::new().post(format!("{url}/v1/assignments")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

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
async fn a_restarted_hub_keeps_accepted_submissions_and_tokens() {
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

    // Round 1: round 0's bytes again (staleness 1 would be accepted) are a replay, refused and
    // recorded; being told to retry while scoring was not a refusal.
    let (s, e) = clients[0].submit_raw(bodies[0].clone()).await.unwrap_err();
    assert_eq!((s, e.code), (StatusCode::CONFLICT, ErrorCode::Replay));
    let st = status(&url).await;
    let rejected = |id: u64| st.contributors.iter().find(|c| c.id == id).map(|c| c.rejected);
    assert_eq!((rejected(clients[0].id), rejected(late.id)), (Some(1), Some(0)));
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
