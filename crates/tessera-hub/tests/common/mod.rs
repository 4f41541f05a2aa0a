//! What the hub's tests share: a run spec, backends (SQLite and a directory; PostgreSQL and S3
//! where the test command provides them), a hub served over real HTTP on its own runtime, and
//! contributors that talk to it through `tessera-client`.

#![allow(dead_code, unused_imports)] // Each test file uses its own part.

pub use std::sync::Arc;
pub use std::time::Duration;

pub use reqwest::StatusCode;
pub use reqwest::blocking::Response;
pub use tessera_client::{ClientError, HubClient};
pub use tessera_hub::{Db, Hub, HubConfig, NewRun, Store};
pub use tessera_protocol::api::{
    Assignment, ContestSpec, DataSource, DataSpec, EvalSeed, HubStatus, InnerSpec, Leaderboard, OuterSpec, Receipt,
    RunInfo, ScoreReport, ScoringJob, SubmissionScore,
};
pub use tessera_protocol::{
    Aggregation, ApiError, Codec, ErrorCode, MessageView, PseudoGradient, RunSpec, TensorSpec, decode_weights,
    weights_hash,
};

pub fn spec(quorum: u32) -> RunSpec {
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
        governance: None,
    }
}

pub fn initial() -> Vec<Vec<f32>> {
    vec![(0..8).map(|i| i as f32 * 0.5).collect(), (0..32).map(|i| (i as f32 * 0.37).sin()).collect()]
}

/// Where a test hub keeps its state: SQLite + a directory, or the external services.
pub struct Backend {
    pub db: String,
    pub store: String,
    /// The hub's key file: a restarted hub serves the run with the key it was created with.
    pub key: std::path::PathBuf,
    pub _dir: tempfile::TempDir,
}

pub fn backend(kind: &str) -> Option<Backend> {
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

pub struct Server {
    pub url: String,
    pub hub: Arc<Hub>,
    pub rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    pub fn start(b: &Backend, spec: RunSpec) -> Server {
        Server::start_with(
            b,
            spec,
            initial(),
            HubConfig { validator_token: Some(VALIDATOR.into()), ..HubConfig::default() },
        )
    }

    pub fn start_with(b: &Backend, spec: RunSpec, weights: Vec<Vec<f32>>, config: HubConfig) -> Server {
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
            tessera_hub::serve(h, listener, tessera_edge::Limits::default(), async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server { url, hub, rt, stop: Some(tx), task: Some(task) }
    }

    pub fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self.rt.block_on(task);
        }
    }
}

/// A contributor: a client signing with its key, pinning the hub's.
pub struct Client {
    pub hub: HubClient,
    pub id: u64,
    pub key: Arc<tessera_trust::Identity>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A client of `url` with no retries: every refusal and failure shows.
pub fn client(url: &str) -> HubClient {
    HubClient::new(url).unwrap().with_patience(Duration::ZERO)
}

/// A refusal's HTTP status and body; anything else fails the test.
pub fn refused(e: ClientError) -> (StatusCode, ApiError) {
    match e {
        ClientError::Refused { status, error } => (StatusCode::from_u16(status).unwrap(), error),
        other => panic!("not a refusal: {other}"),
    }
}

/// The status an answer came with: `ok` if it succeeded.
pub fn status<T>(r: Result<T, ClientError>, ok: StatusCode) -> StatusCode {
    r.map_or_else(|e| refused(e).0, |_| ok)
}

/// A POST of `path` with exactly these headers (a signature to replay or to tamper with).
pub fn post_signed(hub: &HubClient, path: &str, headers: &[(&'static str, String)], body: Vec<u8>) -> Response {
    let mut b = hub.request(reqwest::Method::POST, path);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(body).send().unwrap()
}

impl Client {
    pub fn register(url: &str, name: &str) -> Client {
        Client::register_key(url, name, Arc::new(tessera_trust::Identity::generate().unwrap()))
    }

    pub fn register_key(url: &str, name: &str, key: Arc<tessera_trust::Identity>) -> Client {
        let hub = client(url);
        let hub_key = tessera_trust::PublicKey::parse(&hub.run().unwrap().hub_key).unwrap();
        let hub = hub.signed_by(key.clone()).pinning(hub_key);
        let reg = hub.register(name).unwrap();
        assert_eq!(reg.public_key, key.public().hex());
        Client { hub, id: reg.contributor_id, key }
    }

    /// A client of `url` that signs with `key`, registered or not.
    pub fn with_key(url: &str, key: Arc<tessera_trust::Identity>) -> Client {
        Client { hub: client(url).signed_by(key.clone()), id: u64::MAX, key }
    }

    /// The signature headers of a POST of `path` with `body`, now.
    pub fn signature(&self, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
        self.hub.signature("POST", path, body, now_ms()).unwrap()
    }

    pub fn post(&self, path: &str, body: Vec<u8>) -> Response {
        post_signed(&self.hub, path, &self.signature(path, &body), body)
    }

    pub fn assignment(&self, wait_ms: u64) -> Assignment {
        self.hub.assignment(Duration::from_millis(wait_ms)).unwrap()
    }

    pub fn submit_raw(&self, body: Vec<u8>) -> Result<Receipt, (StatusCode, ApiError)> {
        self.hub.submit(Arc::new(body), None, None).map_err(refused)
    }

    pub fn submit(
        &self,
        info: &RunInfo,
        round: u64,
        base: &str,
        delta: &[Vec<f32>],
    ) -> Result<Receipt, (StatusCode, ApiError)> {
        self.submit_raw(message(info, info.spec.codec, round, base, delta))
    }
}

pub fn message(info: &RunInfo, codec: Codec, round: u64, base: &str, delta: &[Vec<f32>]) -> Vec<u8> {
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&info.run_id, &mut run_id).unwrap();
    let mut base_hash = [0u8; 32];
    hex::decode_to_slice(base, &mut base_hash).unwrap();
    let tensors = info.spec.tensors.iter().zip(delta).map(|(t, d)| (t.name.as_str(), t.shape.as_slice(), d.as_slice()));
    PseudoGradient::build(codec, run_id, round, base_hash, tensors).unwrap().to_bytes()
}

pub fn info(url: &str) -> RunInfo {
    client(url).run().unwrap()
}

pub fn status_of(url: &str) -> HubStatus {
    client(url).status().unwrap()
}

/// A published checkpoint's weights.
pub fn weights(url: &str, hash: &str, tensors: &[TensorSpec]) -> Vec<Vec<f32>> {
    decode_weights(&client(url).checkpoint(hash, None).unwrap(), tensors).unwrap()
}

pub fn leaderboard(url: &str) -> Leaderboard {
    client(url).leaderboard().unwrap()
}

pub fn delta(scale: f32) -> Vec<Vec<f32>> {
    vec![(0..8).map(|i| scale * (i as f32 - 3.0)).collect(), (0..32).map(|i| scale * (i as f32 * 0.11).cos()).collect()]
}

pub const VALIDATOR: &str = "validator-secret";

pub fn validator_get(url: &str, path: &str, token: Option<&str>) -> Response {
    let mut r = client(url).get(path);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().unwrap()
}

pub fn post_scores(url: &str, report: &ScoreReport) -> StatusCode {
    status(client(url).with_validator_token(VALIDATOR).post_scores(report), StatusCode::NO_CONTENT)
}
