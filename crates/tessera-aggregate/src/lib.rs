//! `tessera-aggregate`: the outer loop of DiLoCo (Douillard et al. 2023) on plain `f32` buffers,
//! so the hub can run it without a tensor runtime.
//!
//! Each round, contributors send pseudo-gradients Δ_i = θ − θ_i (θ the round's global weights,
//! θ_i theirs after H inner steps). The hub averages the accepted Δ_i with weights
//! ([`Accumulator`]) and applies an outer SGD step with Nesterov momentum ([`OuterOptimizer`]):
//!
//! ```text
//!     v ← μ·v + Δ̄          (momentum buffer)
//!     θ ← θ − lr·(Δ̄ + μ·v)  (Nesterov; plain momentum uses θ ← θ − lr·v)
//! ```
//!
//! the same update as `torch.optim.SGD(lr, momentum=μ, nesterov=True)` given Δ̄ as the gradient.
//! Defaults: lr 0.7, μ 0.9 (the DiLoCo paper's).
//!
//! Back of the envelope: one round touches each parameter a handful of times (accumulate per
//! contributor, one momentum update, one weight update): for 100M parameters and 16
//! contributors, ≈ 16 × 400 MB read + 3 × 400 MB read/write ≈ 8 GB of memory traffic.

pub mod bench;
pub mod robust;
pub mod round;
pub mod shard;

use tessera_protocol::{Codec, ErrorFeedback, MessageView, PseudoGradient};

/// The largest magnitude a pseudo-gradient value (or a validator's aggregate of them) may have.
/// No honest Δ comes within many orders of magnitude of it (weights move by far less than one
/// per round), while a million contributors at this bound sum to 1e15 and the outer step
/// multiplies by at most (1 + μ)/(1 − μ) ≈ 20 at μ = 0.9: far from f32's 3.4e38, so no
/// submission, however chosen, can overflow the sum, the momentum or the weights to infinity.
pub const DELTA_ABS_MAX: f32 = 1e9;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    #[error("pseudo-gradient has {got} tensors, the model has {expected}")]
    TensorCount { expected: usize, got: usize },
    #[error("tensor {index} has {got} values, the model's has {expected}")]
    TensorLength { index: usize, expected: usize, got: usize },
    #[error("weight {0} must be finite and positive")]
    BadWeight(String),
    #[error("non-finite value in tensor {index} at {position}")]
    NonFinite { index: usize, position: usize },
    #[error(
        "value {value:e} in tensor {index} at {position} is beyond ±{DELTA_ABS_MAX:e}, the most a pseudo-gradient may hold"
    )]
    OutOfRange { index: usize, position: usize, value: f32 },
    #[error("no pseudo-gradient was accumulated")]
    Empty,
    #[error("pseudo-gradient message: {0}")]
    Decode(#[from] tessera_protocol::WireError),
    #[error("broadcast codec: {0}")]
    Codec(#[from] tessera_protocol::CodecError),
    #[error("weights: {0}")]
    Weights(#[from] tessera_protocol::WeightsError),
    #[error("growing into the next phase: {0}")]
    Grow(String),
    #[error("the outer state is not finite even when the weights are held")]
    NonFiniteState,
    #[error("the submission's stored bytes cannot be read: {0}")]
    Unreadable(String),
}

fn check_shapes(expected: &[usize], tensors: &[&[f32]]) -> Result<(), AggregateError> {
    if tensors.len() != expected.len() {
        return Err(AggregateError::TensorCount { expected: expected.len(), got: tensors.len() });
    }
    for (index, (t, &n)) in tensors.iter().zip(expected).enumerate() {
        if t.len() != n {
            return Err(AggregateError::TensorLength { index, expected: n, got: t.len() });
        }
    }
    Ok(())
}

/// Weighted average of pseudo-gradients, accumulated one contributor at a time so the hub never
/// holds more than one decoded submission besides the running sum.
#[derive(Debug, Clone)]
pub struct Accumulator {
    sums: Vec<Vec<f32>>,
    weight: f64,
    count: usize,
    /// One decode buffer per worker thread, reused across messages.
    scratch: Vec<Vec<f32>>,
}

impl Accumulator {
    /// An empty accumulator for tensors of the given lengths.
    pub fn new(lengths: &[usize]) -> Accumulator {
        Accumulator {
            sums: lengths.iter().map(|&n| vec![0.0; n]).collect(),
            weight: 0.0,
            count: 0,
            scratch: Vec::new(),
        }
    }

    pub(crate) fn lengths(&self) -> Vec<usize> {
        self.sums.iter().map(Vec::len).collect()
    }

    /// Adds `weight · delta`. A non-finite value rejects the whole submission and leaves the
    /// sum untouched.
    pub fn add(&mut self, weight: f32, delta: &[&[f32]]) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight.to_string()));
        }
        check_shapes(&self.lengths(), delta)?;
        for (index, t) in delta.iter().enumerate() {
            check_values(index, 0, t)?;
        }
        let mut no_scratch = vec![Vec::new(); threads().min(delta.len().max(1))];
        per_tensor(&mut self.sums, &mut no_scratch, |i, sum, _| {
            for (s, &d) in sum.iter_mut().zip(delta[i].iter()) {
                *s += weight * d;
            }
            Ok(())
        })?;
        self.weight += f64::from(weight);
        self.count += 1;
        Ok(())
    }

    /// Decodes a pseudo-gradient message and adds it with `weight`.
    pub fn add_message(&mut self, weight: f32, message: &PseudoGradient) -> Result<(), AggregateError> {
        self.add_view(weight, &message.view())
    }

    /// Decodes a verified message view and adds it with `weight`, on all cores, without
    /// allocating per message. Checks the whole message first ([`check_view`]), so a bad
    /// message leaves the sum untouched.
    pub fn add_view(&mut self, weight: f32, message: &MessageView<'_>) -> Result<(), AggregateError> {
        check_view(&self.lengths(), message)?;
        self.add_checked(weight, message)
    }

    /// Adds a message that already passed [`check_view`] (the hub checks each submission when
    /// it arrives): one decode pass. If the message is bad after all, the error is returned and
    /// the sum may be partly updated: start the round's accumulation again without it.
    pub fn add_checked(&mut self, weight: f32, message: &MessageView<'_>) -> Result<(), AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight.to_string()));
        }
        let lengths = self.lengths();
        check_table(&lengths, message)?;
        let codec = message.codec;
        let piece = piece_len(&codec);
        let workers = threads().min(lengths.len().max(1));
        self.scratch.resize_with(workers, Vec::new);
        for s in &mut self.scratch {
            s.resize(piece, 0.0);
        }
        // Piece by piece, so what was just decoded is still in cache when it is checked and
        // added: the sum is read and written once per message, the encoding read once.
        let add = |i: usize, sum: &mut Vec<f32>, scratch: &mut [f32]| -> Result<(), AggregateError> {
            let encoded = message.tensors[i].encoded;
            let mut start = 0;
            while start < sum.len() {
                let end = (start + piece).min(sum.len());
                let bytes = &encoded[codec.encoded_len(start as u64) as usize..codec.encoded_len(end as u64) as usize];
                let out = &mut scratch[..end - start];
                codec.decode_into(bytes, out).map_err(tessera_protocol::WireError::from)?;
                check_values(i, start, out)?;
                for (s, &d) in sum[start..end].iter_mut().zip(out.iter()) {
                    *s += weight * d;
                }
                start = end;
            }
            Ok(())
        };
        per_tensor(&mut self.sums, &mut self.scratch, add)?;
        self.weight += f64::from(weight);
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The weighted mean Δ̄.
    pub fn finish(mut self) -> Result<Vec<Vec<f32>>, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        let inv = (1.0 / self.weight) as f32;
        for sum in &mut self.sums {
            sum.iter_mut().for_each(|s| *s *= inv);
        }
        Ok(self.sums)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OuterConfig {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
}

impl Default for OuterConfig {
    fn default() -> Self {
        OuterConfig { lr: 0.7, momentum: 0.9, nesterov: true }
    }
}

/// SGD with (Nesterov) momentum applied to the global weights, with Δ̄ as the gradient.
#[derive(Debug, Clone)]
pub struct OuterOptimizer {
    pub config: OuterConfig,
    momentum: Vec<Vec<f32>>,
    /// Outer steps taken.
    pub step: u64,
}

impl OuterOptimizer {
    pub fn new(config: OuterConfig, lengths: &[usize]) -> OuterOptimizer {
        OuterOptimizer { config, momentum: lengths.iter().map(|&n| vec![0.0; n]).collect(), step: 0 }
    }

    /// θ ← θ − lr·(Δ̄ + μ·v) after v ← μ·v + Δ̄ (or θ ← θ − lr·v without Nesterov).
    pub fn step(&mut self, params: &mut [&mut [f32]], mean_delta: &[&[f32]]) -> Result<(), AggregateError> {
        let lengths: Vec<usize> = self.momentum.iter().map(Vec::len).collect();
        check_shapes(&lengths, mean_delta)?;
        let param_views: Vec<&[f32]> = params.iter().map(|p| &**p).collect();
        check_shapes(&lengths, &param_views)?;
        for ((p, v), g) in params.iter_mut().zip(&mut self.momentum).zip(mean_delta) {
            outer_step_tensor(&self.config, p, v, g);
        }
        self.step += 1;
        Ok(())
    }

    /// Ends a round: averages what `acc` gathered and takes the outer step on `params`.
    pub fn apply(&mut self, params: &mut [Vec<f32>], acc: Accumulator) -> Result<(), AggregateError> {
        self.step_to(params, &acc.finish()?)
    }

    /// [`OuterOptimizer::step`] on owned buffers: the outer step with Δ̄ = `mean_delta`.
    pub fn step_to(&mut self, params: &mut [Vec<f32>], mean_delta: &[Vec<f32>]) -> Result<(), AggregateError> {
        let mean_views: Vec<&[f32]> = mean_delta.iter().map(Vec::as_slice).collect();
        let mut param_views: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        self.step(&mut param_views, &mean_views)
    }

    /// The momentum buffers, for checkpointing the hub's state.
    pub fn momentum(&self) -> &[Vec<f32>] {
        &self.momentum
    }

    /// Restores momentum saved from [`OuterOptimizer::momentum`].
    pub fn set_momentum(&mut self, step: u64, momentum: Vec<Vec<f32>>) -> Result<(), AggregateError> {
        let lengths: Vec<usize> = self.momentum.iter().map(Vec::len).collect();
        let views: Vec<&[f32]> = momentum.iter().map(Vec::as_slice).collect();
        check_shapes(&lengths, &views)?;
        self.momentum = momentum;
        self.step = step;
        Ok(())
    }
}

/// The outer step on one tensor: its weights `p`, momentum `v` and Δ̄ `g` (equal lengths).
/// Every coordinate on its own, so any split of the model into tensor ranges gives the same bits.
pub fn outer_step_tensor(config: &OuterConfig, p: &mut [f32], v: &mut [f32], g: &[f32]) {
    let OuterConfig { lr, momentum: mu, nesterov } = *config;
    for ((p, v), &g) in p.iter_mut().zip(v.iter_mut()).zip(g.iter()) {
        *v = mu * *v + g;
        *p -= lr * if nesterov { g + mu * *v } else { *v };
    }
}

/// Moves the published weights `theta` to `target` through `codec`, with error feedback in
/// `residual`: u = decode(encode(target − θ + e)), then θ ← θ + u and e ← target − θ_old + e − u.
/// Returns each tensor's encoding of u: the update a follower applies to its copy of θ (by the
/// same element-wise f32 addition) to hold exactly the new θ.
pub fn broadcast_step(
    codec: &Codec,
    theta: &mut [Vec<f32>],
    target: &[Vec<f32>],
    residual: &mut [Vec<f32>],
) -> Result<Vec<Vec<u8>>, AggregateError> {
    let lengths: Vec<usize> = theta.iter().map(Vec::len).collect();
    check_shapes(&lengths, &target.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
    check_shapes(&lengths, &residual.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
    let mut encoded = Vec::with_capacity(theta.len());
    for ((t, goal), e) in theta.iter_mut().zip(target).zip(residual.iter_mut()) {
        encoded.push(broadcast_tensor(codec, t, goal, e)?);
    }
    Ok(encoded)
}

/// [`broadcast_step`] on one tensor: moves `t` towards `goal` through `codec` with the error
/// feedback `e`, and returns the encoding of what it moved by.
pub fn broadcast_tensor(
    codec: &Codec,
    t: &mut [f32],
    goal: &[f32],
    e: &mut Vec<f32>,
) -> Result<Vec<u8>, AggregateError> {
    let delta: Vec<f32> = goal.iter().zip(t.iter()).map(|(g, t)| g - t).collect();
    let mut feedback = ErrorFeedback::from_residual(std::mem::take(e));
    let (bytes, sent) = feedback.encode_sent(codec, &delta)?;
    t.iter_mut().zip(&sent).for_each(|(t, s)| *t += s);
    *e = feedback.into_residual();
    Ok(bytes)
}

/// Values decoded at a time on the hot path: a whole number of the codec's blocks, about 16 KiB
/// of f32, so a piece stays in the core's cache from decoding to adding.
fn piece_len(codec: &Codec) -> usize {
    const TARGET: usize = 4 * 1024;
    let unit = codec.unit() as usize;
    TARGET.div_ceil(unit) * unit
}

/// Refuses a non-finite value or one beyond ±[`DELTA_ABS_MAX`] in `values` (tensor `index`,
/// starting at `offset`). The common case is one pass with no early exit, so it vectorizes.
pub fn check_values(index: usize, offset: usize, values: &[f32]) -> Result<(), AggregateError> {
    let out = |v: f32| v.is_nan() | (v.abs() > DELTA_ABS_MAX);
    if !values.iter().fold(false, |bad, &v| bad | out(v)) {
        return Ok(());
    }
    let (p, &value) = values.iter().enumerate().find(|(_, v)| out(**v)).unwrap_or((0, &0.0));
    let position = offset + p;
    Err(if value.is_finite() {
        AggregateError::OutOfRange { index, position, value }
    } else {
        AggregateError::NonFinite { index, position }
    })
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn check_table(lengths: &[usize], message: &MessageView<'_>) -> Result<(), AggregateError> {
    if message.tensors.len() != lengths.len() {
        return Err(AggregateError::TensorCount { expected: lengths.len(), got: message.tensors.len() });
    }
    for (index, (t, &n)) in message.tensors.iter().zip(lengths).enumerate() {
        if t.numel() != n as u64 {
            return Err(AggregateError::TensorLength { index, expected: n, got: t.numel() as usize });
        }
    }
    Ok(())
}

/// Decodes every tensor of `message` (which must match `lengths`) into f32, refusing
/// non-finite values and values beyond ±[`DELTA_ABS_MAX`]: what a robust rule, which needs all
/// submissions at once, works on.
pub fn decode_view(lengths: &[usize], message: &MessageView<'_>) -> Result<Vec<Vec<f32>>, AggregateError> {
    check_table(lengths, message)?;
    let mut out: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
    let codec = message.codec;
    let mut no_scratch = vec![Vec::new(); threads().min(lengths.len().max(1))];
    per_tensor(&mut out, &mut no_scratch, |i, t, _| {
        codec.decode_into(message.tensors[i].encoded, t).map_err(tessera_protocol::WireError::from)?;
        check_values(i, 0, t)
    })?;
    Ok(out)
}

/// Values one core decodes at a time when a submission is checked: the check's scratch is
/// bounded by this (4 bytes a value, per core), not by the model's largest tensor.
pub const CHECK_CHUNK: usize = 1 << 16;

/// Checks that every tensor of `message` decodes to `lengths` finite values within
/// ±[`DELTA_ABS_MAX`], on all cores, [`CHECK_CHUNK`] values (whole codec blocks) at a time.
/// The hub runs this when a submission arrives, so a bad one is refused then and there.
pub fn check_view(lengths: &[usize], message: &MessageView<'_>) -> Result<(), AggregateError> {
    check_table(lengths, message)?;
    let codec = message.codec;
    let unit = (codec.unit() as usize).max(1);
    let chunk = (CHECK_CHUNK / unit).max(1) * unit;
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    let workers = threads().min(lengths.len().max(1));
    let mut scratch: Vec<Vec<f32>> = (0..workers).map(|_| vec![0.0; chunk.min(max_len)]).collect();
    // `per_tensor` hands out disjoint per-tensor slots; here they carry nothing.
    let mut slots: Vec<Vec<f32>> = vec![Vec::new(); lengths.len()];
    per_tensor(&mut slots, &mut scratch, |i, _, scratch| {
        let n = lengths[i];
        let encoded = message.tensors[i].encoded;
        let mut a = 0;
        while a < n {
            let b = (a + chunk).min(n);
            let r = shard::span_bytes(&codec, n as u64, &shard::Span { tensor: i, values: a..b })?;
            let bytes = encoded.get(r.start as usize..r.end as usize).ok_or_else(|| {
                AggregateError::Unreadable(format!("tensor {i}'s encoding is shorter than {}", r.end))
            })?;
            let out = &mut scratch[..b - a];
            codec.decode_into(bytes, out).map_err(tessera_protocol::WireError::from)?;
            check_values(i, a, out)?;
            a = b;
        }
        Ok(())
    })
}

/// `f(i, &mut sums[i], scratch)` for every tensor, tensors dealt round-robin to one thread per
/// scratch buffer (a model's tensors come in a handful of sizes, so this balances well enough).
/// Returns the first error in tensor order.
fn per_tensor<F>(sums: &mut [Vec<f32>], scratch: &mut [Vec<f32>], f: F) -> Result<(), AggregateError>
where
    F: Fn(usize, &mut Vec<f32>, &mut [f32]) -> Result<(), AggregateError> + Sync,
{
    let workers = scratch.len().max(1);
    let mut buckets: Vec<Vec<(usize, &mut Vec<f32>)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, sum) in sums.iter_mut().enumerate() {
        buckets[i % workers].push((i, sum));
    }
    let mut errors: Vec<(usize, AggregateError)> = std::thread::scope(|scope| {
        let handles: Vec<_> = buckets
            .into_iter()
            .zip(scratch.iter_mut())
            .map(|(bucket, buf)| {
                let f = &f;
                scope.spawn(move || {
                    let mut first = None;
                    for (i, sum) in bucket {
                        if let Err(e) = f(i, sum, buf) {
                            first = Some((i, e));
                            break;
                        }
                    }
                    first
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().expect("aggregation worker panicked")).collect()
    });
    errors.sort_by_key(|(i, _)| *i);
    match errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A finite but huge Δ is refused like a NaN, before anything is added: otherwise two of
    /// them at 3e38 sum to infinity, and so does one through the outer step.
    #[test]
    fn huge_values_are_refused_before_summing() {
        let mut acc = Accumulator::new(&[2]);
        assert_eq!(
            acc.add(1.0, &[&[1.0, 3e38]]),
            Err(AggregateError::OutOfRange { index: 0, position: 1, value: 3e38 })
        );
        acc.add(1.0, &[&[1.0, -DELTA_ABS_MAX]]).unwrap();
        let huge =
            PseudoGradient::build(Codec::F32, [0; 16], 0, [0; 32], [("a", &[2u64][..], &[3e38f32, 0.0][..])]).unwrap();
        assert!(matches!(check_view(&[2], &huge.view()), Err(AggregateError::OutOfRange { position: 0, .. })));
        assert!(matches!(decode_view(&[2], &huge.view()), Err(AggregateError::OutOfRange { .. })));
        assert!(matches!(acc.add_message(1.0, &huge), Err(AggregateError::OutOfRange { .. })));
        assert_eq!(acc.finish().unwrap(), vec![vec![1.0, -DELTA_ABS_MAX]]);
        // An int8 block whose scale is huge decodes to huge values: refused the same way.
        let scaled = PseudoGradient::build(
            Codec::Int8 { block: 2 },
            [0; 16],
            0,
            [0; 32],
            [("a", &[2u64][..], &[2e12f32, -1e12][..])],
        )
        .unwrap();
        assert!(matches!(check_view(&[2], &scaled.view()), Err(AggregateError::OutOfRange { .. })));
    }

    #[test]
    fn weighted_mean() {
        let mut acc = Accumulator::new(&[2]);
        acc.add(1.0, &[&[1.0, 2.0]]).unwrap();
        acc.add(3.0, &[&[5.0, -2.0]]).unwrap();
        assert_eq!(acc.finish().unwrap(), vec![vec![4.0, -1.0]]);
    }

    #[test]
    fn bad_submissions_leave_the_sum_untouched() {
        let mut acc = Accumulator::new(&[2, 1]);
        acc.add(1.0, &[&[1.0, 1.0], &[1.0]]).unwrap();
        assert_eq!(acc.add(1.0, &[&[1.0, f32::NAN], &[1.0]]), Err(AggregateError::NonFinite { index: 0, position: 1 }));
        assert_eq!(acc.add(1.0, &[&[1.0, 1.0]]), Err(AggregateError::TensorCount { expected: 2, got: 1 }));
        assert_eq!(
            acc.add(1.0, &[&[1.0], &[1.0]]),
            Err(AggregateError::TensorLength { index: 0, expected: 2, got: 1 })
        );
        assert!(matches!(acc.add(0.0, &[&[1.0, 1.0], &[1.0]]), Err(AggregateError::BadWeight(_))));
        assert_eq!(acc.count(), 1);
        assert_eq!(acc.finish().unwrap(), vec![vec![1.0, 1.0], vec![1.0]]);
        assert_eq!(Accumulator::new(&[1]).finish(), Err(AggregateError::Empty));
    }

    /// With lr 1 and no momentum the outer step lands exactly on the averaged local weights.
    #[test]
    fn lr_one_without_momentum_is_model_averaging() {
        let mut opt = OuterOptimizer::new(OuterConfig { lr: 1.0, momentum: 0.0, nesterov: true }, &[2]);
        let mut theta = vec![1.0f32, 2.0];
        opt.step(&mut [&mut theta], &[&[0.5, -1.0]]).unwrap();
        assert_eq!(theta, vec![0.5, 3.0]);
    }

    /// Matches torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True) on g = 1, 2 over two steps:
    /// v1 = 1, p1 = -0.7·(1 + 0.9) = -1.33; v2 = 0.9 + 2 = 2.9, p2 = p1 - 0.7·(2 + 0.9·2.9) = -4.557.
    #[test]
    fn nesterov_matches_the_closed_form() {
        let mut opt = OuterOptimizer::new(OuterConfig::default(), &[1]);
        let mut p = vec![0.0f32];
        opt.step(&mut [&mut p], &[&[1.0]]).unwrap();
        assert!((p[0] + 1.33).abs() < 1e-6);
        opt.step(&mut [&mut p], &[&[2.0]]).unwrap();
        assert!((p[0] + 4.557).abs() < 1e-5, "{}", p[0]);
    }

    #[test]
    fn messages_are_decoded_checked_and_added() {
        use tessera_protocol::Codec;
        let a: Vec<f32> = vec![1.0, 2.0, 3.0];
        let b: Vec<f32> = vec![-4.0];
        let build = |a: &[f32], b: &[f32]| {
            PseudoGradient::build(Codec::F32, [0; 16], 0, [0; 32], [("a", &[3u64][..], a), ("b", &[1u64][..], b)])
                .unwrap()
        };
        let mut acc = Accumulator::new(&[3, 1]);
        acc.add_message(1.0, &build(&a, &b)).unwrap();
        acc.add_message(1.0, &build(&[3.0, 2.0, 1.0], &[0.0])).unwrap();
        let wrong = PseudoGradient::build(Codec::F32, [0; 16], 0, [0; 32], [("a", &[3u64][..], &a[..])]).unwrap();
        assert_eq!(acc.add_message(1.0, &wrong), Err(AggregateError::TensorCount { expected: 2, got: 1 }));
        let mut nan = build(&[9.0, 9.0, 9.0], &[9.0]);
        nan.tensors[1].encoded.copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(acc.add_message(1.0, &nan), Err(AggregateError::NonFinite { index: 1, position: 0 }));
        assert_eq!(acc.finish().unwrap(), vec![vec![2.0, 2.0, 2.0], vec![-2.0]]);
    }

    #[test]
    fn broadcast_delivers_what_it_drops_later() {
        // Each round the hub wants θ to move by `step` from where it is published.
        let codec = Codec::Int4 { block: 4 };
        let step = [1.0f32, 0.3, -0.2, 0.01, 5.0, -5.0, 0.7, 0.0];
        let mut theta = vec![vec![0.0f32; 8]];
        let mut residual = vec![vec![0.0f32; 8]];
        let mut follower = theta.clone();
        for round in 1..=30 {
            let target = vec![theta[0].iter().zip(&step).map(|(t, s)| t + s).collect::<Vec<f32>>()];
            let enc = broadcast_step(&codec, &mut theta, &target, &mut residual).unwrap();
            let u = codec.decode(&enc[0], 8).unwrap();
            follower[0].iter_mut().zip(&u).for_each(|(f, u)| *f += u);
            assert_eq!(follower, theta, "a follower applying the updates holds exactly θ");
            // Nothing is lost: what was delivered plus what is owed is everything wanted.
            for ((t, e), s) in theta[0].iter().zip(&residual[0]).zip(&step) {
                assert!((t + e - round as f32 * s).abs() < 1e-3, "round {round}: {t} + {e} vs {}", round as f32 * s);
            }
            // And what is owed stays within one quantisation step of the largest value.
            assert!(residual[0].iter().all(|e| e.abs() <= 5.0 / 7.0 + 1e-3));
        }
        let mut short = vec![vec![0.0f32; 3]];
        let target = theta.clone();
        assert!(broadcast_step(&codec, &mut theta, &target, &mut short).is_err());
    }

    proptest! {
        #[test]
        fn mean_of_identical_submissions_is_that_submission(v in proptest::collection::vec(-1e3f32..1e3, 1..50), k in 1usize..6, w in 0.1f32..10.0) {
            let mut acc = Accumulator::new(&[v.len()]);
            for _ in 0..k {
                acc.add(w, &[&v]).unwrap();
            }
            let mean = acc.finish().unwrap();
            for (a, b) in mean[0].iter().zip(&v) {
                prop_assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0));
            }
        }
    }
}
