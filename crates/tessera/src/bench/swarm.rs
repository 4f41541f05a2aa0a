//! `tessera bench swarm`: hundreds of simulated contributors (real HTTP, real messages, no
//! training) against one hub on loopback: errors and submission latency percentiles.

use std::time::Instant;

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
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let key = tessera_trust::Identity::generate()?;
        let hub =
            Hub::open(Db::connect(&database).await?, Store::open(&store)?, Some(NewRun { spec, weights }), key, HubConfig::default())
                .await?;
        let info = hub.info().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tessera_hub::serve(hub, listener, async {
            let _ = stop_rx.await;
        }));
        println!(
            "{} contributors × {} rounds against one hub on loopback: {} parameters, codec {}, database {}",
            args.contributors,
            args.rounds,
            args.params,
            args.codec,
            if database.starts_with("sqlite") { "SQLite" } else { "PostgreSQL" }
        );
        // One blocking client per simulated contributor, sharing one connection pool, each on
        // its own thread; no retries, so every failure counts.
        let base = tessera_client::HubClient::new(&url)?.with_patience(std::time::Duration::ZERO);
        let start = Instant::now();
        let results: Vec<Result<(Vec<f64>, Vec<String>)>> = tokio::task::block_in_place(|| {
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..args.contributors)
                    .map(|i| {
                        let (base, info) = (base.clone(), info.clone());
                        scope.spawn(move || simulate(i, base, &info))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a simulated contributor panicked"))))
                    .collect()
            })
        });
        let (mut latencies, mut errors) = (Vec::new(), Vec::new());
        for r in results {
            match r {
                Ok((l, e)) => {
                    latencies.extend(l);
                    errors.extend(e);
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let _ = stop_tx.send(());
        server.await??;
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
        println!(
            "{} submissions in {elapsed:.1} s, {} errors | submission latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            latencies.len(),
            errors.len(),
            pct(0.5) * 1e3,
            pct(0.9) * 1e3,
            pct(0.99) * 1e3,
            pct(1.0) * 1e3
        );
        for e in errors.iter().take(5) {
            println!("error: {e}");
        }
        if !errors.is_empty() {
            bail!("{} submissions failed", errors.len());
        }
        Ok(())
    })
}

/// One simulated contributor: registers, then submits a fixed pseudo-gradient every round
/// until the run finishes; returns its submissions' latencies and the refusals it met.
fn simulate(i: usize, base: tessera_client::HubClient, info: &RunInfo) -> Result<(Vec<f64>, Vec<String>)> {
    let me = std::sync::Arc::new(tessera_trust::Identity::generate()?);
    let client = base.signed_by(me).pinning(tessera_trust::PublicKey::parse(&info.hub_key)?);
    client.register(&format!("sim-{i}"))?;
    let mut run_id = [0u8; 16];
    hex::decode_to_slice(&info.run_id, &mut run_id)?;
    let deltas: Vec<Vec<f32>> = info
        .spec
        .tensors
        .iter()
        .map(|t| (0..t.numel()).map(|j| ((j + i as u64) as f32 * 0.37).sin() * 1e-3).collect())
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), Vec::new());
    loop {
        let a = client.assignment(tessera_client::ASSIGNMENT_WAIT)?;
        if a.finished {
            break;
        }
        let mut base = [0u8; 32];
        hex::decode_to_slice(&a.base_checkpoint, &mut base)?;
        let tensors =
            info.spec.tensors.iter().zip(&deltas).map(|(t, d)| (t.name.as_str(), t.shape.as_slice(), d.as_slice()));
        let body = PseudoGradient::build(info.spec.codec, run_id, a.round, base, tensors)?.to_bytes();
        let t = Instant::now();
        let result = client.submit(std::sync::Arc::new(body), None, None);
        latencies.push(t.elapsed().as_secs_f64());
        if let Err(e) = result {
            errors.push(e.to_string());
        }
    }
    Ok((latencies, errors))
}
