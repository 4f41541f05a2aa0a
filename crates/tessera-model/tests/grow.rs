//! Growth preserves the function exactly (logits within 1e-5) for each operator alone and all
//! together, and every new parameter learns.

use tch::{Device, Kind, Tensor};
use tessera_model::{Growth, Llama, LlamaConfig, grow, preset};

fn base() -> LlamaConfig {
    // tiny: width 32, 2 layers, 4 heads over 2 K/V heads (head size 8), MLP 64, vocab 64.
    preset("tiny").unwrap()
}

fn tokens() -> Tensor {
    Tensor::from_slice(&(0..2 * 24).map(|i| (i * 37 + 11) % 64).collect::<Vec<i64>>()).view([2, 24])
}

/// A trained-looking source: random weights with norm gains away from one.
fn source() -> Llama {
    let m = Llama::new(&base(), Device::Cpu, 3).unwrap();
    for (name, mut t) in m.named_parameters() {
        if name.contains("norm") {
            tch::no_grad(|| {
                t.copy_(&(Tensor::rand(t.size().as_slice(), (Kind::Float, Device::Cpu)) + 0.5));
            });
        }
    }
    m
}

fn max_logit_diff(a: &Llama, b: &Llama) -> f64 {
    let (la, lb) = (a.forward(&tokens(), None).unwrap(), b.forward(&tokens(), None).unwrap());
    f64::try_from((la - lb).abs().max()).unwrap()
}

fn check(to: LlamaConfig) -> (Llama, Llama, Growth) {
    let small = source();
    let (big, growth) = grow(&small, &to, 9).unwrap();
    let diff = max_logit_diff(&small, &big);
    assert!(diff <= 1e-5, "logits moved by {diff:e} growing to {:?}", growth.to);
    (small, big, growth)
}

#[test]
fn wider_hidden_size_preserves_the_function() {
    let (_, big, g) = check(LlamaConfig { hidden_size: 48, head_dim: Some(8), ..base() });
    assert_eq!(big.config.hidden_size, 48);
    assert!((g.to.rms_norm_eps - base().rms_norm_eps * 32.0 / 48.0).abs() < 1e-20);
}

#[test]
fn wider_mlp_preserves_the_function() {
    check(LlamaConfig { intermediate_size: 96, ..base() });
}

#[test]
fn more_heads_preserve_the_function() {
    // Same grouping (2 query heads per K/V head), more of both.
    check(LlamaConfig { hidden_size: 48, num_attention_heads: 6, num_key_value_heads: Some(3), ..base() });
}

#[test]
fn a_new_grouped_query_ratio_preserves_the_function() {
    // 4 over 2 K/V heads → 6 over 6: each old K/V head is copied for each of its query heads.
    check(LlamaConfig { hidden_size: 48, num_attention_heads: 6, num_key_value_heads: Some(6), ..base() });
    // …and one the layout cannot hold is refused with the reason.
    // 6 query heads over 2 K/V heads (3 per group) cannot become 6 over 3 (2 per group): each old
    // group would need two K/V heads, four in all.
    let six = LlamaConfig { hidden_size: 48, num_attention_heads: 6, num_key_value_heads: Some(2), ..base() };
    let e = Growth::plan(&six, &LlamaConfig { num_key_value_heads: Some(3), ..six.clone() }, 0).unwrap_err();
    assert!(e.to_string().contains("K/V heads"), "{e}");
}

#[test]
fn deeper_preserves_the_function() {
    check(LlamaConfig { num_hidden_layers: 5, ..base() });
}

#[test]
fn all_at_once_preserves_the_function_and_everything_new_learns() {
    let to = LlamaConfig {
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: Some(4),
        max_position_embeddings: 64,
        ..base()
    };
    let (small, big, growth) = check(to);
    // Growing twice composes: grow the grown model again.
    let again = LlamaConfig { num_hidden_layers: 6, intermediate_size: 192, ..growth.to.clone() };
    let (bigger, _) = grow(&big, &again, 10).unwrap();
    assert!(max_logit_diff(&small, &bigger) <= 1e-5);

    // Two AdamW-free SGD steps: every grown tensor moves, new parts included.
    let before: Vec<(String, Tensor)> =
        big.named_parameters().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    let x = tokens();
    let (inputs, targets) = (x.narrow(1, 0, 23).contiguous(), x.narrow(1, 1, 23).contiguous());
    for _ in 0..2 {
        let loss = big.loss(&inputs, &targets).unwrap();
        for (_, t) in big.named_parameters() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        loss.backward();
        tch::no_grad(|| {
            for (_, mut t) in big.named_parameters() {
                let g = t.grad();
                let _ = t.f_sub_(&(g * 0.1)).unwrap();
            }
        });
    }
    let d = base().hidden_size;
    for ((name, old), (_, new)) in before.iter().zip(big.named_parameters()) {
        let moved = (&new - old).abs();
        assert!(f64::try_from(moved.max()).unwrap() > 0.0, "{name} did not learn");
        // The new residual coordinates of output projections learn too (they started at zero).
        if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
            let fresh_rows = moved.narrow(0, d, new.size()[0] - d);
            assert!(f64::try_from(fresh_rows.max()).unwrap() > 0.0, "{name}: new rows stay zero");
        }
    }
    // New MLP rows are not copies of one another.
    let gate = before.iter().find(|(n, _)| n == "model.layers.0.mlp.gate_proj.weight").unwrap().1.shallow_clone();
    let (a, b) = (gate.get(100), gate.get(101));
    assert!(f64::try_from((a - b).abs().max()).unwrap() > 0.0);
}

#[test]
fn moments_follow_the_weights_with_zeros_for_everything_new() {
    let small = source();
    let to = LlamaConfig {
        hidden_size: 48,
        num_attention_heads: 6,
        num_key_value_heads: Some(3),
        num_hidden_layers: 3,
        ..base()
    };
    let growth = Growth::plan(&small.config, &to, 1).unwrap();
    let ones: std::collections::HashMap<String, Tensor> =
        small.named_parameters().into_iter().map(|(n, t)| (n, t.ones_like())).collect();
    let m = growth.moments(&ones, -1).unwrap();
    let v = growth.moments(&ones, -2).unwrap();
    let c = (32.0f64 / 48.0).sqrt();
    let norm = &m["model.norm.weight"];
    assert!((f64::try_from(norm.get(0)).unwrap() - 1.0 / c).abs() < 1e-6);
    assert_eq!(f64::try_from(norm.get(40)).unwrap(), 0.0);
    assert!((f64::try_from(v["model.norm.weight"].get(0)).unwrap() - 1.0 / (c * c)).abs() < 1e-6);
    // A copied weight keeps its moment; new entries and inserted layers start at zero.
    let q = &m["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(f64::try_from(q.get(0).get(0)).unwrap(), 1.0);
    assert_eq!(f64::try_from(q.get(0).get(40)).unwrap(), 0.0);
    let inserted = growth.to.num_hidden_layers - 1;
    let total: f64 = m
        .iter()
        .filter(|(n, _)| n.starts_with(&format!("model.layers.{inserted}.")))
        .map(|(_, t)| f64::try_from(t.abs().sum(Kind::Double)).unwrap())
        .sum();
    assert_eq!(total, 0.0);
}

/// New second moments start at the mean of the carried ones of their kind, never at zero.
#[test]
fn new_second_moments_start_at_their_kinds_mean() {
    let small = source();
    let to = LlamaConfig {
        hidden_size: 48,
        num_attention_heads: 6,
        num_key_value_heads: Some(3),
        num_hidden_layers: 3,
        ..base()
    };
    let growth = Growth::plan(&small.config, &to, 1).unwrap();
    // Layer k's second moments are all k + 1, the rest 5.
    let v: std::collections::HashMap<String, Tensor> = small
        .named_parameters()
        .into_iter()
        .map(|(n, t)| {
            let k = n
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .map_or(5.0, |k| k.parse::<f64>().unwrap() + 1.0);
            (n, t.ones_like() * k)
        })
        .collect();
    let grown = growth.second_moments(&v).unwrap();
    let layers = small.config.num_hidden_layers;
    let mean = (1..=layers).map(|k| k as f64).sum::<f64>() / layers as f64;
    let q0 = &grown["model.layers.0.self_attn.q_proj.weight"];
    assert_eq!(f64::try_from(q0.get(0).get(0)).unwrap(), 1.0, "a carried entry keeps its moment");
    assert!((f64::try_from(q0.get(0).get(40)).unwrap() - mean).abs() < 1e-6, "a new column gets its kind's mean");
    let inserted = growth.to.num_hidden_layers - 1;
    let down = &grown[&format!("model.layers.{inserted}.mlp.down_proj.weight")];
    assert!((f64::try_from(down.min()).unwrap() - mean).abs() < 1e-6);
    assert!((f64::try_from(down.max()).unwrap() - mean).abs() < 1e-6);
    let emb = &grown["model.embed_tokens.weight"];
    assert_eq!(f64::try_from(emb.get(0).get(40)).unwrap(), 5.0);
    // Nothing new anywhere is zero.
    for (name, t) in &grown {
        assert!(f64::try_from(t.min()).unwrap() > 0.0, "{name} has a zero second moment");
    }
}

#[test]
fn shrinking_or_changing_the_vocabulary_is_refused() {
    for to in [
        LlamaConfig { hidden_size: 16, head_dim: Some(8), ..base() },
        LlamaConfig { num_hidden_layers: 1, ..base() },
        LlamaConfig { vocab_size: 65, ..base() },
    ] {
        assert!(Growth::plan(&base(), &to, 0).is_err());
    }
}

#[test]
fn a_tied_head_grows_too() {
    let tied = LlamaConfig { tie_word_embeddings: true, ..base() };
    let small = Llama::new(&tied, Device::Cpu, 4).unwrap();
    let to = LlamaConfig {
        hidden_size: 64,
        num_attention_heads: 8,
        num_key_value_heads: Some(4),
        num_hidden_layers: 3,
        ..tied
    };
    let (big, _) = grow(&small, &to, 2).unwrap();
    assert!(max_logit_diff(&small, &big) <= 1e-5);
}

#[test]
fn a_source_tensor_of_the_wrong_shape_is_an_error_not_a_panic() {
    let small = source();
    let growth = Growth::plan(&small.config, &LlamaConfig { hidden_size: 48, head_dim: Some(8), ..base() }, 0).unwrap();
    let mut weights: std::collections::HashMap<String, Tensor> =
        small.named_parameters().into_iter().map(|(n, t)| (n, t.detach())).collect();
    weights.insert("model.norm.weight".into(), Tensor::ones([7], (Kind::Float, Device::Cpu)));
    let e = growth.weights(&weights).unwrap_err();
    assert!(e.to_string().contains("model.norm.weight"), "{e}");
}
