//! Robust aggregation: the run's [`Aggregation`] rule applied to a round's decoded
//! pseudo-gradients. Unlike the streaming [`crate::Accumulator`] (the weighted mean, one
//! submission at a time), these rules look at every submission at once, coordinate by
//! coordinate or through whole-Δ norms, so the caller holds them all.
//!
//! Each submission is a list of tensors (flat f32, the model's order). Weights come from the
//! scores and staleness; the mean, norm clipping and centred clipping use them, the trimmed mean
//! and the median count each submission once. Work is split over all cores by coordinate range.
//!
//! Against what: a scaled, noisy or sign-flipped Δ has a large distance to the others and is
//! clipped (norm clip, centred clip) or falls off the ends (trimmed mean, median); small, aligned
//! attacks (ALIE, IPM) are what the scores and weights are for.

use tessera_protocol::Aggregation;

use crate::{AggregateError, check_shapes, threads};

/// What a rule did, for the round's log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RobustReport {
    /// Submissions scaled down at least once (norm clipping, centred clipping's last pass).
    pub clipped: usize,
    /// The clipping radius of the last pass, when there was one.
    pub radius: Option<f64>,
}

/// Combines `inputs` (submission → tensor → values, every submission the same shapes) under
/// `rule` with `weights` (finite, positive). Non-finite inputs, and inputs beyond
/// ±[`crate::DELTA_ABS_MAX`], are refused.
pub fn aggregate(
    rule: &Aggregation,
    inputs: &[Vec<&[f32]>],
    weights: &[f32],
) -> Result<(Vec<Vec<f32>>, RobustReport), AggregateError> {
    let first = inputs.first().ok_or(AggregateError::Empty)?;
    let lengths: Vec<usize> = first.iter().map(|t| t.len()).collect();
    if weights.len() != inputs.len() {
        return Err(AggregateError::BadWeight(format!("{} weights for {} submissions", weights.len(), inputs.len())));
    }
    for (x, &w) in inputs.iter().zip(weights) {
        check_shapes(&lengths, x)?;
        if !(w.is_finite() && w > 0.0) {
            return Err(AggregateError::BadWeight(w.to_string()));
        }
        for (index, t) in x.iter().enumerate() {
            crate::check_values(index, 0, t)?;
        }
    }
    let mut out: Vec<Vec<f32>> = lengths.iter().map(|&n| vec![0.0; n]).collect();
    let mut report = RobustReport::default();
    match *rule {
        Aggregation::Mean => weighted_mean(inputs, weights, &vec![1.0; inputs.len()], &mut out),
        Aggregation::NormClip { factor } => {
            let norms: Vec<f64> = inputs.iter().map(|x| norm(x)).collect();
            let radius = f64::from(factor) * median_of(&norms);
            let scales: Vec<f32> = norms.iter().map(|&n| clip_scale(n, radius)).collect();
            report = RobustReport { clipped: scales.iter().filter(|&&s| s < 1.0).count(), radius: Some(radius) };
            weighted_mean(inputs, weights, &scales, &mut out);
        }
        Aggregation::TrimmedMean { trim } => {
            let drop = (f64::from(trim) * inputs.len() as f64).floor() as usize;
            coordinatewise(inputs, &mut out, |values| {
                values.sort_unstable_by(f32::total_cmp);
                let kept = &values[drop..values.len() - drop];
                (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
            });
        }
        Aggregation::Median => coordinatewise(inputs, &mut out, median_in_place),
        Aggregation::CenteredClip { factor, iters } => {
            coordinatewise(inputs, &mut out, median_in_place);
            for _ in 0..iters {
                let dists: Vec<f64> = inputs.iter().map(|x| distance(x, &out)).collect();
                let radius = f64::from(factor) * median_of(&dists);
                let scales: Vec<f32> = dists.iter().map(|&d| clip_scale(d, radius)).collect();
                report = RobustReport { clipped: scales.iter().filter(|&&s| s < 1.0).count(), radius: Some(radius) };
                centre_step(inputs, &coefficients(weights, &scales), &mut out);
            }
        }
    }
    Ok((out, report))
}

/// wᵢ sᵢ / Σ wᵢ for each submission.
pub(crate) fn coefficients(weights: &[f32], scales: &[f32]) -> Vec<f32> {
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    weights.iter().zip(scales).map(|(&w, &s)| (f64::from(w) * f64::from(s) / total) as f32).collect()
}

/// One pass of centred clipping: v ← v + Σ cᵢ (xᵢ − v), coordinate by coordinate.
pub(crate) fn centre_step(inputs: &[Vec<&[f32]>], coef: &[f32], out: &mut [Vec<f32>]) {
    for (t, v) in out.iter_mut().enumerate() {
        par_ranges(v, |start, v| {
            for (j, v) in v.iter_mut().enumerate() {
                let c = *v;
                let step: f32 = inputs.iter().zip(coef).map(|(x, &a)| a * (x[t][start + j] - c)).sum();
                *v = c + step;
            }
        });
    }
}

/// Σ wᵢ sᵢ xᵢ / Σ wᵢ: the weighted mean of the submissions each scaled by sᵢ.
pub(crate) fn weighted_mean(inputs: &[Vec<&[f32]>], weights: &[f32], scales: &[f32], out: &mut [Vec<f32>]) {
    let coef = coefficients(weights, scales);
    for (t, o) in out.iter_mut().enumerate() {
        par_ranges(o, |start, o| {
            for (x, &a) in inputs.iter().zip(&coef) {
                for (o, &v) in o.iter_mut().zip(&x[t][start..]) {
                    *o += a * v;
                }
            }
        });
    }
}

/// `f` over each coordinate's values (one per submission, in a reused buffer).
pub(crate) fn coordinatewise(inputs: &[Vec<&[f32]>], out: &mut [Vec<f32>], f: impl Fn(&mut [f32]) -> f32 + Sync) {
    for (t, o) in out.iter_mut().enumerate() {
        par_ranges(o, |start, o| {
            let mut values = vec![0.0f32; inputs.len()];
            for (j, o) in o.iter_mut().enumerate() {
                for (v, x) in values.iter_mut().zip(inputs) {
                    *v = x[t][start + j];
                }
                *o = f(&mut values);
            }
        });
    }
}

/// The median of `values` (mean of the middle two for an even count); reorders them.
pub(crate) fn median_in_place(values: &mut [f32]) -> f32 {
    let n = values.len();
    let (_, &mut hi, _) = values.select_nth_unstable_by(n / 2, f32::total_cmp);
    if n % 2 == 1 {
        return hi;
    }
    let lo = values[..n / 2].iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64: `lo + hi` in f32 overflows to infinity for values beyond ±1.7e38.
    ((f64::from(lo) + f64::from(hi)) * 0.5) as f32
}

pub(crate) fn median_of(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// min(1, radius / n); a zero radius (most submissions identical) leaves nothing unclipped
/// but a zero vector.
pub(crate) fn clip_scale(n: f64, radius: f64) -> f32 {
    if n <= radius { 1.0 } else { (radius / n) as f32 }
}

fn norm(x: &[&[f32]]) -> f64 {
    x.iter().map(|t| square_sum(t)).sum::<f64>().sqrt()
}

fn distance(x: &[&[f32]], v: &[Vec<f32>]) -> f64 {
    x.iter().zip(v).map(|(t, v)| square_distance(t, v)).sum::<f64>().sqrt()
}

/// Σ x² over one tensor, in f64: a norm is the root of these summed in tensor order.
pub(crate) fn square_sum(t: &[f32]) -> f64 {
    square_sum_from(0.0, t)
}

/// `acc` + Σ x², added in order: a tensor's [`square_sum`] taken piece by piece, each piece
/// continuing from the last, is the same number bit for bit.
pub(crate) fn square_sum_from(acc: f64, t: &[f32]) -> f64 {
    t.iter().fold(acc, |s, &v| s + f64::from(v) * f64::from(v))
}

/// Σ (a − b)² over one tensor, in f64.
pub(crate) fn square_distance(a: &[f32], b: &[f32]) -> f64 {
    square_distance_from(0.0, a, b)
}

/// `acc` + Σ (a − b)², added in order (see [`square_sum_from`]).
pub(crate) fn square_distance_from(acc: f64, a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).fold(acc, |s, (&a, &b)| {
        let d = f64::from(a) - f64::from(b);
        s + d * d
    })
}

/// `f(start, chunk)` over `out` split into one contiguous range per core.
fn par_ranges(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    let n = out.len();
    let workers = threads().min(n.div_ceil(1 << 14)).max(1);
    if workers == 1 {
        return f(0, out);
    }
    let size = n.div_ceil(workers);
    std::thread::scope(|s| {
        for (k, chunk) in out.chunks_mut(size).enumerate() {
            let f = &f;
            s.spawn(move || f(k * size, chunk));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(rule: &str, xs: &[Vec<f32>], w: &[f32]) -> Vec<f32> {
        let inputs: Vec<Vec<&[f32]>> = xs.iter().map(|x| vec![x.as_slice()]).collect();
        let (out, _) = aggregate(&rule.parse().unwrap(), &inputs, w).unwrap();
        out.into_iter().next().unwrap()
    }

    #[test]
    fn rules_on_a_small_example() {
        let xs = vec![vec![1.0, 10.0], vec![2.0, 20.0], vec![3.0, 30.0], vec![100.0, -1000.0]];
        let ones = [1.0; 4];
        assert_eq!(run("mean", &xs, &ones), vec![26.5, -235.0]);
        assert_eq!(run("median", &xs, &ones), vec![2.5, 15.0]);
        assert_eq!(run("trimmed-mean:0.25", &xs, &ones), vec![2.5, 15.0]);
        assert_eq!(run("median", &xs[..3], &ones[..3]), vec![2.0, 20.0]);
        // The outlier's norm is far beyond twice the median: it is scaled to that radius.
        let clipped = run("norm-clip:1", &xs, &ones);
        assert!(clipped[1] > 0.0, "{clipped:?}");
        let cc = run("centered-clip:1:5", &xs, &ones);
        assert!((cc[0] - 2.0).abs() < 1.5 && (cc[1] - 20.0).abs() < 15.0, "{cc:?}");
    }

    /// The midpoint of two huge values of the same sign is theirs, not infinity.
    #[test]
    fn the_median_of_huge_values_does_not_overflow() {
        assert_eq!(median_in_place(&mut [3e38, 3e38]), 3e38);
        assert_eq!(median_in_place(&mut [-3e38, -3e38, 1.0, -3.2e38]), -3e38);
        assert_eq!(median_in_place(&mut [f32::MAX, -f32::MAX]), 0.0);
    }

    #[test]
    fn weights_matter_where_documented() {
        let xs = vec![vec![0.0], vec![4.0]];
        assert_eq!(run("mean", &xs, &[3.0, 1.0]), vec![1.0]);
        assert_eq!(run("median", &xs, &[3.0, 1.0]), vec![2.0]);
    }

    #[test]
    fn refuses_bad_input() {
        let a = [1.0f32, 2.0];
        let b = [1.0f32];
        let nan = [f32::NAN, 0.0];
        let rule = Aggregation::Mean;
        assert!(matches!(aggregate(&rule, &[], &[]), Err(AggregateError::Empty)));
        assert!(aggregate(&rule, &[vec![&a[..]], vec![&b[..]]], &[1.0, 1.0]).is_err());
        assert!(aggregate(&rule, &[vec![&a[..]], vec![&nan[..]]], &[1.0, 1.0]).is_err());
        assert!(aggregate(&rule, &[vec![&a[..]]], &[0.0]).is_err());
        assert!(aggregate(&rule, &[vec![&a[..]]], &[1.0, 1.0]).is_err());
    }

    proptest! {
        /// With identical honest inputs every rule returns them exactly; with fewer than half
        /// replaced by huge values, the median and trimmed mean stay inside the honest range
        /// and centred clipping moves at most a clipped step per iteration.
        #[test]
        fn rules_bound_the_influence_of_outliers(
            honest in proptest::collection::vec(-1.0f32..1.0, 64),
            bad in 1usize..4,
            scale in 1e3f32..1e6,
        ) {
            let n = 9;
            let mut xs: Vec<Vec<f32>> = (0..n).map(|i| honest.iter().map(|v| v + i as f32 * 1e-3).collect()).collect();
            for x in xs.iter_mut().take(bad) {
                x.iter_mut().for_each(|v| *v *= -scale);
            }
            let w = vec![1.0; n];
            for rule in ["median", "trimmed-mean:0.34", "centered-clip:2:3", "norm-clip:2"] {
                let out = run(rule, &xs, &w);
                for (j, o) in out.iter().enumerate() {
                    let h = honest[j];
                    prop_assert!((o - h).abs() <= 2.0 * h.abs() + 0.05, "{rule}: {o} vs {h}");
                }
            }
            let same: Vec<Vec<f32>> = vec![honest.clone(); 5];
            for rule in ["mean", "median", "trimmed-mean:0.2", "centered-clip", "norm-clip"] {
                let out = run(rule, &same, &[1.0; 5]);
                for (o, h) in out.iter().zip(&honest) {
                    prop_assert!((o - h).abs() <= 1e-6 * h.abs().max(1.0), "{rule}: {o} vs {h}");
                }
            }
        }
    }
}
