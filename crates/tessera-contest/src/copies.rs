//! Copy detection. Independent contributors' pseudo-gradients share a direction (same model,
//! same data distribution) but differ in their noise: their cosine similarity is far from 1.
//! A copied Δ, with or without a little added noise, sits at cosine ≈ 1 to its source.
//!
//! The cosine is computed on coordinates sampled from the round's revealed seed, so a copier
//! cannot know which coordinates to perturb, and the cost is independent of model size.
//!
//! A sparse codec (top-k) opens another disguise: keep a victim's support — which coordinates it
//! sent — and rescale its values, which lowers the cosine below the threshold while keeping most
//! of the victim's gain. So for sparse submissions the supports are compared too (Templar's
//! top-k index overlap): on the same sampled coordinates, the share of one's non-zeros where the
//! other is non-zero as well. Independent top-k supports overlap about as much as their
//! directions agree (≈ 0.2 at cosine 0.2, 0.65 at cosine 0.7, simulated); a kept support
//! overlaps fully.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Cosine similarity at or above which two submissions are one and a copy.
pub const COPY_COSINE: f64 = 0.97;
/// Coordinates sampled per submission.
pub const SAMPLES: usize = 1 << 16;
/// Support overlap at or above which two sparse submissions are one and a copy.
pub const COPY_OVERLAP: f64 = 0.9;
/// A submission is sparse when at most this share of its sampled coordinates is non-zero…
pub const SPARSE_DENSITY: f64 = 0.5;
/// …and its support is compared only with this many sampled non-zeros at least (fewer say
/// too little to call anything a copy).
pub const MIN_SUPPORT: usize = 32;

/// The sampled coordinates of one submission (tensors in the model's order), in a fixed order
/// drawn from `seed`: the same positions for every submission of the round.
pub fn sample(delta: &[&[f32]], seed: u64) -> Vec<f32> {
    let total: usize = delta.iter().map(|t| t.len()).sum();
    if total <= SAMPLES {
        return delta.iter().flat_map(|t| t.iter().copied()).collect();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut positions: Vec<usize> = (0..SAMPLES).map(|_| rng.random_range(0..total)).collect();
    positions.sort_unstable();
    let mut out = Vec::with_capacity(SAMPLES);
    let (mut tensor, mut offset) = (0, 0);
    for p in positions {
        while p >= offset + delta[tensor].len() {
            offset += delta[tensor].len();
            tensor += 1;
        }
        out.push(delta[tensor][p - offset]);
    }
    out
}

pub fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    (aa > 0.0 && bb > 0.0 && ab.is_finite() && aa.is_finite() && bb.is_finite()).then(|| ab / (aa * bb).sqrt())
}

/// The overlap of two sparse samples' supports: of the smaller support, the share where the
/// other is non-zero too. `None` when either is dense or its support too small to judge.
pub fn support_overlap(a: &[f32], b: &[f32]) -> Option<f64> {
    let sparse = |x: &[f32]| {
        let nonzero = x.iter().filter(|v| **v != 0.0).count();
        (nonzero >= MIN_SUPPORT && nonzero as f64 <= SPARSE_DENSITY * x.len() as f64).then_some(nonzero)
    };
    let (na, nb) = (sparse(a)?, sparse(b)?);
    let both = a.iter().zip(b).filter(|(x, y)| **x != 0.0 && **y != 0.0).count();
    Some(both as f64 / na.min(nb) as f64)
}

/// For samples listed in arrival order, `Some(j)` for each one that copies an earlier one `j`
/// (the earliest it matches: cosine at or above [`COPY_COSINE`], or, both sparse, support
/// overlap at or above [`COPY_OVERLAP`]), `None` for originals. Also returns the largest cosine
/// between submissions not flagged, for the round's log.
pub fn find_copies(samples: &[Vec<f32>]) -> (Vec<Option<usize>>, f64) {
    let mut copy_of = vec![None; samples.len()];
    let mut largest_other = f64::NEG_INFINITY;
    for i in 0..samples.len() {
        for j in 0..i {
            let c = cosine(&samples[i], &samples[j]);
            let overlap = support_overlap(&samples[i], &samples[j]);
            if c.is_some_and(|c| c >= COPY_COSINE) || overlap.is_some_and(|o| o >= COPY_OVERLAP) {
                copy_of[i] = Some(j);
                break;
            }
            if let Some(c) = c {
                largest_other = largest_other.max(c);
            }
        }
    }
    (copy_of, largest_other)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn copies_are_found_and_independent_work_is_not() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        let common: Vec<f32> = (0..200_000).map(|_| normal.sample(&mut rng)).collect();
        // Independent contributors: a shared direction plus their own noise of equal size.
        let honest: Vec<Vec<f32>> =
            (0..4).map(|_| common.iter().map(|c| c + normal.sample(&mut rng)).collect()).collect();
        let copy = honest[1].clone();
        let noisy: Vec<f32> = honest[2].iter().map(|v| v + 0.05 * normal.sample(&mut rng)).collect();
        let zero = vec![0.0f32; 200_000];
        let all = [&honest[0], &honest[1], &honest[2], &honest[3], &copy, &noisy, &zero];
        let samples: Vec<Vec<f32>> = all.iter().map(|d| sample(&[&d[..150_000], &d[150_000..]], 9)).collect();
        assert_eq!(samples[0].len(), SAMPLES);
        let (copy_of, largest) = find_copies(&samples);
        assert_eq!(copy_of, vec![None, None, None, None, Some(1), Some(2), None]);
        assert!(largest < 0.6, "{largest}");
        // Sampling reads the same coordinates of every submission.
        assert_eq!(sample(&[&copy], 3), sample(&[&honest[1]], 3));
    }

    /// Keeps the `k` largest |x| of each `chunk` (what a top-k codec sends).
    fn top_k(x: &[f32], chunk: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; x.len()];
        for (c, o) in x.chunks(chunk).zip(out.chunks_mut(chunk)) {
            let mut order: Vec<usize> = (0..c.len()).collect();
            order.sort_by(|&a, &b| c[b].abs().total_cmp(&c[a].abs()));
            for &i in order.iter().take(k) {
                o[i] = c[i];
            }
        }
        out
    }

    #[test]
    fn a_kept_support_is_a_copy_whatever_its_values() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        let n = 1 << 19;
        let common: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        // Honest contributors whose directions agree closely (cosine ≈ 0.7 after top-k).
        let honest: Vec<Vec<f32>> = (0..3)
            .map(|_| top_k(&common.iter().map(|c| c + 0.3 * normal.sample(&mut rng)).collect::<Vec<_>>(), 4096, 256))
            .collect();
        // The victim's support, every value rescaled by a random factor in [0.1, 1.9].
        let reweighted: Vec<f32> = honest[0].iter().map(|v| v * rng.random_range(0.1f32..1.9)).collect();
        let all = [&honest[0], &honest[1], &honest[2], &reweighted];
        let samples: Vec<Vec<f32>> = all.iter().map(|d| sample(&[d], 5)).collect();
        let c = cosine(&samples[3], &samples[0]).unwrap();
        assert!(c < COPY_COSINE, "the disguise must beat the cosine for this test to mean anything: {c}");
        assert!(support_overlap(&samples[1], &samples[0]).unwrap() < 0.75);
        assert_eq!(support_overlap(&samples[3], &samples[0]), Some(1.0));
        let (copy_of, _) = find_copies(&samples);
        assert_eq!(copy_of, vec![None, None, None, Some(0)]);
        // Dense submissions are never compared by support (every coordinate is non-zero).
        let dense: Vec<f32> = (0..1000).map(|_| normal.sample(&mut rng)).collect();
        assert_eq!(support_overlap(&dense, &dense), None);
        assert_eq!(support_overlap(&[0.0; 100], &[0.0; 100]), None);
    }
}
