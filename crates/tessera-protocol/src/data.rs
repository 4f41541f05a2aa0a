//! The data assignment: which training shard of a run's dataset a data slot trains on in a
//! round. A pure function of (run seed, round, slot), so the hub that hands it out, the
//! contributor that prefetches its next shard and the validator that checks its data all compute
//! the same answer, and anyone can recompute who trained what (`docs/data.md`).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::api::{DataAssignment, DataSource, RunSpec};

/// The order training shards are handed out in during `epoch`: a permutation of
/// `0..n_train`, seeded by (run seed, epoch). Costs `n_train` words of memory.
pub fn epoch_order(seed: u64, epoch: u64, n_train: u32) -> Vec<u32> {
    let mut input = [0u8; 16];
    input[..8].copy_from_slice(&seed.to_le_bytes());
    input[8..].copy_from_slice(&epoch.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(blake3::derive_key("tessera 2026 shard order v1", &input));
    let mut order: Vec<u32> = (0..n_train).collect();
    order.shuffle(&mut rng);
    order
}

/// Which training shard a data slot trains on in a round, and in which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPick {
    pub epoch: u64,
    /// Index among the manifest's training shards (manifest order).
    pub shard: u32,
}

/// The assignment: data slot `slot` (< `slots_per_round`) of round `round` takes position
/// `round × slots_per_round + slot` of the concatenated per-epoch permutations of the `n_train`
/// training shards. Within an epoch no shard is taken twice; the next epoch reshuffles.
pub fn assigned_shard(seed: u64, round: u64, slot: u64, slots_per_round: u64, n_train: u32) -> Option<ShardPick> {
    if n_train == 0 || slot >= slots_per_round {
        return None;
    }
    let position = round.checked_mul(slots_per_round)?.checked_add(slot)?;
    let epoch = position / u64::from(n_train);
    let within = (position % u64::from(n_train)) as usize;
    Some(ShardPick { epoch, shard: epoch_order(seed, epoch, n_train)[within] })
}

/// A manifest run's shard for `contributor` in `round`: its data slot `contributor mod
/// slots_per_round` and that slot's pick. `None` for other sources.
pub fn data_assignment(spec: &RunSpec, round: u64, contributor: u64) -> Option<DataAssignment> {
    let DataSource::Manifest { train_shards, slots_per_round, .. } = &spec.data.source else { return None };
    let slot = DataSource::data_slot(contributor, *slots_per_round);
    let pick = assigned_shard(spec.seed, round, slot, u64::from(*slots_per_round), *train_shards)?;
    Some(DataAssignment { slot, epoch: pick.epoch, shard: pick.shard })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_hands_out_every_shard_once_and_the_next_reshuffles() {
        let (n, slots) = (10u32, 3u64);
        let mut epochs: Vec<Vec<u32>> = vec![Vec::new(); 4];
        for round in 0..13 {
            for slot in 0..slots {
                let pick = assigned_shard(9, round, slot, slots, n).unwrap();
                epochs[pick.epoch as usize].push(pick.shard);
            }
        }
        for e in &epochs[..3] {
            let mut sorted = e.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(epochs[0], epochs[1]);
        assert_eq!(assigned_shard(9, 4, 1, slots, n), assigned_shard(9, 4, 1, slots, n));
        assert_ne!(epoch_order(9, 0, n), epoch_order(10, 0, n));
        assert_eq!(assigned_shard(9, 0, 3, slots, n), None);
        assert_eq!(assigned_shard(9, 0, 0, slots, 0), None);
        assert_eq!(assigned_shard(9, u64::MAX, 1, slots, n), None);
    }
}
