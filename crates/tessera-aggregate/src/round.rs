//! A round's arithmetic on the hub's side: the mean of its submissions under the run's rule
//! (streaming, layer-sharded or robust), the outer step, the compressed broadcast update, the
//! hub's outer state as bytes, and growing that state into the next phase.
//!
//! Cost for N submissions of P parameters: the streaming mean holds the running sum (4P bytes)
//! and reads and decodes one submission at a time (or takes the sum the hub kept as they
//! arrived, [`RunningMean`]); a robust rule here holds every decoded submission (4NP bytes:
//! the reference, and what a validator holding the opened submissions does), while
//! [`crate::shard::whole`] gives the same Δ̄ holding one piece of each (what the hub does); the
//! outer step and the broadcast hold θ, the momentum, the residual and one target (16P bytes)
//! besides.

use tessera_protocol::{
    Aggregation, MessageView, PseudoGradient, RunSpec, TensorEntry, TensorSpec, decode_weights, encode_weights,
};

use crate::robust::RobustReport;
use crate::{Accumulator, AggregateError, OuterConfig, OuterOptimizer, broadcast_step, decode_view};

/// What the hub keeps between rounds besides the published weights' bytes.
#[derive(Debug, Clone)]
pub struct OuterState {
    /// The published weights θ_r.
    pub theta: Vec<Vec<f32>>,
    pub outer: OuterOptimizer,
    /// What the compressed broadcast of past updates has not delivered yet.
    pub residual: Vec<Vec<f32>>,
}

impl OuterState {
    /// A run's first state: `theta`, no momentum, nothing owed. `spec` is the run at its
    /// current phase.
    pub fn new(spec: &RunSpec, theta: Vec<Vec<f32>>) -> OuterState {
        let lengths: Vec<usize> = spec.tensors.iter().map(|t| t.numel() as usize).collect();
        OuterState {
            outer: OuterOptimizer::new(outer_config(spec), &lengths),
            residual: lengths.iter().map(|&n| vec![0.0; n]).collect(),
            theta,
        }
    }

    /// The state after `step` outer steps: the published weights' bytes and, from the second
    /// round on, the momentum and residual saved with them ([`Aggregated::outer_bytes`]).
    pub fn restore(spec: &RunSpec, weights: &[u8], saved: Option<(u64, &[u8])>) -> Result<OuterState, AggregateError> {
        let theta = decode_weights(weights, &spec.tensors)?;
        let mut state = OuterState::new(spec, theta);
        if let Some((step, bytes)) = saved {
            let mut momentum = decode_weights(bytes, &outer_table(&spec.tensors))?;
            state.residual = momentum.split_off(spec.tensors.len());
            state.outer.set_momentum(step, momentum)?;
        }
        Ok(state)
    }

    /// Whether every value of the state is finite.
    pub fn is_finite(&self) -> bool {
        [&self.theta[..], self.outer.momentum(), &self.residual[..]]
            .iter()
            .all(|part| part.iter().all(|t| t.iter().all(|v| v.is_finite())))
    }
}

fn outer_config(spec: &RunSpec) -> OuterConfig {
    OuterConfig { lr: spec.outer.lr, momentum: spec.outer.momentum, nesterov: spec.outer.nesterov }
}

/// The tensor table the outer state is saved under: `momentum/…` then `residual/…`.
pub fn outer_table(tensors: &[TensorSpec]) -> Vec<TensorSpec> {
    let mut table = Vec::with_capacity(2 * tensors.len());
    for prefix in ["momentum", "residual"] {
        table.extend(
            tensors.iter().map(|t| TensorSpec { name: format!("{prefix}/{}", t.name), shape: t.shape.clone() }),
        );
    }
    table
}

/// One stored submission to average; its bytes are read when the mean needs them.
#[derive(Debug, Clone)]
pub struct Input {
    pub weight: f32,
    /// The tensors it carries (indices into the model's table), in a layer-sharded run.
    pub carries: Option<Vec<usize>>,
}

/// A round's Δ̄, what it is made of, and what was left out.
#[derive(Debug, Clone)]
pub struct Mean {
    pub mean: Vec<Vec<f32>>,
    /// The total weight and the number of submissions that went in.
    pub weight: f64,
    pub used: u64,
    /// Submissions (by index) whose stored bytes can no longer be read or decoded: left out,
    /// never allowed to fail or poison the round.
    pub left_out: Vec<(usize, AggregateError)>,
    /// What a robust rule did.
    pub robust: Option<RobustReport>,
}

impl Mean {
    /// Δ̄ given whole: a sealed run's aggregate from its validator, or zeros.
    pub fn given(mean: Vec<Vec<f32>>, weight: f64, used: u64) -> Mean {
        Mean { mean, weight, used, left_out: Vec::new(), robust: None }
    }

    fn zeros(lengths: &[usize]) -> Vec<Vec<f32>> {
        lengths.iter().map(|&n| vec![0.0; n]).collect()
    }
}

/// The round's Δ̄ under `rule`: in a layer-sharded run each tensor averaged over the
/// submissions that carry it; the weighted mean one submission at a time; a robust rule over
/// all of them decoded at once. `load(k)` reads submission `k`'s bytes (checked when it
/// arrived); the mean-family rules hold one at a time, so memory does not grow with the
/// number of submissions. A submission that cannot be read or decoded is left out.
pub fn mean<B: AsRef<[u8]>>(
    rule: &Aggregation,
    lengths: &[usize],
    inputs: &[Input],
    load: impl Fn(usize) -> Result<B, AggregateError>,
) -> Result<Mean, AggregateError> {
    if inputs.iter().any(|i| i.carries.is_some()) {
        return Ok(fragment_mean(lengths, inputs, load));
    }
    if *rule == Aggregation::Mean {
        streaming_mean(lengths, inputs, load)
    } else {
        robust_mean(rule, lengths, inputs, load)
    }
}

/// The weighted mean taken as submissions arrive, in arrival order: what [`mean`] gives for
/// the same submissions under [`Aggregation::Mean`], bit for bit, without reading any of them
/// again when the round closes. Holds the running sum (4P bytes).
#[derive(Debug)]
pub struct RunningMean {
    acc: Accumulator,
    weight: f64,
}

impl RunningMean {
    pub fn new(lengths: &[usize]) -> RunningMean {
        RunningMean { acc: Accumulator::new(lengths), weight: 0.0 }
    }

    /// Adds one submission (checked with [`crate::check_view`] when it arrived). On an error
    /// the sum may be partly updated: the caller drops this mean and takes [`mean`] at close.
    pub fn add(&mut self, weight: f32, message: &MessageView<'_>) -> Result<(), AggregateError> {
        self.acc.add_checked(weight, message)?;
        self.weight += f64::from(weight);
        Ok(())
    }

    /// How many submissions it holds.
    pub fn count(&self) -> usize {
        self.acc.count()
    }

    pub fn finish(self) -> Result<Mean, AggregateError> {
        let used = self.acc.count() as u64;
        let lengths = self.acc.lengths();
        let mean = if used == 0 { Mean::zeros(&lengths) } else { self.acc.finish()? };
        Ok(Mean { mean, weight: self.weight, used, left_out: Vec::new(), robust: None })
    }
}

/// The weighted mean, one submission at a time. Every submission was checked on arrival, so
/// one decode pass each; should one fail after all (a damaged blob), start again without it.
fn streaming_mean<B: AsRef<[u8]>>(
    lengths: &[usize],
    inputs: &[Input],
    load: impl Fn(usize) -> Result<B, AggregateError>,
) -> Result<Mean, AggregateError> {
    let mut left_out: Vec<(usize, AggregateError)> = Vec::new();
    let running = 'accumulate: loop {
        let mut running = RunningMean::new(lengths);
        for (k, input) in inputs.iter().enumerate() {
            if left_out.iter().any(|(j, _)| *j == k) {
                continue;
            }
            let added = load(k).and_then(|bytes| {
                let view = MessageView::parse(bytes.as_ref())?;
                running.add(input.weight, &view)
            });
            if let Err(e) = added {
                left_out.push((k, e));
                continue 'accumulate;
            }
        }
        break running;
    };
    Ok(Mean { left_out, ..running.finish()? })
}

/// A layer-sharded round's mean: every tensor averaged (weighted) over the submissions that
/// carry it; a tensor nobody trained stays at zero.
fn fragment_mean<B: AsRef<[u8]>>(
    lengths: &[usize],
    inputs: &[Input],
    load: impl Fn(usize) -> Result<B, AggregateError>,
) -> Mean {
    let mut sum = Mean::zeros(lengths);
    let mut weight_of = vec![0.0f64; lengths.len()];
    let (mut weight, mut used, mut left_out) = (0.0, 0, Vec::new());
    let everything: Vec<usize> = (0..lengths.len()).collect();
    for (k, input) in inputs.iter().enumerate() {
        let keep = input.carries.as_deref().unwrap_or(&everything);
        let subset: Vec<usize> = keep.iter().map(|&i| lengths[i]).collect();
        let decoded = load(k).and_then(|bytes| decode_view(&subset, &MessageView::parse(bytes.as_ref())?));
        match decoded {
            Ok(d) => {
                for (&i, values) in keep.iter().zip(d) {
                    for (s, v) in sum[i].iter_mut().zip(values) {
                        *s += input.weight * v;
                    }
                    weight_of[i] += f64::from(input.weight);
                }
                weight += f64::from(input.weight);
                used += 1;
            }
            Err(e) => left_out.push((k, e)),
        }
    }
    for (t, &w) in sum.iter_mut().zip(&weight_of) {
        if w > 0.0 {
            let inv = (1.0 / w) as f32;
            t.iter_mut().for_each(|v| *v *= inv);
        }
    }
    Mean { mean: sum, weight, used, left_out, robust: None }
}

/// The run's robust rule over every submission, decoded at once (4NP bytes: the rules compare
/// every submission's value at each coordinate).
fn robust_mean<B: AsRef<[u8]>>(
    rule: &Aggregation,
    lengths: &[usize],
    inputs: &[Input],
    load: impl Fn(usize) -> Result<B, AggregateError>,
) -> Result<Mean, AggregateError> {
    let mut decoded = Vec::with_capacity(inputs.len());
    let mut weights = Vec::with_capacity(inputs.len());
    let mut left_out = Vec::new();
    for (k, input) in inputs.iter().enumerate() {
        match load(k).and_then(|bytes| decode_view(lengths, &MessageView::parse(bytes.as_ref())?)) {
            Ok(d) => {
                decoded.push(d);
                weights.push(input.weight);
            }
            Err(e) => left_out.push((k, e)),
        }
    }
    if decoded.is_empty() {
        return Ok(Mean { mean: Mean::zeros(lengths), weight: 0.0, used: 0, left_out, robust: None });
    }
    let views: Vec<Vec<&[f32]>> = decoded.iter().map(|d| d.iter().map(Vec::as_slice).collect()).collect();
    let (mean, report) = crate::robust::aggregate(rule, &views, &weights)?;
    let weight = weights.iter().map(|&w| f64::from(w)).sum();
    Ok(Mean { mean, weight, used: decoded.len() as u64, left_out, robust: Some(report) })
}

/// A round aggregated: the state it moves to and what publishing it stores.
#[derive(Debug, Clone)]
pub struct Aggregated {
    pub state: OuterState,
    /// The new weights (deterministic safetensors; their BLAKE3 names the checkpoint).
    pub weights_bytes: Vec<u8>,
    /// The compressed update from the round's checkpoint to the new one.
    pub update_bytes: Vec<u8>,
    /// Momentum and broadcast residual ([`outer_table`]).
    pub outer_bytes: Vec<u8>,
    /// The step would have left a non-finite state, so the round holds the weights instead
    /// (momentum cleared): the run goes on, and the caller says so loudly.
    pub held: bool,
}

/// Round `round`'s outer step from `state` with Δ̄ = `mean`, and the broadcast update (from
/// the round's checkpoint `base`) that moves a follower's θ to exactly the new θ. `spec` is the
/// run at its current phase. The new state is checked before it is returned: should a step
/// leave anything non-finite, the round holds the weights instead, so nothing that cannot be
/// encoded or restarted from is ever persisted.
pub fn step(
    spec: &RunSpec,
    run_id: [u8; 16],
    round: u64,
    base: [u8; 32],
    state: &OuterState,
    mean: &[Vec<f32>],
) -> Result<Aggregated, AggregateError> {
    let moved = (|| {
        let mut next = state.clone();
        let mut target = state.theta.clone();
        next.outer.step_to(&mut target, mean)?;
        let encoded = broadcast_step(&spec.broadcast_codec, &mut next.theta, &target, &mut next.residual)?;
        Ok::<_, AggregateError>((next, encoded))
    })();
    let (next, encoded, held) = match moved {
        Ok((next, encoded)) if next.is_finite() => (next, encoded, false),
        _ => {
            // A hold: θ stays, momentum starts again, the residual is still owed.
            let mut next = state.clone();
            let lengths: Vec<usize> = next.theta.iter().map(Vec::len).collect();
            let step = next.outer.step + 1;
            next.outer.set_momentum(step, Mean::zeros(&lengths))?;
            let target = next.theta.clone();
            let encoded = broadcast_step(&spec.broadcast_codec, &mut next.theta, &target, &mut next.residual)?;
            if !next.is_finite() {
                return Err(AggregateError::NonFiniteState);
            }
            (next, encoded, true)
        }
    };
    let tensors = spec
        .tensors
        .iter()
        .zip(encoded)
        .map(|(t, encoded)| TensorEntry { name: t.name.clone(), shape: t.shape.clone(), encoded })
        .collect();
    let update =
        PseudoGradient { codec: spec.broadcast_codec, run_id, round: round + 1, base_checkpoint: base, tensors };
    Ok(Aggregated {
        weights_bytes: encode_weights(&spec.tensors, &next.theta)?,
        update_bytes: update.to_bytes(),
        outer_bytes: encode_outer(&spec.tensors, &next)?,
        state: next,
        held,
    })
}

fn encode_outer(tensors: &[TensorSpec], state: &OuterState) -> Result<Vec<u8>, AggregateError> {
    let saved: Vec<&[f32]> = state.outer.momentum().iter().chain(&state.residual).map(Vec::as_slice).collect();
    Ok(encode_weights(&outer_table(tensors), &saved)?)
}

/// What growing a run's state into its next phase gives.
pub struct Grown {
    pub theta: Vec<Vec<f32>>,
    pub momentum: Vec<Vec<f32>>,
    pub residual: Vec<Vec<f32>>,
}

/// Grows the hub's state into the next phase's model, function-preserving. The hub links no
/// libtorch; `tessera_train::TorchGrower` implements this with `tessera_model::grow`. `from`
/// and `to` are the run's spec at the two phases; momentum and the broadcast residual live in
/// weight space.
pub trait Grower: Send + Sync {
    fn grow(
        &self,
        from: &RunSpec,
        to: &RunSpec,
        seed: u64,
        theta: &[Vec<f32>],
        momentum: &[Vec<f32>],
        residual: &[Vec<f32>],
    ) -> Result<Grown, String>;
}

/// A phase's last round, aggregated, grown into the next phase's model (`to`): weights, outer
/// momentum and broadcast residual, re-encoded. The update stays the one computed before
/// growth, so a contributor following updates falls back to downloading the grown checkpoint.
pub fn grow(
    agg: Aggregated,
    grower: &dyn Grower,
    from: &RunSpec,
    to: &RunSpec,
    seed: u64,
) -> Result<Aggregated, AggregateError> {
    let s = &agg.state;
    let grown = grower
        .grow(from, to, seed, &s.theta, s.outer.momentum(), &s.residual)
        .map_err(|e| AggregateError::Grow(e.to_string()))?;
    let mut state = OuterState::new(to, grown.theta);
    state.outer.set_momentum(s.outer.step, grown.momentum)?;
    state.residual = grown.residual;
    if state.theta.len() != to.tensors.len() || state.residual.len() != to.tensors.len() || !state.is_finite() {
        return Err(AggregateError::Grow("the grown state does not fit the next phase's model".into()));
    }
    Ok(Aggregated {
        weights_bytes: encode_weights(&to.tensors, &state.theta)?,
        outer_bytes: encode_outer(&to.tensors, &state)?,
        state,
        ..agg
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tessera_protocol::Codec;
    use tessera_protocol::api::{DataSource, DataSpec, InnerSpec, OuterSpec};

    /// A one-tensor run with outer lr `lr` (momentum 0.9, Nesterov), f32 submissions.
    pub(crate) fn spec(lr: f32) -> RunSpec {
        RunSpec {
            name: "t".into(),
            model: serde_json::json!({}),
            tensors: vec![TensorSpec { name: "w".into(), shape: vec![3] }],
            data: DataSpec {
                name: "d".into(),
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
            rounds: 2,
            outer: OuterSpec { lr, momentum: 0.9, nesterov: true },
            codec: Codec::F32,
            feedback_decay: 1.0,
            broadcast_codec: Codec::Int8 { block: 3 },
            quorum: 1,
            round_deadline_ms: 1000,
            max_staleness: 0,
            staleness_decay: 0.5,
            seed: 0,
            aggregation: Aggregation::Mean,
            contest: None,
            trust: None,
            phases: Vec::new(),
            fragments: 0,
            until_loss: None,
            economy: None,
            governance: None,
        }
    }

    /// A step that would overflow (here a spec's outer lr far too large for its weights) holds
    /// the weights instead of persisting infinity: the broadcast can still encode, and the
    /// saved state restores.
    #[test]
    fn an_overflowing_step_holds_the_weights() {
        let spec = spec(1e30);
        let state = OuterState::new(&spec, vec![vec![3e38, 1.0, -2.0]]);
        let agg = step(&spec, [0; 16], 0, [0; 32], &state, &[vec![1e9, 1e9, 1e9]]).unwrap();
        assert!(agg.held);
        assert!(agg.state.is_finite());
        assert_eq!(agg.state.theta, state.theta);
        let back = OuterState::restore(&spec, &agg.weights_bytes, Some((1, &agg.outer_bytes))).unwrap();
        assert_eq!(back.theta, state.theta);
        // An ordinary step moves, and says it did not hold.
        let fine =
            step(&spec_ok(), [0; 16], 0, [0; 32], &OuterState::new(&spec_ok(), vec![vec![1.0; 3]]), &[vec![0.5; 3]])
                .unwrap();
        assert!(!fine.held && fine.state.theta != vec![vec![1.0; 3]]);
    }

    fn spec_ok() -> RunSpec {
        spec(0.7)
    }

    #[test]
    fn a_damaged_submission_is_left_out_of_every_rule() {
        let good =
            PseudoGradient::build(Codec::F32, [0; 16], 0, [0; 32], [("w", &[3u64][..], &[1.0f32, 2.0, 3.0][..])])
                .unwrap()
                .to_bytes();
        let mut bad = good.clone();
        bad[60] ^= 0xff;
        let blobs = [good, bad];
        for rule in [Aggregation::Mean, Aggregation::Median] {
            let inputs = [Input { weight: 1.0, carries: None }, Input { weight: 1.0, carries: None }];
            let m = mean(&rule, &[3], &inputs, |k| Ok(&blobs[k])).unwrap();
            assert_eq!((m.used, m.left_out.len(), m.left_out[0].0), (1, 1, 1), "{rule}");
            assert_eq!(m.mean, vec![vec![1.0, 2.0, 3.0]]);
        }
        // A blob that can no longer be read is left out the same way.
        let gone = |k: usize| if k == 0 { Err(AggregateError::Unreadable("gone".into())) } else { Ok(&blobs[0]) };
        let inputs = [Input { weight: 1.0, carries: None }, Input { weight: 1.0, carries: None }];
        let m = mean(&Aggregation::Mean, &[3], &inputs, gone).unwrap();
        assert_eq!((m.used, m.left_out.len(), m.left_out[0].0), (1, 1, 0));
    }

    #[test]
    fn the_mean_taken_on_arrival_is_the_mean_taken_at_close_bit_for_bit() {
        let n = 1000;
        let blobs: Vec<Vec<u8>> = (0..7)
            .map(|k| {
                let values: Vec<f32> = (0..n).map(|i| ((i * 31 + k * 17) % 97) as f32 / 7.3 - 6.0).collect();
                PseudoGradient::build(
                    Codec::Int8 { block: 64 },
                    [0; 16],
                    0,
                    [0; 32],
                    [("w", &[n as u64][..], &values[..])],
                )
                .unwrap()
                .to_bytes()
            })
            .collect();
        let weights = [1.0f32, 0.5, 0.25, 1.0, 0.3, 0.9, 0.7];
        let inputs: Vec<Input> = weights.iter().map(|&weight| Input { weight, carries: None }).collect();
        let closed = mean(&Aggregation::Mean, &[n], &inputs, |k| Ok(&blobs[k])).unwrap();
        let mut running = RunningMean::new(&[n]);
        for (blob, &w) in blobs.iter().zip(&weights) {
            running.add(w, &MessageView::parse(blob).unwrap()).unwrap();
        }
        assert_eq!(running.count(), 7);
        let arrived = running.finish().unwrap();
        let bits = |m: &Mean| m.mean[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&arrived), bits(&closed));
        assert_eq!((arrived.weight, arrived.used), (closed.weight, closed.used));
    }
}
