//! DiLoCo over the network with real processes: a `tessera hub`, `tessera contribute` workers,
//! `kill -9` of either at awkward moments, and the demo.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessera_protocol::api::HubStatus;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// A small, fast run: the `tiny` model on a small embedded corpus.
const RUN: &[&str] = &["--model", "tiny", "--synthetic-chars", "20000", "--batch-size", "4", "--warmup-steps", "2"];

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn kill9(&mut self) {
        // Child::kill is SIGKILL on Unix: no chance to clean up.
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    fn wait_success(&mut self, within: Duration, log: &Path) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "process failed ({status}):\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
                return;
            }
            assert!(
                start.elapsed() < within,
                "process still running after {within:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn spawn(args: &[String], log: &Path) -> Proc {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Proc(child)
}

fn hub(dir: &Path, port: u16, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "hub".into(),
        "--database".into(),
        format!("sqlite://{}", dir.join("hub.db").display()),
        "--store".into(),
        dir.join("store").display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--key".into(),
        dir.join("hub-key.pem").display().to_string(),
    ];
    args.extend(RUN.iter().chain(extra).map(|s| s.to_string()));
    spawn(&args, &dir.join("hub.log"))
}

fn contributor(dir: &Path, port: u16, name: &str) -> Proc {
    contributor_with(dir, port, name, &[])
}

fn contributor_with(dir: &Path, port: u16, name: &str, extra: &[&str]) -> Proc {
    let mut args: Vec<String> = vec![
        "contribute".into(),
        "--hub".into(),
        format!("http://127.0.0.1:{port}"),
        "--state-dir".into(),
        dir.join(name).display().to_string(),
        "--name".into(),
        name.into(),
        "--threads".into(),
        "1".into(),
        "--patience".into(),
        "120".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn(&args, &dir.join(format!("{name}.log")))
}

/// A client of the hub on `port`, trying once (the hub may be restarting).
fn client(port: u16) -> tessera_client::HubClient {
    let url = format!("http://127.0.0.1:{port}");
    tessera_client::HubClient::new(&url).expect("a hub URL").with_patience(std::time::Duration::ZERO)
}

/// A client that checks the hub's signature on every answer (its key pinned on first contact).
fn pinned(port: u16) -> tessera_client::HubClient {
    let c = client(port);
    let key = tessera_trust::PublicKey::parse(&c.run().unwrap().hub_key).unwrap();
    c.pinning(key)
}

fn status(port: u16) -> Option<HubStatus> {
    client(port).status().ok()
}

/// Polls the hub until `pred` holds (the hub may be restarting meanwhile).
fn wait_for(port: u16, within: Duration, what: &str, pred: impl Fn(&HubStatus) -> bool) -> HubStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = status(port).filter(|s| pred(s)) {
            return s;
        }
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One process's log in `dir` (`name.log`).
fn log_of(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "log") {
            out += &format!("==> {} <==\n{}\n", p.display(), std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    out
}

/// Base rounds each contributor was told were accepted, from its log.
fn receipts(log: &Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("round") && l.contains("accepted"))
        .filter_map(|l| l.split(':').next()?.trim_start_matches("round").trim().parse().ok())
        .collect()
}

#[test]
fn killing_the_hub_loses_no_accepted_submission() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let flags = ["--inner-steps", "3", "--rounds", "8", "--quorum", "2", "--deadline", "30", "--codec", "int8"];
    let mut h = hub(d, port, &flags);
    let mut workers = [contributor(d, port, "a"), contributor(d, port, "b")];
    let mut seen: Vec<HubStatus> = Vec::new();
    // Kill the hub three times: between rounds, and right after submissions land.
    for (i, target) in [2u64, 4, 6].into_iter().enumerate() {
        let s = wait_for(port, Duration::from_secs(120), "progress", |s| {
            s.round >= target || (s.round + 1 == target && s.history.last().is_some_and(|r| r.accepted > 0))
        });
        std::thread::sleep(Duration::from_millis(37 * i as u64));
        let before = status(port).unwrap_or(s);
        h.kill9();
        seen.push(before);
        std::thread::sleep(Duration::from_millis(300));
        h = hub(d, port, &flags);
    }
    for (w, name) in workers.iter_mut().zip(["a", "b"]) {
        w.wait_success(Duration::from_secs(180), &d.join(format!("{name}.log")));
    }
    let last = wait_for(port, Duration::from_secs(30), "the finished run", |s| s.finished);
    assert_eq!(last.round, 8, "{}", logs(d));
    for before in &seen {
        for c in &before.contributors {
            let now = last.contributors.iter().find(|x| x.id == c.id).unwrap();
            for r in &c.submitted_rounds {
                assert!(now.submitted_rounds.contains(r), "contributor {} lost its round-{r} submission", c.id);
            }
        }
    }
    for name in ["a", "b"] {
        let c = last.contributors.iter().find(|c| c.name == name).unwrap();
        for r in receipts(&d.join(format!("{name}.log"))) {
            assert!(c.submitted_rounds.contains(&r), "{name} holds a receipt for round {r} the hub lost\n{}", logs(d));
        }
    }
    assert_eq!(last.contributors.len(), 2, "contributors keep their identity across hub restarts");
    drop(h);
}

/// A fresh PostgreSQL database for one test (from `TESSERA_TEST_POSTGRES`, which
/// `scripts/test` provides), or `None` with a loud skip.
fn postgres_database() -> Option<String> {
    let Ok(admin) = std::env::var("TESSERA_TEST_POSTGRES") else {
        assert!(
            std::env::var("TESSERA_TEST_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "TESSERA_TEST_POSTGRES is not set"
        );
        eprintln!("SKIPPED: TESSERA_TEST_POSTGRES is not set (scripts/test provides it)");
        return None;
    };
    let name = format!("swarm_{}_{}", std::process::id(), free_port());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&admin).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&pool).await.unwrap();
    });
    Some(format!("{}/{name}", admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b)))
}

/// Two `tessera hub` processes on one PostgreSQL database and one store, a contributor on
/// each; one replica is killed with SIGKILL three times (its supervisor restarting it). Every
/// acknowledged submission survives, the run finishes once, both replicas agree.
#[test]
fn killing_a_replica_loses_no_accepted_submission() {
    let Some(database) = postgres_database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ports = [free_port(), free_port()];
    let flags = ["--inner-steps", "3", "--rounds", "8", "--quorum", "2", "--deadline", "30", "--codec", "int8"];
    let replica = |k: usize| {
        let mut args: Vec<String> = vec![
            "hub".into(),
            "--database".into(),
            database.clone(),
            "--store".into(),
            d.join("store").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", ports[k]),
            "--key".into(),
            d.join("hub-key.pem").display().to_string(),
        ];
        args.extend(RUN.iter().chain(&flags).map(|s| s.to_string()));
        spawn(&args, &d.join(format!("hub{k}.log")))
    };
    let mut first = replica(0);
    wait_for(ports[0], Duration::from_secs(60), "the first replica", |_| true);
    let second = replica(1);
    wait_for(ports[1], Duration::from_secs(60), "the second replica", |_| true);
    let mut workers = [contributor(d, ports[0], "a"), contributor(d, ports[1], "b")];
    for (i, target) in [2u64, 4, 6].into_iter().enumerate() {
        wait_for(ports[1], Duration::from_secs(120), "progress", |s| {
            s.round >= target || (s.round + 1 == target && s.history.last().is_some_and(|r| r.accepted > 0))
        });
        std::thread::sleep(Duration::from_millis(37 * i as u64));
        first.kill9();
        std::thread::sleep(Duration::from_millis(300));
        first = replica(0);
    }
    for (w, name) in workers.iter_mut().zip(["a", "b"]) {
        w.wait_success(Duration::from_secs(180), &d.join(format!("{name}.log")));
    }
    let last = wait_for(ports[1], Duration::from_secs(30), "the finished run", |s| s.finished);
    assert_eq!(last.round, 8, "{}", logs(d));
    let other = wait_for(ports[0], Duration::from_secs(30), "the other replica", |s| s.finished);
    assert_eq!(other.round, last.round);
    assert_eq!(other.history.last().map(|h| &h.result_checkpoint), last.history.last().map(|h| &h.result_checkpoint));
    for name in ["a", "b"] {
        let c = last.contributors.iter().find(|c| c.name == name).unwrap();
        for r in receipts(&d.join(format!("{name}.log"))) {
            assert!(c.submitted_rounds.contains(&r), "{name} holds a receipt for round {r} the hub lost\n{}", logs(d));
        }
    }
    assert_eq!(last.history.iter().filter(|h| h.result_checkpoint.is_some()).count(), 8, "each round once");
    drop((first, second));
}

#[test]
fn a_killed_contributor_rejoins_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let _h = hub(d, port, &["--inner-steps", "6", "--rounds", "6", "--quorum", "1", "--codec", "topk:64:4"]);
    let mut a = contributor(d, port, "a");
    wait_for(port, Duration::from_secs(120), "round 2", |s| s.round >= 2);
    std::thread::sleep(Duration::from_millis(150)); // mid-round
    a.kill9();
    let before = status(port).unwrap();
    let mut a = contributor(d, port, "a");
    a.wait_success(Duration::from_secs(180), &d.join("a.log"));
    let last = status(port).unwrap();
    assert!(last.finished, "{}", logs(d));
    assert_eq!(last.contributors.len(), 1, "the restarted contributor reuses its identity\n{}", logs(d));
    let rounds = &last.contributors[0].submitted_rounds;
    assert_eq!(rounds, &(0..6).collect::<Vec<u64>>(), "{}", logs(d));
    assert!(before.contributors[0].submitted_rounds.len() >= 2);
    // The inner optimizer continued from its saved state: one round of H steps per finished
    // round, less at most the round in flight when it was killed (if the hub had already
    // accepted that round's submission, its training is not repeated).
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("a/trainer/trainer_state.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step.is_multiple_of(6) && (30..=36).contains(&step), "inner step {step}\n{}", logs(d));
    assert!(std::fs::read_to_string(d.join("a.log")).unwrap().contains("rejoining with the saved identity"));
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("RUST_LOG", "warn").output().unwrap()
}

fn final_loss(stdout: &str, prefix: &str) -> f64 {
    let line = stdout.lines().find(|l| l.contains(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"));
    let rest = &line[line.find("val loss ").unwrap() + 9..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// A run small enough for a test: the tiny model on a short embedded corpus, H = 4.
const TINY_RUN: [&str; 10] =
    ["--model", "tiny", "--synthetic-chars", "20000", "--batch-size", "4", "--inner-steps", "4", "--lr", "0.003"];

/// The hub and contributors over HTTP compute what the in-process simulation computes, codecs
/// and broadcast updates included: the final global model is the same up to float rounding.
#[test]
fn the_networked_run_matches_the_in_process_simulation() {
    let dir = tempfile::tempdir().unwrap();
    let common = [&TINY_RUN[..], &["--rounds", "3"]].concat();
    // (name, the hub's flags, the simulation's flags): lossless; int8 both ways; top-k with
    // decaying error feedback and plain outer SGD (the SparseLoCo recipe).
    let sparse = ["--feedback-decay", "0.9", "--outer-lr", "1.5", "--outer-momentum", "0", "--broadcast-codec", "int8"];
    let cases: [(&str, Vec<&str>, Vec<&str>); 3] = [
        ("f32", vec!["--codec", "f32", "--broadcast-codec", "f32"], vec!["--codec", "f32", "--broadcast-codec", "f32"]),
        (
            "int8",
            vec!["--codec", "int8", "--broadcast-codec", "int8"],
            vec!["--codec", "int8", "--broadcast-codec", "int8"],
        ),
        (
            "topk",
            [&["--codec", "topk:64:8"][..], &sparse].concat(),
            [&["--codec", "topk", "--topk-chunk", "64", "--topk-k", "8"][..], &sparse].concat(),
        ),
    ];
    for (up, hub_flags, sim_flags) in cases {
        let d: PathBuf = dir.path().join(up);
        let mut demo_args = vec!["demo", "--contributors", "2", "--dir", d.to_str().unwrap()];
        demo_args.extend(&hub_flags);
        demo_args.extend(&common);
        let demo = run(&demo_args);
        let out = String::from_utf8_lossy(&demo.stdout).into_owned();
        assert!(demo.status.success(), "{out}\n{}", String::from_utf8_lossy(&demo.stderr));
        for needle in ["finished: 3 rounds", "synchronous data parallel would move", "contributor-0", "contributor-1"] {
            assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
        }
        assert!(d.join("final/config.json").exists() && d.join("final/model.safetensors").exists());

        let mut sim_args = vec!["bench", "diloco", "--workers", "2", "--threads", "1"];
        sim_args.extend(&sim_flags);
        sim_args.extend(&common);
        let sim = run(&sim_args);
        let sim_out = String::from_utf8_lossy(&sim.stdout).into_owned();
        assert!(sim.status.success(), "{sim_out}\n{}", String::from_utf8_lossy(&sim.stderr));
        let (net, local) = (final_loss(&out, "final global model"), final_loss(&sim_out, "DiLoCo: final"));
        assert!((net - local).abs() < 1e-3, "{up}: network {net} vs simulation {local}\n{out}\n{sim_out}");
    }
}

/// A run on a published dataset, end to end: prepare, publish to a directory, serve it over
/// HTTP with an access log, and train through the hub with two contributors. Each round assigns
/// every contributor one training shard (its data slot's pick); the server's access log shows
/// that exactly those shards were fetched (and the next round's, prefetched), never the whole
/// dataset, and each contributor's cache holds only its own.
/// `tessera data serve` of a published dataset on a free port, logging each request to
/// `access`; returns once it accepts connections, with its URL.
/// `tessera ARGS` — a three-round demo — with `cache` as its cache directory, to the end.
fn three_round_demo(args: &[&str], cache: &Path) {
    let demo = Command::new(BIN).args(args).env("RUST_LOG", "warn").env("XDG_CACHE_HOME", cache).output().unwrap();
    let out = String::from_utf8_lossy(&demo.stdout).into_owned();
    assert!(demo.status.success(), "{out}\n{}", String::from_utf8_lossy(&demo.stderr));
    assert!(out.contains("finished: 3 rounds"), "{out}");
}

fn serve_dataset(published: &Path, access: &Path, log: &Path) -> (Proc, String) {
    let port = free_port();
    let args = ["data", "serve", &published.display().to_string(), "--addr", &format!("127.0.0.1:{port}")]
        .iter()
        .map(|s| s.to_string())
        .chain(["--access-log".to_string(), access.display().to_string()])
        .collect::<Vec<_>>();
    let server = spawn(&args, log);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "tessera data serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, format!("http://127.0.0.1:{port}"))
}

#[test]
fn contributors_fetch_only_their_assigned_shards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dataset");
    let prepared = run(&[
        "data",
        "prepare",
        "--out",
        data.to_str().unwrap(),
        "--synthetic-chars",
        "200000",
        "--shard-tokens",
        "10000",
    ]);
    assert!(prepared.status.success(), "{}", String::from_utf8_lossy(&prepared.stderr));
    let published = dir.path().join("published");
    let publish = run(&["data", "publish", data.to_str().unwrap(), published.to_str().unwrap()]);
    assert!(publish.status.success(), "{}", String::from_utf8_lossy(&publish.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(published.join("manifest.json")).unwrap()).unwrap();
    let split = |which: &str| -> Vec<String> {
        manifest["shards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["split"] == which)
            .map(|e| e["hash"].as_str().unwrap().to_owned())
            .collect()
    };
    let (train, validation) = (split("train"), split("validation"));
    assert_eq!(train.len(), 20);

    let access = dir.path().join("access.jsonl");
    let (_server, url) = serve_dataset(&published, &access, &dir.path().join("serve.log"));

    let d = dir.path().join("run");
    let mut args = vec!["demo", "--dir", d.to_str().unwrap(), "--contributors", "2", "--rounds", "3", "--data", &url];
    args.extend(&TINY_RUN[..2]);
    args.extend(&TINY_RUN[4..]);
    three_round_demo(&args, dir.path());

    // Who was assigned what: data slot = contributor id mod 64 (ids count from 0); rounds
    // 0..=3, the last only prefetched. The run's seed is the default, 1337.
    let mut assigned = std::collections::BTreeSet::new();
    let mut slots = Vec::new();
    for c in 0..2u64 {
        let state = d.join(format!("contributor-{c}"));
        let identity: serde_json::Value =
            serde_json::from_slice(&std::fs::read(state.join("identity.json")).unwrap()).unwrap();
        let slot = identity["contributor_id"].as_u64().unwrap();
        slots.push(slot);
        let mine: std::collections::BTreeSet<String> = (0..=3u64)
            .map(|round| {
                train[tessera_protocol::data::assigned_shard(1337, round, slot, 64, 20).unwrap().shard as usize].clone()
            })
            .collect();
        let held: std::collections::BTreeSet<String> = std::fs::read_dir(state.join("data"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_string_lossy().strip_suffix(".tshard").map(str::to_owned))
            .filter(|h| train.contains(h))
            .collect();
        assert!(held.is_subset(&mine), "contributor {c} holds {held:?}, was assigned {mine:?}");
        assert!(held.len() >= 3, "contributor {c} holds {held:?}");
        assigned.extend(mine);
    }
    assert!(assigned.len() < train.len());

    // The server's access log: every training shard fetched was assigned to someone, every
    // shard a round trained on was fetched, and only validation shards besides (the held-out
    // tokens of the contributors and of the final evaluation).
    let log = std::fs::read_to_string(&access).unwrap();
    let mut fetched_train = std::collections::BTreeSet::new();
    for line in log.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap();
        let path = entry["path"].as_str().unwrap();
        let Some(hash) = path.strip_prefix("/shards/").and_then(|p| p.strip_suffix(".tshard")) else {
            assert!(["/manifest.json", "/tokenizer.json"].contains(&path), "unexpected request {line}");
            continue;
        };
        assert_eq!(entry["method"], "GET", "{line}");
        if validation.iter().any(|v| v == hash) {
            continue;
        }
        assert!(assigned.contains(hash), "shard {hash} was fetched but assigned to nobody: {line}");
        fetched_train.insert(hash.to_owned());
    }
    for (c, &slot) in slots.iter().enumerate() {
        for round in 0..3u64 {
            let shard =
                &train[tessera_protocol::data::assigned_shard(1337, round, slot, 64, 20).unwrap().shard as usize];
            assert!(fetched_train.contains(shard), "contributor {c}'s round-{round} shard {shard} was never fetched");
        }
    }
    assert!(fetched_train.len() < train.len(), "the whole dataset was fetched: {log}");
}

/// A run on a mixture of two published datasets (the same byte tokenizer), weights 1 : 1 over
/// two data slots: each round, slot 0 trains a shard of the run's own dataset and slot 1 one of
/// the mixed dataset, each fetched from its own server; the validator checks each submission's
/// data fit on the shard of the dataset its assignment named, and both contributors earn.
#[test]
fn contributors_train_a_mixture_of_published_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Vec::new();
    let mut served = Vec::new();
    for (name, words) in [
        ("prose", ["the", "cat", "sat", "on", "a", "mat", "and", "slept"]),
        ("code", ["fn", "let", "x", "=", "1", ";", "{", "}"]),
    ] {
        // 400 documents of 100 words: split by document into training and validation.
        let doc = |d: usize| {
            let mut x = d as u64 * 2_654_435_761 + 1;
            let body: Vec<&str> = (0..100)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                    words[(x >> 33) as usize % words.len()]
                })
                .collect();
            format!("{d}: {}", body.join(" "))
        };
        let lines: Vec<String> =
            (0..400).map(|d| serde_json::json!({"id": format!("{name}-{d}"), "text": doc(d)}).to_string()).collect();
        let src = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&src, lines.join("\n") + "\n").unwrap();
        let out = dir.path().join(name);
        let prepared = run(&[
            "data",
            "prepare",
            src.to_str().unwrap(),
            "--tokenizer",
            "byte",
            "--out",
            out.to_str().unwrap(),
            "--shard-tokens",
            "10000",
        ]);
        assert!(prepared.status.success(), "{}", String::from_utf8_lossy(&prepared.stderr));
        let published = dir.path().join(format!("{name}-published"));
        let publish = run(&["data", "publish", out.to_str().unwrap(), published.to_str().unwrap()]);
        assert!(publish.status.success(), "{}", String::from_utf8_lossy(&publish.stderr));
        let access = dir.path().join(format!("{name}-access.jsonl"));
        let (server, url) = serve_dataset(&published, &access, &dir.path().join(format!("{name}-serve.log")));
        serve.push(server);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(published.join("manifest.json")).unwrap()).unwrap();
        let train: Vec<String> = manifest["shards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["split"] == "train")
            .map(|e| e["hash"].as_str().unwrap().to_owned())
            .collect();
        served.push((url, access, train));
    }
    let d = dir.path().join("run");
    let mut args = vec!["demo", "--dir", d.to_str().unwrap(), "--contributors", "2", "--rounds", "3", "--scored"];
    args.extend(["--data", &served[0].0, "--mix-data", &served[1].0, "--mix-weights", "1,1", "--data-slots", "2"]);
    args.extend(&TINY_RUN[..2]);
    args.extend(&TINY_RUN[4..]);
    three_round_demo(&args, dir.path());

    // Each round's slot 0 took the run's own dataset and slot 1 the mixed one: each server was
    // asked for exactly the training shards its dataset's slot was assigned (and no other).
    // The run's spec, as the hub stored it (the demo's hub has stopped).
    let db = d.join("hub.db");
    let (spec, flagged, earning): (tessera_protocol::RunSpec, i64, Vec<i64>) = {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            sqlx::any::install_default_drivers();
            let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
            let spec: String = sqlx::query_scalar("SELECT spec FROM runs").fetch_one(&pool).await.unwrap();
            let flagged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM scores WHERE flag = 'wrong_data'")
                .fetch_one(&pool)
                .await
                .unwrap();
            let earning: Vec<i64> =
                sqlx::query_scalar("SELECT DISTINCT contributor FROM scores WHERE reward > 0 ORDER BY contributor")
                    .fetch_all(&pool)
                    .await
                    .unwrap();
            (serde_json::from_str(&spec).unwrap(), flagged, earning)
        })
    };
    // The validator checked each submission on its own dataset's shard: nobody was flagged for
    // training on other data, and both contributors (one per dataset) earned.
    assert_eq!((flagged, earning), (0, vec![0, 1]));
    assert_eq!(spec.data.source.weights_at(0), vec![1, 1]);
    for (source, (_, access, train)) in served.iter().enumerate() {
        let assigned: std::collections::BTreeSet<&String> = (0..=3u64)
            .flat_map(|round| (0..2u64).map(move |c| (round, c)))
            .filter_map(|(round, c)| tessera_protocol::data::data_assignment(&spec, round, c))
            .filter(|a| a.source as usize == source)
            .map(|a| &train[a.shard as usize])
            .collect();
        assert!(!assigned.is_empty());
        let log = std::fs::read_to_string(access).unwrap();
        let fetched: std::collections::BTreeSet<String> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|e| {
                e["path"]
                    .as_str()
                    .and_then(|p| p.strip_prefix("/shards/"))
                    .and_then(|p| p.strip_suffix(".tshard"))
                    .map(str::to_owned)
            })
            .filter(|h| train.contains(h))
            .collect();
        assert!(
            fetched.len() >= 3,
            "dataset {source} served {} training shards, fewer than its 3 rounds: {log}",
            fetched.len()
        );
        for h in &fetched {
            assert!(assigned.contains(h), "dataset {source}: shard {h} was fetched but assigned to nobody");
        }
    }
    drop(serve);
}

/// A lone contributor that overlaps its transfers with training reconstructs the hub's outer
/// step exactly, so with lossless codecs its run ends where the plain run ends; its report shows
/// every round submitted and the waits it measured.
#[test]
fn an_overlapped_lone_contributor_follows_the_plain_run() {
    let dir = tempfile::tempdir().unwrap();
    let common =
        [&TINY_RUN[..], &["--rounds", "4", "--codec", "f32", "--broadcast-codec", "f32", "--contributors", "1"]]
            .concat();
    let mut losses = Vec::new();
    for overlap in [false, true] {
        let d: PathBuf = dir.path().join(if overlap { "overlapped" } else { "plain" });
        let mut args = vec!["demo", "--dir", d.to_str().unwrap()];
        args.extend(&common);
        if overlap {
            args.push("--overlap");
        }
        let demo = run(&args);
        let out = String::from_utf8_lossy(&demo.stdout).into_owned();
        assert!(demo.status.success(), "{out}\n{}", String::from_utf8_lossy(&demo.stderr));
        losses.push(final_loss(&out, "final global model"));
        let report = std::fs::read_to_string(d.join("contributor-0.report.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = report.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 5, "four rounds and the totals:\n{report}");
        for (r, line) in lines[..4].iter().enumerate() {
            assert_eq!(line["round"], r as u64, "{report}");
            assert!(line["outcome"]["Accepted"].is_object(), "{report}");
            // Overlapped rounds but the last were sent while the next one trained.
            assert_eq!(line["waited_s"].is_number(), overlap && r < 3, "{report}");
        }
        assert_eq!(lines[4]["rounds"], 4);
        let log = log_of(&d, "contributor-0");
        assert_eq!(log.contains("transfers overlapped with training"), overlap, "{log}");
    }
    let (plain, overlapped) = (losses[0], losses[1]);
    assert!((plain - overlapped).abs() < 1e-3, "plain {plain} vs overlapped {overlapped}");
}

/// A sealed, scored run with real processes: two honest contributors, one that scales its Δ
/// ×100 (`--adversary scale`), and `tessera validator` (attesting with the INSECURE development
/// stand-in the run allows) opening, scoring and settling every round over HTTP. A validator
/// without a TEE is refused; the attacker earns nothing and ranks last; `tessera leaderboard`
/// shows who qualifies; `tessera ledger verify` checks the hub's ledger and names a tamper.
#[test]
fn a_sealed_scored_run_with_a_validator_and_an_attacker() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let rounds = 4u64;
    let flags = [
        "--inner-steps",
        "4",
        "--rounds",
        "4",
        "--quorum",
        "4",
        "--deadline",
        "60",
        "--codec",
        "int8",
        "--scored",
        "--validator-token",
        "tok",
        "--reward-units",
        "1000",
        "--promote-top",
        "2",
        "--eval-windows",
        "8",
        "--fit-windows",
        "4",
        "--sealed",
        "--insecure-dev-tee",
    ];
    // Steered by its holders: a backer (allocated at genesis) proposes and votes a release before
    // anyone trains; the boundary writes it after the validator's signed entries for the round.
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let backer = d.join("backer.pem");
    let backer_hex = run(&["keygen", "--out", backer.to_str().unwrap()]).trim().to_owned();
    let operator = run(&["keygen", "--out", d.join("operator.pem").to_str().unwrap()]).trim().to_owned();
    std::fs::write(d.join("sale.toml"), format!("{backer_hex} = 10000\n")).unwrap();
    std::fs::write(
        d.join("rules.toml"),
        "voting_rounds = 1\nquorum_ppm = 200000\nthreshold_ppm = 500001\n[bounds]\nreleases = true\n",
    )
    .unwrap();
    let (sale, rules) = (d.join("sale.toml").display().to_string(), d.join("rules.toml").display().to_string());
    let steered = ["--operator", &operator, "--allocations", &sale, "--governance", &rules];
    let _h = hub(d, port, &[&flags[..], &steered[..]].concat());
    let url = format!("http://127.0.0.1:{port}");
    wait_for(port, Duration::from_secs(60), "the hub", |_| true);
    let key = backer.to_str().unwrap();
    let said = run(&["propose", "--hub", &url, "--key", key, "--title", "first", "--release", "v0"]);
    let proposal = said.lines().next().unwrap().trim_start_matches("proposal ").trim().to_owned();
    run(&["vote", "--hub", &url, "--key", key, "--proposal", &proposal, "yes"]);
    let mut workers = [
        contributor(d, port, "a"),
        contributor(d, port, "b"),
        contributor_with(d, port, "bad", &["--adversary", "scale"]),
        contributor_with(d, port, "nan", &["--adversary", "nan"]),
    ];
    let mut validate: Vec<String> =
        ["validator", "--hub", &url, "--token", "tok", "--threads", "1"].iter().map(|s| s.to_string()).collect();
    // No TEE here: without the development flag the validator refuses to start.
    let mut untrusted = spawn(&validate, &d.join("untrusted.log"));
    let code = untrusted.0.wait().unwrap();
    let said = log_of(d, "untrusted");
    assert!(!code.success() && said.contains("no TEE here") && said.contains("--insecure-dev-tee"), "{said}");
    validate.push("--insecure-dev-tee".into());
    // The validator's Prometheus metrics, scraped while it works; the last answer is kept.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    validate.extend(["--metrics-addr".to_string(), format!("127.0.0.1:{metrics_port}")]);
    let mut v = spawn(&validate, &d.join("validator.log"));
    let scraped = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let scraping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let scraper = {
        let (scraped, scraping) = (scraped.clone(), scraping.clone());
        std::thread::spawn(move || {
            while scraping.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(text) =
                    reqwest::blocking::get(format!("http://127.0.0.1:{metrics_port}/metrics")).and_then(|r| r.text())
                {
                    *scraped.lock().unwrap() = text;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    for (w, name) in workers.iter_mut().zip(["a", "b", "bad", "nan"]) {
        w.wait_success(Duration::from_secs(240), &d.join(format!("{name}.log")));
    }
    v.wait_success(Duration::from_secs(60), &d.join("validator.log"));
    scraping.store(false, std::sync::atomic::Ordering::Relaxed);
    scraper.join().unwrap();
    let metrics = scraped.lock().unwrap().clone();
    assert!(metrics.contains("tessera_validator_rounds_scored_total"), "{metrics}");
    assert!(metrics.contains("tessera_validator_round_seconds_bucket"), "{metrics}");
    // The hub's own metrics count the same run.
    let hub_metrics = tessera_client::HubClient::new(&url).unwrap().metrics().unwrap();
    assert!(
        hub_metrics.contains("tessera_hub_rounds_published_total") && hub_metrics.contains("outcome=\"accepted\""),
        "{hub_metrics}"
    );
    let last = wait_for(port, Duration::from_secs(30), "the finished run", |s| s.finished);
    assert_eq!(last.round, rounds, "{}", logs(d));

    let out = Command::new(BIN).args(["leaderboard", "--hub", &url, "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let board: tessera_protocol::api::Leaderboard = serde_json::from_slice(&out.stdout).unwrap();
    let row = |name: &str| board.rows.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(row("bad").rewards, 0, "{}", logs(d));
    assert_eq!(row("nan").rewards, 0, "{}", logs(d));
    let last_two: Vec<&str> = board.rows.iter().rev().take(2).map(|r| r.name.as_str()).collect();
    assert!(last_two.contains(&"bad") && last_two.contains(&"nan"), "{board:?}");
    let paid: u64 = board.rows.iter().map(|r| r.rewards).sum();
    assert!(paid > 0 && paid <= 1000 * rounds && paid.is_multiple_of(1000), "whole rounds of units, exactly: {paid}");
    assert!(row("a").qualified && row("b").qualified && !row("bad").qualified && !row("nan").qualified, "{board:?}");
    assert_eq!(row("a").rounds, rounds);
    let table = Command::new(BIN).args(["leaderboard", "--hub", &url]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("qualified") && table.contains("bad"), "{table}");
    let log = log_of(d, "validator");
    assert_eq!(log.matches("submissions scored").count() as u64, rounds, "{log}");
    assert!(log.contains("INSECURE"), "{log}");
    // The hub cannot look inside a sealed NaN; the validator can, and refuses it by name.
    assert!(log.contains("sealed submission refused") && log.contains("non-finite"), "{log}");
    // Every round's evaluation seed was drawn by the validator and revealed by its verdict,
    // matching the commitment the round took submissions under.
    for round in 0..rounds {
        let e = client(port).eval_seed(round).unwrap();
        let mut seed = [0u8; 32];
        hex::decode_to_slice(e.seed.expect("revealed"), &mut seed).unwrap();
        assert_eq!(hex::encode(tessera_contest::commit::commitment(&seed)), e.commitment, "round {round}");
    }

    // The ledger: verified from the hub, exported, and a tampered copy refused by name.
    let export = d.join("ledger.bin");
    let out = Command::new(BIN).args(["ledger", "verify", "--hub", &url, "--export"]).arg(&export).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("verified") && text.contains("INSECURE") && text.contains(&format!("{rounds} settled rounds")),
        "{text}"
    );
    let out = Command::new(BIN).args(["ledger", "verify", "--json", "--file"]).arg(&export).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let units: u64 = json["units"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(units, paid, "the ledger's balances are the leaderboard's rewards");
    // The release was recorded with its tally after round 0's receipts, in the sealed ledger.
    let proposals = client(port).proposals().unwrap();
    let p = proposals.proposals.iter().find(|p| p.id == proposal).unwrap();
    assert_eq!((p.state.as_str(), p.tally.yes, p.apply_at), ("applied", 10000, 1), "{proposals:?}");
    assert!(p.tally.power > 10000, "round 0's reward units are in the snapshot: {:?}", p.tally);
    assert!(text.contains("the spec the hub serves") && text.contains("1 proposal(s), 1 passed"), "{text}");
    let mut bytes = std::fs::read(&export).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x04;
    std::fs::write(&export, &bytes).unwrap();
    let out = Command::new(BIN).args(["ledger", "verify", "--file"]).arg(&export).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("does not verify") && err.contains("entry"), "{err}");
}

/// `tessera demo --scored` runs a validator beside the hub and contributors, and passes the
/// run's rule and contest flags to the hub.
#[test]
fn a_scored_demo_runs_its_own_validator() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    demo_in(
        d,
        &[
            "--contributors",
            "2",
            "--inner-steps",
            "3",
            "--rounds",
            "3",
            "--scored",
            "--aggregation",
            "median",
            "--eval-windows",
            "4",
            "--fit-windows",
            "4",
        ],
    );
    let validator = log_of(d, "validator");
    assert!(validator.contains("scored 3 rounds"), "{validator}");
    let hub = log_of(d, "hub");
    assert!(hub.contains("aggregation median, scored"), "{hub}");
}

/// `tessera demo FLAGS` in `d` on the tests' small run, to the end; fails with its logs.
fn demo_in(d: &Path, flags: &[&str]) {
    let out = Command::new(BIN).arg("demo").args(flags).arg("--dir").arg(d).args(RUN).output().unwrap();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), logs(d));
}

/// A finished demo's run served again by a hub on its database, store and key (the demo's own
/// hub has stopped); returns it and its port once it answers.
fn demo_hub_again(d: &Path) -> (Proc, u16) {
    let port = free_port();
    let args: Vec<String> = [
        "hub",
        "--spec",
        &d.join("hub.run.toml").display().to_string(),
        "--database",
        &format!("sqlite://{}", d.join("hub.db").display()),
        "--store",
        &d.join("store").display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--key",
        &d.join("hub.key.pem").display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let hub = spawn(&args, &d.join("hub-again.log"));
    wait_for(port, Duration::from_secs(60), "the hub again", |s| s.finished);
    (hub, port)
}

/// The operator raises the score of `round`'s submission by `contributor` in the demo's database.
fn tamper_score(d: &Path, round: u64, contributor: u64) {
    let db = format!("sqlite://{}", d.join("hub.db").display());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&db).await.unwrap();
        let changed = sqlx::query("UPDATE scores SET score = score + 0.01 WHERE round = $1 AND contributor = $2")
            .bind(round as i64)
            .bind(contributor as i64)
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(changed.rows_affected(), 1);
    });
}

/// In a run that does not publish its submissions, a contributor audits its own: `tessera audit
/// --identity` fetches them with requests it signs and recomputes their scores from the
/// checkpoint, the revealed seed and the published norm bound. It agrees; no contributor gets
/// another's submission; once the operator edits a contributor's score in its database, that
/// contributor's audit names it and exits non-zero, and another's finds its own score intact
/// but the round's rewards no longer following from the published rows.
#[test]
fn a_contributor_audits_its_own_scores_and_catches_a_tampered_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    demo_in(
        d,
        &[
            "--contributors",
            "3",
            "--inner-steps",
            "3",
            "--rounds",
            "2",
            "--scored",
            "--eval-windows",
            "4",
            "--fit-windows",
            "4",
        ],
    );
    // The demo's hub has stopped; the run's hub comes back on the same database and store.
    let (_hub, port) = demo_hub_again(d);
    let url = format!("http://127.0.0.1:{port}");
    let identity = |i: usize| d.join(format!("contributor-{i}")).join("identity.pem");
    let audit = |who: Option<usize>| {
        let mut c = Command::new(BIN);
        c.args(["audit", "--hub", &url, "--round", "1", "--threads", "1"]);
        if let Some(i) = who {
            c.arg("--identity").arg(identity(i));
        }
        c.output().unwrap()
    };
    // Nobody but a contributor can recompute anything here, and the refusal says how.
    let out = audit(None);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("--identity"), "{err}");
    // Contributor `mine` is one the round paid (so an edit of its score changes the split);
    // `other` is another.
    let key = |i: usize| std::sync::Arc::new(tessera_trust::Identity::load(&identity(i)).unwrap());
    let hub = pinned(port);
    let published = hub.round_audit(1).unwrap();
    let at = |i: usize| published.job.submissions.iter().position(|s| s.contributor_key == key(i).public().hex());
    let mine = (0..3).find(|&i| at(i).is_some_and(|p| published.scores[p].flag.is_none())).expect("a paid submission");
    let other = (0..3).find(|&i| i != mine && at(i).is_some()).expect("another submission");
    let by = |i: usize| &published.job.submissions[at(i).unwrap()];
    let out = audit(Some(mine));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("1 of your own submissions recomputed"), "{text}");
    assert_eq!(text.matches(" agrees").count(), 1, "{text}");

    // Another contributor's key does not fetch `mine`'s submission; its own it does.
    let as_other = pinned(port).signed_by(key(other));
    assert!(as_other.own_submission(1, &by(other).blob).is_ok());
    let refused = as_other.own_submission(1, &by(mine).blob).unwrap_err().to_string();
    assert!(refused.contains("no submission"), "{refused}");
    assert!(hub.published_submission(1, &by(mine).blob).is_err());

    tamper_score(d, 1, by(mine).contributor);
    let out = audit(Some(mine));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "a tampered score passed the audit:\n{text}");
    let differs: Vec<&str> = text.lines().filter(|l| l.contains("DIFFERS")).collect();
    assert_eq!(differs.len(), 1, "{text}");
    assert!(
        differs[0].split_whitespace().nth(1) == Some(&by(mine).contributor.to_string()) && differs[0].contains("score"),
        "{text}"
    );
    assert!(text.contains("rewards: DIFFER"), "{text}");
    // The other's own score is untouched; the round's rewards no longer follow from its rows.
    let out = audit(Some(other));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.matches(" agrees").count(), 1, "{text}");
    assert!(text.contains("rewards: DIFFER") && !out.status.success(), "{text}");
}

/// Three real validators share a round scored in tasks: nine contributors' submissions are split
/// into two tasks, every task scored twice (double share 1), by different validators, which
/// agree (the same computation); the round publishes no fault. `tessera audit` then recomputes
/// the round task by task, agrees with it, and names the score the operator then edits.
#[test]
fn three_validators_share_rounds_in_tasks_and_the_audit_recomputes_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    demo_in(
        d,
        &[
            "--contributors",
            "9",
            "--validators",
            "3",
            "--quorum",
            "9",
            "--inner-steps",
            "2",
            "--rounds",
            "1",
            "--scored",
            "--task-size",
            "8",
            "--double-share",
            "1",
            "--publish-submissions",
            "--eval-windows",
            "2",
            "--fit-windows",
            "2",
        ],
    );
    // Each validator prints a line per task it scored: `round    0, task T: …`.
    let mut by_task: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    let texts: Vec<(&str, String)> =
        [("validator", "validator.log"), ("v2", "validator-v2.log"), ("v3", "validator-v3.log")]
            .iter()
            .map(|(name, log)| (*name, std::fs::read_to_string(d.join(log)).unwrap()))
            .collect();
    for (name, text) in &texts {
        for line in text.lines().filter(|l| l.starts_with("round    0, task ")) {
            let task = line.split(", task ").nth(1).and_then(|t| t.split(':').next()).unwrap_or_default();
            by_task.entry(task.to_owned()).or_default().push(name);
        }
    }
    assert_eq!(by_task.len(), 2, "two tasks: {by_task:?}\n{}", logs(d));
    for (task, by) in &by_task {
        assert_eq!(by.len(), 2, "task {task} scored twice, by two validators: {by:?}");
        assert_ne!(by[0], by[1]);
    }
    // The run's hub again, on the same database and store, for the audit.
    let (_hub, port) = demo_hub_again(d);
    let url = format!("http://127.0.0.1:{port}");
    let out = Command::new(BIN).args(["audit", "--hub", &url, "--round", "0", "--threads", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.matches(" agrees").count(), 9, "{text}");
    // Honest validators agree: no fault in the ledger.
    let ledger = tessera_trust::ledger::Ledger::from_bytes(&client(port).ledger(0).unwrap()).unwrap();
    assert!(ledger.faults.is_empty(), "{:?}", ledger.faults);

    // The operator raises one score in its database: the audit names that submission.
    let tampered = pinned(port).round_audit(0).unwrap().job.submissions[4].contributor;
    tamper_score(d, 0, tampered);
    let out = Command::new(BIN).args(["audit", "--hub", &url, "--round", "0", "--threads", "1"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "a tampered score passed the audit:\n{text}");
    let differs: Vec<&str> = text.lines().filter(|l| l.contains("DIFFERS")).collect();
    assert_eq!(differs.len(), 1, "{text}");
    assert!(differs[0].split_whitespace().nth(1) == Some(&tampered.to_string()) && differs[0].contains("score"));
}

/// A run that grows: two `tiny` rounds, then the hub grows the model into `nano`'s sizes
/// (function-preserving) and two more rounds train it. The contributors switch to the new model
/// on their own, without a restart, and the run finishes on the grown model.
#[test]
fn a_run_grows_into_its_next_phase_and_contributors_follow() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let flags = ["--inner-steps", "3", "--rounds", "2", "--grow-to", "nano:2", "--quorum", "2", "--deadline", "60"];
    let _h = hub(d, port, &flags);
    // One contributor trains ahead while it talks to the hub: at the phase boundary the round it
    // trained ahead is not the one the hub opens, and it must drop that work and follow.
    let mut workers = [contributor(d, port, "a"), contributor_with(d, port, "b", &["--overlap"])];
    for (w, name) in workers.iter_mut().zip(["a", "b"]) {
        w.wait_success(Duration::from_secs(240), &d.join(format!("{name}.log")));
    }
    let last = wait_for(port, Duration::from_secs(30), "the finished run", |s| s.finished);
    assert_eq!(last.round, 4, "{}", logs(d));
    assert!(last.history.iter().all(|r| r.accepted == 2), "every round had both contributors: {:?}", last.history);
    let info = client(port).run().unwrap();
    assert_eq!(info.phase, 1);
    assert!(info.spec.tensors.iter().any(|t| t.name.starts_with("model.layers.3.")), "grown to four layers");
    let nano = tessera_model::preset("nano").unwrap();
    assert!(info.spec.tensors.iter().any(|t| t.shape.contains(&(nano.hidden_size as u64))));
    let hub_log = log_of(d, "hub");
    assert!(hub_log.contains("the run grew into its next phase"), "{hub_log}");
    for name in ["a", "b"] {
        let log = log_of(d, name);
        assert!(log.contains("the run grew: training its new model"), "{log}");
    }
    let overlapped = log_of(d, "b");
    assert!(overlapped.contains("trained ahead: that work is dropped"), "{overlapped}");
}

/// A scored run whose second phase admits only the top two of the leaderboard: the attacker
/// (`--adversary scale`) ranks last, is refused by the grown phase with its reason and stops;
/// the two honest contributors and the validator carry on with the grown model.
#[test]
fn a_grown_phase_admits_only_who_qualified() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let flags = [
        "--inner-steps",
        "3",
        "--rounds",
        "2",
        "--grow-to",
        "nano:2:2",
        "--quorum",
        "3",
        "--deadline",
        "4",
        "--scored",
        "--validator-token",
        "tok",
        "--eval-windows",
        "8",
        "--fit-windows",
        "4",
    ];
    let _h = hub(d, port, &flags);
    let url = format!("http://127.0.0.1:{port}");
    let mut workers = [
        contributor(d, port, "a"),
        contributor(d, port, "b"),
        contributor_with(d, port, "bad", &["--adversary", "scale"]),
    ];
    let validate: Vec<String> =
        ["validator", "--hub", &url, "--token", "tok", "--threads", "1"].iter().map(|s| s.to_string()).collect();
    let mut v = spawn(&validate, &d.join("validator.log"));
    for (w, name) in workers.iter_mut().zip(["a", "b", "bad"]) {
        w.wait_success(Duration::from_secs(240), &d.join(format!("{name}.log")));
    }
    v.wait_success(Duration::from_secs(60), &d.join("validator.log"));
    let last = wait_for(port, Duration::from_secs(30), "the finished run", |s| s.finished);
    assert_eq!(last.round, 4, "{}", logs(d));
    assert_eq!(last.history[2].accepted, 2, "{:?}", last.history);
    let bad = log_of(d, "bad");
    assert!(bad.contains("not admitted") && bad.contains("did not qualify"), "{bad}");
    for name in ["a", "b"] {
        let log = log_of(d, name);
        assert!(log.contains("the run grew: training its new model"), "{log}");
    }
    let validator = log_of(d, "validator");
    assert!(validator.contains("scoring with its new model"), "{validator}");
}

/// `tessera demo --phases --scored`: the seven-phase ladder, each phase grown from the one before
/// and admitting the top two, runs to the end with the contributors and the validator switching
/// models on their own (work trained on a phase that has since grown is refused as stale, never
/// as malformed).
#[test]
fn the_demo_ladder_runs_all_seven_phases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "demo",
        "--phases",
        "--scored",
        "--promote-top",
        "2",
        "--contributors",
        "3",
        "--rounds",
        "1",
        "--inner-steps",
        "3",
        "--batch-size",
        "4",
        "--synthetic-chars",
        "20000",
        "--warmup-steps",
        "2",
        "--eval-windows",
        "4",
        "--fit-windows",
        "4",
        "--dir",
        d.to_str().unwrap(),
    ];
    let out = Command::new(BIN).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), logs(d));
    assert!(
        stdout.contains("phases, each grown from the one before") && stdout.contains("finished: 7 rounds"),
        "{stdout}"
    );
    // The final model is the last rung's size (its head size and ε carried through growth).
    let grown = tessera_model::checkpoint::load_config(&d.join("final")).unwrap();
    let top = tessera_model::preset("ladder7").unwrap();
    assert_eq!((grown.hidden_size, grown.num_hidden_layers), (top.hidden_size, top.num_hidden_layers));
    assert!(grown.rms_norm_eps < top.rms_norm_eps, "ε shrank with every widening: {}", grown.rms_norm_eps);
}

/// `tessera demo --fragments 2`: contributors train and submit only their half of the layers
/// (plus the shared tensors), and the run finishes with every submission accepted.
#[test]
fn a_layer_sharded_demo_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "demo",
        "--fragments",
        "2",
        "--contributors",
        "2",
        "--rounds",
        "2",
        "--inner-steps",
        "3",
        "--dir",
        d.to_str().unwrap(),
    ];
    let out = Command::new(BIN).args(args).args(RUN).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}\n{}", String::from_utf8_lossy(&out.stderr), logs(d));
    assert!(stdout.contains("finished: 2 rounds"), "{stdout}");
    // Each contributor's row: id, name, accepted, rejected, …
    let rows: Vec<Vec<&str>> =
        stdout.lines().filter(|l| l.contains("contributor-")).map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows.iter().all(|r| r[2] == "2" && r[3] == "0"), "{stdout}");
}

/// `--until-loss`: the first phase ends as soon as a round's mean inner loss reaches its target
/// (here at once, after round 0, instead of after its planned 3 rounds); the next phase takes
/// the rounds left and the run still ends after 5.
#[test]
fn a_phase_that_reaches_its_loss_target_grows_early() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let flags = [
        "--inner-steps",
        "3",
        "--rounds",
        "3",
        "--grow-to",
        "nano:2",
        "--until-loss",
        "100",
        "--quorum",
        "2",
        "--deadline",
        "60",
    ];
    let _h = hub(d, port, &flags);
    let mut workers = [contributor(d, port, "a"), contributor(d, port, "b")];
    for (w, name) in workers.iter_mut().zip(["a", "b"]) {
        w.wait_success(Duration::from_secs(240), &d.join(format!("{name}.log")));
    }
    let last = wait_for(port, Duration::from_secs(30), "the finished run", |s| s.finished);
    assert_eq!(last.round, 5, "{}", logs(d));
    assert!(log_of(d, "hub").contains("reached its loss target"), "{}", log_of(d, "hub"));
    // Round 1 already started from the grown checkpoint: bigger than round 0's.
    let size = |hash: &str| client(port).checkpoint(hash, None).unwrap().len();
    assert!(size(&last.history[1].base_checkpoint) > 2 * size(&last.history[0].base_checkpoint));
}

/// On a terminal, `tessera contribute` shows live status: phase, round, inner step and loss, then
/// the upload, here slowed to 0.05 Mbit/s by the emulated link so that it is seen (run under a
/// pseudo-terminal by `script`, where the progress bar is drawn).
#[test]
fn a_contributor_on_a_terminal_shows_live_status() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let _hub = hub(d, port, &["--quorum", "1", "--rounds", "1"]);
    wait_for(port, Duration::from_secs(60), "the hub", |_| true);
    let command = format!(
        "{BIN} contribute --hub http://127.0.0.1:{port} --state-dir {} --name tty --threads 1 --max-rounds 1 --max-upload-mbps 0.05",
        d.join("tty").display()
    );
    let out = Command::new("script").args(["-qec", &command, "/dev/null"]).env("TERM", "xterm").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for needle in
        ["phase 1/1 · round 0", "step ", "loss ", "uploading", "round    0: inner loss", "% compute utilisation"]
    {
        assert!(text.contains(needle), "{needle:?} missing from the terminal:\n{text}");
    }
}

/// `tessera doctor --hub` against a live hub: it reaches the run, measures the link and the
/// clock, and finds this machine able to hold the run's model; against no hub it fails.
#[test]
fn doctor_checks_a_machine_against_a_live_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let _h = hub(d, port, &["--inner-steps", "2", "--rounds", "2", "--quorum", "1"]);
    wait_for(port, Duration::from_secs(60), "the hub", |_| true);
    let state = d.join("state").display().to_string();
    let url = format!("http://127.0.0.1:{port}");
    let out =
        run(&["doctor", "--hub", &url, "--device", "cpu", "--state-dir", &state, "--data-cache-gib", "0.1", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let hub = &report["facts"]["hub"]["reached"]["Ok"];
    assert!(hub["name"].as_str().unwrap().starts_with("tiny"), "{report:#}");
    assert!(hub["latency_s"].as_f64().unwrap() < 1.0, "{report:#}");
    assert!(hub["download_bps"].as_f64().unwrap() > 0.0, "{report:#}");
    assert!(hub["skew_s"].as_f64().unwrap().abs() < 2.0, "the same clock: {report:#}");
    assert_eq!(report["verdict"]["can_contribute"], true, "{report:#}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let gone = format!("http://127.0.0.1:{}", free_port());
    let out = run(&["doctor", "--hub", &gone, "--device", "cpu", "--state-dir", &state]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.lines().any(|l| l.contains("FAIL") && l.contains("hub")), "{text}");
    let out = run(&["doctor", "--device", "tpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown device"));
}

/// `--device cpu,cpu`: one contributor trains two replicas, each its share of every step's
/// windows, and averages them before one upload: the hub sees one contributor submitting once
/// per round, both replicas trained every round, and the run differs from one device's.
#[test]
fn a_contributor_with_two_devices_averages_its_replicas() {
    let run_with = |devices: &str| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let port = free_port();
        let _h = hub(d, port, &["--inner-steps", "4", "--rounds", "3", "--quorum", "1", "--codec", "f32"]);
        let mut a = contributor_with(d, port, "a", &["--device", devices]);
        a.wait_success(Duration::from_secs(180), &d.join("a.log"));
        let last = status(port).unwrap();
        assert!(last.finished, "{}", logs(d));
        assert_eq!(last.contributors.len(), 1, "{}", logs(d));
        assert_eq!(last.contributors[0].submitted_rounds, vec![0, 1, 2], "{}", logs(d));
        let step = |trainer: &str| -> Option<u64> {
            let text = std::fs::read_to_string(d.join("a").join(trainer).join("trainer_state.json")).ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
        };
        assert_eq!(step("trainer"), Some(12), "{}", logs(d));
        let info = client(port).run().unwrap();
        (step("trainer-1"), info.checkpoint, log_of(d, "a"), dir)
    };
    let (second, two, log, _keep) = run_with("cpu,cpu");
    assert_eq!(second, Some(12), "the second replica trained every round too\n{log}");
    assert!(log.contains("2 replicas averaged per round"), "{log}");
    let (none, one, _, _keep) = run_with("cpu");
    assert_eq!(none, None);
    assert_ne!(two, one, "two replicas train more data than one");
}
