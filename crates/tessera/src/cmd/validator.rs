//! `tessera validator`: score (or, in a sealed run, settle) every round of a scored run.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::args::{RuntimeArgs, ScoringDataArgs, setup_runtime};

#[derive(Args)]
pub struct ValidateArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// The token the hub was started with (`tessera hub --validator-token`).
    #[arg(long, env = "TESSERA_VALIDATOR_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(flatten)]
    pub data: ScoringDataArgs,
    /// Stop after scoring this many rounds, or tasks in a run scored by many validators
    /// (default: until the run finishes).
    #[arg(long)]
    pub max_rounds: Option<u64>,
    /// Keep retrying an unreachable hub for this many seconds.
    #[arg(long, default_value_t = 300)]
    pub patience: u64,
    /// Sealed runs, SEV-SNP guests: this chip's VCEK (DER), fetched ahead of time from AMD's
    /// key distribution service.
    #[arg(long)]
    pub vcek: Option<PathBuf>,
    /// Sealed runs, TDX guests: the quote's DCAP collateral (JSON), fetched ahead of time.
    #[arg(long)]
    pub tdx_collateral: Option<PathBuf>,
    /// The kernel's configfs-tsm report directory.
    #[arg(long, default_value = tessera_validator::tee::TSM_REPORTS)]
    pub tsm_dir: PathBuf,
    /// DEVELOPMENT ONLY, INSECURE: attest with a software stand-in instead of a TEE (the run
    /// must allow it). Nothing about this validator is proven; it says so everywhere.
    #[arg(long)]
    pub insecure_dev_tee: bool,
    /// Serve Prometheus metrics (`tessera_validator_*`: rounds and submissions scored, time per
    /// round) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// Serves this process's Prometheus metrics at `addr`/metrics from a thread of its own.
fn serve_metrics(addr: std::net::SocketAddr) -> Result<()> {
    tessera_telemetry::prometheus().context("a metrics recorder is already installed")?;
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("metrics on {addr}"))?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
        let Ok(rt) = rt else { return };
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            let app =
                axum::Router::new().route("/metrics", axum::routing::get(|| async { tessera_telemetry::exposition() }));
            let limits = tessera_edge::Limits::default();
            if let Err(e) = tessera_edge::serve(listener, app, limits, std::future::pending()).await {
                tracing::error!(error = %e, "the metrics server stopped");
            }
        });
    })?;
    eprintln!("tessera validator: metrics at http://{addr}/metrics");
    Ok(())
}

pub fn validate(args: ValidateArgs) -> Result<()> {
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr)?;
    }
    let data = args.data.config()?;
    let device = setup_runtime(&args.runtime)?;
    let config = tessera_validator::client::ValidatorConfig {
        hub: args.hub.trim_end_matches('/').to_owned(),
        token: args.token.clone(),
        device,
        data,
        poll: Duration::from_millis(500),
        patience: Duration::from_secs(args.patience),
        attester: Some(if args.insecure_dev_tee {
            tracing::warn!("--insecure-dev-tee: attesting with an INSECURE software stand-in, not a TEE");
            tessera_validator::tee::Attester::InsecureDev
        } else {
            tessera_validator::tee::Attester::Tsm {
                reports: args.tsm_dir.clone(),
                vcek: args.vcek.clone(),
                tdx_collateral: args.tdx_collateral.clone(),
            }
        }),
    };
    let mut validator = tessera_validator::client::Validator::connect(config)?;
    match validator.attestation() {
        Some(v) => eprintln!("tessera validator: attested as {v}; settling rounds of {} as they close", args.hub),
        None => eprintln!("tessera validator: scoring rounds of {} as they close", args.hub),
    }
    let rounds = validator.run(args.max_rounds, |r| {
        let task = r.task.map_or(String::new(), |t| format!(", task {t}"));
        eprintln!(
            "round {:>4}{task}: {} submissions scored in {:.1} s ({} windows forward), {} copies, best score {}",
            r.round,
            r.submissions,
            r.cost.seconds,
            r.cost.windows_forward,
            r.copies,
            r.best.map_or("–".into(), |b| format!("{b:.4}"))
        );
    })?;
    eprintln!("tessera validator: scored {rounds} rounds (or tasks, in a run scored by many validators)");
    Ok(())
}
