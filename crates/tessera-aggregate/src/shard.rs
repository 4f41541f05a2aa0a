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
//! Within a shard, every stage reads the submissions a piece at a time ([`Piece`]: spans of
//! consecutive tensors cut at whole codec blocks): the coordinate-wise work is the same
//! whatever the cut, and the per-submission sums are carried from span to span in order, so
//! pieces change nothing either. [`whole`] runs every stage over the whole model in one process.
//!
//! Cost per shard of `p` parameters and `N` submissions: a stage holds the shard's output (4p
//! bytes: the mean, or centred clipping's centre) and one piece of each submission, at most a
//! budget's worth of f32 ([`PIECE_BYTES`] by default; one block of each at least) under the
//! coordinate-wise and clipping rules, one submission's piece under the mean-family rules;
//! never N × p. Each stage reads every submission's slice once, in N reads per piece. The
//! outer step holds θ, momentum, residual and target of the shard (16p bytes).

use std::ops::Range;

use tessera_protocol::{Aggregation, Codec, MessageView};

use crate::robust::{
    RobustReport, centre_step, clip_scale, coefficients, coordinatewise, median_in_place, median_of,
    square_distance_from, square_sum_from, weighted_mean,
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

/// Values `values` of the model's tensor `tensor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub tensor: usize,
    pub values: Range<usize>,
}

/// What a stage reads of a submission at a time: spans of consecutive tensors, in order (of
/// one tensor only in a layer-sharded round, where submissions carry different tensors), read
/// as one range of the message. A stage goes through its pieces in order and holds one piece
/// of every submission at most, so what it holds is bounded by a budget, not by the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub spans: Vec<Span>,
}

impl Piece {
    /// Values in the piece.
    pub fn len(&self) -> usize {
        self.spans.iter().map(|s| s.values.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each span with where its values start in the piece's.
    fn placed(&self) -> impl Iterator<Item = (&Span, Range<usize>)> {
        self.spans.iter().scan(0, |at, s| {
            let r = *at..*at + s.values.len();
            *at = r.end;
            Some((s, r))
        })
    }
}

/// The default budget of decoded values a stage holds at once (bytes of f32).
pub const PIECE_BYTES: usize = 256 << 20;

/// Whether `rule` looks at every submission's value of a coordinate at once (so a stage holds
/// a piece of each), rather than adding them one at a time.
fn holds_all(rule: &Aggregation, inputs: &[Input]) -> bool {
    *rule != Aggregation::Mean && !inputs.iter().any(|i| i.carries.is_some())
}

/// The tensors of `range` cut into pieces so that what a stage holds at once fits in `budget`
/// bytes of f32: one submission's piece under the mean-family rules, every submission's under
/// the others (at least one unit each, whatever the budget). A tensor is cut at whole codec
/// units (`unit` values, which decode on their own); small tensors share a piece, so that
/// reads stay large.
pub fn pieces(
    rule: &Aggregation,
    inputs: &[Input],
    lengths: &[usize],
    range: &Range<usize>,
    unit: usize,
    budget: usize,
) -> Vec<Piece> {
    let unit = unit.max(1);
    let held = if holds_all(rule, inputs) { inputs.len().max(1) } else { 1 };
    let per = (budget / (4 * held) / unit).max(1) * unit;
    let share = !inputs.iter().any(|i| i.carries.is_some());
    let mut out: Vec<Piece> = Vec::new();
    let mut size = 0;
    for t in range.clone() {
        let n = lengths[t];
        for a in (0..n).step_by(per) {
            let span = Span { tensor: t, values: a..(a + per).min(n) };
            let len = span.values.len();
            match out.last_mut() {
                Some(last) if share && size + len <= per => {
                    last.spans.push(span);
                    size += len;
                }
                _ => {
                    out.push(Piece { spans: vec![span] });
                    size = len;
                }
            }
        }
    }
    out
}

/// Whether `input` carries the model's tensor `t`.
fn carries(input: &Input, t: usize) -> bool {
    input.carries.as_ref().is_none_or(|c| c.contains(&t))
}

/// The submissions that carry every tensor of piece `p`, in order.
pub fn carriers<'a>(inputs: &'a [Input], p: &'a Piece) -> impl Iterator<Item = usize> + 'a {
    inputs.iter().enumerate().filter(move |(_, i)| p.spans.iter().all(|s| carries(i, s.tensor))).map(|(k, _)| k)
}

/// The order in which a stage over `pieces` reads: piece by piece, each from every submission
/// that carries it. A reader can fetch ahead in this order.
pub fn reads<'a>(inputs: &'a [Input], pieces: &'a [Piece]) -> impl Iterator<Item = (usize, &'a Piece)> + 'a {
    pieces.iter().flat_map(move |p| carriers(inputs, p).map(move |k| (k, p)))
}

/// Where span `s`'s encoding lies in its tensor's encoding (`numel` values under `codec`).
pub fn span_bytes(codec: &Codec, numel: u64, s: &Span) -> Result<Range<u64>, AggregateError> {
    let (a, b) = (s.values.start as u64, s.values.end as u64);
    let unit = u64::from(codec.unit());
    if b > numel || a > b || !a.is_multiple_of(unit) || (b < numel && !b.is_multiple_of(unit)) {
        return Err(AggregateError::Unreadable(format!(
            "values {a}..{b} of tensor {} are not whole blocks of its {numel} under {codec}",
            s.tensor
        )));
    }
    Ok(codec.encoded_len(a)..codec.encoded_len(b))
}

/// Decodes span `s` from `bytes` (its encoding, [`span_bytes`]) onto `out`, checking its values
/// as a submission's are checked on arrival.
pub fn decode_span(codec: &Codec, bytes: &[u8], s: &Span, out: &mut Vec<f32>) -> Result<(), AggregateError> {
    let at = out.len();
    out.resize(at + s.values.len(), 0.0);
    codec.decode_into(bytes, &mut out[at..]).map_err(tessera_protocol::WireError::from)?;
    crate::check_values(s.tensor, s.values.start, &out[at..])
}

/// Where the model's tensor `t` is in `input`'s message, if it carries it.
pub fn message_index(input: &Input, t: usize) -> Option<usize> {
    match &input.carries {
        None => Some(t),
        Some(keep) => keep.iter().position(|&i| i == t),
    }
}

/// Piece `p` of a submission held whole (`view`, carrying `input`'s tensors).
pub fn view_piece(view: &MessageView<'_>, input: &Input, p: &Piece) -> Result<Vec<f32>, AggregateError> {
    let mut out = Vec::with_capacity(p.len());
    for s in &p.spans {
        let tensor = message_index(input, s.tensor)
            .and_then(|m| view.tensors.get(m))
            .ok_or_else(|| AggregateError::Unreadable(format!("the submission lacks tensor {}", s.tensor)))?;
        let r = span_bytes(&view.codec, tensor.numel(), s)?;
        let bytes = tensor.encoded.get(r.start as usize..r.end as usize).ok_or_else(|| {
            AggregateError::Unreadable(format!("tensor {}'s encoding is shorter than {}", s.tensor, r.end))
        })?;
        decode_span(&view.codec, bytes, s, &mut out)?;
    }
    Ok(out)
}

/// Stage `stage` of the shard `range` of a round with `inputs` under `rule`, over its
/// `pieces` ([`pieces`]). `lengths` are the whole model's; `load(k, p)` gives submission `k`'s
/// decoded, checked values of piece `p`, and is called in [`reads`] order. An error is the
/// round's to handle (one process leaves out what it cannot read; a shard cannot, since the
/// others would not know).
///
/// Bit for bit what one process computes over whole tensors: every rule is coordinate-wise
/// but for its per-submission sums, which are carried from piece to piece in order.
#[allow(clippy::too_many_arguments)]
pub fn stage(
    rule: &Aggregation,
    stage: u32,
    inputs: &[Input],
    lengths: &[usize],
    range: Range<usize>,
    previous: &Previous,
    pieces: &[Piece],
    mut load: impl FnMut(usize, &Piece) -> Result<Vec<f32>, AggregateError>,
) -> Result<Stage, AggregateError> {
    let shard = lengths.get(range.clone()).ok_or_else(|| {
        AggregateError::Unreadable(format!("the shard {range:?} is not in the model's {} tensors", lengths.len()))
    })?;
    let mut out: Vec<Vec<f32>> = shard.iter().map(|&n| vec![0.0f32; n]).collect();
    let outside = |s: &Span| !range.contains(&s.tensor) || s.values.end > lengths[s.tensor];
    if let Some(p) = pieces.iter().find(|p| p.spans.is_empty() || p.spans.iter().any(outside)) {
        return Err(AggregateError::Unreadable(format!("piece {p:?} is not in the shard {range:?}")));
    }
    let mut read = |k: usize, p: &Piece| -> Result<Vec<f32>, AggregateError> {
        let values = load(k, p)?;
        if values.len() != p.len() {
            let index = p.spans[0].tensor;
            return Err(AggregateError::TensorLength { index, expected: p.len(), got: values.len() });
        }
        Ok(values)
    };
    if !holds_all(rule, inputs) {
        return weighted_sum(inputs, &range, pieces, out, read);
    }
    if inputs.is_empty() {
        return Ok(Stage::Mean { mean: out, robust: None });
    }
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
    // Every submission's values of a piece.
    let mut all = |p: &Piece| (0..inputs.len()).map(|k| read(k, p)).collect::<Result<Vec<_>, _>>();
    /// Every submission's values of one span of the piece, as the robust helpers take them.
    fn views<'a>(xs: &'a [Vec<f32>], r: &Range<usize>) -> Vec<Vec<&'a [f32]>> {
        xs.iter().map(|x| vec![&x[r.clone()]]).collect()
    }
    // Where a span's values go in the shard's output.
    let place = |s: &Span| (s.tensor - range.start, s.values.clone());
    // Per submission, per tensor of the shard: a sum carried from span to span in order.
    let mut sums = vec![vec![0.0f64; shard.len()]; inputs.len()];
    match *rule {
        Aggregation::NormClip { .. } if stage == 0 => {
            for p in pieces {
                let xs = all(p)?;
                for (s, r) in p.placed() {
                    let (t, _) = place(s);
                    for (k, x) in xs.iter().enumerate() {
                        sums[k][t] = square_sum_from(sums[k][t], &x[r.clone()]);
                    }
                }
            }
            Ok(Stage::Partial { sums, centre: None })
        }
        Aggregation::NormClip { factor } => {
            let (scales, report) = clip(factor, &totals()?);
            for p in pieces {
                let xs = all(p)?;
                for (s, r) in p.placed() {
                    let mut piece = vec![vec![0.0f32; r.len()]];
                    weighted_mean(&views(&xs, &r), &weights, &scales, &mut piece);
                    let (t, values) = place(s);
                    out[t][values].copy_from_slice(&piece[0]);
                }
            }
            Ok(Stage::Mean { mean: out, robust: Some(report) })
        }
        Aggregation::CenteredClip { factor, iters } => {
            let (coef, report) = if stage == 0 {
                (None, RobustReport::default())
            } else {
                out = previous.centre.clone().ok_or_else(|| {
                    AggregateError::Unreadable(format!("stage {stage} of centred clipping has no centre"))
                })?;
                if out.iter().map(Vec::len).ne(shard.iter().copied()) {
                    return Err(AggregateError::Unreadable(format!("stage {stage}'s centre is not the shard's shape")));
                }
                let (scales, report) = clip(factor, &totals()?);
                (Some(coefficients(&weights, &scales)), report)
            };
            for p in pieces {
                let xs = all(p)?;
                for (s, r) in p.placed() {
                    let (t, values) = place(s);
                    let centre = &mut out[t][values];
                    let mut piece = vec![centre.to_vec()];
                    match &coef {
                        None => coordinatewise(&views(&xs, &r), &mut piece, median_in_place),
                        Some(coef) => centre_step(&views(&xs, &r), coef, &mut piece),
                    }
                    centre.copy_from_slice(&piece[0]);
                    if stage < iters {
                        for (k, x) in xs.iter().enumerate() {
                            sums[k][t] = square_distance_from(sums[k][t], &x[r.clone()], centre);
                        }
                    }
                }
            }
            if stage >= iters {
                return Ok(Stage::Mean { mean: out, robust: Some(report) });
            }
            Ok(Stage::Partial { sums, centre: Some(out) })
        }
        _ => {
            // Coordinate-wise rules: each span on its own.
            let mut report = RobustReport::default();
            for p in pieces {
                let xs = all(p)?;
                for (s, r) in p.placed() {
                    let (piece, said) = crate::robust::aggregate(rule, &views(&xs, &r), &weights)?;
                    let (t, values) = place(s);
                    out[t][values].copy_from_slice(&piece[0]);
                    report = said;
                }
            }
            Ok(Stage::Mean { mean: out, robust: Some(report) })
        }
    }
}

/// The weighted mean of the shard, each tensor over the submissions carrying it (all of them
/// outside a layer-sharded round), one submission's piece at a time: [`crate::Accumulator`]'s
/// arithmetic, coordinate by coordinate in submission order.
fn weighted_sum(
    inputs: &[Input],
    range: &Range<usize>,
    pieces: &[Piece],
    mut out: Vec<Vec<f32>>,
    mut read: impl FnMut(usize, &Piece) -> Result<Vec<f32>, AggregateError>,
) -> Result<Stage, AggregateError> {
    for (k, p) in reads(inputs, pieces) {
        let x = read(k, p)?;
        let w = inputs[k].weight;
        for (s, r) in p.placed() {
            for (o, &v) in out[s.tensor - range.start][s.values.clone()].iter_mut().zip(&x[r]) {
                *o += w * v;
            }
        }
    }
    for (t, sum) in range.clone().zip(out.iter_mut()) {
        let weight = inputs.iter().filter(|i| carries(i, t)).fold(0.0f64, |s, i| s + f64::from(i.weight));
        if weight > 0.0 {
            let inv = (1.0 / weight) as f32;
            sum.iter_mut().for_each(|v| *v *= inv);
        }
    }
    Ok(Stage::Mean { mean: out, robust: None })
}

/// Every stage of `rule` over the whole model in this process, piece by piece: the Δ̄ of
/// [`crate::round::mean`] bit for bit, holding one piece of every submission rather than all
/// of them (the budget and `unit` as for [`pieces`]). `start(active, pieces)` begins a pass
/// over the submissions `active` (indices into `inputs`) cut into `pieces`, and returns their
/// reader, called with those indices in [`reads`] order, stage after stage. A submission that cannot be read is left
/// out and the pass starts again without it.
pub fn whole<S>(
    rule: &Aggregation,
    lengths: &[usize],
    inputs: &[Input],
    (unit, budget): (usize, usize),
    mut start: impl FnMut(&[usize], &[Piece]) -> S,
) -> Result<crate::round::Mean, AggregateError>
where
    S: FnMut(usize, &Piece) -> Result<Vec<f32>, AggregateError>,
{
    let everything = 0..lengths.len();
    let fragments = inputs.iter().any(|i| i.carries.is_some());
    let mut left_out: Vec<(usize, AggregateError)> = Vec::new();
    'pass: loop {
        let active: Vec<usize> = (0..inputs.len()).filter(|k| !left_out.iter().any(|(j, _)| j == k)).collect();
        let kept: Vec<Input> = active.iter().map(|&k| inputs[k].clone()).collect();
        let pieces = pieces(rule, &kept, lengths, &everything, unit, budget);
        let mut source = start(&active, &pieces);
        let mut previous = Previous::default();
        for s in 0..stages(rule, fragments) {
            let mut failed = None;
            let load = |k: usize, p: &Piece| source(active[k], p).inspect_err(|_| failed = Some(active[k]));
            match stage(rule, s, &kept, lengths, everything.clone(), &previous, &pieces, load) {
                Ok(Stage::Partial { sums, centre }) => previous = Previous { sums, centre },
                Ok(Stage::Mean { mean, robust }) => {
                    let weight = kept.iter().map(|i| f64::from(i.weight)).sum();
                    let used = kept.len() as u64;
                    return Ok(crate::round::Mean { mean, weight, used, left_out, robust });
                }
                Err(e) => match failed {
                    Some(k) => {
                        left_out.push((k, e));
                        continue 'pass;
                    }
                    None => return Err(e),
                },
            }
        }
        return Err(AggregateError::Unreadable(format!("{rule}'s stages ended without a mean")));
    }
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
        budget: usize,
    ) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let lengths: Vec<usize> = spec.tensors.iter().map(|t| t.numel() as usize).collect();
        let ranges = plan(&lengths, shards);
        let fragments = inputs.iter().any(|i| i.carries.is_some());
        let mut previous: Vec<Previous> = vec![Previous::default(); ranges.len()];
        let mut means: Vec<Vec<Vec<f32>>> = vec![Vec::new(); ranges.len()];
        let unit = spec.codec.unit() as usize;
        for s in 0..stages(&spec.aggregation, fragments) {
            let mut sums: Vec<Vec<Vec<f64>>> = Vec::new();
            let mut centres = Vec::new();
            for (r, range) in ranges.iter().enumerate() {
                let pieces = pieces(&spec.aggregation, inputs, &lengths, range, unit, budget);
                let mut order = reads(inputs, &pieces);
                let load = |k: usize, p: &Piece| {
                    assert_eq!(order.next(), Some((k, p)), "read out of order");
                    view_piece(&MessageView::parse(&blobs[k]).unwrap(), &inputs[k], p)
                };
                let at = stage(&spec.aggregation, s, inputs, &lengths, range.clone(), &previous[r], &pieces, load);
                match at.unwrap() {
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
                                input.carries.clone().unwrap_or_else(|| (0..tensors.len()).collect());
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
                    // Piece by piece in one process, a piece as small as one unit or the tensor.
                    for budget in [PIECE_BYTES, 200] {
                        let start = |_: &[usize], _: &[Piece]| {
                            |k: usize, p: &Piece| view_piece(&MessageView::parse(&blobs[k]).unwrap(), &inputs[k], p)
                        };
                        let pieced =
                            super::whole(&spec.aggregation, &lengths, &inputs, (codec.unit() as usize, budget), start);
                        let pieced = pieced.unwrap();
                        let what = format!("{rule}, {codec:?}, fragments {fragments}, budget {budget}");
                        assert_eq!(pieced.mean, one.mean, "{what}");
                        assert_eq!((pieced.weight, pieced.used), (one.weight, one.used), "{what}");
                        assert_eq!(pieced.robust, one.robust, "{what}");
                    }
                    for (shards, budget) in [(1, PIECE_BYTES), (2, PIECE_BYTES), (3, 200), (9, 100), (2, 1)] {
                        let (weights, update, outer) = sharded(&spec, &state, &inputs, &blobs, shards, budget);
                        let what =
                            format!("{rule}, {codec:?}, fragments {fragments}, {shards} shards, budget {budget}");
                        assert_eq!(weights_hash(&weights), weights_hash(&whole.weights_bytes), "weights: {what}");
                        assert_eq!(update, whole.update_bytes, "update: {what}");
                        assert_eq!(outer, whole.outer_bytes, "outer state: {what}");
                    }
                }
            }
        }
    }

    /// A submission that stops reading partway through a robust rule's later stage is left
    /// out and the rule starts over: the same as one process given the others only.
    #[test]
    fn a_submission_unreadable_midway_is_left_out() {
        let tensors: Vec<TensorSpec> = [("a", vec![64u64]), ("b", vec![8, 8])]
            .into_iter()
            .map(|(name, shape)| TensorSpec { name: name.into(), shape })
            .collect();
        let lengths = vec![64, 64];
        let codec = Codec::Int8 { block: 16 };
        let blobs: Vec<Vec<u8>> = (0..5)
            .map(|k| {
                let values: Vec<Vec<f32>> =
                    (0..2).map(|i| (0..64).map(|j| noise((k * 977 + i * 64 + j) as u64)).collect()).collect();
                let entries = tensors.iter().zip(&values).map(|(t, v)| (t.name.as_str(), &t.shape[..], &v[..]));
                PseudoGradient::build(codec, [3; 16], 4, [4; 32], entries).unwrap().to_bytes()
            })
            .collect();
        let inputs: Vec<Input> = (0..5).map(|k| Input { weight: 1.0 + k as f32, carries: None }).collect();
        // Eight pieces a stage: the reads fail in the third, second and first stage.
        for (rule, good) in [("centered-clip:1:2", 19), ("norm-clip:2", 10), ("median", 5)] {
            let rule: Aggregation = rule.parse().unwrap();
            let reads = std::cell::Cell::new(0);
            let start = |active: &[usize], _: &[Piece]| {
                let flaky = active.contains(&2);
                let (blobs, inputs, reads) = (&blobs, &inputs, &reads);
                move |k: usize, p: &Piece| {
                    if flaky && k == 2 {
                        reads.set(reads.get() + 1);
                        if reads.get() > good {
                            return Err(AggregateError::Unreadable("gone".into()));
                        }
                    }
                    view_piece(&MessageView::parse(&blobs[k]).unwrap(), &inputs[k], p)
                }
            };
            let pieced = whole(&rule, &lengths, &inputs, (16, 4 * 5 * 16), start).unwrap();
            assert_eq!(pieced.left_out.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![2], "{rule}");
            let others = [0, 1, 3, 4];
            let rest: Vec<Input> = others.iter().map(|&k| inputs[k].clone()).collect();
            let one = mean(&rule, &lengths, &rest, |k| Ok(&blobs[others[k]])).unwrap();
            assert_eq!(pieced.mean, one.mean, "{rule}");
            assert_eq!((pieced.used, pieced.weight), (4, one.weight), "{rule}");
        }
    }

    /// What a robust stage holds at once stays within the budget (or one unit per
    /// submission), whatever the model's size; the mean-family rules hold one submission's.
    #[test]
    fn pieces_keep_what_a_stage_holds_within_the_budget() {
        let lengths = vec![1 << 20, 3, 70_000, 4096];
        let all = 0..lengths.len();
        for n in [1usize, 7, 1000] {
            let inputs: Vec<Input> = (0..n).map(|_| Input { weight: 1.0, carries: None }).collect();
            for (rule, held) in [(Aggregation::Median, n), (Aggregation::Mean, 1)] {
                for (unit, budget) in [(1, 1 << 20), (16, 1 << 20), (64, 100), (8, PIECE_BYTES)] {
                    let pieces = pieces(&rule, &inputs, &lengths, &all, unit, budget);
                    let widest = pieces.iter().map(Piece::len).max().unwrap();
                    assert!(4 * held * widest <= budget.max(4 * held * unit), "{rule} {n} {unit} {budget}");
                    let covered: Vec<(usize, usize)> = pieces
                        .iter()
                        .flat_map(|p| &p.spans)
                        .flat_map(|s| s.values.clone().map(move |j| (s.tensor, j)))
                        .collect();
                    let every: Vec<(usize, usize)> =
                        all.clone().flat_map(|t| (0..lengths[t]).map(move |j| (t, j))).collect();
                    assert_eq!(covered, every);
                    assert!(pieces.iter().flat_map(|p| &p.spans).all(|s| s.values.start % unit == 0));
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
