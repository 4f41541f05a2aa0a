//! `tessera bench overlap`: how busy a contributor keeps its accelerator, with and without
//! overlapping its transfers with training, on emulated links.
//!
//! It first times the model's training step here (at the thread count each contributor will
//! get), so that a round's compute is known, then limits each contributor's uplink and downlink
//! so that one transfer of a round's payload (the encoded pseudo-gradient up, the encoded update
//! down) takes `--transfer-share` of that compute. The same run is then made twice with
//! `tessera demo`'s machinery — a hub and contributor processes on localhost — once plain and
//! once with `--overlap`; each contributor reports its compute utilisation (training time over
//! wall time from its first inner step) and the final global model is evaluated.
//!
//! One pair of runs says little about loss: a short run's final loss moves by several percent
//! under perturbations as small as f32 rounding, so `--seeds` repeats the pair for each seed and
//! reports the mean change and its standard error.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser};
use tch::Device;
use tessera_model::LlamaConfig;
use tessera_protocol::Codec;
use tessera_train::bench::{BenchOptions, train_throughput};

use crate::cmd::demo::{DemoArgs, SwarmRun, run_swarm};

#[derive(Args)]
pub struct BenchOverlapArgs {
    /// The model: a preset or a config.json.
    #[arg(long, default_value = "micro")]
    model: String,
    /// Contributor processes (the cores are split between them).
    #[arg(long, default_value_t = 1)]
    contributors: usize,
    #[arg(long, default_value_t = 8)]
    rounds: u64,
    /// H: inner steps per round.
    #[arg(long, default_value_t = 20)]
    inner_steps: u64,
    #[arg(long, default_value_t = 12)]
    batch_size: u32,
    /// One transfer of a round's payload takes this share of a round's compute.
    #[arg(long, default_value_t = 0.1)]
    transfer_share: f64,
    /// Codec of uploads and of the updates downloaded.
    #[arg(long, default_value = "int8:64")]
    codec: String,
    /// Working directory (one subdirectory per run).
    #[arg(long, default_value = "runs/bench-overlap")]
    dir: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the pair (plain, then overlapped) once per seed (the demo's `--seed`: the initial
    /// weights and every contributor's data), and report the loss change's mean and standard
    /// error over the pairs.
    #[arg(long, value_delimiter = ',', default_value = "1337")]
    seeds: Vec<u64>,
    /// More `tessera demo` flags for both runs, after `--` (e.g. `-- --lr 2e-3`).
    #[arg(last = true)]
    demo_flags: Vec<String>,
}

/// `tessera demo`'s flags, parsed as the command line would be.
#[derive(Parser)]
struct DemoLine {
    #[command(flatten)]
    demo: DemoArgs,
}

#[derive(serde::Serialize)]
struct Arm {
    overlap: bool,
    wall_s: f64,
    /// Per contributor: training over wall time from its first inner step.
    utilisation: Vec<f64>,
    /// Per contributor: seconds before its first inner step (the first checkpoint download).
    joining_s: Vec<f64>,
    /// Per contributor: tokens trained per second of training.
    train_tokens_per_s: Vec<f64>,
    val_loss: f64,
    val_loss_warm: f64,
}

#[derive(serde::Serialize)]
struct Results {
    model: String,
    params: u64,
    contributors: usize,
    threads: usize,
    rounds: u64,
    inner_steps: u64,
    step_s: f64,
    round_compute_s: f64,
    upload_bytes: u64,
    download_bytes: u64,
    upload_mbps: f64,
    download_mbps: f64,
    transfer_share: f64,
    pairs: Vec<Pair>,
    /// Mean over the pairs of each arm's mean utilisation.
    utilisation_plain: f64,
    utilisation_overlapped: f64,
    /// Mean over the pairs of `loss_change`, and its standard error (absent for one pair).
    loss_change_mean: f64,
    loss_change_se: Option<f64>,
}

#[derive(serde::Serialize)]
struct Pair {
    seed: u64,
    plain: Arm,
    overlapped: Arm,
    /// The overlapped run's final loss over the plain run's, minus one.
    loss_change: f64,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The standard error of `v`'s mean (sample standard deviation over √n); `None` below two.
fn standard_error(v: &[f64]) -> Option<f64> {
    let n = v.len();
    (n >= 2).then(|| {
        let m = mean(v);
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64 / n as f64).sqrt()
    })
}

fn arm(overlap: bool, r: &SwarmRun, tokens_per_round: f64) -> Result<Arm> {
    let mut utilisation = Vec::new();
    let mut joining_s = Vec::new();
    let mut train_tokens_per_s = Vec::new();
    for (i, s) in r.contributors.iter().enumerate() {
        let s = s.as_ref().with_context(|| format!("contributor {i} wrote no report"))?;
        utilisation.push(s.utilisation());
        joining_s.push(s.joining_s);
        train_tokens_per_s.push(s.rounds as f64 * tokens_per_round / s.training_s.max(1e-9));
    }
    Ok(Arm {
        overlap,
        wall_s: r.elapsed,
        utilisation,
        joining_s,
        train_tokens_per_s,
        val_loss: r.eval.val_loss,
        val_loss_warm: r.eval.val_loss_warm,
    })
}

pub fn bench_overlap(args: BenchOverlapArgs) -> Result<()> {
    // Long on purpose: calibration, the plain and overlapped pair per seed, and the report.
    if args.contributors == 0 || args.rounds < 2 || args.inner_steps == 0 {
        bail!("--contributors and --inner-steps must be positive, and --rounds at least 2");
    }
    if !(args.transfer_share > 0.0 && args.transfer_share.is_finite()) {
        bail!("--transfer-share must be a positive fraction of a round's compute");
    }
    if args.seeds.is_empty() {
        bail!("--seeds needs at least one seed");
    }
    if args.demo_flags.iter().any(|f| f == "--seed" || f.starts_with("--seed=")) {
        bail!("give the demo's seed with --seeds, not after `--`");
    }
    let codec: Codec = args.codec.parse().map_err(|e| anyhow::anyhow!("--codec: {e}"))?;
    let config = LlamaConfig::from_preset_or_path(&args.model)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / args.contributors).max(1);
    tch::set_num_threads(threads as i32);
    println!("timing {}'s training step on {threads} thread(s)…", args.model);
    let options = BenchOptions {
        batch_size: args.batch_size as usize,
        seq_len: None,
        steps: 5,
        warmup: 2,
        device: Device::Cpu,
        bf16: None,
        peak_flops: None,
    };
    let timed = train_throughput(&args.model, &config, &options)?;
    let step_s = timed.step_ms / 1e3;
    let round_s = step_s * args.inner_steps as f64;
    let shapes = config.parameter_shapes();
    // Uploads and the updates downloaded share one codec, so a round's payload is the same both
    // ways (each message also carries its tensor table and header: a few hundred bytes).
    let payload: u64 = shapes.iter().map(|(_, s)| codec.encoded_len(s.iter().product::<i64>() as u64)).sum();
    let transfer_s = args.transfer_share * round_s;
    let link_mbps = payload as f64 * 8.0 / 1e6 / transfer_s;
    let (up, down, up_mbps, down_mbps) = (payload, payload, link_mbps, link_mbps);
    println!(
        "a round is {} × {:.3} s = {round_s:.1} s of compute; {up} bytes up and {down} down each take {transfer_s:.1} s \
         at {up_mbps:.2} / {down_mbps:.2} Mbit/s",
        args.inner_steps, step_s
    );
    let run = |seed: u64, overlap: bool| -> Result<SwarmRun> {
        let dir = args.dir.join(format!("seed-{seed}")).join(if overlap { "overlapped" } else { "plain" });
        let mut argv: Vec<String> = vec!["demo".into()];
        for (flag, v) in [
            ("--model", args.model.clone()),
            ("--contributors", args.contributors.to_string()),
            ("--quorum", args.contributors.to_string()),
            ("--rounds", args.rounds.to_string()),
            ("--inner-steps", args.inner_steps.to_string()),
            ("--batch-size", args.batch_size.to_string()),
            ("--codec", args.codec.clone()),
            ("--broadcast-codec", args.codec.clone()),
            ("--max-upload-mbps", up_mbps.to_string()),
            ("--max-download-mbps", down_mbps.to_string()),
            ("--seed", seed.to_string()),
            ("--dir", dir.display().to_string()),
        ] {
            argv.extend([flag.to_owned(), v]);
        }
        if overlap {
            argv.push("--overlap".into());
        }
        argv.extend(args.demo_flags.iter().cloned());
        let line = DemoLine::try_parse_from(&argv).map_err(|e| anyhow::anyhow!("the demo flags: {e}"))?;
        println!("\n{} run, seed {seed}:", if overlap { "overlapped" } else { "plain" });
        run_swarm(&line.demo)
    };
    let tokens_per_round = (args.inner_steps * u64::from(args.batch_size) * timed.seq_len as u64) as f64;
    let mut pairs = Vec::with_capacity(args.seeds.len());
    for &seed in &args.seeds {
        let plain = arm(false, &run(seed, false)?, tokens_per_round)?;
        let overlapped = arm(true, &run(seed, true)?, tokens_per_round)?;
        let loss_change = overlapped.val_loss / plain.val_loss - 1.0;
        pairs.push(Pair { seed, plain, overlapped, loss_change });
    }
    let changes: Vec<f64> = pairs.iter().map(|p| p.loss_change).collect();
    let utilisation = |f: fn(&Pair) -> &Arm| mean(&pairs.iter().map(|p| mean(&f(p).utilisation)).collect::<Vec<_>>());
    let results = Results {
        model: args.model.clone(),
        params: config.num_params(),
        contributors: args.contributors,
        threads,
        rounds: args.rounds,
        inner_steps: args.inner_steps,
        step_s,
        round_compute_s: round_s,
        upload_bytes: up,
        download_bytes: down,
        upload_mbps: up_mbps,
        download_mbps: down_mbps,
        transfer_share: args.transfer_share,
        utilisation_plain: utilisation(|p| &p.plain),
        utilisation_overlapped: utilisation(|p| &p.overlapped),
        loss_change_mean: mean(&changes),
        loss_change_se: standard_error(&changes),
        pairs,
    };
    println!(
        "\n{:>6} {:<11} {:>9} {:>13} {:>12} {:>16} {:>10} {:>10} {:>9}",
        "seed", "run", "wall s", "utilisation", "joining s", "train tokens/s", "val loss", "warm loss", "change"
    );
    for p in &results.pairs {
        for a in [&p.plain, &p.overlapped] {
            let change = if a.overlap { format!("{:+.2}%", 100.0 * p.loss_change) } else { String::new() };
            println!(
                "{:>6} {:<11} {:>9.1} {:>12.2}% {:>12.1} {:>16.0} {:>10.4} {:>10.4} {:>9}",
                p.seed,
                if a.overlap { "overlapped" } else { "plain" },
                a.wall_s,
                100.0 * mean(&a.utilisation),
                mean(&a.joining_s),
                mean(&a.train_tokens_per_s),
                a.val_loss,
                a.val_loss_warm,
                change
            );
        }
    }
    let spread = results.loss_change_se.map_or(String::new(), |se| {
        format!(" ± {:.2}% (standard error over {} seeds)", 100.0 * se, results.pairs.len())
    });
    println!(
        "\noverlap: utilisation {:.2}% → {:.2}% (target ≥ 97%); final loss {:+.2}%{spread} against the plain run \
         (target within 1%)",
        100.0 * results.utilisation_plain,
        100.0 * results.utilisation_overlapped,
        100.0 * results.loss_change_mean,
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The standard error of the mean: sample standard deviation over √n, and none for one
    /// pair, where there is no spread to measure.
    #[test]
    fn the_standard_error_is_the_sample_deviation_over_root_n() {
        let se = standard_error(&[1.0, 2.0, 3.0]).unwrap();
        assert!((se - 1.0 / 3f64.sqrt()).abs() < 1e-12, "{se}");
        assert_eq!(standard_error(&[0.5]), None);
        assert_eq!(standard_error(&[0.25, 0.25]), Some(0.0));
    }
}
