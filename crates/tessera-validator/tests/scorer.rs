//! The validator's measurements on the tiny model: a trained Δ helps, a flipped or scaled one
//! hurts, a copy is found, everything is a function of the revealed seed, and training on the
//! assigned windows shows in the data fit where training on other windows does not.

use tch::Device;
use tessera_data::{Dataset, SyntheticSpec};
use tessera_model::preset;
use tessera_train::diloco::read_params;
use tessera_train::{TrainConfig, Trainer};
use tessera_validator::{Candidate, ScoreConfig, Scorer};

const H: u64 = 30;

fn inner(worker: u64) -> TrainConfig {
    TrainConfig {
        steps: 10 * H,
        batch_size: 8,
        seq_len: 32,
        warmup_steps: 2,
        lr: 3e-3,
        min_lr: 3e-4,
        seed: 11,
        worker,
        ..TrainConfig::default()
    }
}

/// Trains `slot`'s copy from θ for H steps on `data_slot`'s windows; returns Δ = θ − θ_local.
fn delta(dataset: &Dataset, theta: &[Vec<f32>], data_slot: u64) -> Vec<Vec<f32>> {
    let config = preset("tiny").unwrap();
    let mut t = Trainer::new(inner(data_slot), &config, dataset.clone(), Device::Cpu).unwrap();
    tessera_train::diloco::write_params(&t.model, theta).unwrap();
    for _ in 0..H {
        t.train_step().unwrap();
    }
    let local = read_params(&t.model).unwrap();
    theta.iter().zip(&local).map(|(a, b)| a.iter().zip(b).map(|(a, b)| a - b).collect()).collect()
}

/// The dataset and weights trained 2H steps from initialisation, where almost any step lowers
/// the loss.
fn trained_base() -> (Dataset, Vec<Vec<f32>>) {
    let dataset = Dataset::synthetic(SyntheticSpec::default(), 60_000, 6_000).unwrap();
    let mut base = Trainer::new(inner(99), &preset("tiny").unwrap(), dataset.clone(), Device::Cpu).unwrap();
    for _ in 0..2 * H {
        base.train_step().unwrap();
    }
    let theta = read_params(&base.model).unwrap();
    (dataset, theta)
}

#[test]
fn scores_fits_and_copies() {
    tch::manual_seed(0);
    let (dataset, theta) = trained_base();
    let config = preset("tiny").unwrap();
    let candidate = |contributor: u64, delta: Vec<Vec<f32>>| Candidate {
        contributor,
        slot: contributor,
        schedule_step: 0,
        inner_steps: H,
        base_round: 0,
        delta,
        weight: 1.0,
        assigned: None,
    };
    let honest: Vec<Vec<Vec<f32>>> = (0..4).map(|slot| delta(&dataset, &theta, slot)).collect();
    let mut candidates: Vec<Candidate> =
        honest.iter().enumerate().map(|(i, d)| candidate(i as u64, d.clone())).collect();
    // 4: trained on slot 1004's windows but assigned slot 4; 5: 1's work scaled ×100 (a copy
    // too: cosine does not see scale); 6: a copy of 0.
    candidates.push(candidate(4, delta(&dataset, &theta, 1004)));
    candidates.push(candidate(5, honest[1].iter().map(|t| t.iter().map(|v| 100.0 * v).collect()).collect()));
    candidates.push(candidate(6, honest[0].clone()));
    let mut scorer = Scorer::new(
        inner(0),
        &config,
        dataset.clone(),
        Device::Cpu,
        ScoreConfig { eval_windows: 16, fit_windows: 16, ..ScoreConfig::default() },
    )
    .unwrap();
    let seed = [3u8; 32];
    let tessera_validator::RoundScores { scored: scores, cost, held_out_loss, .. } =
        scorer.score(&theta, &candidates, &seed).unwrap();
    assert!(held_out_loss.is_finite() && held_out_loss > 0.0);
    assert!(cost.windows_forward > 0);
    for s in &scores[..5] {
        assert!(s.score > 0.0, "trained work helps: {s:?}");
    }
    assert!(scores[5].score < 0.0, "scaled work hurts: {:?}", scores[5]);
    assert_eq!(
        scores.iter().map(|s| s.copy_of).collect::<Vec<_>>(),
        vec![None, None, None, None, None, Some(1), Some(0)]
    );
    assert!(scores.iter().all(|s| s.data_fit.is_some_and(f64::is_finite)));
    // Each score comes with its standard error over the held-out windows: positive, and
    // smaller than the gain of trained work (16 windows tell it from noise).
    assert!(scores.iter().all(|s| s.score_se.is_some_and(|se| se.is_finite() && se > 0.0)), "{scores:?}");
    let clear = scores[..5].iter().filter(|s| s.score > 2.0 * s.score_se.unwrap()).count();
    assert!(clear >= 3, "trained work stands clear of its noise: {scores:?}");
    // Everything the scorer samples is a function of the seed.
    let again = scorer.score(&theta, &candidates, &seed).unwrap().scored;
    assert_eq!(again, scores);
    let other = scorer.score(&theta, &candidates, &[4u8; 32]).unwrap().scored;
    assert_ne!(other, scores);
    // Every score in a round was measured against one norm bound, and each submission's score
    // is recomputed from its own Δ and that bound alone (the ×100 one beyond it), as a
    // contributor's audit does.
    let bound = scores[0].norm_bound.unwrap();
    assert!(bound > 0.0 && scores.iter().all(|s| s.norm_bound == Some(bound)));
    for (k, s) in candidates.iter().zip(&scores) {
        let (score, se) = scorer.score_own(&theta, &k.delta, &seed, bound).unwrap();
        assert_eq!((score, Some(se)), (s.score, s.score_se), "contributor {}", k.contributor);
    }
    // A smaller bound clips honest work, and its score shrinks with it.
    let clipped = scorer.score_own(&theta, &candidates[0].delta, &seed, 0.1 * bound).unwrap().0;
    assert!(clipped > 0.0 && clipped < scores[0].score, "{clipped} against {}", scores[0].score);
    // A run on a published dataset brings each submission's windows cut from its shard: with
    // the training split as every shard, the measurement is the same, to the bit.
    for k in &mut candidates {
        k.assigned = Some(scorer.assigned_tokens(k, &seed, &dataset.train).unwrap());
    }
    assert_eq!(scorer.score(&theta, &candidates, &seed).unwrap().scored, scores);
    // Cut from the wrong data, the data fit moves.
    for k in &mut candidates {
        k.assigned = Some(scorer.assigned_tokens(k, &seed, &dataset.validation).unwrap());
    }
    let elsewhere = scorer.score(&theta, &candidates, &seed).unwrap().scored;
    assert_ne!(
        elsewhere.iter().map(|s| s.data_fit).collect::<Vec<_>>(),
        scores.iter().map(|s| s.data_fit).collect::<Vec<_>>()
    );
    assert!(scorer.assigned_tokens(&candidates[0], &seed, &dataset.train[..4]).is_err());
}

/// Work trained on its assigned windows fits them better than work trained on other windows:
/// six honest contributors against three trained elsewhere, over a few seeds (one round's
/// measurement is noisy; the hub judges a contributor by its record).
#[test]
fn the_data_fit_tells_assigned_from_other_windows() {
    let (dataset, theta) = trained_base();
    let config = preset("tiny").unwrap();
    let candidates: Vec<Candidate> = (0..9u64)
        .map(|slot| Candidate {
            contributor: slot,
            slot,
            schedule_step: 0,
            inner_steps: H,
            base_round: 0,
            delta: delta(&dataset, &theta, if slot < 6 { slot } else { slot + 1000 }),
            weight: 1.0,
            assigned: None,
        })
        .collect();
    let mut scorer = Scorer::new(
        inner(0),
        &config,
        dataset.clone(),
        Device::Cpu,
        ScoreConfig { eval_windows: 4, fit_windows: 32, ..ScoreConfig::default() },
    )
    .unwrap();
    let (mut honest, mut wrong) = (Vec::new(), Vec::new());
    for seed in 0..4u8 {
        let scores = scorer.score(&theta, &candidates, &[seed; 32]).unwrap().scored;
        for s in scores {
            let f = s.data_fit.unwrap();
            if s.contributor < 6 { honest.push(f) } else { wrong.push(f) }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!("data fit: honest {:.4}, other windows {:.4}", mean(&honest), mean(&wrong));
    assert!(mean(&honest) > mean(&wrong) + 0.005, "honest {honest:?}\nother windows {wrong:?}");
}

/// Scored at a small step, a submission's score is what it adds to a mean of submissions to
/// first order: the mean of four honest Δs scores the mean of their scores, where scored alone
/// (step 1) the mean gains the noise it averaged out. Pooling several workers' Δs into one
/// submission then earns no more than the parts.
#[test]
fn a_small_step_scores_a_pooled_submission_as_the_mean_of_its_parts() {
    let (dataset, theta) = trained_base();
    let config = preset("tiny").unwrap();
    let parts: Vec<Vec<Vec<f32>>> = (0..4).map(|slot| delta(&dataset, &theta, slot)).collect();
    let pooled: Vec<Vec<f32>> = (0..parts[0].len())
        .map(|t| (0..parts[0][t].len()).map(|j| parts.iter().map(|p| p[t][j]).sum::<f32>() / 4.0).collect())
        .collect();
    let seed = [5u8; 32];
    let gap = |step: f64| {
        let scorer = Scorer::new(
            inner(0),
            &config,
            dataset.clone(),
            Device::Cpu,
            ScoreConfig { eval_windows: 16, fit_windows: 4, step },
        )
        .unwrap();
        // A bound no Δ reaches: the step alone is compared.
        let score = |d: &Vec<Vec<f32>>| scorer.score_own(&theta, d, &seed, f64::MAX).unwrap().0;
        let parts_mean = parts.iter().map(&score).sum::<f64>() / 4.0;
        (score(&pooled) - parts_mean, parts_mean)
    };
    let (alone, _) = gap(1.0);
    let (small, mean) = gap(0.05);
    assert!(alone > 0.0, "scored alone, the pooled Δ gains from the averaging: {alone}");
    assert!(small.abs() < 0.1 * mean.abs() && small.abs() < 0.25 * alone, "{small} against {alone} (mean {mean})");
}
