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
///
/// With a mixture, the round's slots are first split among the datasets by the weights in
/// effect at `round` (largest remainder: each gets its exact share of the slots, within one),
/// in dataset order; a slot then takes its position among its dataset's slots in that dataset's
/// own shard order (seeded by the run's seed and the dataset's index).
pub fn data_assignment(spec: &RunSpec, round: u64, contributor: u64) -> Option<DataAssignment> {
    let DataSource::Manifest { train_shards, slots_per_round, mixture, .. } = &spec.data.source else {
        return None;
    };
    let slot = DataSource::data_slot(contributor, *slots_per_round);
    if mixture.is_empty() {
        let pick = assigned_shard(spec.seed, round, slot, u64::from(*slots_per_round), *train_shards)?;
        return Some(DataAssignment { slot, epoch: pick.epoch, shard: pick.shard, source: 0 });
    }
    let weights = spec.data.source.weights_at(round);
    let counts = slots_by_weight(u64::from(*slots_per_round), &weights);
    let (mut first, mut source) = (0u64, None);
    for (i, &n) in counts.iter().enumerate() {
        if slot < first + n {
            source = Some(i);
            break;
        }
        first += n;
    }
    let i = source?;
    let shards = if i == 0 { *train_shards } else { mixture.get(i - 1)?.train_shards };
    let seed = if i == 0 {
        spec.seed
    } else {
        spec.seed ^ u64::from_le_bytes(blake3::hash(&(i as u64).to_le_bytes()).as_bytes()[..8].try_into().ok()?)
    };
    let pick = assigned_shard(seed, round, slot - first, counts[i], shards)?;
    Some(DataAssignment { slot, epoch: pick.epoch, shard: pick.shard, source: i as u32 })
}

/// `slots` split by `weights` (largest remainder, ties to the earlier dataset): one count per
/// weight, summing to `slots`.
pub fn slots_by_weight(slots: u64, weights: &[u32]) -> Vec<u64> {
    let parts =
        tessera_split::pro_rata(u128::from(slots), weights.iter().enumerate().map(|(i, &w)| (i, u128::from(w))));
    let mut counts = vec![0u64; weights.len()];
    for (i, n) in parts {
        counts[i] = n as u64;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mixture_splits_each_rounds_slots_by_weight_and_follows_its_history() {
        use crate::api::MixedData;
        let mut spec: RunSpec = serde_json::from_value(serde_json::json!({
            "name": "m", "model": {}, "tensors": [{"name": "w", "shape": [2]}],
            "data": {"name": "d", "fingerprint": "f", "source": {"kind": "manifest", "urls": ["u"], "train_shards": 7, "slots_per_round": 8}},
            "inner": {"batch_size": 1, "seq_len": 8, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 0.1},
            "inner_steps": 5, "rounds": 9, "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": true}, "codec": "f32",
            "broadcast_codec": "f32", "quorum": 2, "round_deadline_ms": 1000, "max_staleness": 1, "staleness_decay": 0.5, "seed": 3
        }))
        .unwrap();
        // Alone: the plain assignment, from the run's own dataset.
        let alone = data_assignment(&spec, 2, 5).unwrap();
        assert_eq!(alone.source, 0);
        assert_eq!(alone.query(), format!("data_slot=5&epoch={}&shard={}", alone.epoch, alone.shard));
        let DataSource::Manifest { mixture, weights, .. } = &mut spec.data.source else { unreachable!() };
        mixture.push(MixedData {
            name: "code".into(),
            fingerprint: "g".into(),
            urls: vec!["v".into()],
            train_shards: 3,
        });
        weights.push((4, vec![1, 3]));
        spec.validate().unwrap();
        let sources = |round: u64| (0..8).map(|c| data_assignment(&spec, round, c).unwrap().source).collect::<Vec<_>>();
        assert_eq!(sources(0), vec![0, 0, 0, 0, 1, 1, 1, 1], "weight 1 each before round 4");
        assert_eq!(sources(4), vec![0, 0, 1, 1, 1, 1, 1, 1], "1 : 3 from round 4");
        // Each dataset hands out its own shards: every one of the mixed dataset's 3 in 3 picks.
        let picks: Vec<u32> = (0..8)
            .filter_map(|c| data_assignment(&spec, 0, c))
            .filter(|d| d.source == 1)
            .map(|d| d.shard)
            .take(3)
            .collect();
        let mut sorted = picks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2]);
        assert!(data_assignment(&spec, 0, 6).unwrap().query().ends_with("&data_source=1"));
        assert_eq!(slots_by_weight(8, &[1, 3]), vec![2, 6]);
        assert_eq!(slots_by_weight(3, &[1, 1]), vec![2, 1], "ties to the earlier dataset");
        assert_eq!(slots_by_weight(4, &[0, 5]), vec![0, 4]);
        // Weights must match the datasets and come in increasing rounds.
        let DataSource::Manifest { weights, .. } = &mut spec.data.source else { unreachable!() };
        weights.push((4, vec![1, 1]));
        assert!(spec.validate().unwrap_err().contains("increasing rounds"));
    }

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
