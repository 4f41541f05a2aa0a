//! Growth between a run's phases: planning each later phase's model as a function-preserving
//! growth of the one before (so its config and tensor table are fixed when the run is
//! created), and [`TorchGrower`], the hub's [`Grower`]: `tessera_model::grow` applied to the
//! flat buffers the hub keeps (weights, outer momentum, broadcast residual).

use std::collections::HashMap;

use tessera_aggregate::round::{Grower, Grown};
use tessera_model::{Growth, LlamaConfig, ModelError};
use tessera_protocol::api::PhaseSpec;
use tessera_protocol::{RunSpec, TensorSpec};

/// A later phase as asked for: a target model and how long the phase lasts.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseTarget {
    /// A preset name or a config.json (its vocabulary and embedding tie are the run's).
    pub model: String,
    pub config: LlamaConfig,
    pub rounds: u64,
    pub qualify_top: Option<u32>,
    pub until_loss: Option<f64>,
}

/// Plans each target as a growth of the phase before it, starting from `first`: phase `i + 2`
/// gets seed `seed + 1 + i` for the weights growth adds.
pub fn plan_phases(first: &LlamaConfig, targets: &[PhaseTarget], seed: u64) -> Result<Vec<PhaseSpec>, ModelError> {
    let mut prev = first.clone();
    let mut phases = Vec::with_capacity(targets.len());
    for (i, t) in targets.iter().enumerate() {
        let mut target = t.config.clone();
        target.vocab_size = prev.vocab_size;
        target.tie_word_embeddings = prev.tie_word_embeddings;
        let seed = seed.wrapping_add(1 + i as u64);
        let growth = Growth::plan(&prev, &target, seed)?;
        let tensors = growth
            .to
            .parameter_shapes()
            .into_iter()
            .map(|(name, shape)| TensorSpec { name, shape: shape.iter().map(|&d| d as u64).collect() })
            .collect();
        let model = serde_json::to_value(&growth.to)
            .map_err(|e| ModelError::Config { path: t.model.clone(), message: e.to_string() })?;
        phases.push(PhaseSpec {
            name: format!("phase {} ({})", i + 2, t.model),
            model,
            tensors,
            rounds: t.rounds,
            seed,
            qualify_top: t.qualify_top,
            until_loss: t.until_loss,
        });
        prev = growth.to;
    }
    Ok(phases)
}

/// The hub's growth between phases: `tessera_model::grow` on flat f32 buffers, on the CPU.
pub struct TorchGrower;

impl Grower for TorchGrower {
    fn grow(
        &self,
        from: &RunSpec,
        to: &RunSpec,
        seed: u64,
        theta: &[Vec<f32>],
        momentum: &[Vec<f32>],
        residual: &[Vec<f32>],
    ) -> Result<Grown, String> {
        let config = |v: &serde_json::Value| LlamaConfig::from_json(v.clone());
        let growth = Growth::plan(&config(&from.model)?, &config(&to.model)?, seed).map_err(|e| e.to_string())?;
        let named = |buffers: &[Vec<f32>]| -> Result<HashMap<String, tch::Tensor>, String> {
            if buffers.len() != from.tensors.len() {
                return Err(format!("{} buffers for {} tensors", buffers.len(), from.tensors.len()));
            }
            from.tensors
                .iter()
                .zip(buffers)
                .map(|(t, b)| {
                    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
                    let v =
                        tch::Tensor::from_slice(b).f_view(shape.as_slice()).map_err(|e| format!("{}: {e}", t.name))?;
                    Ok((t.name.clone(), v))
                })
                .collect()
        };
        let flat = |grown: HashMap<String, tch::Tensor>| -> Result<Vec<Vec<f32>>, String> {
            to.tensors
                .iter()
                .map(|t| {
                    let g = grown.get(&t.name).ok_or_else(|| format!("growth produced no {}", t.name))?;
                    Vec::<f32>::try_from(g.flatten(0, -1)).map_err(|e| e.to_string())
                })
                .collect()
        };
        let err = |e: ModelError| e.to_string();
        Ok(Grown {
            theta: flat(growth.weights(&named(theta)?).map_err(err)?)?,
            momentum: flat(growth.moments(&named(momentum)?, 1).map_err(err)?)?,
            residual: flat(growth.moments(&named(residual)?, 1).map_err(err)?)?,
        })
    }
}
