//! End-to-end trainer behaviour on the tiny model: learning, exact resume, metrics and
//! checkpoints.

use tch::Device;
use tessera_data::{Dataset, SyntheticSpec};
use tessera_model::{load_checkpoint, preset};
use tessera_train::{TrainConfig, Trainer};

fn dataset() -> Dataset {
    Dataset::synthetic(SyntheticSpec::default(), 50_000, 5_000).unwrap()
}

fn config(steps: u64) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: 8,
        seq_len: 32,
        warmup_steps: 3,
        lr: 3e-3,
        min_lr: 3e-4,
        eval_interval: 1000,
        eval_windows: 16,
        seed: 7,
        ..TrainConfig::default()
    }
}

fn trainer(steps: u64) -> Trainer {
    Trainer::new(config(steps), &preset("tiny").unwrap(), dataset(), Device::Cpu).unwrap()
}

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    tch::set_num_threads(1);
    let mut full = trainer(12);
    let full_losses: Vec<u64> = (0..12).map(|_| full.train_step().unwrap().loss.to_bits()).collect();

    let mut first = trainer(12);
    for _ in 0..5 {
        first.train_step().unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("checkpoint");
    first.save(&ckpt).unwrap();
    drop(first);

    let mut resumed = Trainer::resume(&ckpt, dataset(), Device::Cpu, None).unwrap();
    assert_eq!(resumed.step(), 5);
    let resumed_losses: Vec<u64> = (5..12).map(|_| resumed.train_step().unwrap().loss.to_bits()).collect();
    assert_eq!(resumed_losses, full_losses[5..], "losses after resume differ");
    for ((name, a), (_, b)) in full.model.named_parameters().iter().zip(resumed.model.named_parameters().iter()) {
        assert!(a.equal(b), "{name} differs after resume");
    }
}

#[test]
fn training_lowers_validation_loss_and_writes_metrics_and_checkpoint() {
    let mut t = trainer(60);
    let before = t.evaluate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let summary = t.run(Some(dir.path()), None, false).unwrap();
    assert_eq!(summary.steps, 60);
    assert!(
        summary.final_eval.val_loss < before.val_loss - 0.5,
        "val loss {} → {}",
        before.val_loss,
        summary.final_eval.val_loss
    );
    assert!(summary.final_eval.floor_gap.is_some());

    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["event"], "start");
    assert_eq!(lines.iter().filter(|l| l["event"] == "train").count(), 60);
    assert!(lines.iter().any(|l| l["event"] == "eval" && l["step"] == 60));

    let (model, tokenizer) = load_checkpoint(&dir.path().join("checkpoint"), Device::Cpu).unwrap();
    assert_eq!(tokenizer.unwrap().vocab_size() as i64, model.config.vocab_size);
}

#[test]
fn resume_refuses_a_different_dataset() {
    let mut t = trainer(4);
    t.train_step().unwrap();
    let dir = tempfile::tempdir().unwrap();
    t.save(dir.path()).unwrap();
    let other = Dataset::synthetic(SyntheticSpec { seed: 5, ..SyntheticSpec::default() }, 50_000, 5_000).unwrap();
    let err = Trainer::resume(dir.path(), other, Device::Cpu, None).err().unwrap().to_string();
    assert!(err.contains("trained on"), "{err}");
}

/// Splitting a step's batch into micro-batches changes only the arithmetic order: the data and
/// the update are the same.
#[test]
fn gradient_accumulation_matches_the_full_batch() {
    let full = TrainConfig { batch_size: 8, grad_accum: 1, ..config(4) };
    let split = TrainConfig { batch_size: 2, grad_accum: 4, ..config(4) };
    let mut a = Trainer::new(full, &preset("tiny").unwrap(), dataset(), Device::Cpu).unwrap();
    let mut b = Trainer::new(split, &preset("tiny").unwrap(), dataset(), Device::Cpu).unwrap();
    for _ in 0..2 {
        let (la, lb) = (a.train_step().unwrap().loss, b.train_step().unwrap().loss);
        assert!((la - lb).abs() < 1e-5, "loss {la} vs {lb}");
    }
    for ((name, x), (_, y)) in a.model.named_parameters().iter().zip(b.model.named_parameters().iter()) {
        assert!(x.allclose(y, 1e-5, 1e-6, false), "{name} differs between accumulated and full batch");
    }
}

/// Replicas of one worker (one per device) split the batch one device with their combined
/// batch would train: replica 0 draws exactly a lone worker's windows, and from the same
/// weights the replicas' mean loss is the combined batch's loss.
#[test]
fn replicas_split_the_combined_batch() {
    let replica = |r: usize| TrainConfig { batch_size: 4, replicas: 2, replica: r, ..config(4) };
    let new = |c: TrainConfig| Trainer::new(c, &preset("tiny").unwrap(), dataset(), Device::Cpu).unwrap();
    let lone = new(TrainConfig { batch_size: 4, ..config(4) }).train_step().unwrap().loss;
    let first = new(replica(0)).train_step().unwrap().loss;
    let second = new(replica(1)).train_step().unwrap().loss;
    let both = new(TrainConfig { batch_size: 8, ..config(4) }).train_step().unwrap().loss;
    assert_eq!(lone.to_bits(), first.to_bits(), "replica 0 trains a lone worker's windows");
    assert_ne!(first, second, "replica 1 trains other windows");
    assert!(((first + second) / 2.0 - both).abs() < 1e-5, "{first} and {second} vs the combined batch's {both}");
    let err = Trainer::new(replica(2), &preset("tiny").unwrap(), dataset(), Device::Cpu).err().unwrap();
    assert!(err.to_string().contains("replica 2 of 2"), "{err}");
}

#[test]
fn bad_setups_are_refused() {
    let long = TrainConfig { seq_len: 64, ..config(4) };
    let err = Trainer::new(long, &preset("tiny").unwrap(), dataset(), Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("exceeds the model's context"), "{err}");
}

/// A save killed after removing the old checkpoint but before renaming the new one into place
/// leaves only the complete `.partial`: resuming finishes the save and loses nothing.
#[test]
fn a_save_interrupted_before_its_rename_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let mut t = trainer(6);
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    t.save(&ckpt).unwrap();
    // What the kill leaves behind: the new checkpoint under its side name, no old one.
    std::fs::rename(&ckpt, ckpt.with_extension("partial")).unwrap();
    assert!(Trainer::recover(&ckpt).unwrap());
    let resumed = Trainer::resume(&ckpt, dataset(), Device::Cpu, None).unwrap();
    assert_eq!(resumed.step(), 3);
    // Nothing to recover: an empty directory stays without a checkpoint.
    assert!(!Trainer::recover(&dir.path().join("none")).unwrap());
}
