//! Deterministic windows: which token windows a worker trains on at a
//! step is a pure function of `(seed, worker, step)`. A resumed run, a verifier replaying a
//! contributor's work, and the contributor itself all compute the same windows.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng_for(domain: &str, seed: u64, worker: u64, step: u64) -> ChaCha8Rng {
    let mut input = [0u8; 24];
    input[..8].copy_from_slice(&seed.to_le_bytes());
    input[8..16].copy_from_slice(&worker.to_le_bytes());
    input[16..].copy_from_slice(&step.to_le_bytes());
    ChaCha8Rng::from_seed(blake3::derive_key(domain, &input))
}

/// Start offsets of the `batch` training windows of `seq_len + 1` tokens (inputs plus the shifted
/// targets) that `worker` uses at `step`, within a token stream of length `n_tokens`.
pub fn train_windows(seed: u64, worker: u64, step: u64, batch: usize, seq_len: usize, n_tokens: usize) -> Vec<usize> {
    assert!(n_tokens > seq_len + 1, "token stream of {n_tokens} is too short for windows of {seq_len}");
    let mut rng = rng_for("tessera 2026 training windows v1", seed, worker, step);
    (0..batch).map(|_| rng.random_range(0..n_tokens - seq_len - 1)).collect()
}

/// How many non-overlapping evaluation windows of `seq_len` (+1 target) fit in `n_tokens`.
pub fn eval_window_count(seq_len: usize, n_tokens: usize) -> usize {
    n_tokens.saturating_sub(1) / seq_len.max(1)
}

/// The fixed evaluation windows: of the split's non-overlapping windows, all of them when
/// `max_windows` is 0 or at least their number, else `max_windows` evenly spaced over the whole
/// split (window `⌊i·total/max⌋` for each i), so the sample covers all of it rather than its start.
pub fn eval_windows(seq_len: usize, n_tokens: usize, max_windows: usize) -> Vec<usize> {
    let total = eval_window_count(seq_len, n_tokens);
    if max_windows == 0 || max_windows >= total {
        return (0..total).map(|i| i * seq_len).collect();
    }
    (0..max_windows).map(|i| (i * total / max_windows) * seq_len).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_a_pure_function_of_seed_worker_step() {
        let a = train_windows(7, 3, 100, 8, 64, 10_000);
        assert_eq!(a, train_windows(7, 3, 100, 8, 64, 10_000));
        assert_ne!(a, train_windows(7, 3, 101, 8, 64, 10_000));
        assert_ne!(a, train_windows(7, 4, 100, 8, 64, 10_000));
        assert_ne!(a, train_windows(8, 3, 100, 8, 64, 10_000));
        assert!(a.iter().all(|&s| s + 65 <= 10_000));
    }

    #[test]
    fn eval_windows_do_not_overlap_fit_and_spread_over_the_split() {
        let w = eval_windows(10, 105, 100);
        assert_eq!(w.len(), 10);
        assert!(w.iter().all(|&s| s + 11 <= 105));
        assert_eq!(eval_windows(10, 105, 0), w);
        assert_eq!(eval_windows(10, 105, 3), vec![0, 30, 60]);
        let spread = eval_windows(16, 1_000_000, 200);
        assert_eq!(spread.len(), 200);
        assert!(spread.windows(2).all(|p| p[1] >= p[0] + 16));
        assert!(*spread.last().unwrap() > 990_000 - 16 * 400, "the sample reaches the split's end");
    }
}
