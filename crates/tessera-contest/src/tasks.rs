//! Many validators: a round's submissions split into scoring tasks, a seeded share of the tasks
//! scored twice, and two validators' results on one task compared.
//!
//! A task is scored as a round of its own (the same held-out windows; data-fit controls and the
//! norm radius drawn from the task's submissions), so the cost per validator is one task's
//! submissions, whatever the round's size. Two results on the same task are the same computation
//! on the same bytes: beyond floating-point noise ([`Tolerance`]) they agree, so a disagreement
//! means one of them is wrong. Copies are looked for across the whole round on a smaller sample
//! ([`CROSS_SAMPLES`] coordinates) each result carries, so a copy in another task is found too.
//!
//! The split is drawn from the round's evaluation seed, revealed only once submissions closed: a
//! contributor cannot aim its submission at a friendly validator, and a validator cannot know
//! whether its task is one that another validator will score again.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::copies::cosine;

/// Coordinates of each submission's copy-detection sample that a task's result carries, for
/// looking for copies across tasks: a fixed, evenly strided subset of the seeded sample
/// ([`crate::copies::sample`]). 4096 coordinates (16 KiB) per submission.
pub const CROSS_SAMPLES: usize = 4096;

/// Two results' copy samples of one submission are the same sample at or above this cosine.
pub const SAMPLE_AGREEMENT: f64 = 0.999;

/// The smallest task: the data-fit check needs a submission and [`crate::judge`]'s controls
/// (four others) in the same task, and a median norm of a handful says little.
pub const MIN_TASK: usize = 8;

/// One scoring task: positions in the round's arrival order, ascending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: u32,
    pub positions: Vec<u32>,
    /// Scored by two validators (three when they disagree).
    pub checked: bool,
}

/// Splits a round of `n` submissions into `⌈n / size⌉` tasks of near-equal size (positions
/// shuffled by `seed`), `⌈share × tasks⌉` of them checked (also drawn by `seed`).
pub fn split(n: usize, seed: u64, size: usize, double_share: f64) -> Vec<Task> {
    if n == 0 {
        return Vec::new();
    }
    let count = n.div_ceil(size.max(1));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut rng);
    let mut ids: Vec<usize> = (0..count).collect();
    ids.shuffle(&mut rng);
    let checked = ((double_share.clamp(0.0, 1.0) * count as f64).ceil() as usize).min(count);
    let checked: std::collections::HashSet<usize> = ids[..checked].iter().copied().collect();
    (0..count)
        .map(|t| {
            let mut positions = order[t * n / count..(t + 1) * n / count].to_vec();
            positions.sort_unstable();
            Task { id: t as u32, positions, checked: checked.contains(&t) }
        })
        .collect()
}

/// A round's tasks, drawn from its revealed evaluation `seed`: what the hub hands out and what
/// an audit recomputes task by task.
pub fn split_round(seed: &[u8; 32], n: usize, size: usize, double_share: f64) -> Vec<Task> {
    split(n, crate::commit::derive(seed, "scoring tasks"), size, double_share)
}

/// The part of a seeded copy sample a task's result carries ([`CROSS_SAMPLES`] coordinates).
pub fn cross_sample(sample: &[f32]) -> Vec<f32> {
    let stride = sample.len().div_ceil(CROSS_SAMPLES).max(1);
    sample.iter().step_by(stride).copied().collect()
}

/// A copy sample as a task's report carries it: hex of little-endian f32s.
pub fn sample_hex(sample: &[f32]) -> String {
    hex::encode(sample.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

/// A copy sample from its hex (at most [`CROSS_SAMPLES`] little-endian f32s).
pub fn sample_from_hex(hex: &str) -> Result<Vec<f32>, String> {
    if !hex.len().is_multiple_of(8) || hex.len() > 8 * CROSS_SAMPLES {
        return Err(format!("a copy sample is hex of at most {CROSS_SAMPLES} little-endian f32s"));
    }
    let bytes = hex::decode(hex).map_err(|e| format!("a copy sample: {e}"))?;
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// How far two measurements of one number may lie apart and still agree:
/// `absolute + relative × |first|` (scores are differences of mean losses; another machine's
/// floating point differs a little).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub absolute: f64,
    pub relative: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance { absolute: 1e-4, relative: 1e-2 }
    }
}

impl Tolerance {
    pub fn agrees(&self, first: Option<f64>, second: Option<f64>) -> bool {
        match (first, second) {
            (Some(p), Some(r)) => (p - r).abs() <= self.absolute + self.relative * p.abs(),
            (None, None) => true,
            _ => false,
        }
    }
}

/// One validator's measurement of one submission in a task.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub score: f64,
    pub data_fit: Option<f64>,
    /// The score's standard error over the held-out windows (compared with the score's
    /// tolerance: it comes from the same losses).
    pub score_se: Option<f64>,
    /// The norm bound it was scored against (twice the task's median Δ norm).
    pub norm_bound: Option<f64>,
    /// Its [`cross_sample`].
    pub sample: Vec<f32>,
}

/// Where two results on the same task first differ beyond `tolerance`, in words; `None` when
/// they agree on every score, data fit and copy sample, and on the held-out loss.
pub fn disagreement(
    a: (&[Measured], Option<f64>),
    b: (&[Measured], Option<f64>),
    tolerance: Tolerance,
) -> Option<String> {
    if a.0.len() != b.0.len() {
        return Some(format!("{} scores against {}", a.0.len(), b.0.len()));
    }
    if !tolerance.agrees(a.1, b.1) {
        return Some(format!("held-out loss {:?} against {:?}", a.1, b.1));
    }
    for (i, (x, y)) in a.0.iter().zip(b.0).enumerate() {
        if !tolerance.agrees(Some(x.score), Some(y.score)) {
            return Some(format!("submission {i}: score {} against {}", x.score, y.score));
        }
        if !tolerance.agrees(x.score_se, y.score_se) {
            return Some(format!("submission {i}: score error {:?} against {:?}", x.score_se, y.score_se));
        }
        if !tolerance.agrees(x.norm_bound, y.norm_bound) {
            return Some(format!("submission {i}: norm bound {:?} against {:?}", x.norm_bound, y.norm_bound));
        }
        if !tolerance.agrees(x.data_fit, y.data_fit) {
            return Some(format!("submission {i}: data fit {:?} against {:?}", x.data_fit, y.data_fit));
        }
        let same = x.sample == y.sample || cosine(&x.sample, &y.sample).is_some_and(|c| c >= SAMPLE_AGREEMENT);
        if !same {
            return Some(format!("submission {i}: its copy samples differ"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_covers_every_submission_once_in_balanced_tasks() {
        for (n, size, share) in [(1, 32, 0.0), (100, 32, 0.1), (1000, 32, 0.1), (64, 8, 1.0), (33, 32, 0.5)] {
            let tasks = split(n, 7, size, share);
            assert_eq!(tasks.len(), n.div_ceil(size));
            let mut all: Vec<u32> = tasks.iter().flat_map(|t| t.positions.clone()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..n as u32).collect::<Vec<_>>(), "{n} {size}");
            let (min, max) = (
                tasks.iter().map(|t| t.positions.len()).min().unwrap(),
                tasks.iter().map(|t| t.positions.len()).max().unwrap(),
            );
            assert!(max <= size && max - min <= 1, "{n} {size}: {min}..{max}");
            let checked = tasks.iter().filter(|t| t.checked).count();
            assert_eq!(checked, ((share * tasks.len() as f64).ceil() as usize));
            assert!(tasks.iter().all(|t| t.positions.windows(2).all(|w| w[0] < w[1])));
        }
        assert!(split(0, 1, 32, 0.5).is_empty());
        // The seed decides it: another seed, another split.
        assert_ne!(split(100, 1, 10, 0.2), split(100, 2, 10, 0.2));
        assert_eq!(split(100, 1, 10, 0.2), split(100, 1, 10, 0.2));
    }

    #[test]
    fn results_agree_within_tolerance_and_name_the_first_difference() {
        let m = |score: f64, fit: Option<f64>, s: f32| Measured {
            score,
            data_fit: fit,
            score_se: Some(0.001),
            norm_bound: Some(0.5),
            sample: vec![s, 1.0, -2.0],
        };
        let a = [m(0.01, Some(0.002), 1.0), m(-0.003, None, 0.5)];
        let close = [m(0.01 + 1e-6, Some(0.002), 1.0), m(-0.003, None, 0.5 + 1e-5)];
        let t = Tolerance::default();
        assert_eq!(disagreement((&a, Some(2.5)), (&close, Some(2.5)), t), None);
        let inflated = [m(0.05, Some(0.002), 1.0), a[1].clone()];
        assert!(disagreement((&a, Some(2.5)), (&inflated, Some(2.5)), t).unwrap().contains("submission 0: score"));
        let framed = [a[0].clone(), m(-0.003, None, 9.0)];
        assert!(disagreement((&a, None), (&framed, None), t).unwrap().contains("copy samples"));
        let unfit = [m(0.01, None, 1.0), a[1].clone()];
        assert!(disagreement((&a, None), (&unfit, None), t).unwrap().contains("data fit"));
        assert!(disagreement((&a, Some(2.5)), (&a, Some(2.6)), t).unwrap().contains("held-out loss"));
        assert!(disagreement((&a, None), (&a[..1], None), t).is_some());
    }

    proptest::proptest! {
        #[test]
        fn copy_samples_round_trip_and_hostile_hex_is_refused(
            values in proptest::collection::vec(proptest::prelude::any::<f32>(), 0..64),
            junk in "[0-9a-zA-Z]{0,40}",
        ) {
            let back = sample_from_hex(&sample_hex(&values)).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            proptest::prop_assert_eq!(bits(&back), bits(&values));
            let _ = sample_from_hex(&junk);
        }
    }

    #[test]
    fn oversized_samples_are_refused() {
        assert!(sample_from_hex(&"00".repeat(4 * CROSS_SAMPLES + 4)).is_err());
        assert!(sample_from_hex("abc").is_err());
    }

    #[test]
    fn a_cross_sample_is_at_most_its_size_and_keeps_short_samples_whole() {
        let long: Vec<f32> = (0..crate::copies::SAMPLES).map(|i| i as f32).collect();
        let c = cross_sample(&long);
        assert_eq!(c.len(), CROSS_SAMPLES);
        assert_eq!(&c[..2], &[0.0, 16.0]);
        let short = vec![1.0f32; 100];
        assert_eq!(cross_sample(&short), short);
    }
}
