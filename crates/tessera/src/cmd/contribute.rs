//! `tessera contribute`: join a hub's run and train for it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_contributor::{Contributor, ContributorConfig, Outcome};

use crate::args::{RuntimeArgs, external_data, gib, mbps, setup_devices};

#[derive(Args)]
pub struct ContributeArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// Identity, inner optimizer state and cached weights; reuse it to rejoin after a restart.
    #[arg(long, default_value = "runs/contributor")]
    pub state_dir: PathBuf,
    /// A name shown on the hub's status page.
    #[arg(long, default_value = "anonymous")]
    pub name: String,
    /// Your Ed25519 identity (`tessera keygen`); default: identity.pem in the state directory,
    /// created if missing. Every request is signed with it; rewards are credited to it.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Training data, for runs that do not use the embedded corpus (must match the run's fingerprint).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokenizer for --data: `char`, `byte` or a tokenizer.json.
    #[arg(long, default_value = "char")]
    pub tokenizer: String,
    /// Stop after this many rounds (default: until the run finishes).
    #[arg(long)]
    pub max_rounds: Option<u64>,
    /// Keep retrying an unreachable hub for this many seconds.
    #[arg(long, default_value_t = 300)]
    pub patience: u64,
    /// TESTING TOOL — attack the run instead of helping it, to check the hub and validator:
    /// nan, noise, sign-flip, scale, alie, ipm, zero, lazy, stale, replay, wrong-data, copy,
    /// copy-noise. Never use on a run you do not own.
    #[arg(long)]
    pub adversary: Option<tessera_contest::Adversary>,
    /// Emulate a slower uplink: upload no faster than this many megabits per second (a token
    /// bucket over every submission).
    #[arg(long, value_name = "MBPS")]
    pub max_upload_mbps: Option<f64>,
    /// Emulate a slower downlink: download checkpoints and updates no faster than this many
    /// megabits per second.
    #[arg(long, value_name = "MBPS")]
    pub max_download_mbps: Option<f64>,
    /// Runs on a published dataset: keep at most this many GiB of its shards on disk (the
    /// current round's and the next, prefetched while training, at least).
    #[arg(long, value_name = "GIB", default_value_t = 8.0)]
    pub data_cache_gib: f64,
    /// Keep training while talking to the hub: upload each round's pseudo-gradient and
    /// download the next checkpoint while the next round already trains. That round starts from
    /// an estimate of the hub's next weights (its outer step, with this contributor's own
    /// pseudo-gradient for the mean) and moves onto the real ones as soon as they arrive.
    /// Alone on a run it loses nothing. Among several contributors the steps trained before
    /// the real weights arrive are worth less: with short rounds (H = 20) the loss after the
    /// same rounds was several percent higher, with H = 50 within 1% (docs/benchmarks.md).
    #[arg(long)]
    pub overlap: bool,
    /// Write a JSON line per submitted round, then one with the totals, to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// `--device cuda:0,cuda:1,…` (or `cpu,cpu`): train one DiLoCo replica per device, each on
    /// its share of every step's windows (together what one device with that many times the
    /// batch would train), and average them before the round's one upload. Needs the model and
    /// its optimizer to fit each device.
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// The training bar's message: the last loss and, with --overlap, the share sent so far of the
/// submission uploading beside the training.
#[derive(Default)]
struct StepMessage {
    loss: String,
    sending: Option<u64>,
}

impl std::fmt::Display for StepMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.loss)?;
        match self.sending {
            Some(p) => write!(f, " · sending {p}%"),
            None => Ok(()),
        }
    }
}

pub fn contribute(args: ContributeArgs) -> Result<()> {
    let devices = setup_devices(&args.runtime)?;
    if devices.len() > 1 && (args.overlap || args.adversary.is_some()) {
        bail!("several devices train one contributor's replicas; --overlap and --adversary take one device");
    }
    let data = external_data(&args.data, &args.tokenizer)?;
    if !args.data_cache_gib.is_finite() || args.data_cache_gib <= 0.0 {
        bail!("--data-cache-gib must be positive");
    }
    let config = ContributorConfig {
        hub: args.hub.trim_end_matches('/').to_owned(),
        state_dir: args.state_dir.clone(),
        name: args.name.clone(),
        key: args.key.clone(),
        devices: devices.clone(),
        data,
        max_rounds: args.max_rounds,
        patience: Duration::from_secs(args.patience),
        adversary: args.adversary,
        max_upload_bps: mbps("--max-upload-mbps", args.max_upload_mbps)?,
        max_download_bps: mbps("--max-download-mbps", args.max_download_mbps)?,
        overlap: args.overlap,
        data_cache_bytes: (args.data_cache_gib * (1u64 << 30) as f64) as u64,
    };
    if args.overlap && args.adversary.is_some() {
        bail!("--overlap and --adversary do not go together: an attack's rounds are not overlapped");
    }
    let mut report = match &args.report {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("create the report {}", p.display()))?,
        )),
        None => None,
    };
    if let Some(kind) = args.adversary {
        tracing::warn!(%kind, "ADVERSARY MODE (a testing tool): this contributor attacks the run");
    }
    let mut contributor = Contributor::join(config)?;
    eprintln!(
        "tessera contribute: contributor {} in run {} ({}), H = {}, codec {}{}{}{}",
        contributor.id(),
        contributor.run.run_id,
        contributor.run.spec.name,
        contributor.run.spec.inner_steps,
        contributor.run.spec.codec,
        if contributor.run.spec.trust.is_some() { ", submissions sealed to the attested validator" } else { "" },
        if args.overlap { ", transfers overlapped with training" } else { "" },
        if devices.len() > 1 { format!(", {} replicas averaged per round", devices.len()) } else { String::new() }
    );
    eprintln!("your key {} (rewards are credited to it)", contributor.public_key());
    // Live status on a terminal (hidden when stderr is not one): phase, round, inner step and
    // loss, then the upload (with --overlap, its share sent beside the loss, as the next round
    // trains meanwhile); a line per round stays above it.
    let bar = indicatif::ProgressBar::new(0);
    let phases = contributor.run.spec.phases.len() + 1;
    let scored = contributor.run.spec.contest.is_some();
    contributor.on_progress(progress_display(bar.clone(), phases, args.overlap));
    let mut report_error = None;
    let summary = contributor.run(|r| {
        if let Some(w) = report.as_mut()
            && let Err(e) = serde_json::to_writer(&mut *w, r).map_err(std::io::Error::from).and_then(|()| writeln!(w))
        {
            report_error.get_or_insert(e);
        }
        let outcome = match &r.outcome {
            Outcome::Accepted(rc) if rc.staleness > 0 => {
                format!("accepted into round {} at weight {}", rc.round, rc.weight)
            }
            Outcome::Accepted(_) => "accepted".to_owned(),
            Outcome::AlreadyAccepted => "already accepted (an earlier attempt's answer was lost)".to_owned(),
            Outcome::NotUsed(why) => format!("not used: {why}"),
        };
        let waited = r.waited_s.map_or(String::new(), |w| format!(" (+{w:.1} s waiting)"));
        bar.suspend(|| {
            eprintln!(
                "round {:>4}: inner loss {:.4} | {:.1} s training{waited} | ↑ {} ↓ {} | {outcome}",
                r.round,
                r.inner_loss,
                r.train_s,
                gib(r.bytes_up),
                gib(r.bytes_down)
            )
        });
    })?;
    bar.finish_and_clear();
    if scored {
        match contributor.standing() {
            Ok(Some((row, of))) => eprintln!(
                "standing: rank {}/{of} · rating μ−3σ {:.2} · mean score {} · {} reward units · {}",
                row.rank,
                row.ordinal,
                row.mean_score.map_or("–".into(), |s| format!("{s:+.5}")),
                row.rewards,
                if row.qualified { "qualified for the next phase" } else { "not (yet) qualified" }
            ),
            Ok(None) => eprintln!("standing: not on the leaderboard yet"),
            Err(e) => eprintln!("standing: could not read the leaderboard: {e}"),
        }
    }
    eprintln!(
        "tessera contribute: done after {} round(s); training {:.1} s of {:.1} s since the first step \
         ({:.1}% compute utilisation; {:.1} s joining before it)",
        summary.rounds,
        summary.training_s,
        summary.wall_s,
        100.0 * summary.utilisation(),
        summary.joining_s
    );
    if let Some(mut w) = report {
        serde_json::to_writer(&mut w, &summary)?;
        writeln!(w)?;
        w.flush()?;
    }
    if let Some(e) = report_error {
        bail!("writing the report: {e}");
    }
    Ok(())
}

/// The live status line on a terminal (hidden when stderr is not one): phase, round, inner step
/// and loss, then the upload (with `--overlap`, its share sent beside the loss, as the next round
/// trains meanwhile).
fn progress_display(bar: indicatif::ProgressBar, phases: usize, overlap: bool) -> tessera_contributor::ProgressFn {
    let training =
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] step {pos}/{len} · loss {msg} · {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let uploading = indicatif::ProgressStyle::with_template(
        "{prefix} uploading [{bar:30}] {bytes}/{total_bytes} · {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let standing = std::sync::Mutex::new(String::new());
    let message = std::sync::Mutex::new(StepMessage::default());
    std::sync::Arc::new(move |p: &tessera_contributor::Progress| match *p {
        tessera_contributor::Progress::Standing { rank, of, mean_score, rewards } => {
            if let Ok(mut s) = standing.lock() {
                let score = mean_score.map_or("–".into(), |s| format!("{s:+.4}"));
                *s = format!(" · rank {rank}/{of}, mean score {score}, {rewards} units");
            }
        }
        tessera_contributor::Progress::Round { round, phase, steps } => {
            bar.set_style(training.clone());
            let standing = standing.lock().map(|s| s.clone()).unwrap_or_default();
            bar.set_prefix(format!("phase {}/{phases} · round {round}{standing}", phase + 1));
            bar.set_length(steps);
            bar.set_position(0);
            bar.reset_elapsed();
        }
        tessera_contributor::Progress::Step { step, loss } => {
            bar.set_position(step);
            if let Ok(mut m) = message.lock() {
                m.loss = format!("{loss:.4}");
                bar.set_message(m.to_string());
            }
        }
        tessera_contributor::Progress::Upload { sent, total } if overlap => {
            if let Ok(mut m) = message.lock() {
                m.sending = (sent < total).then(|| 100 * sent / total.max(1));
                bar.set_message(m.to_string());
            }
        }
        tessera_contributor::Progress::Upload { sent, total } => {
            if bar.length() != Some(total) {
                bar.set_style(uploading.clone());
                bar.set_length(total);
            }
            bar.set_position(sent);
        }
    })
}
