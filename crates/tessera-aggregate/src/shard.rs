//! A round's arithmetic split by tensor range, for aggregation workers: each shard (a range of
//! whole tensors) is averaged, stepped and broadcast on its own, and the parts put together are
//! bit for bit what [`crate::round::mean`] and [`crate::round::step`] give in one process.
//!
//! Why it can be exact: every rule but two is computed coordinate by coordinate, and so are the
//! outer step and the broadcast (per tensor). Norm clipping and centred clipping also need one
//! number per submission over the whole model (a norm, a distance); those are sums over tensors
//! of per-tensor sums, so a shard computes its tensors' sums ([`Stage::Partial`]), and the next
//! stage, once every shard has reported, adds them in tensor order as one process would. Norm
//! clipping takes two stages, centred clipping with `k` iterations `k + 1`; the others one.
//!
//! Cost per shard of `p` parameters and `N` submissions: the mean-family rules hold the sum and
//! one decoded tensor (4p bytes and one tensor); the coordinate-wise and clipping rules hold
//! every submission's slice (4Np bytes); every stage reads each submission's slice once. The
//! outer step holds θ, momentum, residual and target of the shard (16p bytes).

use std::ops::Range;

use tessera_protocol::{Aggregation, Codec};

use crate::robust::{
    RobustReport, centre_step, clip_scale, coefficients, coordinatewise, median_in_place, median_of, square_distance,
    square_sum, weighted_mean,
};
use crate::round::Input;
use crate::{AggregateError, OuterConfig, broadcast_tensor, outer_step_tensor};

/// How many stages a round under `rule` takes (a layer-sharded round is always one).
pub fn stages(rule: &Aggregation, fragments: bool) -> u32 {
    match *rule {
        _ if fragments => 1,
        Aggregation::NormClip { .. } => 2,
        Aggregation::CenteredClip { iters, .. } => iters + 1,
        _ => 1,
    }
}

/// Splits the model's tensors into at most `shards` contiguous ranges of about equal size
/// (a tensor is never split).
pub fn plan(lengths: &[usize], shards: usize) -> Vec<Range<usize>> {
    let total: usize = lengths.iter().sum();
    let target = (total as f64 / shards.max(1) as f64).max(1.0);
    let mut out = Vec::new();
    let (mut start, mut size) = (0, 0usize);
    for (i, &n) in lengths.iter().enumerate() {
        // A range ends before the tensor that would take it further past its share than
        // stopping short leaves it.
        if i > start && size as f64 + n as f64 / 2.0 > target && out.len() + 1 < shards {
            out.push(start..i);
            (start, size) = (i, 0);
        }
        size += n;
    }
    if start < lengths.len() {
        out.push(start..lengths.len());
    }
    out
}

/// The tensors of `range` that `input` carries: (the model's index, its index in the message).
pub fn wanted(input: &Input, range: &Range<usize>) -> Vec<(usize, usize)> {
    match &input.carries {
        None => range.clone().map(|i| (i, i)).collect(),
        Some(keep) => keep.iter().enumerate().filter(|(_, i)| range.contains(i)).map(|(m, &i)| (i, m)).collect(),
    }
}

/// What one stage of one shard gives.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Per submission, per tensor of the shard, the sum the next stage's clipping needs; and
    /// centred clipping's centre so far, for the shard's tensors.
    Partial { sums: Vec<Vec<f64>>, centre: Option<Vec<Vec<f32>>> },
    /// The shard's Δ̄, and what a robust rule did (every shard reports the same).
    Mean { mean: Vec<Vec<f32>>, robust: Option<RobustReport> },
}

/// What a later stage starts from: every shard's sums of the stage before, per submission per
/// tensor of the whole model (in order), and this shard's centre.
#[derive(Debug, Clone, Default)]
pub struct Previous {
    pub sums: Vec<Vec<f64>>,
    pub centre: Option<Vec<Vec<f32>>>,
}

/// Stage `stage` of the shard `range` of a round with `inputs` under `rule`. `lengths` are the
/// whole model's; `load(k)` gives submission `k`'s decoded values for [`wanted`]`(k, range)`,
/// checked ([`crate::check_values`]). An error is the round's to handle (one process leaves
/// out what it cannot read; a shard cannot, since the others would not know).
pub fn stage(
    rule: &Aggregation,
    stage: u32,
    inputs: &[Input],
    lengths: &[usize],
    range: Range<usize>,
    previous: &Previous,
    load: impl Fn(usize) -> Result<Vec<Vec<f32>>, AggregateError>,
) -> Result<Stage, AggregateError> {
    let shard: Vec<usize> = lengths[range.clone()].to_vec();
    let zeros = || shard.iter().map(|&n| vec![0.0f32; n]).collect::<Vec<_>>();
    if inputs.iter().any(|i| i.carries.is_some()) {
        return fragment(inputs, &shard, &range, load);
    }
    if *rule == Aggregation::Mean {
        return streaming(inputs, &shard, load);
    }
    if inputs.is_empty() {
        return Ok(Stage::Mean { mean: zeros(), robust: None });
    }
    let decoded = (0..inputs.len()).map(&load).collect::<Result<Vec<_>, _>>()?;
    let views: Vec<Vec<&[f32]>> = decoded.iter().map(|d| d.iter().map(Vec::as_slice).collect()).collect();
    let weights: Vec<f32> = inputs.iter().map(|i| i.weight).collect();
    // The whole model's norm or distance of each submission, from the stage before.
    let totals = || -> Result<Vec<f64>, AggregateError> {
        if previous.sums.len() != inputs.len() {
            return Err(AggregateError::Unreadable(format!(
                "stage {stage} has sums of {} submissions, not {}",
                previous.sums.len(),
                inputs.len()
            )));
        }
        Ok(previous.sums.iter().map(|s| s.iter().sum::<f64>().sqrt()).collect())
    };
    let clip = |factor: f32, lengths: &[f64]| -> (Vec<f32>, RobustReport) {
        let radius = f64::from(factor) * median_of(lengths);
        let scales: Vec<f32> = lengths.iter().map(|&n| clip_scale(n, radius)).collect();
        let clipped = scales.iter().filter(|&&s| s < 1.0).count();
        (scales, RobustReport { clipped, radius: Some(radius) })
    };
    let distances = |centre: &[Vec<f32>]| -> Vec<Vec<f64>> {
        views.iter().map(|x| x.iter().zip(centre).map(|(t, c)| square_distance(t, c)).collect()).collect()
    };
    match *rule {
        Aggregation::NormClip { .. } if stage == 0 => Ok(Stage::Partial {
            sums: views.iter().map(|x| x.iter().map(|t| square_sum(t)).collect()).collect(),
            centre: None,
        }),
        Aggregation::NormClip { factor } => {
            let (scales, report) = clip(factor, &totals()?);
            let mut out = zeros();
            weighted_mean(&views, &weights, &scales, &mut out);
            Ok(Stage::Mean { mean: out, robust: Some(report) })
        }
        Aggregation::CenteredClip { factor, iters } => {
            let (centre, report) = if stage == 0 {
                let mut out = zeros();
                coordinatewise(&views, &mut out, median_in_place);
                (out, RobustReport::default())
            } else {
                let mut centre = previous.centre.clone().ok_or_else(|| {
                    AggregateError::Unreadable(format!("stage {stage} of centred clipping has no centre"))
                })?;
                let (scales, report) = clip(factor, &totals()?);
                centre_step(&views, &coefficients(&weights, &scales), &mut centre);
                (centre, report)
            };
            if stage == iters {
                return Ok(Stage::Mean { mean: centre, robust: Some(report) });
            }
            Ok(Stage::Partial { sums: distances(&centre), centre: Some(centre) })
        }
        _ => {
            let (mean, report) = crate::robust::aggregate(rule, &views, &weights)?;
            Ok(Stage::Mean { mean, robust: Some(report) })
        }
    }
}

/// The weighted mean of the shard, submission by submission: [`crate::Accumulator`]'s
/// arithmetic, one decoded slice at a time.
fn streaming(
    inputs: &[Input],
    shard: &[usize],
    load: impl Fn(usize) -> Result<Vec<Vec<f32>>, AggregateError>,
) -> Result<Stage, AggregateError> {
    let mut sums: Vec<Vec<f32>> = shard.iter().map(|&n| vec![0.0; n]).collect();
    let mut total = 0.0f64;
    for (k, input) in inputs.iter().enumerate() {
        let decoded = load(k)?;
        for (s, d) in sums.iter_mut().zip(&decoded) {
            for (s, &d) in s.iter_mut().zip(d) {
                *s += input.weight * d;
            }
        }
        total += f64::from(input.weight);
    }
    if !inputs.is_empty() {
        let inv = (1.0 / total) as f32;
        sums.iter_mut().for_each(|s| s.iter_mut().for_each(|v| *v *= inv));
    }
    Ok(Stage::Mean { mean: sums, robust: None })
}

/// A layer-sharded round's mean over the shard: each tensor over the submissions carrying it.
fn fragment(
    inputs: &[Input],
    shard: &[usize],
    range: &Range<usize>,
    load: impl Fn(usize) -> Result<Vec<Vec<f32>>, AggregateError>,
) -> Result<Stage, AggregateError> {
    let mut sums: Vec<Vec<f32>> = shard.iter().map(|&n| vec![0.0; n]).collect();
    let mut weight_of = vec![0.0f64; shard.len()];
    for (k, input) in inputs.iter().enumerate() {
        let decoded = load(k)?;
        for ((i, _), values) in wanted(input, range).into_iter().zip(decoded) {
            for (s, v) in sums[i - range.start].iter_mut().zip(values) {
                *s += input.weight * v;
            }
            weight_of[i - range.start] += f64::from(input.weight);
        }
    }
    for (t, &w) in sums.iter_mut().zip(&weight_of) {
        if w > 0.0 {
            let inv = (1.0 / w) as f32;
            t.iter_mut().for_each(|v| *v *= inv);
        }
    }
    Ok(Stage::Mean { mean: sums, robust: None })
}

/// Where θ, momentum, residual and the update's encodings of each tensor lie in a stored part.
pub type PartRanges = [Vec<Range<u64>>; 4];

/// A shard's part of the next state and of the broadcast update.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub theta: Vec<Vec<f32>>,
    pub momentum: Vec<Vec<f32>>,
    pub residual: Vec<Vec<f32>>,
    /// Each tensor's encoding in the update.
    pub update: Vec<Vec<u8>>,
}

/// The outer step and the broadcast on the shard's tensors, as [`crate::round::step`] takes
/// them: from θ, momentum and residual, with Δ̄ = `mean`. `None` where the step leaves anything
/// non-finite: the whole round then holds its weights, which the caller decides in one place.
pub fn step(
    config: &OuterConfig,
    codec: &Codec,
    mut theta: Vec<Vec<f32>>,
    mut momentum: Vec<Vec<f32>>,
    mut residual: Vec<Vec<f32>>,
    mean: &[Vec<f32>],
) -> Result<Option<Part>, AggregateError> {
    let n = theta.len();
    if [momentum.len(), residual.len(), mean.len()].iter().any(|&m| m != n) {
        return Err(AggregateError::TensorCount { expected: n, got: mean.len() });
    }
    let mut update = Vec::with_capacity(n);
    for i in 0..n {
        let len = theta[i].len();
        if [momentum[i].len(), residual[i].len(), mean[i].len()].iter().any(|&m| m != len) {
            return Err(AggregateError::TensorLength { index: i, expected: len, got: mean[i].len() });
        }
        let mut target = theta[i].clone();
        outer_step_tensor(config, &mut target, &mut momentum[i], &mean[i]);
        match broadcast_tensor(codec, &mut theta[i], &target, &mut residual[i]) {
            Ok(bytes) => update.push(bytes),
            Err(_) => return Ok(None),
        }
    }
    let finite = [&theta, &momentum, &residual].iter().all(|p| p.iter().all(|t| t.iter().all(|v| v.is_finite())));
    Ok(finite.then_some(Part { theta, momentum, residual, update }))
}

impl Part {
    /// The part as stored: θ, momentum and residual of each tensor (f32 little-endian), then
    /// each tensor's update encoding; [`Part::ranges`] says where each lies.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for group in [&self.theta, &self.momentum, &self.residual] {
            for t in group {
                out.extend(t.iter().flat_map(|v| v.to_le_bytes()));
            }
        }
        for u in &self.update {
            out.extend_from_slice(u);
        }
        out
    }

    /// Where, in [`Part::to_bytes`] of a shard with tensors of `lengths` and the broadcast
    /// `codec`: per tensor θ's, momentum's, residual's and the update's byte range.
    pub fn ranges(lengths: &[usize], codec: &Codec) -> PartRanges {
        let mut at = 0u64;
        let mut next = |n: u64| {
            let r = at..at + n;
            at += n;
            r
        };
        let mut groups: PartRanges = Default::default();
        for g in groups.iter_mut().take(3) {
            *g = lengths.iter().map(|&n| next(4 * n as u64)).collect();
        }
        groups[3] = lengths.iter().map(|&n| next(codec.encoded_len(n as u64))).collect();
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::round::{self, OuterState, mean};
    use tessera_protocol::{
        MessageView, PseudoGradient, RunSpec, TensorSpec, WeightsLayout, header_bytes_for, weights_hash,
    };

    fn spec(tensors: Vec<TensorSpec>, codec: Codec, rule: Aggregation) -> RunSpec {
        RunSpec { tensors, codec, broadcast_codec: codec, aggregation: rule, ..round::tests::spec(0.7) }
    }

    /// A small pseudo-random value from a counter (no generator crate needed).
    fn noise(k: u64) -> f32 {
        let x = k.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
    }

    /// Everything a round publishes, computed by shards as workers would (each stage after
    /// every shard finished the one before), put together as the hub puts the parts together.
    fn sharded(
        spec: &RunSpec,
        state: &OuterState,
        inputs: &[Input],
        blobs: &[Vec<u8>],
        shards: usize,
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let lengths: Vec<usize> = spec.tensors.iter().map(|t| t.numel() as usize).collect();
        let ranges = plan(&lengths, shards);
        let fragments = inputs.iter().any(|i| i.carries.is_some());
        let mut previous: Vec<Previous> = vec![Previous::default(); ranges.len()];
        let mut means: Vec<Vec<Vec<f32>>> = vec![Vec::new(); ranges.len()];
        for s in 0..stages(&spec.aggregation, fragments) {
            let mut sums: Vec<Vec<Vec<f64>>> = Vec::new();
            let mut centres = Vec::new();
            for (r, range) in ranges.iter().enumerate() {
                let load = |k: usize| {
                    let view = MessageView::parse(&blobs[k]).unwrap();
                    Ok(wanted(&inputs[k], range)
                        .into_iter()
                        .map(|(_, m)| spec.codec.decode(view.tensors[m].encoded, view.tensors[m].numel()).unwrap())
                        .collect())
                };
                match stage(&spec.aggregation, s, inputs, &lengths, range.clone(), &previous[r], load).unwrap() {
                    Stage::Partial { sums: part, centre } => {
                        sums.push(part);
                        centres.push(centre);
                    }
                    Stage::Mean { mean, .. } => means[r] = mean,
                }
            }
            // Every shard's sums, per submission in tensor order.
            let whole: Vec<Vec<f64>> =
                (0..inputs.len()).map(|k| sums.iter().flat_map(|p| p[k].iter().copied()).collect()).collect();
            for (r, centre) in centres.into_iter().enumerate() {
                previous[r] = Previous { sums: whole.clone(), centre };
            }
        }
        let config = OuterConfig { lr: spec.outer.lr, momentum: spec.outer.momentum, nesterov: spec.outer.nesterov };
        let parts: Vec<Part> = ranges
            .iter()
            .zip(&means)
            .map(|(range, m)| {
                let slice = |v: &[Vec<f32>]| v[range.clone()].to_vec();
                step(
                    &config,
                    &spec.broadcast_codec,
                    slice(&state.theta),
                    slice(state.outer.momentum()),
                    slice(&state.residual),
                    m,
                )
                .unwrap()
                .unwrap()
            })
            .collect();
        // Put together from the stored parts' bytes, as the hub does.
        let stored: Vec<(Range<usize>, Vec<u8>, PartRanges)> = ranges
            .iter()
            .zip(&parts)
            .map(|(r, p)| (r.clone(), p.to_bytes(), Part::ranges(&lengths[r.clone()], &spec.broadcast_codec)))
            .collect();
        let piece = |group: usize, i: usize| -> &[u8] {
            let (r, bytes, at) = stored.iter().find(|(r, ..)| r.contains(&i)).unwrap();
            let span = &at[group][i - r.start];
            &bytes[span.start as usize..span.end as usize]
        };
        let weights = {
            let layout = WeightsLayout::of(&spec.tensors).unwrap();
            let mut out = layout.header.clone();
            layout.file_order().into_iter().for_each(|i| out.extend_from_slice(piece(0, i)));
            out
        };
        let outer = {
            let layout = WeightsLayout::of(&round::outer_table(&spec.tensors)).unwrap();
            let mut out = layout.header.clone();
            let n = spec.tensors.len();
            layout.file_order().into_iter().for_each(|i| out.extend_from_slice(piece(1 + i / n, i % n)));
            out
        };
        let update = {
            let mut out = header_bytes_for(&spec.broadcast_codec, [3; 16], 5, [4; 32], &spec.tensors);
            (0..spec.tensors.len()).for_each(|i| out.extend_from_slice(piece(3, i)));
            let digest = blake3::hash(&out);
            out.extend_from_slice(digest.as_bytes());
            out
        };
        (weights, update, outer)
    }

    /// For every rule and codec, in plain and layer-sharded rounds, over 1, 2, 3 and more
    /// shards than tensors: the parts put together are the bytes one process publishes.
    #[test]
    fn shards_give_what_one_process_gives_bit_for_bit() {
        let tensors: Vec<TensorSpec> = [("embed", vec![7u64, 24]), ("b.bias", vec![40]), ("a.weight", vec![16, 9])]
            .into_iter()
            .chain([("norm", vec![5])])
            .map(|(name, shape)| TensorSpec { name: name.into(), shape })
            .collect();
        let rules = ["mean", "median", "trimmed-mean:0.2", "norm-clip:1.5", "centered-clip:1:3", "centered-clip:2:1"];
        let codecs = [
            Codec::F32,
            Codec::Bf16,
            Codec::Int8 { block: 16 },
            Codec::Int4 { block: 8 },
            Codec::TopK { chunk: 16, k: 3 },
        ];
        for rule in rules {
            for codec in codecs {
                for fragments in [false, true] {
                    let spec = spec(tensors.clone(), codec, rule.parse().unwrap());
                    let lengths: Vec<usize> = tensors.iter().map(|t| t.numel() as usize).collect();
                    let n = 7;
                    let inputs: Vec<Input> = (0..n)
                        .map(|k| Input {
                            weight: 0.25 + (k as f32) * 0.4,
                            carries: fragments.then(|| (0..tensors.len()).filter(|i| (i + k) % 3 != 0).collect()),
                        })
                        .collect();
                    let blobs: Vec<Vec<u8>> = inputs
                        .iter()
                        .enumerate()
                        .map(|(k, input)| {
                            let carried: Vec<usize> =
                                wanted(input, &(0..tensors.len())).into_iter().map(|(i, _)| i).collect();
                            let values: Vec<Vec<f32>> = carried
                                .iter()
                                .map(|&i| {
                                    // One submission in seven is an outlier, for the clipping rules.
                                    let scale = if k == 3 { 40.0 } else { 1.0 };
                                    (0..lengths[i]).map(|j| scale * noise((k * 1000 + i * 100 + j) as u64)).collect()
                                })
                                .collect();
                            PseudoGradient::build(
                                codec,
                                [3; 16],
                                4,
                                [4; 32],
                                carried
                                    .iter()
                                    .zip(&values)
                                    .map(|(&i, v)| (tensors[i].name.as_str(), &tensors[i].shape[..], &v[..])),
                            )
                            .unwrap()
                            .to_bytes()
                        })
                        .collect();
                    let theta: Vec<Vec<f32>> = lengths
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| (0..n).map(|j| noise((i * 7919 + j) as u64)).collect())
                        .collect();
                    let mut state = OuterState::new(&spec, theta);
                    let momentum: Vec<Vec<f32>> = lengths
                        .iter()
                        .enumerate()
                        .map(|(i, &n)| (0..n).map(|j| 0.1 * noise((i * 31 + j) as u64 + 99)).collect())
                        .collect();
                    state.outer.set_momentum(3, momentum).unwrap();
                    state.residual[1][2] = 0.01;
                    let one = mean(&spec.aggregation, &lengths, &inputs, |k| Ok(&blobs[k])).unwrap();
                    assert!(one.left_out.is_empty());
                    let whole = round::step(&spec, [3; 16], 4, [4; 32], &state, &one.mean).unwrap();
                    assert!(!whole.held);
                    for shards in [1, 2, 3, 9] {
                        let (weights, update, outer) = sharded(&spec, &state, &inputs, &blobs, shards);
                        let what = format!("{rule}, {codec:?}, fragments {fragments}, {shards} shards");
                        assert_eq!(weights_hash(&weights), weights_hash(&whole.weights_bytes), "weights: {what}");
                        assert_eq!(update, whole.update_bytes, "update: {what}");
                        assert_eq!(outer, whole.outer_bytes, "outer state: {what}");
                    }
                }
            }
        }
    }

    #[test]
    fn plans_cover_every_tensor_once_in_order() {
        assert_eq!(plan(&[8, 32], 2), vec![0..1, 1..2]);
        assert_eq!(plan(&[4, 4, 4, 4], 2), vec![0..2, 2..4]);
        for (lengths, shards) in [(vec![5, 1, 1, 1, 10, 2], 3), (vec![1], 4), (vec![3, 3, 3], 1), (vec![], 2)] {
            let ranges = plan(&lengths, shards);
            assert!(ranges.len() <= shards.max(1));
            let covered: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(covered, (0..lengths.len()).collect::<Vec<_>>());
            assert!(ranges.iter().all(|r| !r.is_empty()));
        }
    }
}
