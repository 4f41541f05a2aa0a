//! Copy detection. Independent contributors' pseudo-gradients share a direction (same model,
//! same data distribution) but differ in their noise: their cosine similarity is far from 1.
//! A copied Δ, with or without a little added noise, sits at cosine ≈ 1 to its source.
//!
//! The cosine is computed on coordinates sampled from the round's revealed seed, so a copier
//! cannot know which coordinates to perturb, and the cost is independent of model size.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Cosine similarity at or above which two submissions are one and a copy.
pub const COPY_COSINE: f64 = 0.97;
/// Coordinates sampled per submission.
pub const SAMPLES: usize = 1 << 16;

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

/// For samples listed in arrival order, `Some(j)` for each one that copies an earlier one `j`
/// (the earliest it matches), `None` for originals. Also returns the largest cosine between
/// submissions not flagged, for the round's log.
pub fn find_copies(samples: &[Vec<f32>]) -> (Vec<Option<usize>>, f64) {
    let mut copy_of = vec![None; samples.len()];
    let mut largest_other = f64::NEG_INFINITY;
    for i in 0..samples.len() {
        for j in 0..i {
            let Some(c) = cosine(&samples[i], &samples[j]) else { continue };
            if c >= COPY_COSINE {
                copy_of[i] = Some(j);
                break;
            }
            largest_other = largest_other.max(c);
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
}
