//! `tessera bench swarm`: many simulated contributors (real HTTP, real signed requests, real
//! messages, no training) against one hub or several replicas on one database and store, on
//! loopback, one replica killed mid-run if asked: latency per request kind, round-close
//! latency, lost or doubled submissions, and the CPU it all took.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use clap::Args;
use tessera_hub::{Db, Hub, HubConfig, NewRun, Store};
use tessera_protocol::PseudoGradient;
use tessera_protocol::api::{DataSource, DataSpec, InnerSpec, OuterSpec, RunInfo};
use tessera_protocol::{Codec, RunSpec, TensorSpec};

use crate::args::parse_codec;

#[derive(Args)]
pub struct BenchSwarmArgs {
    /// Simulated contributors, all submitting concurrently.
    #[arg(long, default_value_t = 200)]
    pub contributors: usize,
    /// Rounds (the quorum is every contributor).
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Model size: parameters, in tensors of 16,384 values.
    #[arg(long, default_value_t = 262_144)]
    pub params: u64,
    #[arg(long, default_value = "int8:64", value_parser = parse_codec)]
    pub codec: Codec,
    /// Metadata database (default: SQLite in a temporary directory).
    #[arg(long)]
    pub database: Option<String>,
    /// Blob store (default: a temporary directory).
    #[arg(long)]
    pub store: Option<String>,
    /// Hub replicas on the one database and store (more than one needs PostgreSQL); each
    /// contributor talks to replica `i mod N`, and to the next one when its replica is gone.
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Kill replica 0 (its runtime shut down, connections dropped, no goodbye) once half of
    /// round 1's submissions are in.
    #[arg(long)]
    pub kill_replica: bool,
    /// Drive hubs already running at these URLs (repeatable: replicas) instead of starting
    /// them in this process, so their memory and CPU can be measured apart: the run they serve
    /// sets the model (`--params`, `--codec`, `--database` and `--store` do not apply), and its
    /// quorum should be `--contributors`.
    #[arg(long = "hub")]
    pub hubs: Vec<String>,
    /// At most this many contributors build and send a submission at once (each holds its Δ
    /// and message while it does; default: all of them).
    #[arg(long)]
    pub in_flight: Option<usize>,
    /// Contributors submit over this many seconds after their assignment (each at its own
    /// seeded offset), as training times spread a real round's arrivals; 0: all at once, the
    /// worst burst.
    #[arg(long, default_value_t = 0.0)]
    pub spread: f64,
}

/// Many contributors against one hub over real HTTP on loopback: registration, assignment and
/// submission of real messages; reports errors and submission latency percentiles.
pub fn bench_swarm(args: BenchSwarmArgs) -> Result<()> {
    // Long on purpose: the run's spec, the hub, the simulated contributors and the report, in
    // the order they happen.
    if args.contributors == 0 || args.rounds == 0 || args.params == 0 {
        bail!("--contributors, --rounds and --params must be positive");
    }
    let tmp = tempfile::tempdir()?;
    let database = args.database.clone().unwrap_or_else(|| format!("sqlite://{}/hub.db", tmp.path().display()));
    let store = args.store.clone().unwrap_or_else(|| tmp.path().join("store").display().to_string());
    let tensor = 16_384u64;
    let tensors: Vec<TensorSpec> = (0..args.params.div_ceil(tensor))
        .map(|i| TensorSpec { name: format!("t{i:04}"), shape: vec![tensor.min(args.params - i * tensor)] })
        .collect();
    let weights: Vec<Vec<f32>> = tensors.iter().map(|t| vec![0.01; t.numel() as usize]).collect();
    let spec = RunSpec {
        name: "bench".into(),
        model: serde_json::json!({}),
        tensors,
        data: DataSpec {
            name: "none".into(),
            fingerprint: String::new(),
            source: DataSource::External,
            loss_floor: None,
        },
        inner: InnerSpec {
            batch_size: 1,
            seq_len: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 0,
            grad_clip: 1.0,
            weight_decay: 0.0,
        },
        inner_steps: 1,
        rounds: args.rounds,
        outer: OuterSpec { lr: 0.7, momentum: 0.9, nesterov: true },
        codec: args.codec,
        feedback_decay: 1.0,
        broadcast_codec: args.codec,
        quorum: args.contributors as u32,
        round_deadline_ms: 600_000,
        max_staleness: 1,
        staleness_decay: 0.5,
        seed: 0,
        aggregation: tessera_protocol::Aggregation::Mean,
        contest: None,
        trust: None,
        phases: Vec::new(),
        fragments: 0,
        until_loss: None,
        economy: None,
        governance: None,
    };
    if args.replicas == 0 || (args.replicas > 1 && !database.starts_with("postgres")) {
        bail!("--replicas N needs N ≥ 1, and more than one needs a postgres:// --database");
    }
    if args.kill_replica && (args.replicas < 2 || args.rounds < 2) {
        bail!("--kill-replica needs at least 2 replicas and 2 rounds");
    }
    let key = tmp.path().join("hub-key.pem");
    let mut replicas = Vec::with_capacity(args.replicas);
    if args.hubs.is_empty() {
        for r in 0..args.replicas {
            let new = (r == 0).then(|| NewRun { spec: spec.clone(), weights: weights.clone() });
            replicas.push(Replica::start(&database, &store, new, &key)?);
        }
    } else {
        if args.kill_replica {
            bail!("--kill-replica needs the replicas in this process: leave out --hub");
        }
        replicas.extend(args.hubs.iter().map(|url| Replica { url: url.clone(), runtime: None }));
    }
    let info = tessera_client::HubClient::new(&replicas[0].url)?.run()?;
    let params: u64 = info.spec.tensors.iter().map(|t| t.numel()).sum();
    let in_flight = Gate::new(args.in_flight.unwrap_or(args.contributors).max(1));
    let store_kind = match (args.hubs.is_empty(), store.starts_with("s3://")) {
        (false, _) => "the running hub's store",
        (true, true) => "S3 (direct transfers)",
        (true, false) => "a directory",
    };
    let database_kind = match (args.hubs.is_empty(), database.starts_with("sqlite")) {
        (false, _) => "the running hub's database",
        (true, true) => "SQLite",
        (true, false) => "PostgreSQL",
    };
    println!(
        "{} contributors × {} rounds against {} hub replica(s) on loopback: {} parameters, codec {}, {database_kind}, store {store_kind}",
        args.contributors,
        args.rounds,
        replicas.len(),
        params,
        info.spec.codec,
    );
    let pg_before = database.starts_with("postgres").then(|| pg_counters(&database)).flatten();
    let cpu_before = Cpu::now();
    // One blocking client per replica, shared by its contributors' threads (one connection
    // pool each); every contributor its own key and thread. No retries but failover, so every
    // refusal counts.
    let clients: Vec<tessera_client::HubClient> = replicas
        .iter()
        .map(|r| Ok(tessera_client::HubClient::new(&r.url)?.with_patience(Duration::ZERO)))
        .collect::<Result<_>>()?;
    let log = Log::default();
    let killed = AtomicUsize::new(usize::MAX);
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut handles = Vec::with_capacity(args.contributors);
        for i in 0..args.contributors {
            let (clients, info, log, killed, gate) = (&clients, &info, &log, &killed, &in_flight);
            let (spread, external) = (args.spread, !args.hubs.is_empty());
            let h = std::thread::Builder::new().stack_size(256 << 10).spawn_scoped(scope, move || {
                simulate(i, clients, info, log, killed, gate, Reach { spread, external })
            })?;
            handles.push(h);
        }
        if args.kill_replica {
            let half = (args.contributors / 2) as u64;
            while log.accepted_in(1) < half && !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(5));
            }
            killed.store(0, Ordering::SeqCst);
            replicas[0].kill();
            println!("killed replica 0 with {} of round 1's submissions in", log.accepted_in(1));
        }
        for h in handles {
            if let Err(e) = h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a simulated contributor panicked"))) {
                log.error(e.to_string());
            }
        }
        Ok(())
    })?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = Cpu::now().since(&cpu_before);
    let status = replicas
        .iter()
        .find_map(|r| tessera_client::HubClient::new(&r.url).ok()?.with_patience(Duration::ZERO).status().ok())
        .ok_or_else(|| anyhow::anyhow!("no replica answers for its status"))?;
    let pg = pg_before.zip(pg_counters(&database)).map(|(a, b)| (b.0 - a.0, b.1 - a.1));
    for r in &mut replicas {
        r.kill();
    }
    log.report(&status, args.contributors as u64 * args.rounds, elapsed, cpu, pg)
}

/// One hub replica serving on loopback, on a runtime of its own so that killing it ends
/// everything it runs.
struct Replica {
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Replica {
    fn start(database: &str, store: &str, new: Option<NewRun>, key: &std::path::Path) -> Result<Replica> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let url = runtime.block_on(async {
            let identity = tessera_trust::Identity::load_or_create(key)?;
            let hub = Hub::open(Db::connect(database).await?, Store::open(store)?, new, identity, HubConfig::default())
                .await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            // Every simulated contributor comes from this one address: no per-address caps.
            let limits = tessera_edge::Limits {
                max_connections: 1 << 16,
                max_connections_per_address: 1 << 16,
                per_address: None,
                ..tessera_edge::Limits::default()
            };
            tokio::spawn(tessera_hub::serve(hub, listener, limits, std::future::pending()));
            anyhow::Ok(url)
        })?;
        Ok(Replica { url, runtime: Some(runtime) })
    }

    fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// What the simulated contributors saw: latencies per request kind, acknowledgement and
/// next-round times per round, refusals.
#[derive(Default)]
struct Log {
    inner: Mutex<LogInner>,
    accepted: [AtomicU64; 2],
}

#[derive(Default)]
struct LogInner {
    latency: std::collections::BTreeMap<&'static str, Vec<f64>>,
    /// Per round: the last acknowledgement, and the first assignment for the next round
    /// (seconds from the start of the process's clock).
    last_ack: std::collections::BTreeMap<u64, f64>,
    first_next: std::collections::BTreeMap<u64, f64>,
    acked: u64,
    errors: Vec<String>,
}

fn clock() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

impl Log {
    fn time(&self, kind: &'static str, seconds: f64) {
        if let Ok(mut l) = self.inner.lock() {
            l.latency.entry(kind).or_default().push(seconds);
        }
    }

    fn acked(&self, round: u64) {
        let now = clock();
        if let Some(a) = self.accepted.get(round as usize) {
            a.fetch_add(1, Ordering::SeqCst);
        }
        if let Ok(mut l) = self.inner.lock() {
            l.acked += 1;
            let last = l.last_ack.entry(round).or_insert(now);
            *last = last.max(now);
        }
    }

    fn assigned(&self, round: u64) {
        let now = clock();
        if let Ok(mut l) = self.inner.lock() {
            let first = l.first_next.entry(round).or_insert(now);
            *first = first.min(now);
        }
    }

    fn accepted_in(&self, round: u64) -> u64 {
        self.accepted.get(round as usize).map_or(0, |a| a.load(Ordering::SeqCst))
    }

    fn error(&self, e: String) {
        if let Ok(mut l) = self.inner.lock() {
            l.errors.push(e);
        }
    }

    fn report(
        &self,
        status: &tessera_protocol::api::HubStatus,
        expected: u64,
        elapsed: f64,
        cpu: Cpu,
        pg: Option<(u64, u64)>,
    ) -> Result<()> {
        let l = self.inner.lock().map_err(|_| anyhow::anyhow!("log poisoned"))?;
        println!("| request | count | p50 | p99 | max |");
        println!("|---|---:|---:|---:|---:|");
        for (kind, v) in &l.latency {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            let pct = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0) * 1e3;
            println!("| {kind} | {} | {:.1} ms | {:.1} ms | {:.1} ms |", v.len(), pct(0.5), pct(0.99), pct(1.0));
        }
        let closes: Vec<String> = l
            .last_ack
            .iter()
            .filter_map(|(r, ack)| l.first_next.get(&(r + 1)).map(|next| format!("{r}: {:.0} ms", (next - ack) * 1e3)))
            .collect();
        println!("round close (last acknowledgement → first assignment of the next round): {}", closes.join(", "));
        let counted: u64 = status.history.iter().filter(|h| h.result_checkpoint.is_some()).map(|h| h.accepted).sum();
        println!(
            "{} submissions acknowledged of {expected}; the hub counted {counted} in published rounds ({} lost, {} doubled); {} errors",
            l.acked,
            l.acked.saturating_sub(counted),
            counted.saturating_sub(l.acked),
            l.errors.len()
        );
        println!(
            "{elapsed:.1} s wall; CPU: this process (hubs and contributors) {:.1} s, PostgreSQL {:.1} s, S3 server {:.1} s",
            cpu.me, cpu.postgres, cpu.s3
        );
        if let Some((xacts, tuples)) = pg {
            println!(
                "PostgreSQL: {:.1} transactions and {:.1} rows read or written per acknowledged submission",
                xacts as f64 / l.acked.max(1) as f64,
                tuples as f64 / l.acked.max(1) as f64
            );
        }
        for e in l.errors.iter().take(5) {
            println!("error: {e}");
        }
        if !l.errors.is_empty() || counted != l.acked || l.acked != expected {
            bail!("{} errors; {} acknowledged, {counted} counted, {expected} expected", l.errors.len(), l.acked);
        }
        Ok(())
    }
}

/// CPU seconds used so far: this process, PostgreSQL's processes and the S3 server's (found
/// by name in /proc; zero where there are none).
#[derive(Clone, Copy, Default)]
struct Cpu {
    me: f64,
    postgres: f64,
    s3: f64,
}

impl Cpu {
    fn now() -> Cpu {
        let ticks = 100.0; // USER_HZ on Linux
        let mut cpu = Cpu::default();
        let me = std::process::id().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let comm = &stat[open + 1..close];
            let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
            let used = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
            let seconds = (used(11) + used(12)) / ticks;
            if name == me {
                cpu.me += seconds;
            } else if comm.starts_with("postgres") {
                cpu.postgres += seconds;
            } else if comm.starts_with("s3s-fs") {
                cpu.s3 += seconds;
            }
        }
        cpu
    }

    fn since(self, before: &Cpu) -> Cpu {
        Cpu { me: self.me - before.me, postgres: self.postgres - before.postgres, s3: self.s3 - before.s3 }
    }
}

/// PostgreSQL's committed transactions and rows read or written in this database so far
/// (`pg_stat_database`, through `psql`), if it can be asked.
fn pg_counters(url: &str) -> Option<(u64, u64)> {
    let query = "SELECT xact_commit, tup_returned + tup_fetched + tup_inserted + tup_updated + tup_deleted \
                 FROM pg_stat_database WHERE datname = current_database()";
    let psql = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|d| d.path().join("bin/psql"))
        .find(|p| p.exists())
        .unwrap_or_else(|| "psql".into());
    let out = std::process::Command::new(psql).args([url, "-tA", "-F", " ", "-c", query]).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// How simulated contributors arrive: spread over this many seconds of each round, and at
/// hubs this process runs (failover once one is killed) or at running ones (`--hub`: failover
/// once one stops answering).
#[derive(Clone, Copy)]
struct Reach {
    spread: f64,
    external: bool,
}

/// One simulated contributor: registers, then submits a fixed pseudo-gradient every round
/// until the run finishes, through replica `i mod N` or, once that one is gone, the next.
fn simulate(
    i: usize,
    clients: &[tessera_client::HubClient],
    info: &RunInfo,
    log: &Log,
    killed: &AtomicUsize,
    gate: &Gate,
    reach: Reach,
) -> Result<()> {
    let Reach { spread, external } = reach;
    let me = Arc::new(tessera_trust::Identity::generate()?);
    let hub_key = tessera_trust::PublicKey::parse(&info.hub_key)?;
    let mine = |k: usize| clients[k].clone().signed_by(me.clone()).pinning(hub_key);
    let mut k = i % clients.len();
    let mut client = mine(k);
    // A request through a replica that is gone goes to the next one; a lost answer to a
    // submission shows up there as `duplicate`, which is the acknowledgement it lost.
    // In this process a replica is gone once it was killed; a running hub's, once it stops
    // answering (`--hub`: its supervisor, or the benchmark's script, killed it).
    let failover = |k: &mut usize, client: &mut tessera_client::HubClient| -> bool {
        if clients.len() < 2 || (!external && killed.load(Ordering::SeqCst) != *k) {
            return false;
        }
        *k = (*k + 1) % clients.len();
        *client = mine(*k);
        true
    };
    let t = Instant::now();
    loop {
        match client.register(&format!("sim-{i}")) {
            Ok(_) => break,
            Err(tessera_client::ClientError::Unavailable { .. }) if failover(&mut k, &mut client) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    log.time("register", t.elapsed().as_secs_f64());
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&info.run_id, &mut run_id)?;
    // Δ is made when it is sent, and dropped after: memory is `--in-flight` submissions.
    let deltas = || -> Vec<Vec<f32>> {
        info.spec
            .tensors
            .iter()
            .map(|t| (0..t.numel()).map(|j| ((j + i as u64) as f32 * 0.37).sin() * 1e-3).collect())
            .collect()
    };
    let mut done: Option<u64> = None;
    loop {
        let t = Instant::now();
        let a = match client.assignment(tessera_client::ASSIGNMENT_WAIT) {
            Ok(a) => a,
            Err(tessera_client::ClientError::Unavailable { .. }) if failover(&mut k, &mut client) => continue,
            Err(e) => return Err(e.into()),
        };
        log.time("assignment (long-poll)", t.elapsed().as_secs_f64());
        if a.finished {
            return Ok(());
        }
        if done == Some(a.round) {
            // The long-poll ended before the round closed: wait again.
            continue;
        }
        log.assigned(a.round);
        if spread > 0.0 {
            // A fixed offset per contributor and round (Knuth's multiplicative hash).
            let h = ((i as u64) << 20 ^ a.round).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
            std::thread::sleep(Duration::from_secs_f64(spread * (h as f64 / (1u64 << 53) as f64)));
        }
        let mut base = [0u8; 32];
        hex::decode_to_slice(&a.base_checkpoint, &mut base)?;
        let _turn = gate.enter();
        let delta = deltas();
        let tensors =
            info.spec.tensors.iter().zip(&delta).map(|(t, d)| (t.name.as_str(), t.shape.as_slice(), d.as_slice()));
        let body = Arc::new(PseudoGradient::build(info.spec.codec, run_id, a.round, base, tensors)?.to_bytes());
        drop(delta);
        let t = Instant::now();
        let mut failed_over = false;
        loop {
            match client.submit(body.clone(), None, None) {
                Ok(receipt) => {
                    log.time("submission (whole path)", t.elapsed().as_secs_f64());
                    log.acked(receipt.round);
                }
                Err(tessera_client::ClientError::Unavailable { .. }) if failover(&mut k, &mut client) => {
                    failed_over = true;
                    continue;
                }
                // The answer was lost with the replica: `duplicate` is the acknowledgement.
                Err(e) if failed_over && e.code() == Some(tessera_protocol::ErrorCode::Duplicate) => log.acked(a.round),
                Err(e) => log.error(format!("contributor {i}, round {}: {e}", a.round)),
            }
            break;
        }
        done = Some(a.round);
    }
}

/// At most `n` holders at once (a counting semaphore for threads).
struct Gate {
    free: Mutex<usize>,
    wake: std::sync::Condvar,
}

struct Turn<'a>(&'a Gate);

impl Gate {
    fn new(n: usize) -> Gate {
        Gate { free: Mutex::new(n), wake: std::sync::Condvar::new() }
    }

    fn enter(&self) -> Turn<'_> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = self.wake.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        Turn(self)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.0.wake.notify_one();
    }
}
