//! `tessera demo`: a hub and N contributor processes (and a validator, in a scored run) on
//! localhost, live progress, then a summary against the entropy floor and synchronous data
//! parallel. The hub gets the run as one spec file; nothing is copied back into flags.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use tch::Device;
use tessera_model::{Llama, LlamaConfig, save_checkpoint};
use tessera_protocol::api::{HubStatus, RunInfo};
use tessera_protocol::{TensorSpec, decode_weights};
use tessera_train::diloco::write_params;
use tessera_train::run::{inner_config, run_dataset};
use tessera_train::trainer::{describe_eval, print_above};
use tessera_train::{EvalStats, Trainer};

use crate::args::{evaluation_dataset, gib};
use crate::spec::RunArgs;

#[derive(Args)]
pub struct DemoArgs {
    /// Contributor processes.
    #[arg(long, default_value_t = 4)]
    pub contributors: usize,
    /// Working directory: database, store, contributor state, logs and the final checkpoint.
    #[arg(long, default_value = "runs/swarm")]
    pub dir: PathBuf,
    /// The seven-phase demo ladder: start from `ladder1` and grow through `ladder7` (presets
    /// small enough for two cores), --rounds rounds per phase (default here: 4); with --scored,
    /// each phase after the first admits the top --promote-top of the leaderboard.
    #[arg(long)]
    pub phases: bool,
    /// Run phase N of the plan (`tessera hub --phase N`) with these contributors: its model,
    /// sequence length, micro-batch, H, codecs and scoring, changed by the run flags given
    /// (e.g. a short --seq-len and --rounds on a small machine). Needs --data.
    #[arg(long, value_name = "N", conflicts_with = "phases")]
    pub phase: Option<usize>,
    /// Contributors overlap their uploads and downloads with training (`contribute --overlap`).
    #[arg(long)]
    pub overlap: bool,
    /// Each contributor uploads no faster than this (`contribute --max-upload-mbps`).
    #[arg(long, value_name = "MBPS")]
    pub max_upload_mbps: Option<f64>,
    /// Each contributor downloads no faster than this (`contribute --max-download-mbps`).
    #[arg(long, value_name = "MBPS")]
    pub max_download_mbps: Option<f64>,
    /// Validator processes in a scored demo. More than one shares each round among them when
    /// the run is scored in tasks (--task-size); the others are named `v2`, `v3`, … in the
    /// hub's log and the ledger.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub validators: usize,
    #[command(flatten)]
    pub run: RunArgs,
}

/// A finished local run: what the hub reported, the final model's evaluation, and each
/// contributor's totals.
pub struct SwarmRun {
    pub info: RunInfo,
    pub status: HubStatus,
    pub eval: EvalStats,
    pub elapsed: f64,
    pub final_dir: PathBuf,
    /// A line about the verified ledger (sealed runs).
    pub ledger_line: Option<String>,
    /// Per contributor, the totals from its `--report` (absent if it wrote none).
    pub contributors: Vec<Option<tessera_contributor::Summary>>,
}

/// A child process whose output goes to a log file.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, log: PathBuf, args: &[String]) -> Result<Proc> {
        Proc::spawn_with(name, log, args, &[])
    }

    fn spawn_with(name: &str, log: PathBuf, args: &[String], env: &[(&str, &str)]) -> Result<Proc> {
        let exe = std::env::current_exe()?;
        let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(exe)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        Ok(Proc { name: name.to_owned(), child, log })
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn demo(args: DemoArgs) -> Result<()> {
    let r = run_swarm(&args)?;
    summary(&r.info, &r.status, &r.eval, r.elapsed, &r.final_dir);
    if let Some(line) = r.ledger_line {
        println!("{line}");
    }
    Ok(())
}

/// The run the demo's hub serves: the run flags as given, with the quorum no larger than the
/// contributors and, with `--phases`, the seven-phase ladder.
pub fn demo_run(args: &DemoArgs) -> Result<RunArgs> {
    let given = match args.phase {
        Some(n) => crate::spec::phase_run(n, &args.run)?,
        None => args.run.clone(),
    };
    let mut run = RunArgs { quorum: given.quorum.min(args.contributors as u32), ..given };
    if args.phases {
        if !run.grow_to.is_empty() || run.model != "nano" {
            bail!("--phases sets the model and its growth itself; leave out --model and --grow-to");
        }
        // 20 rounds is the single-phase default; a ladder phase gets 4 unless told otherwise.
        let per_phase = if run.rounds == 20 { 4 } else { run.rounds };
        let top = run.contest.scored.then(|| format!(":{}", run.contest.promote_top.min(args.contributors as u32)));
        run.model = "ladder1".into();
        run.rounds = per_phase;
        run.grow_to = (2..=7).map(|k| format!("ladder{k}:{per_phase}{}", top.as_deref().unwrap_or(""))).collect();
        // Each phase must still reach its quorum with the contributors it admits.
        if let Some(t) = run.contest.scored.then_some(run.contest.promote_top) {
            run.quorum = run.quorum.min(t.max(1));
        }
    }
    Ok(run)
}

/// The `tessera hub` command line the demo starts: its storage in `dir`, any free port, and
/// the run as one spec file.
pub fn hub_command(dir: &Path, spec_file: &Path, addr_file: &Path) -> Vec<String> {
    vec![
        "hub".into(),
        "--spec".into(),
        spec_file.display().to_string(),
        "--database".into(),
        format!("sqlite://{}", dir.join("hub.db").display()),
        "--store".into(),
        dir.join("store").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--addr-file".into(),
        addr_file.display().to_string(),
        "--key".into(),
        dir.join("hub.key.pem").display().to_string(),
    ]
}

/// Runs a hub and `--contributors` contributor processes on localhost until the run finishes,
/// then evaluates the final weights.
pub fn run_swarm(args: &DemoArgs) -> Result<SwarmRun> {
    // Long on purpose: the processes' lives in order (clean up, start the hub, the
    // contributors and the validator, follow the run, evaluate), sharing their handles.
    if args.contributors == 0 {
        bail!("--contributors must be at least 1");
    }
    let dir = &args.dir;
    std::fs::create_dir_all(dir)?;
    // A fresh run each time: clear what an earlier demo left here.
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if name.starts_with("hub.")
            || name == "store"
            || name.starts_with("contributor-")
            || name == "final"
            || name.starts_with("validator")
            || name == "dataset"
        {
            if p.is_dir() { std::fs::remove_dir_all(&p)? } else { std::fs::remove_file(&p)? }
        }
    }
    let mut run = demo_run(args)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.contributors).max(1);
    announce(args, &run)?;
    if run.data.data.is_none() {
        run.data.data = Some(embedded_manifest(&run, &dir.join("dataset"))?);
    }
    println!("logs and state: {}", dir.display());

    let addr_file = dir.join("hub.addr");
    let spec_file = dir.join("hub.run.toml");
    run.write(&spec_file)?;
    let mut hub_args = hub_command(dir, &spec_file, &addr_file);
    // A scored demo runs validators too; the first one's token goes to the hub through the
    // environment, the others' in an owner-only file.
    let fresh = || -> Result<String> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness for a validator token: {e}"))?;
        Ok(hex::encode(raw))
    };
    let token = fresh()?;
    let secret = [("TESSERA_VALIDATOR_TOKEN", token.as_str())];
    let mut tokens = vec![token.clone()];
    if args.validators > 1 {
        let more: Vec<String> = (1..args.validators).map(|_| fresh()).collect::<Result<_>>()?;
        let file = dir.join("validator-tokens");
        let lines: String = more.iter().enumerate().map(|(i, t)| format!("v{} {t}\n", i + 2)).collect();
        tessera_trust::identity::write_secret(&file, lines.as_bytes())?;
        hub_args.extend(["--validator-tokens".into(), file.display().to_string()]);
        tokens.extend(more);
    }
    let mut hub = Proc::spawn_with("hub", dir.join("hub.log"), &hub_args, &secret)?;
    let start = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            break a;
        }
        if let Some(status) = hub.child.try_wait()? {
            bail!("the hub exited ({status}):\n{}", hub.tail());
        }
        if start.elapsed() > Duration::from_secs(120) {
            bail!("the hub did not start within 120 s:\n{}", hub.tail());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let url = format!("http://{}", addr.trim());
    let mut workers = Vec::new();
    for i in 0..args.contributors {
        let name = format!("contributor-{i}");
        let mut a: Vec<String> = vec![
            "contribute".into(),
            "--hub".into(),
            url.clone(),
            "--state-dir".into(),
            dir.join(&name).display().to_string(),
            "--name".into(),
            name.clone(),
            "--threads".into(),
            threads.to_string(),
            "--report".into(),
            dir.join(format!("{name}.report.jsonl")).display().to_string(),
        ];
        if let Some(d) = external(&run.data.data) {
            a.extend(["--data".into(), d.display().to_string(), "--tokenizer".into(), run.data.tokenizer.clone()]);
        }
        if args.overlap {
            a.push("--overlap".into());
        }
        for (flag, v) in [("--max-upload-mbps", args.max_upload_mbps), ("--max-download-mbps", args.max_download_mbps)]
        {
            if let Some(v) = v {
                a.extend([flag.into(), v.to_string()]);
            }
        }
        workers.push(Proc::spawn(&name, dir.join(format!("{name}.log")), &a)?);
    }
    let mut validators = Vec::new();
    for (i, token) in tokens.iter().enumerate().take(if run.contest.scored { args.validators.max(1) } else { 0 }) {
        let mut a: Vec<String> =
            vec!["validator".into(), "--hub".into(), url.clone(), "--threads".into(), threads.to_string()];
        if run.contest.insecure_dev_tee {
            a.push("--insecure-dev-tee".into());
        }
        if let Some(d) = external(&run.data.data) {
            a.extend(["--data".into(), d.display().to_string(), "--tokenizer".into(), run.data.tokenizer.clone()]);
        }
        let (name, log) = if i == 0 {
            ("validator".to_owned(), "validator.log".to_owned())
        } else {
            (format!("v{}", i + 1), format!("validator-v{}.log", i + 1))
        };
        let env = [("TESSERA_VALIDATOR_TOKEN", token.as_str())];
        validators.push(Proc::spawn_with(&name, dir.join(log), &a, &env)?);
    }

    let hub_client = tessera_client::HubClient::with_timeout(&url, Duration::from_secs(30))?;
    let bar = indicatif::ProgressBar::new(run.rounds);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] round {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut reported = 0usize;
    let status: HubStatus = loop {
        let status: HubStatus = hub_client.status()?;
        let published: Vec<_> = status.history.iter().filter(|r| r.result_checkpoint.is_some()).collect();
        for r in &published[reported.min(published.len())..] {
            print_above(
                &bar,
                format!(
                    "round {:>3}: {} submissions ({}), inner loss {}, {} up",
                    r.round + 1,
                    r.accepted,
                    r.closed_by.as_deref().unwrap_or("?"),
                    r.mean_inner_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    gib(r.bytes_up)
                ),
            );
        }
        reported = published.len();
        bar.set_length(status.rounds);
        bar.set_position(status.round.min(status.rounds));
        let current = status.history.last().map_or(0, |r| r.accepted);
        bar.set_message(format!(
            "· {current}/{} in · {} up, {} down",
            run.quorum,
            gib(status.bytes_up),
            gib(status.bytes_down)
        ));
        if status.finished {
            break status;
        }
        for w in &mut workers {
            if let Some(code) = w.child.try_wait()?
                && !code.success()
            {
                bar.abandon();
                bail!("{} exited ({code}):\n{}", w.name, w.tail());
            }
        }
        if let Some(code) = hub.child.try_wait()? {
            bar.abandon();
            bail!("the hub exited ({code}):\n{}", hub.tail());
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    for w in &mut workers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let (info, eval, final_dir, ledger_line) = evaluate_final(&hub_client, hub, &run, dir)?;
    let contributors = (0..args.contributors)
        .map(|i| {
            let text = std::fs::read_to_string(dir.join(format!("contributor-{i}.report.jsonl"))).ok()?;
            serde_json::from_str(text.lines().last()?).ok()
        })
        .collect();
    Ok(SwarmRun { info, status, eval, elapsed, final_dir, ledger_line, contributors })
}

/// The embedded corpus as a published dataset in `out`, so the demo runs the same path as a
/// real run: the hub names the manifest, contributors fetch and check its shards, the validator
/// its validation shards. One training shard holds the whole training split, so every
/// contributor draws its windows from the same tokens as on the corpus in memory, and the run
/// computes exactly what `tessera bench diloco` does.
fn embedded_manifest(run: &RunArgs, out: &Path) -> Result<PathBuf> {
    let dataset = crate::args::load_dataset(&run.data)?;
    dataset
        .write_manifest(out, dataset.train.len() as u64)
        .with_context(|| format!("writing the embedded corpus to {}", out.display()))?;
    Ok(out.to_path_buf())
}

/// Says what the demo is about to run.
fn announce(args: &DemoArgs, run: &RunArgs) -> Result<()> {
    println!(
        "tessera demo: a hub and {} contributors on localhost, `{}` on {}, {} rounds × H = {} inner steps, codec {} up / {} down",
        args.contributors,
        run.model,
        if run.data.data.is_some() { "your data" } else { "the embedded corpus" },
        run.rounds,
        run.inner_steps,
        run.codec,
        run.broadcast_codec
    );
    if !run.grow_to.is_empty() {
        let first = LlamaConfig::from_preset_or_path(&run.model)?;
        let phases = run.phases(&first)?;
        let sizes: Vec<String> = std::iter::once(format!("{} ({} rounds)", run.model, run.rounds))
            .chain(phases.iter().map(|p| {
                let n: u64 = p.tensors.iter().map(TensorSpec::numel).sum();
                format!(
                    "{n} parameters ({} rounds{})",
                    p.rounds,
                    p.qualify_top.map_or(String::new(), |t| format!(", top {t}"))
                )
            }))
            .collect();
        println!("phases, each grown from the one before: {}", sizes.join(" → "));
    }
    Ok(())
}

/// The run's final global weights, saved as a checkpoint and evaluated here (where libtorch
/// is), and a line about its verified ledger in a sealed run. Stops the hub once the weights
/// are in hand.
fn evaluate_final(
    hub_client: &tessera_client::HubClient,
    hub: Proc,
    run: &RunArgs,
    dir: &Path,
) -> Result<(RunInfo, EvalStats, PathBuf, Option<String>)> {
    let info: RunInfo = hub_client.run()?;
    let hub_client = hub_client.clone().pinning(tessera_trust::PublicKey::parse(&info.hub_key)?);
    let ledger_line = if info.spec.trust.is_some() {
        let bytes = hub_client.ledger(0)?;
        std::fs::write(dir.join("ledger.bin"), &bytes)?;
        let ledger = tessera_trust::ledger::Ledger::from_bytes(&bytes)
            .map_err(|e| anyhow::anyhow!("the run's ledger does not verify: {e}"))?;
        let insecure = ledger.validators().any(|v| v.insecure);
        Some(format!(
            "ledger: {} entries verified (signatures, chain, Merkle roots, attestations, balances){}; saved to {} \
             (`tessera ledger verify --file` it)",
            ledger.len(),
            if insecure { ", signed by an INSECURE development validator" } else { "" },
            dir.join("ledger.bin").display()
        ))
    } else {
        None
    };
    let bytes = hub_client.checkpoint(&info.checkpoint, None)?;
    drop(hub);
    let weights = decode_weights(&bytes, &info.spec.tensors)?;
    let dataset = run_dataset(&info, run.data.data.as_ref().map(|_| evaluation_dataset(&run.data)).transpose()?)?;
    let config = LlamaConfig::from_json(info.spec.model.clone()).map_err(anyhow::Error::msg)?;
    let model = Llama::zeroed(&config, Device::Cpu)?;
    write_params(&model, &weights)?;
    let final_dir = dir.join("final");
    save_checkpoint(&model, Some(&dataset.tokenizer), &final_dir)?;
    let trainer = Trainer::from_model(inner_config(&info, 0), model, dataset)?;
    let eval = EvalStats { step: info.spec.rounds * info.spec.inner_steps, ..trainer.evaluate()? };
    Ok((info, eval, final_dir, ledger_line))
}

fn summary(info: &RunInfo, status: &HubStatus, eval: &EvalStats, elapsed: f64, final_dir: &Path) {
    let spec = &info.spec;
    let p = spec.num_params();
    let submissions: u64 = status.contributors.iter().map(|c| c.accepted).sum();
    let worker_steps = submissions * spec.inner_steps;
    let tokens = worker_steps * u64::from(spec.inner.batch_size) * u64::from(spec.inner.seq_len);
    // Synchronous data parallel on the same worker-steps: each uploads its f32 gradient and
    // downloads the f32 average at every step.
    let dp = worker_steps * 2 * 4 * p;
    let moved = status.bytes_up + status.bytes_down;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nrun {} finished: {} rounds in {elapsed:.0} s, {} tokens trained",
        info.run_id, spec.rounds, tokens
    );
    let _ = writeln!(out, "final global model: {}", describe_eval(eval));
    let _ = writeln!(
        out,
        "bytes: {} uploaded + {} downloaded = {}; synchronous data parallel would move {} ({:.0}× more)",
        gib(status.bytes_up),
        gib(status.bytes_down),
        gib(moved),
        gib(dp),
        dp as f64 / moved.max(1) as f64
    );
    let _ = writeln!(
        out,
        "\n{:>4}  {:<16} {:>9} {:>9} {:>12} {:>11}",
        "id", "name", "accepted", "rejected", "uploaded", "inner loss"
    );
    for c in &status.contributors {
        let _ = writeln!(
            out,
            "{:>4}  {:<16} {:>9} {:>9} {:>12} {:>11}",
            c.id,
            c.name,
            c.accepted,
            c.rejected,
            gib(c.bytes_up),
            c.mean_inner_loss.map_or("-".into(), |l| format!("{l:.4}"))
        );
    }
    let _ = writeln!(out, "\nfinal checkpoint (Hugging Face format): {}", final_dir.display());
}

/// The dataset contributors and the validator must be given: an external one. A published
/// dataset (a manifest directory or URL) they fetch themselves, a shard at a time.
fn external(data: &Option<std::path::PathBuf>) -> Option<&std::path::PathBuf> {
    data.as_ref().filter(|d| !crate::args::is_url(d) && !tessera_data::Dataset::is_manifest(d))
}
