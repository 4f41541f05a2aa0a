//! DiLoCo in one process on the tiny model.

use tch::Device;
use tessera_aggregate::OuterConfig;
use tessera_data::{Dataset, SyntheticSpec};
use tessera_model::preset;
use tessera_protocol::Codec;
use tessera_train::diloco::{DilocoConfig, run_diloco};
use tessera_train::{TrainConfig, Trainer};

fn dataset() -> Dataset {
    Dataset::synthetic(SyntheticSpec::default(), 50_000, 5_000).unwrap()
}

fn inner() -> TrainConfig {
    TrainConfig {
        steps: 0,
        batch_size: 8,
        seq_len: 32,
        warmup_steps: 2,
        lr: 3e-3,
        min_lr: 3e-4,
        eval_windows: 16,
        seed: 11,
        ..TrainConfig::default()
    }
}

/// One worker, one inner step per round, outer lr 1 without momentum: the outer step lands on
/// the worker's weights, so DiLoCo must reproduce plain training.
#[test]
fn degenerate_diloco_is_plain_training() {
    let rounds = 6;
    let config = DilocoConfig {
        workers: 1,
        inner_steps: 1,
        rounds,
        outer: OuterConfig { lr: 1.0, momentum: 0.0, nesterov: false },
        codec: Codec::F32,
        broadcast: Codec::F32,
        eval_every: rounds,
        feedback_decay: 1.0,
    };
    let summary = run_diloco(&inner(), &preset("tiny").unwrap(), &dataset(), &config, Device::Cpu, |_| {}).unwrap();
    let mut plain =
        Trainer::new(TrainConfig { steps: rounds, ..inner() }, &preset("tiny").unwrap(), dataset(), Device::Cpu)
            .unwrap();
    for _ in 0..rounds {
        plain.train_step().unwrap();
    }
    let expected = plain.evaluate().unwrap().val_loss;
    assert!((summary.final_eval.val_loss - expected).abs() < 1e-4, "{} vs {expected}", summary.final_eval.val_loss);
}

#[test]
fn several_workers_learn_and_compression_moves_fewer_bytes() {
    let config = DilocoConfig {
        workers: 2,
        inner_steps: 5,
        rounds: 8,
        outer: OuterConfig::default(),
        codec: Codec::F32,
        broadcast: Codec::F32,
        eval_every: 4,
        feedback_decay: 1.0,
    };
    let mut rounds_seen = Vec::new();
    let f32_run = run_diloco(&inner(), &preset("tiny").unwrap(), &dataset(), &config, Device::Cpu, |r| {
        rounds_seen.push((r.round, r.eval.is_some()))
    })
    .unwrap();
    assert_eq!(rounds_seen, (1..=8).map(|r| (r, r % 4 == 0)).collect::<Vec<_>>());
    let untrained = Trainer::new(TrainConfig { steps: 1, ..inner() }, &preset("tiny").unwrap(), dataset(), Device::Cpu)
        .unwrap()
        .evaluate()
        .unwrap()
        .val_loss;
    assert!(f32_run.final_eval.val_loss < untrained - 0.5, "{} vs untrained {untrained}", f32_run.final_eval.val_loss);
    assert!(f32_run.data_parallel_bytes > 4 * (f32_run.bytes_up + f32_run.bytes_down) / 2);

    let int8 = DilocoConfig { codec: Codec::Int8 { block: 64 }, broadcast: Codec::Int8 { block: 64 }, ..config };
    let int8_run = run_diloco(&inner(), &preset("tiny").unwrap(), &dataset(), &int8, Device::Cpu, |_| {}).unwrap();
    assert!(int8_run.bytes_up * 3 < f32_run.bytes_up, "int8 {} vs f32 {}", int8_run.bytes_up, f32_run.bytes_up);
    assert!(int8_run.bytes_down < f32_run.bytes_down, "an int8 broadcast moves fewer bytes down");
    let rel = (int8_run.final_eval.val_loss - f32_run.final_eval.val_loss).abs() / f32_run.final_eval.val_loss;
    assert!(rel < 0.05, "int8 changed the loss by {rel}");
}
