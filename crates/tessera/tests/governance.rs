//! Governance from the command line, end to end: a hub started with holders and rules, a
//! release proposed and voted with `tessera propose` / `tessera vote`, recorded at the round
//! boundary, checked by `tessera ledger verify --hub`, then `tessera release` writing the model
//! directory and uploading it through a server that speaks the Hugging Face Hub's upload API
//! (repository creation, preupload, the Git LFS batch API, the NDJSON commit).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{post, put};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{Value, json};
use sha2::Digest;

fn tessera(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(args: &[&str]) -> String {
    ok_env(args, &[])
}

fn ok_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = tessera(args, env);
    assert!(out.status.success(), "tessera {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = tessera(args, &[]);
    assert!(!out.status.success(), "tessera {args:?} should have failed");
    String::from_utf8(out.stderr).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// What the test Hub server holds: committed files by path, LFS objects by SHA-256.
#[derive(Default)]
struct HubRepo {
    files: BTreeMap<String, Vec<u8>>,
    lfs: BTreeMap<String, Vec<u8>>,
    created: Vec<String>,
}

type Shared = Arc<Mutex<HubRepo>>;

fn authorised(h: &HeaderMap) -> Result<(), StatusCode> {
    match h.get("authorization").and_then(|v| v.to_str().ok()) {
        Some("Bearer hf_test") => Ok(()),
        _ => Err(StatusCode::UNAUTHORIZED),
    }
}

/// The Hugging Face Hub's upload API, as `huggingface_hub` uses it, over a map.
fn hf_server(state: Shared) -> Router {
    async fn create(State(s): State<Shared>, h: HeaderMap, Json(v): Json<Value>) -> Result<Json<Value>, StatusCode> {
        authorised(&h)?;
        let name = format!("{}/{}", v["organization"].as_str().unwrap_or(""), v["name"].as_str().unwrap_or(""));
        s.lock().unwrap().created.push(name.clone());
        Ok(Json(json!({"url": name})))
    }
    async fn preupload(h: HeaderMap, Json(v): Json<Value>) -> Result<Json<Value>, StatusCode> {
        authorised(&h)?;
        let files: Vec<Value> = v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let path = f["path"].as_str().unwrap();
                let lfs = path.ends_with(".safetensors");
                json!({"path": path, "uploadMode": if lfs { "lfs" } else { "regular" }, "shouldIgnore": false})
            })
            .collect();
        Ok(Json(json!({"files": files})))
    }
    async fn batch(
        State(_s): State<Shared>,
        h: HeaderMap,
        UrlPath((ns, repo)): UrlPath<(String, String)>,
        body: Bytes,
    ) -> Result<Json<Value>, StatusCode> {
        authorised(&h)?;
        assert!(repo.ends_with(".git"), "{ns}/{repo}");
        let host = h.get("host").unwrap().to_str().unwrap().to_owned();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["operation"], "upload");
        let objects: Vec<Value> = v["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                let oid = o["oid"].as_str().unwrap();
                json!({"oid": oid, "size": o["size"], "actions": {"upload": {"href": format!("http://{host}/lfs/{oid}")}}})
            })
            .collect();
        Ok(Json(json!({"transfer": "basic", "objects": objects})))
    }
    async fn lfs_put(State(s): State<Shared>, UrlPath(oid): UrlPath<String>, body: Bytes) -> StatusCode {
        if hex::encode(sha2::Sha256::digest(&body)) != oid {
            return StatusCode::BAD_REQUEST;
        }
        s.lock().unwrap().lfs.insert(oid, body.to_vec());
        StatusCode::OK
    }
    async fn commit(State(s): State<Shared>, h: HeaderMap, body: String) -> Result<Json<Value>, StatusCode> {
        authorised(&h)?;
        let mut repo = s.lock().unwrap();
        let mut lines = body.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
        assert_eq!(lines.next().unwrap()["key"], "header");
        for line in lines {
            let v = &line["value"];
            let path = v["path"].as_str().unwrap().to_owned();
            let bytes = match line["key"].as_str().unwrap() {
                "file" => base64::engine::general_purpose::STANDARD.decode(v["content"].as_str().unwrap()).unwrap(),
                "lfsFile" => match repo.lfs.get(v["oid"].as_str().unwrap()) {
                    Some(b) => b.clone(),
                    None => return Err(StatusCode::UNPROCESSABLE_ENTITY),
                },
                other => panic!("commit line {other}"),
            };
            repo.files.insert(path, bytes);
        }
        Ok(Json(json!({"commitUrl": "http://hub/commit/1", "commitOid": "1"})))
    }
    Router::new()
        .route("/api/repos/create", post(create))
        .route("/api/models/{ns}/{name}/preupload/main", post(preupload))
        .route("/api/models/{ns}/{name}/commit/main", post(commit))
        .route("/{ns}/{repo}/info/lfs/objects/batch", post(batch))
        .route("/lfs/{oid}", put(lfs_put))
        .with_state(state)
}

/// Publishes the hub's current round with one zero pseudo-gradient from a registered key.
fn publish_round(url: &str, key: Arc<tessera_trust::Identity>) {
    publish_round_of(url, key, 0.0);
}

/// Publishes the hub's current round with one pseudo-gradient of `value` everywhere.
fn publish_round_of(url: &str, key: Arc<tessera_trust::Identity>, value: f32) {
    let hub = tessera_client::HubClient::new(url).unwrap();
    let run = hub.run().unwrap();
    let hub = hub.signed_by(key).pinning(tessera_trust::PublicKey::parse(&run.hub_key).unwrap());
    hub.register("trainer").unwrap();
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&run.run_id, &mut run_id).unwrap();
    let mut base = [0u8; 32];
    hex::decode_to_slice(&run.checkpoint, &mut base).unwrap();
    let zeros: Vec<Vec<f32>> = run.spec.tensors.iter().map(|t| vec![value; t.numel() as usize]).collect();
    let tensors = run.spec.tensors.iter().zip(&zeros).map(|(t, d)| (t.name.as_str(), t.shape.as_slice(), d.as_slice()));
    let body =
        tessera_protocol::PseudoGradient::build(run.spec.codec, run_id, run.round, base, tensors).unwrap().to_bytes();
    hub.submit(Arc::new(body), None, None).unwrap();
    assert_eq!(hub.run().unwrap().round, run.round + 1);
}

/// Starts `tessera hub` in `d` with `extra` flags and returns the process and its URL.
fn start_hub(d: &Path, extra: &[&str]) -> (std::process::Child, String) {
    let addr = d.join("addr");
    let db = format!("sqlite://{}/hub.db", p(d));
    let hub = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["hub", "--model", "tiny", "--seq-len", "16", "--rounds", "4", "--quorum", "1", "--inner-steps", "2"])
        .args(extra)
        .args(["--database", &db, "--store", p(&d.join("store")), "--key", p(&d.join("hub-key.pem"))])
        .args(["--listen", "127.0.0.1:0", "--addr-file", p(&addr)])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&addr).map_or(true, |a| a.trim().is_empty())
        && started.elapsed() < std::time::Duration::from_secs(120)
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (hub, format!("http://{}", std::fs::read_to_string(&addr).unwrap().trim()))
}

/// In a run its holders do not steer, only the operator (the hub's key) names a release.
#[test]
fn an_unsteered_runs_operator_names_its_releases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut hub, url) = start_hub(d, &[]);
    publish_round(&url, Arc::new(tessera_trust::Identity::generate().unwrap()));
    let out = d.join("v1");
    let err = fails(&["release", "--hub", &url, "--version", "v1", "--out", p(&out)]);
    assert!(err.contains("its operator names releases"), "{err}");
    ok(&["keygen", "--out", p(&d.join("someone.pem"))]);
    let err = fails(&[
        "release",
        "--hub",
        &url,
        "--version",
        "v1",
        "--out",
        p(&out),
        "--operator-key",
        p(&d.join("someone.pem")),
    ]);
    assert!(err.contains("is not the key of this run's hub"), "{err}");
    assert!(ok(&["proposals", "--hub", &url]).contains("not steered by its holders"));
    ok(&["release", "--hub", &url, "--version", "v1", "--out", p(&out), "--operator-key", p(&d.join("hub-key.pem"))]);
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("By the run's operator") && card.contains("round 1"), "{card}");
    let _ = hub.kill();
    let _ = hub.wait();
}

#[test]
fn holders_vote_a_release_and_tessera_release_publishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let holder = d.join("holder.pem");
    let other = d.join("other.pem");
    let holder_hex = ok(&["keygen", "--out", p(&holder)]).trim().to_owned();
    let other_hex = ok(&["keygen", "--out", p(&other)]).trim().to_owned();
    let operator = ok(&["keygen", "--out", p(&d.join("operator.pem"))]).trim().to_owned();
    std::fs::write(d.join("sale.toml"), format!("{holder_hex} = 700\n{other_hex} = 300\n")).unwrap();
    std::fs::write(
        d.join("rules.toml"),
        "voting_rounds = 1\nquorum_ppm = 500000\nthreshold_ppm = 500001\nmin_proposer_balance = 100\n\n\
         [bounds]\ninner_steps = [2, 20]\nreleases = true\n",
    )
    .unwrap();
    let (sale, rules) = (d.join("sale.toml"), d.join("rules.toml"));
    let flags = ["--operator", &operator, "--allocations", p(&sale), "--governance", p(&rules)];
    let (mut hub, url) = start_hub(d, &flags);

    // A proposal outside the bounds is refused with the bound; a release is proposed and voted.
    let err = fails(&["propose", "--hub", &url, "--key", p(&holder), "--title", "h", "--inner-steps", "99"]);
    assert!(err.contains("outside the run's bound [2, 20]"), "{err}");
    let out = ok(&["propose", "--hub", &url, "--key", p(&holder), "--title", "first release", "--release", "v0.1"]);
    let id = out.lines().next().unwrap().strip_prefix("proposal ").unwrap().trim().to_owned();
    ok(&["vote", "--hub", &url, "--key", p(&holder), "--proposal", &id, "yes"]);
    ok(&["vote", "--hub", &url, "--key", p(&other), "--proposal", &id, "no"]);
    let listed = ok(&["proposals", "--hub", &url]);
    assert!(listed.contains(&id) && listed.contains("[pending]") && listed.contains("2 voter(s)"), "{listed}");
    let err = fails(&["release", "--hub", &url, "--version", "v0.1", "--out", p(&d.join("early"))]);
    assert!(err.contains("no release named \"v0.1\" passed a vote"), "{err}");

    // The round boundary records it, tallies it (700 yes, 300 no) and applies it.
    publish_round(&url, Arc::new(tessera_trust::Identity::generate().unwrap()));
    let listed = ok(&["proposals", "--hub", &url]);
    assert!(listed.contains("[applied]") && listed.contains("yes 700 no 300 abstain 0 of 1000"), "{listed}");
    let verified = ok(&["ledger", "verify", "--hub", &url]);
    assert!(verified.contains("the spec the hub serves at round 1 is the one its ledger allows"), "{verified}");
    assert!(verified.contains("1 proposal(s), 1 passed"), "{verified}");

    // Released to a directory and to a Hugging Face repository.
    let repo: Shared = Arc::default();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(axum::serve(listener, hf_server(repo.clone())).into_future());
    let out_dir = d.join("v0.1");
    let args = ["release", "--hub", &url, "--version", "v0.1", "--out", p(&out_dir), "--repo", "tessera/test-model"];
    let said = ok_env(&args, &[("HF_ENDPOINT", &endpoint), ("HF_TOKEN", "hf_test")]);
    assert!(said.contains("uploaded to"), "{said}");
    let provenance: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("tessera-release.json")).unwrap()).unwrap();
    let checkpoint = provenance["checkpoint_blake3"].as_str().unwrap();
    let weights = std::fs::read(out_dir.join("model.safetensors")).unwrap();
    assert_eq!(
        blake3::hash(&weights).to_hex().as_str(),
        checkpoint,
        "the weights are the checkpoint the vote released"
    );
    let card = std::fs::read_to_string(out_dir.join("README.md")).unwrap();
    for want in ["library_name: transformers", "— v0.1", &id, "700 yes, 300 no", "Validation loss", "Merkle root"] {
        assert!(card.contains(want), "the model card lacks {want:?}:\n{card}");
    }
    let held = repo.lock().unwrap();
    assert_eq!(held.created, vec!["tessera/test-model".to_owned()]);
    for f in ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tessera-release.json"] {
        assert_eq!(held.files.get(f), Some(&std::fs::read(out_dir.join(f)).unwrap()), "{f} on the Hub");
    }
    assert_eq!(held.lfs.len(), 1, "the weights went through LFS");
    drop(held);
    // Released again into the same directory: replaced; into a directory of other files: refused.
    ok(&args[..7]);
    let err = fails(&["release", "--hub", &url, "--version", "v0.1", "--out", p(d)]);
    assert!(err.contains("is not a Tessera release"), "{err}");
    let err = fails(&["release", "--hub", &url, "--version", "v9", "--out", p(&d.join("v9"))]);
    assert!(err.contains("released: v0.1"), "{err}");
    let _ = hub.kill();
    let _ = hub.wait();
}

/// `tessera serve --follow-hub` serves the run's latest checkpoint as RUN-rN and follows the
/// run: a round that leaves the weights as they were renames the model, one that changes them
/// loads the new checkpoint; the run's name is an alias a strict request refuses.
#[test]
fn serve_follows_the_hubs_checkpoints_round_by_round() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (mut hub, url) = start_hub(d, &[]);
    let name = tessera_client::HubClient::new(&url).unwrap().run().unwrap().spec.name;
    let db = d.join("serve.sqlite");
    let key = ok(&["keys", "create", "tester", "--db", p(&db)]).trim().to_owned();
    let addr = d.join("serve.addr");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--follow-hub", &url, "--follow-every", "1", "--db", p(&db), "--addr", "127.0.0.1:0"])
        .args(["--addr-file", p(&addr), "--cache", p(&d.join("cache"))])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&addr).map_or(true, |a| a.trim().is_empty()) {
        assert!(started.elapsed() < std::time::Duration::from_secs(120), "serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let api = format!("http://{}", std::fs::read_to_string(&addr).unwrap().trim());
    let client = reqwest::blocking::Client::new();
    let model = || -> String {
        let v: Value = client.get(format!("{api}/v1/models")).bearer_auth(&key).send().unwrap().json().unwrap();
        v["data"][0]["id"].as_str().unwrap().to_owned()
    };
    let wait_for = |want: String| {
        let started = std::time::Instant::now();
        while model() != want {
            assert!(started.elapsed() < std::time::Duration::from_secs(60), "still {} not {want}", model());
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    let complete = |model: &str, strict: bool| -> (u16, Value) {
        let body = json!({"model": model, "prompt": "ab", "max_tokens": 6, "temperature": 0, "ignore_eos": true});
        let mut r = client.post(format!("{api}/v1/completions")).bearer_auth(&key).json(&body);
        if strict {
            r = r.header("x-tessera-strict", "1");
        }
        let r = r.send().unwrap();
        (r.status().as_u16(), r.json().unwrap())
    };
    assert_eq!(model(), format!("{name}-r0"));
    let (status, r0) = complete(&format!("{name}-r0"), true);
    assert_eq!(status, 200, "{r0}");
    let trainer = Arc::new(tessera_trust::Identity::generate().unwrap());
    publish_round(&url, trainer.clone());
    wait_for(format!("{name}-r1"));
    let (_, r1) = complete(&name, false);
    assert_eq!(r1["model"].as_str(), Some(format!("{name}-r1").as_str()));
    assert_eq!(r1["choices"][0]["text"], r0["choices"][0]["text"], "same weights, same text");
    publish_round_of(&url, trainer, 0.05);
    wait_for(format!("{name}-r2"));
    let (status, r2) = complete(&format!("{name}-r2"), true);
    assert_eq!(status, 200, "{r2}");
    assert_ne!(r2["choices"][0]["text"], r0["choices"][0]["text"], "new weights, new text");
    let (status, refused) = complete(&name, true);
    assert_eq!((status, refused["error"]["code"].as_str()), (400, Some("model_alias_refused")), "{refused}");
    let (status, _) = complete(&format!("{name}-r0"), false);
    assert_eq!(status, 404, "an old round's id is no longer served");
    for child in [&mut serve, &mut hub] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
