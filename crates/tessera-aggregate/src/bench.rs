//! The hub's hot path, timed against the machine's memcpy bandwidth measured in the same run:
//! decode each contributor's pseudo-gradient, accumulate, then one outer Nesterov step.
//! Separately: verifying a message (parse + BLAKE3 checksum), and the whole check a submission
//! gets when it arrives (verify, decode, finiteness). `tessera bench hub` prints all three.

use std::time::Instant;

use tessera_protocol::{Codec, MessageView, PseudoGradient};

use crate::{Accumulator, AggregateError, OuterConfig, OuterOptimizer, check_view};

#[derive(Debug, Clone)]
pub struct HubBench {
    pub params: u64,
    pub contributors: usize,
    pub codec: Codec,
    pub message_bytes: u64,
    /// Decode + accumulate every message, then the outer step (best of three rounds).
    pub seconds: f64,
    /// Verifying every message once (parse + checksum).
    pub verify_seconds: f64,
    /// f32-equivalent pseudo-gradient bytes processed per second (contributors × params × 4 / s).
    pub gb_per_s: f64,
    /// The arrival check of one message (parse + checksum + full decode and finiteness check).
    pub arrival_seconds: f64,
    /// Best of three copies of a params-sized f32 buffer, bytes copied per second.
    pub memcpy_gb_per_s: f64,
}

/// Times one round: `contributors` messages of `params` values in tensors of `tensor_len`.
pub fn hub_round(params: u64, tensor_len: u64, contributors: usize, codec: Codec) -> Result<HubBench, AggregateError> {
    let n_tensors = params.div_ceil(tensor_len) as usize;
    let lengths: Vec<usize> = (0..n_tensors).map(|i| tensor_len.min(params - i as u64 * tensor_len) as usize).collect();
    // A deterministic, varied pseudo-gradient; one message re-parsed for every contributor.
    let values: Vec<Vec<f32>> = lengths
        .iter()
        .enumerate()
        .map(|(t, &n)| (0..n).map(|j| ((j as f32 * 0.618 + t as f32) % 1.0 - 0.5) * 1e-3).collect())
        .collect();
    let names: Vec<String> = (0..n_tensors).map(|i| format!("t{i}")).collect();
    let shapes: Vec<[u64; 1]> = lengths.iter().map(|&n| [n as u64]).collect();
    let message = PseudoGradient::build(
        codec,
        [0; 16],
        0,
        [0; 32],
        (0..n_tensors).map(|i| (names[i].as_str(), &shapes[i][..], values[i].as_slice())),
    )?;
    let bytes = message.to_bytes();
    drop(message);
    drop(values);
    let mut theta: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
    let mut outer = OuterOptimizer::new(OuterConfig::default(), &lengths);

    let arrival = Instant::now();
    check_view(&lengths, &MessageView::parse(&bytes)?)?;
    let arrival_seconds = arrival.elapsed().as_secs_f64();

    let verify = Instant::now();
    for _ in 0..contributors {
        std::hint::black_box(MessageView::parse(&bytes)?);
    }
    let verify_seconds = verify.elapsed().as_secs_f64();

    // Best of three rounds, as memcpy is best of three copies: each round starts from a fresh
    // accumulator, as the hub's rounds do.
    let received = MessageView::parse(&bytes)?;
    let mut seconds = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        let mut acc = Accumulator::new(&lengths);
        for _ in 0..contributors {
            acc.add_checked(1.0, &received)?;
        }
        outer.apply(&mut theta, acc)?;
        seconds = seconds.min(started.elapsed().as_secs_f64());
    }

    Ok(HubBench {
        params,
        contributors,
        codec,
        message_bytes: bytes.len() as u64,
        seconds,
        verify_seconds,
        arrival_seconds,
        gb_per_s: (contributors as u64 * params * 4) as f64 / seconds / 1e9,
        memcpy_gb_per_s: memcpy_bandwidth(params as usize),
    })
}

fn memcpy_bandwidth(n: usize) -> f64 {
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

/// One robust rule's time on a round of `contributors` pseudo-gradients of `params` values.
#[derive(Debug, Clone)]
pub struct RobustBench {
    pub rule: tessera_protocol::Aggregation,
    /// Best of `repeats` runs.
    pub seconds: f64,
    pub clipped: usize,
}

/// Times each of `rules` on the same decoded round: `contributors` distinct, deterministic
/// pseudo-gradients in tensors of `tensor_len` (all held in memory, as the hub holds them for
/// a robust rule), one of them scaled ×100 so the clipping rules have work to do.
pub fn robust_round(
    params: u64,
    tensor_len: u64,
    contributors: usize,
    rules: &[tessera_protocol::Aggregation],
    repeats: usize,
) -> Result<Vec<RobustBench>, AggregateError> {
    let n_tensors = params.div_ceil(tensor_len) as usize;
    let lengths: Vec<usize> = (0..n_tensors).map(|i| tensor_len.min(params - i as u64 * tensor_len) as usize).collect();
    let deltas: Vec<Vec<Vec<f32>>> = (0..contributors)
        .map(|c| {
            let scale = if c == 0 { 100.0 } else { 1.0 };
            lengths
                .iter()
                .enumerate()
                .map(|(t, &n)| {
                    let phase = 0.618 * (c + 1) as f32 + t as f32;
                    (0..n).map(|j| scale * ((j as f32 * 0.754_877 + phase) % 1.0 - 0.5) * 1e-3).collect()
                })
                .collect()
        })
        .collect();
    let inputs: Vec<Vec<&[f32]>> = deltas.iter().map(|d| d.iter().map(Vec::as_slice).collect()).collect();
    let weights = vec![1.0; contributors];
    let mut out = Vec::with_capacity(rules.len());
    for rule in rules {
        let mut seconds = f64::INFINITY;
        let mut clipped = 0;
        for _ in 0..repeats.max(1) {
            let started = Instant::now();
            let (mean, report) = crate::robust::aggregate(rule, &inputs, &weights)?;
            seconds = seconds.min(started.elapsed().as_secs_f64());
            std::hint::black_box(mean);
            clipped = report.clipped;
        }
        out.push(RobustBench { rule: *rule, seconds, clipped });
    }
    Ok(out)
}
