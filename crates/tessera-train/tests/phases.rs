//! Growth between phases, as the hub does it: the planned phase's table is the grown model's,
//! and the grower on flat buffers computes exactly the function it started from.

use tch::Device;
use tessera_aggregate::round::Grower;
use tessera_model::{Llama, LlamaConfig};
use tessera_protocol::{RunSpec, TensorSpec};
use tessera_train::diloco::{read_params, write_params};
use tessera_train::{PhaseTarget, TorchGrower, plan_phases};

fn table(m: &Llama) -> Vec<TensorSpec> {
    m.named_parameters()
        .iter()
        .map(|(n, t)| TensorSpec { name: n.clone(), shape: t.size().iter().map(|&d| d as u64).collect() })
        .collect()
}

fn spec(model: serde_json::Value, tensors: Vec<TensorSpec>) -> RunSpec {
    let mut s: RunSpec = serde_json::from_value(serde_json::json!({
        "name": "t", "model": {}, "tensors": [], "data": {"name": "d", "fingerprint": "", "source": {"kind": "external"}},
        "inner": {"batch_size": 1, "seq_len": 8, "lr": 0.001, "min_lr": 0.0001, "warmup_steps": 1, "grad_clip": 1.0, "weight_decay": 0.0},
        "inner_steps": 1, "rounds": 2, "outer": {"lr": 0.7, "momentum": 0.9, "nesterov": true}, "codec": "f32",
        "broadcast_codec": "f32", "quorum": 1, "round_deadline_ms": 1000, "max_staleness": 1, "staleness_decay": 0.5, "seed": 1
    }))
    .unwrap();
    s.model = model;
    s.tensors = tensors;
    s
}

/// The hub's grower, on the flat buffers the hub keeps, computes the grown model's function
/// exactly: logits before and after match.
#[test]
fn the_hubs_grower_preserves_the_function_on_flat_buffers() {
    let small = tessera_model::preset("tiny").unwrap();
    let model = Llama::new(&small, Device::Cpu, 5).unwrap();
    let nano = PhaseTarget {
        model: "nano".into(),
        config: tessera_model::preset("nano").unwrap(),
        rounds: 1,
        qualify_top: None,
        until_loss: None,
    };
    let phases = plan_phases(&small, &[nano], 7).unwrap();
    assert_eq!((phases[0].seed, phases[0].rounds), (8, 1));
    let from = spec(serde_json::to_value(&small).unwrap(), table(&model));
    let to = spec(phases[0].model.clone(), phases[0].tensors.clone());
    let theta = read_params(&model).unwrap();
    let zeros: Vec<Vec<f32>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
    let grown = TorchGrower.grow(&from, &to, phases[0].seed, &theta, &zeros, &zeros).unwrap();
    let big = Llama::zeroed(&LlamaConfig::from_json(to.model.clone()).unwrap(), Device::Cpu).unwrap();
    assert_eq!(table(&big), to.tensors);
    write_params(&big, &grown.theta).unwrap();
    let tokens = tch::Tensor::from_slice(&[1i64, 5, 9, 2, 7, 3, 3, 8]).view([1, 8]);
    let (a, b) = (model.forward(&tokens, None).unwrap(), big.forward(&tokens, None).unwrap());
    assert!(f64::try_from((a - b).abs().max()).unwrap() <= 1e-5);
    assert!(grown.momentum.iter().flatten().all(|&v| v == 0.0));
    // Buffers that do not fit the table are an error, not a panic.
    assert!(TorchGrower.grow(&from, &to, 0, &theta[1..], &zeros, &zeros).is_err());
}
