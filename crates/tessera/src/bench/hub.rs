//! `tessera bench hub` and `tessera bench robust`: the hub's aggregation round and each robust
//! rule, against memcpy bandwidth and the plain mean measured in the same run.

use anyhow::{Result, bail};
use clap::Args;

use crate::args::{CodecArgs, CodecName, gib, human, make_codec};

#[derive(Args)]
pub struct HubBenchArgs {
    /// Model parameters.
    #[arg(long, default_value_t = 100_000_000)]
    params: u64,
    /// Values per tensor.
    #[arg(long, default_value_t = 4_000_000)]
    tensor_len: u64,
    #[arg(long, default_value_t = 16)]
    contributors: usize,
    /// Codecs to measure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16,int8,int4,topk")]
    codecs: Vec<CodecName>,
    #[command(flatten)]
    codec: CodecArgs,
}

#[derive(Args)]
pub struct RobustArgs {
    /// Model parameters.
    #[arg(long, default_value_t = 100_000_000)]
    params: u64,
    /// Values per tensor.
    #[arg(long, default_value_t = 4_000_000)]
    tensor_len: u64,
    #[arg(long, default_value_t = 16)]
    contributors: usize,
    /// Rules to time, comma-separated; the first is the baseline.
    #[arg(long, value_delimiter = ',', default_value = "mean,norm-clip,trimmed-mean,median,centered-clip")]
    rules: Vec<tessera_protocol::Aggregation>,
    /// Runs per rule (the best is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

pub fn bench_hub(args: HubBenchArgs) -> Result<()> {
    let HubBenchArgs { params, tensor_len, contributors, codecs, codec: p } = args;
    if params == 0 || tensor_len == 0 || contributors == 0 {
        bail!("--params, --tensor-len and --contributors must be positive");
    }
    println!(
        "hub round: {} parameters in tensors of {tensor_len}, {contributors} contributors, {} threads \
         (verify: parse + checksum of all {contributors} messages; arrival: verify + decode + check of one)",
        human(params as f64),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<18} {:>10} {:>14} {:>11} {:>12} {:>7} {:>10} {:>12}",
        "codec", "message", "decode+agg+outer s", "GB/s (f32)", "memcpy GB/s", "ratio", "verify s", "arrival s/msg"
    );
    for &name in &codecs {
        let codec = make_codec(name, p)?;
        let r = tessera_aggregate::bench::hub_round(params, tensor_len, contributors, codec)?;
        println!(
            "{:<18} {:>10} {:>14.2} {:>11.2} {:>12.2} {:>6.1}% {:>10.2} {:>12.3}",
            codec.to_string(),
            gib(r.message_bytes),
            r.seconds,
            r.gb_per_s,
            r.memcpy_gb_per_s,
            100.0 * r.gb_per_s / r.memcpy_gb_per_s,
            r.verify_seconds,
            r.arrival_seconds
        );
    }
    Ok(())
}

pub fn bench_robust(args: RobustArgs) -> Result<()> {
    let RobustArgs { params, tensor_len, contributors, rules, repeats } = args;
    if params == 0 || tensor_len == 0 || contributors == 0 || rules.is_empty() {
        bail!("--params, --tensor-len, --contributors and --rules must be non-empty");
    }
    println!(
        "robust aggregation: {} parameters in tensors of {tensor_len}, {contributors} decoded submissions \
         ({} in memory), {} threads, best of {repeats}",
        human(params as f64),
        gib(params * 4 * contributors as u64),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let results = tessera_aggregate::bench::robust_round(params, tensor_len, contributors, &rules, repeats)?;
    let base = results[0].seconds;
    println!("{:<22} {:>10} {:>10} {:>9}", "rule", "seconds", "vs first", "clipped");
    for r in &results {
        println!("{:<22} {:>10.3} {:>9.2}x {:>9}", r.rule.to_string(), r.seconds, r.seconds / base, r.clipped);
    }
    Ok(())
}
