//! The `tessera` binary end to end: real processes, real files, small models.

use std::path::Path;
use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).env("RUST_LOG", "warn").output().expect("spawn tessera")
}

fn ok(args: &[&str]) -> String {
    let out = tessera(args);
    assert!(out.status.success(), "tessera {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = tessera(args);
    assert!(!out.status.success(), "tessera {args:?} should have failed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "tessera {args:?} panicked:\n{err}");
    err
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

const SMALL: &[&str] = &[
    "--model",
    "tiny",
    "--synthetic-chars",
    "20000",
    "--batch-size",
    "4",
    "--eval-windows",
    "8",
    "--warmup-steps",
    "2",
    "--threads",
    "1",
];

#[test]
fn train_resume_generate_on_the_embedded_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--steps", "12", "--eval-interval", "6", "--stop-at", "6", "--out", p(&run)];
    args.extend_from_slice(SMALL);
    let out = ok(&args);
    assert!(out.contains("exact entropy floor"), "{out}");
    assert!(out.contains("nats from the entropy floor"), "{out}");
    let ckpt = run.join("checkpoint");
    for f in [
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}");
    }

    let mut resume = vec!["train", "--steps", "12", "--resume", p(&ckpt), "--out", p(&run)];
    resume.extend_from_slice(&SMALL[2..]);
    let out = ok(&resume);
    assert!(out.contains("resumed at step 6 of 12"), "{out}");
    assert!(out.contains("done: 12 steps"), "{out}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let train_steps: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "train")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, (1..=12).collect::<Vec<_>>());

    let sample = |seed: &str| {
        ok(&["generate", "--checkpoint", p(&ckpt), "--prompt", "ka", "--max-new-tokens", "24", "--seed", seed])
    };
    let a = sample("1");
    assert!(a.starts_with("ka") && a.trim_end().chars().count() > 2, "{a:?}");
    assert_eq!(a, sample("1"), "same seed, same text");
}

#[test]
fn real_text_with_prepared_shards_and_a_bpe_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    let verse = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n";
    std::fs::write(&text, verse.repeat(200)).unwrap();
    let tok = dir.path().join("tokenizer.json");
    let out = ok(&["tokenizer", "train", "--data", p(&text), "--vocab", "300", "--out", p(&tok)]);
    assert!(out.contains("characters per token"), "{out}");

    // Documents as JSONL, each a variation, so both splits get some.
    let jsonl = dir.path().join("docs.jsonl");
    let lines: String = (0..400)
        .map(|i| {
            serde_json::json!({"id": format!("d{i}"), "text": format!("{i}: {}", verse.repeat(1 + i % 3))}).to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&jsonl, lines).unwrap();
    let prepared = dir.path().join("prepared");
    let out = ok(&[
        "data",
        "prepare",
        p(&jsonl),
        "--tokenizer",
        p(&tok),
        "--out",
        p(&prepared),
        "--shard-tokens",
        "1000",
        "--validation-per-mille",
        "100",
    ]);
    assert!(out.contains("400 read"), "{out}");
    assert!(prepared.join("manifest.json").is_file() && prepared.join("shards").is_dir());
    let info = ok(&["data", "info", p(&prepared)]);
    assert!(info.contains("vocabulary 300") && info.contains("merkle"), "{info}");
    let published = dir.path().join("published");
    let out = ok(&["data", "publish", p(&prepared), p(&published)]);
    assert!(out.contains("uploaded"), "{out}");
    assert_eq!(ok(&["data", "info", p(&published)]), info);

    let run = dir.path().join("run");
    ok(&[
        "train",
        "--model",
        "tiny",
        "--data",
        p(&prepared),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-windows",
        "4",
        "--out",
        p(&run),
        "--threads",
        "1",
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("checkpoint/config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 300);

    // A phase's run on this dataset says that its tokenizer sizes the model differently.
    let hub_dir = dir.path().join("hub");
    let mut hub = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["hub", "--phase", "1", "--data", p(&prepared), "--model", "tiny", "--seq-len", "16"])
        .args(["--database", &format!("sqlite://{}", hub_dir.join("hub.db").display())])
        .args(["--store", p(&hub_dir.join("store")), "--key", p(&hub_dir.join("key.pem"))])
        .args(["--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let said: Vec<String> = std::io::BufRead::lines(std::io::BufReader::new(hub.stderr.take().unwrap()))
        .map_while(Result::ok)
        .take_while(|l| !l.contains("listening on"))
        .collect();
    let _ = hub.kill();
    let _ = hub.wait();
    let note = said.iter().find(|l| l.starts_with("note: phase 1's model tiny")).unwrap_or_else(|| panic!("{said:?}"));
    assert!(note.contains("64-token vocabulary") && note.contains("has 300"), "{note}");
}

/// A preparation killed with SIGKILL mid-way resumes from its journal: the shards it finished
/// are not written again, and the dataset comes out byte for byte as an uninterrupted run's.
#[test]
fn a_killed_preparation_resumes_without_redoing_finished_shards() {
    let dir = tempfile::tempdir().unwrap();
    let jsonl = dir.path().join("web.jsonl");
    let mut text = String::new();
    for i in 0..60_000u64 {
        let words: String = (0..40).map(|w| format!("w{} ", (i * 31 + w * 7) % 997)).collect();
        text.push_str(&serde_json::json!({"id": i, "text": words}).to_string());
        text.push('\n');
    }
    std::fs::write(&jsonl, text).unwrap();
    let args = |out: &Path| -> Vec<String> {
        ["data", "prepare", p(&jsonl), "--out", p(out), "--shard-tokens", "20000", "--threads", "1"]
            .map(str::to_owned)
            .to_vec()
    };
    let whole = dir.path().join("whole");
    ok(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());

    let killed = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A shard is finished once the journal's state counts it (it is written, and listed in
    // shards.jsonl, before the state that counts it): kill after five are.
    let journal = killed.join(".prepare").join("shards.jsonl");
    let state = killed.join(".prepare").join("state.json");
    let counted = || -> usize {
        std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["shards"].as_u64())
            .unwrap_or(0) as usize
    };
    let started = std::time::Instant::now();
    while counted() < 5 {
        assert!(child.try_wait().unwrap().is_none(), "the preparation ended before it could be killed");
        assert!(started.elapsed().as_secs() < 120, "no shard after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done: Vec<String> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .take(counted())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["hash"].as_str().unwrap().to_owned())
        .collect();
    let shard = |h: &str| killed.join("shards").join(format!("{h}.tshard"));
    let written: Vec<std::time::SystemTime> =
        done.iter().map(|h| std::fs::metadata(shard(h)).unwrap().modified().unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let out = tessera(&args(&killed).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"), "{}", String::from_utf8_lossy(&out.stderr));
    for (h, t) in done.iter().zip(written) {
        assert_eq!(std::fs::metadata(shard(h)).unwrap().modified().unwrap(), t, "shard {h} was written again");
    }
    assert_eq!(
        std::fs::read(killed.join("manifest.json")).unwrap(),
        std::fs::read(whole.join("manifest.json")).unwrap()
    );
    assert!(!killed.join(".prepare").exists());
}

/// `tessera data serve` and `bench feed` share the dataset server; the bench trains on shards
/// fetched over HTTP through a limited link and reports each round's stall.
#[test]
fn bench_feed_trains_on_fetched_shards_and_reports_stalls() {
    let out = ok(&[
        "bench",
        "feed",
        "--model",
        "tiny",
        "--rounds",
        "3",
        "--inner-steps",
        "2",
        "--batch-size",
        "2",
        "--shard-tokens",
        "20000",
        "--dataset-shards",
        "4",
    ]);
    assert!(out.contains("later rounds") && out.contains("peak resident memory"), "{out}");
    assert_eq!(out.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).count(), 3, "{out}");
}

#[test]
fn model_info_reports_exact_counts() {
    let out = ok(&["model", "info", "nano", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["config"]["hidden_size"], 128);
    let params = v["params"].as_u64().unwrap();
    assert!(params > 800_000 && params < 900_000, "{params}");
    let table = ok(&["model", "info"]);
    for name in ["tiny", "nano", "micro", "phase1", "phase7"] {
        assert!(table.contains(name), "{table}");
    }
    let synthetic = ok(&["data", "info"]);
    assert!(synthetic.contains("entropy rate"), "{synthetic}");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here.txt");
    assert!(fails(&["train", "--data", p(&missing)]).contains("nothing-here.txt"));
    assert!(fails(&["train", "--model", "gigantic"]).contains("unknown preset"));
    assert!(fails(&["train", "--device", "tpu"]).contains("unknown device"));
    assert!(fails(&["train", "--device", "cuda:7"]).contains("CUDA device 7"));

    let jsonl = dir.path().join("docs.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"fine\"}\nnot json\n").unwrap();
    assert!(fails(&["data", "info", "--data", p(&jsonl)]).contains("docs.jsonl:2"));

    let ckpt = dir.path().join("ckpt");
    ok(&["model", "init", "--out", p(&ckpt)]);
    std::fs::write(ckpt.join("config.json"), "{\"hidden_size\": 32}").unwrap();
    let err = fails(&["generate", "--checkpoint", p(&ckpt), "--prompt", "x"]);
    assert!(err.contains("config.json") && err.contains("missing field"), "{err}");

    let ckpt2 = dir.path().join("ckpt2");
    ok(&["model", "init", "--out", p(&ckpt2)]);
    std::fs::write(ckpt2.join("model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let err = fails(&["generate", "--checkpoint", p(&ckpt2)]);
    assert!(err.contains("model.safetensors") && err.contains("missing tensor"), "{err}");

    let ckpt3 = dir.path().join("ckpt3");
    ok(&["model", "init", "--out", p(&ckpt3)]);
    std::fs::write(ckpt3.join("tokenizer.json"), "[]").unwrap();
    let err = fails(&["model", "logits", "--checkpoint", p(&ckpt3), "--text", "x"]);
    assert!(err.contains("tokenizer.json") && err.contains("not a valid tokenizer.json"), "{err}");

    // Attested serving: a client with no policy, a server flag that needs a TEE, a server that
    // is not there, and a machine with no TEE are each told what to do.
    let err = fails(&["verify-serve", "http://127.0.0.1:9", "--api-key", "k"]);
    assert!(err.contains("no measurement is accepted") && err.contains("--sev-snp-measurement"), "{err}");
    let err = fails(&["verify-serve", "http://127.0.0.1:9", "--api-key", "k", "--allow-insecure-dev"]);
    assert!(err.contains("attestation does not check out"), "{err}");
    let db = dir.path().join("serve.sqlite");
    let err = fails(&["serve", "--checkpoint", p(&ckpt3), "--db", p(&db), "--tls"]);
    assert!(err.contains("--tls") && err.contains("--tee"), "{err}");
    let (tsm, ckpt4) = (dir.path().join("no-tsm"), dir.path().join("ckpt4"));
    ok(&["model", "init", "--out", p(&ckpt4)]);
    let err = fails(&["serve", "--checkpoint", p(&ckpt4), "--db", p(&db), "--tee", "--tsm-dir", p(&tsm)]);
    assert!(err.contains("no TEE here") && err.contains("--insecure-dev-tee"), "{err}");
    let err = fails(&["serve", "--db", p(&db)]);
    assert!(err.contains("--checkpoint"), "{err}");
}

/// `bench train` through the bf16 path a GPU takes (exercised here on the CPU): the JSON names
/// the precision, MFU follows from the peak given, peak memory and the stage profile are there,
/// and an absurd peak is refused.
#[test]
fn bench_train_reports_precision_mfu_memory_and_profile() {
    let common = ["bench", "train", "--models", "tiny", "--steps", "3", "--warmup", "1", "--threads", "1", "--json"];
    let line = |extra: &[&str]| -> serde_json::Value {
        let out = ok(&[&common[..], extra].concat());
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let bf16 = line(&["--precision", "bf16", "--peak-tflops", "0.5"]);
    assert_eq!(bf16["precision"], "bf16");
    let mfu = bf16["mfu"].as_f64().unwrap();
    let gflops = bf16["gflops"].as_f64().unwrap();
    assert!((mfu - gflops / 500.0).abs() < 1e-9, "MFU {mfu} is achieved {gflops} GFLOP/s over 500");
    assert_eq!(bf16["profile"]["steps"], 3);
    assert!(bf16["profile"]["backward_s"].as_f64().unwrap() > 0.0);
    if cfg!(target_os = "linux") {
        let (before, peak) = (bf16["rss_before_mib"].as_f64().unwrap(), bf16["peak_rss_mib"].as_f64().unwrap());
        assert!(peak >= before && before > 10.0, "resident memory {before} → peak {peak} MiB");
    }
    let f32 = line(&[]);
    assert_eq!(f32["precision"], "f32");
    assert!(f32["mfu"].is_null(), "no peak known for a CPU");
    assert!(fails(&[&common[..], &["--peak-tflops", "0"]].concat()).contains("--peak-tflops must be positive"));
}

#[test]
fn diloco_simulation_runs_with_a_baseline_and_checks_codec_parameters() {
    let small =
        ["--model", "tiny", "--synthetic-chars", "20000", "--batch-size", "2", "--eval-windows", "4", "--threads", "1"];
    let mut args = vec!["bench", "diloco", "--workers", "2", "--inner-steps", "2", "--rounds", "2", "--baseline"];
    args.extend_from_slice(&["--codec", "topk", "--topk-chunk", "64", "--topk-k", "4"]);
    args.extend_from_slice(&small);
    let out = ok(&args);
    assert!(out.contains("round    2 |") && out.contains("DiLoCo / baseline"), "{out}");
    let mut bad = vec!["bench", "diloco", "--codec", "int4", "--block", "3"];
    bad.extend_from_slice(&small);
    assert!(fails(&bad).contains("must be even"));
}

/// The arena on the tiny model: NaN and replayed submissions are refused by the real hub with
/// their reason, no honest one is, a scaled Δ earns next to nothing, and an unknown attack is
/// an error.
#[test]
fn arena_refuses_and_pays_as_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("arena.jsonl");
    let common = [
        "bench",
        "arena",
        "--model",
        "tiny",
        "--synthetic-chars",
        "20000",
        "--contributors",
        "4",
        "--attackers",
        "1",
        "--rounds",
        "2",
        "--inner-steps",
        "3",
        "--batch-size",
        "4",
        "--eval-windows",
        "4",
        "--fit-windows",
        "4",
        "--val-windows",
        "8",
    ];
    ok(&[&common[..], &["--scenarios", "nan,replay,scale", "--json-out", p(&out)]].concat());
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let get = |name: &str| rows.iter().find(|r| r["scenario"] == name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(get("nan")["rejected"]["malformed_message"], 2);
    assert_eq!(get("replay")["rejected"]["replay"], 2);
    for r in &rows {
        assert_eq!(r["honest_rejected"], 0, "{r}");
    }
    // Early on a ×100 step can lower the loss; size earns nothing all the same.
    assert!(get("scale")["attacker_reward_fraction"].as_f64().unwrap() < 0.01, "{}", get("scale"));
    let err = fails(&[&common[..], &["--scenarios", "bribery"]].concat());
    assert!(err.contains("unknown adversary"), "{err}");
}

/// `tessera keygen` writes an owner-only key and never overwrites one; `bench trust` runs and
/// checks that what it sealed opens; `ledger verify` refuses what is not a ledger.
#[test]
fn keys_trust_bench_and_ledger_errors() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("me.pem");
    let public = ok(&["keygen", "--out", p(&key)]);
    assert_eq!(public.trim().len(), 64, "{public}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    }
    assert!(fails(&["keygen", "--out", p(&key)]).contains("me.pem"));
    let out = ok(&[
        "bench",
        "trust",
        "--bytes",
        "100000",
        "--requests",
        "10",
        "--entries",
        "20",
        "--voters",
        "30",
        "--repeats",
        "1",
    ]);
    assert!(out.contains("HPKE open") && out.contains("entries/s"), "{out}");
    assert!(out.contains("steered ledger, 30 holders") && out.contains("× a receipt"), "{out}");
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"not a ledger").unwrap();
    let err = fails(&["ledger", "verify", "--file", p(&junk)]);
    assert!(err.contains("does not verify") && err.contains("malformed"), "{err}");
    assert!(fails(&["ledger", "verify"]).contains("--hub"));
}

/// `tessera phases` computes the plan; `tessera grow` writes a bigger checkpoint whose logits are
/// the small one's, and refuses to shrink.
#[test]
fn phases_and_growth() {
    let plan: serde_json::Value = serde_json::from_str(&ok(&["phases", "--json"])).unwrap();
    let rows = plan.as_array().unwrap();
    assert_eq!(rows.len(), 7);
    assert_eq!(rows[0]["fits"], true);
    assert_eq!(rows[6]["fits"], false);
    assert!(ok(&["phases"]).contains("sync DP"));

    let dir = tempfile::tempdir().unwrap();
    let (small, big) = (dir.path().join("small"), dir.path().join("big"));
    ok(&["model", "init", "--model", "tiny", "--seed", "3", "--out", p(&small)]);
    let said = ok(&["grow", "--checkpoint", p(&small), "--to", "nano", "--out", p(&big)]);
    assert!(said.contains("grew") && said.contains("layers 2 → 4"), "{said}");
    let logits = |ckpt: &Path| -> Vec<f64> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&["model", "logits", "--checkpoint", p(ckpt), "--text", "kaze no oto"])).unwrap();
        v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect()
    };
    let (a, b) = (logits(&small), logits(&big));
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
    assert!(diff <= 1e-5, "growth changed the logits by {diff}");
    let err = fails(&["grow", "--checkpoint", p(&big), "--to", "tiny", "--out", p(&dir.path().join("x"))]);
    assert!(err.contains("shrink"), "{err}");

    let jsonl = dir.path().join("grow.jsonl");
    let out = ok(&[
        "bench",
        "grow",
        "--model",
        "tiny",
        "--synthetic-chars",
        "20000",
        "--steps",
        "20",
        "--batch-size",
        "4",
        "--budgets",
        "0.5,1.0",
        "--eval-windows",
        "4",
        "--threads",
        "1",
        "--json-out",
        p(&jsonl),
    ]);
    assert!(out.contains("scratch, 50% budget") && out.contains("grown, 100% budget"), "{out}");
    let runs: Vec<serde_json::Value> =
        std::fs::read_to_string(&jsonl).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(runs.len(), 4);
    assert!(runs.iter().all(|r| r["val_loss"].as_f64().unwrap().is_finite()));
}

/// A run is one file: `hub --print-spec` writes what the flags describe, `hub --spec` reads it
/// back (and prints the same), a run flag beside `--spec` is an error, and a key that is no
/// flag is named.
#[test]
fn a_run_is_described_by_one_spec_file() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ok(&["hub", "--print-spec", "--rounds", "7", "--scored", "--codec", "int4:32"]);
    assert!(spec.contains("rounds = 7") && spec.contains("scored = true") && spec.contains("int4:32"), "{spec}");
    let file = dir.path().join("run.toml");
    std::fs::write(&file, &spec).unwrap();
    assert_eq!(ok(&["hub", "--print-spec", "--spec", p(&file)]), spec);
    let err = fails(&["hub", "--spec", p(&file), "--rounds", "3"]);
    assert!(err.contains("--rounds") && err.contains("--spec"), "{err}");
    std::fs::write(&file, "rounds = 3\nquorom = 2\n").unwrap();
    let err = fails(&["hub", "--print-spec", "--spec", p(&file)]);
    assert!(err.contains("quorom") && err.contains("run.toml"), "{err}");
}

/// `hub --phase 1` is phase 1 of the plan as a run (model, sequence, micro-batch, H, codecs,
/// scoring, rounds from the token budget); flags beside it change it; it needs data; a phase
/// that grows from another does not start a run.
#[test]
fn a_phase_of_the_plan_starts_a_run() {
    let spec = ok(&["hub", "--phase", "1", "--data", "somewhere", "--print-spec"]);
    for line in ["model = \"phase1\"", "seq_len = 2048", "batch_size = 4", "inner_steps = 500", "scored = true"] {
        assert!(spec.lines().any(|l| l == line), "{line} missing from\n{spec}");
    }
    let rounds: u64 = spec.lines().find_map(|l| l.strip_prefix("rounds = ")).unwrap().parse().unwrap();
    // 10B tokens at 16 contributors × 500 steps × 4 × 2048 tokens a round.
    assert_eq!(rounds, (10e9_f64 / (16.0 * 500.0 * 4.0 * 2048.0)).ceil() as u64);
    let short = ok(&["hub", "--phase", "1", "--data", "somewhere", "--seq-len", "64", "--print-spec"]);
    assert!(short.contains("seq_len = 64") && short.contains("model = \"phase1\""), "{short}");
    let err = fails(&["hub", "--phase", "1", "--print-spec"]);
    assert!(err.contains("--data"), "{err}");
    let err = fails(&["hub", "--phase", "2", "--data", "x", "--print-spec"]);
    assert!(err.contains("does not start a run"), "{err}");
    let err = fails(&["hub", "--phase", "9", "--data", "x", "--print-spec"]);
    assert!(err.contains("phases 1 to 7"), "{err}");
    let err = fails(&["hub", "--phase", "1", "--spec", "run.toml"]);
    assert!(err.contains("cannot be used with"), "{err}");
}

/// `tessera --help` introduces the whole system and where to start.
#[test]
fn help_introduces_the_system() {
    let help = ok(&["--help"]);
    for needle in ["tessera demo", "tessera contribute", "tessera hub", "--spec"] {
        assert!(help.contains(needle), "{needle} missing from:\n{help}");
    }
    assert!(!help.contains("Start with `tessera train`"), "{help}");
}

/// Output into a closed pipe (`tessera model info micro | head -3`) ends the process quietly,
/// as any Unix tool does: no panic, no stack trace.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["model", "info", "micro"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert!(out.status.success() || out.status.signal() == Some(13), "{:?}", out.status);
}

/// An unscored run is not served beyond loopback unless asked for by name: without scores any
/// key that registers moves the model at will (before, it was served on any address).
#[test]
fn an_unscored_run_stays_on_loopback_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/hub.db", p(dir.path()));
    let store = dir.path().join("store");
    let key = dir.path().join("hub-key.pem");
    let common = ["--database", &db, "--store", p(&store), "--key", p(&key), "--model", "tiny", "--rounds", "1"];
    let err = fails(&[&["hub", "--listen", "0.0.0.0:0"][..], &common[..]].concat());
    assert!(err.contains("unscored") && err.contains("--allow-unscored"), "{err}");
    // Allowed by name, it starts (and says it is insecure); stopped once it listens.
    let addr_file = dir.path().join("addr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(
            [&["hub", "--listen", "0.0.0.0:0", "--allow-unscored", "--addr-file", p(&addr_file)][..], &common[..]]
                .concat(),
        )
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !addr_file.exists() && started.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(addr_file.exists(), "the hub never listened: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("INSECURE"));
}
