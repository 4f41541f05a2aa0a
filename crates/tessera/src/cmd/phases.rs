//! `tessera phases`: prints the phase plan (`crate::plan`) with what each phase implies.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::plan::{DEFAULT_PLAN, H100_BF16, PLANNED_MFU, plan_rows};

#[derive(Args)]
pub struct PhasesArgs {
    /// A phase plan (TOML with [[phase]] tables); default: the plan Tessera ships with.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

fn size(bytes: u64) -> String {
    let b = bytes as f64;
    match b {
        _ if b >= (1u64 << 40) as f64 => format!("{:.1} TiB", b / (1u64 << 40) as f64),
        _ if b >= (1u64 << 30) as f64 => format!("{:.1} GiB", b / (1u64 << 30) as f64),
        _ => format!("{:.0} MiB", b / (1u64 << 20) as f64),
    }
}

fn approx(x: f64) -> String {
    match x {
        _ if x >= 1e6 => format!("{:.1}M", x / 1e6),
        _ if x >= 1e3 => format!("{:.1}k", x / 1e3),
        _ => format!("{x:.0}"),
    }
}

fn count(x: f64) -> String {
    match x {
        _ if x >= 1e12 => format!("{:.1}T", x / 1e12),
        _ if x >= 1e9 => format!("{:.1}B", x / 1e9),
        _ => format!("{:.0}M", x / 1e6),
    }
}

pub fn phases(args: PhasesArgs) -> Result<()> {
    let text = match &args.plan {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?,
        None => DEFAULT_PLAN.to_owned(),
    };
    let rows = plan_rows(&text)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let header =
        ["phase", "params", "layers×d", "heads", "tokens", "tok/p", "optimizer", "+DiLoCo", "+activ.", "brings"];
    println!(
        "{:<20} {:>7} {:>11} {:>8} {:>7} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9}  who",
        header[0],
        header[1],
        header[2],
        header[3],
        header[4],
        header[5],
        header[6],
        header[7],
        header[8],
        header[9],
        "fits?"
    );
    for r in &rows {
        println!(
            "{:<20} {:>7} {:>11} {:>8} {:>7} {:>6.0} {:>10} {:>10} {:>10} {:>10} {:>9}  {}",
            r.name.chars().take(20).collect::<String>(),
            count(r.params as f64),
            format!("{}×{}", r.layers, r.hidden),
            format!("{}/{}", r.heads, r.kv_heads),
            count(r.tokens),
            r.tokens_per_param,
            size(r.optimizer_bytes),
            size(r.diloco_bytes),
            size(r.activation_bytes),
            size(r.contributor_bytes),
            if r.fits {
                "yes".to_owned()
            } else {
                format!("no, {:.1}×", r.total_bytes as f64 / r.contributor_bytes as f64)
            },
            r.qualify
        );
    }
    println!(
        "\nbytes one contributor uploads per round, by codec, against synchronous data parallel over the same H steps:"
    );
    let names: Vec<&str> = rows[0].upload.iter().map(|(n, _)| n.as_str()).collect();
    print!("{:<20}", "phase");
    for n in &names {
        print!(" {n:>13}");
    }
    println!(" {:>13} {:>12}", "sync DP", "DP / int8");
    for r in &rows {
        print!("{:<20}", r.name.chars().take(20).collect::<String>());
        for (_, b) in &r.upload {
            print!(" {:>13}", size(*b));
        }
        let int8 = r.upload.iter().find(|(n, _)| n == "int8:64").map_or(1, |(_, b)| *b);
        println!(" {:>13} {:>11.0}×", size(r.sync_dp_bytes), r.sync_dp_bytes as f64 / int8 as f64);
    }
    println!(
        "\ncompute at {:.0}% of an H100's dense bf16 peak ({:.0} TFLOP/s):",
        100.0 * PLANNED_MFU,
        H100_BF16 / 1e12
    );
    println!(
        "{:<20} {:>12} {:>12} {:>16} {:>22}",
        "phase", "train FLOPs", "H100-hours", "H100s for 90 days", "contributors / replica"
    );
    for r in &rows {
        println!(
            "{:<20} {:>12.2e} {:>12} {:>16.0} {:>22}",
            r.name.chars().take(20).collect::<String>(),
            r.train_flops,
            approx(r.h100_hours),
            r.h100s_for_90_days.ceil(),
            r.contributors_per_replica
        );
    }
    println!(
        "\nmemory: f32 weights, gradients and AdamW moments (16 B/param); DiLoCo's base weights and error-feedback \
         residual (8 B/param); activations of one micro-batch (bf16, 34·s·b·d per layer, memory-efficient attention) \
         and f32 logits. A phase that does not fit one contributor needs the model split across contributors."
    );
    Ok(())
}
