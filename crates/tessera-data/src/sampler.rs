//! Deterministic data assignment: which shard and which token windows a worker trains on at a
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

/// The shard `worker` reads at `step`, out of `n_shards`.
pub fn assign_shard(seed: u64, worker: u64, step: u64, n_shards: u32) -> u32 {
    assert!(n_shards > 0, "no shards to assign");
    rng_for("tessera 2026 shard assignment v1", seed, worker, step).random_range(0..n_shards)
}

/// Start offsets of the `batch` training windows of `seq_len + 1` tokens (inputs plus the shifted
/// targets) that `worker` uses at `step`, within a token stream of length `n_tokens`.
pub fn train_windows(seed: u64, worker: u64, step: u64, batch: usize, seq_len: usize, n_tokens: usize) -> Vec<usize> {
    assert!(n_tokens > seq_len + 1, "token stream of {n_tokens} is too short for windows of {seq_len}");
    let mut rng = rng_for("tessera 2026 training windows v1", seed, worker, step);
    (0..batch).map(|_| rng.random_range(0..n_tokens - seq_len - 1)).collect()
}

/// The fixed evaluation windows: consecutive, non-overlapping, from the start of the validation
/// stream, at most `max_windows` of them.
pub fn eval_windows(seq_len: usize, n_tokens: usize, max_windows: usize) -> Vec<usize> {
    (0..n_tokens.saturating_sub(1) / seq_len).take(max_windows).map(|i| i * seq_len).collect()
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
    fn shard_assignment_spreads_over_all_shards() {
        let mut seen = [0u32; 5];
        for step in 0..500 {
            seen[assign_shard(1, 2, step, 5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
    }

    #[test]
    fn eval_windows_do_not_overlap_and_fit() {
        let w = eval_windows(10, 105, 100);
        assert_eq!(w.len(), 10);
        assert!(w.iter().all(|&s| s + 11 <= 105));
        assert_eq!(eval_windows(10, 105, 3).len(), 3);
    }
}
