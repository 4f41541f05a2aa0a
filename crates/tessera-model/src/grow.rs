//! Function-preserving growth: a larger Llama that computes exactly what a smaller one did, with
//! room to learn more.
//!
//! Every growth keeps the residual stream's new coordinates at zero and every new path's output
//! at zero, so the logits do not change; the new weights that read those zeros are random, so
//! they differ from one another and learn once the zero outputs move (which their gradients do
//! at the first step).
//!
//! - **Hidden size d → d′.** New embedding columns and every new output row (`o_proj`,
//!   `down_proj`) are zero, so the new residual coordinates stay zero. RMSNorm averages over d′
//!   now: old gains are scaled by c = √(d/d′) and ε by d/d′, which makes every norm's output on
//!   the old coordinates exactly what it was. New input columns of q/k/v/gate/up and of an untied
//!   head are random (they multiply zeros).
//! - **MLP size f → f′.** New `gate`/`up` rows are random, new `down` columns zero.
//! - **Heads.** Head size stays fixed (set explicitly when d′/h′ would change it). Query heads
//!   are laid out so that every old head still reads (a copy of) its old K/V head — groups of the
//!   new grouped-query ratio are filled with an old group's heads, the old K/V head copied into
//!   as many new K/V heads as its queries need. Every other query or K/V head is new and random,
//!   and its `o_proj` columns are zero.
//! - **Depth L → L′.** New layers are spread evenly (after old layer k come ⌊(k+1)E/L⌋ − ⌊kE/L⌋
//!   of the E new ones); each is a copy of the grown layer before it with `o_proj` and
//!   `down_proj` at zero: the identity on the residual stream.
//!
//! The AdamW moments of a grown parameter follow the same map with zeros for everything new
//! ([`Growth::moments`]), except that a new entry's second moment starts at the mean of the
//! carried ones of its kind ([`Growth::second_moments`], which says why); where a norm gain was scaled by c its gradient scales by 1/c, so the
//! first moment is scaled by 1/c and the second by 1/c². A duplicated K/V head starts from the
//! original's moments (its gradient is now the share of its own query heads: an approximation).
//! RoPE's θ and the head size are kept; the context length may grow.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::{LlamaConfig, ModelError};

/// A planned growth from one configuration to a larger one.
#[derive(Debug, Clone)]
pub struct Growth {
    pub from: LlamaConfig,
    /// The grown model's configuration: the target's sizes with the source's head size, RoPE and
    /// activation, and ε scaled for the wider norm.
    pub to: LlamaConfig,
    /// For each new query head, the old one it is (`None`: new).
    q_heads: HeadMap,
    /// For each new K/V head, the old one it copies (`None`: new).
    kv_heads: HeadMap,
    /// For each new layer, the old layer it is (`Ok`) or the new layer it copies with zeroed
    /// outputs (`Err`).
    layers: Vec<Result<i64, usize>>,
    seed: u64,
}

fn bad(message: String) -> ModelError {
    ModelError::Config { path: "<growth>".into(), message }
}

/// What fills a grown tensor's new entries, and how old norm gains scale.
#[derive(Clone, Copy)]
enum Fill {
    /// Weights: random where new entries read zeros, gains × c.
    Weights,
    /// AdamW moments: zeros everywhere new, gains' moments × c^power.
    Moments { power: i32 },
}

impl Growth {
    /// Plans growing `from` to `to`'s sizes. Every size may stay or grow, nothing may shrink;
    /// vocabulary, tying, activation and biases must match. `seed` draws the new weights.
    pub fn plan(from: &LlamaConfig, to: &LlamaConfig, seed: u64) -> Result<Growth, ModelError> {
        from.validate().map_err(bad)?;
        let checks = [
            ("hidden size", from.hidden_size, to.hidden_size),
            ("intermediate size", from.intermediate_size, to.intermediate_size),
            ("layers", from.num_hidden_layers, to.num_hidden_layers),
            ("attention heads", from.num_attention_heads, to.num_attention_heads),
            ("key/value heads", from.kv_heads(), to.kv_heads()),
            ("context", from.max_position_embeddings, to.max_position_embeddings),
        ];
        for (what, a, b) in checks {
            if b < a {
                return Err(bad(format!("{what} would shrink from {a} to {b}: growth only grows")));
            }
        }
        if from.vocab_size != to.vocab_size || from.tie_word_embeddings != to.tie_word_embeddings {
            return Err(bad("growth keeps the vocabulary and whether the head is tied".into()));
        }
        if from.hidden_act != to.hidden_act || from.attention_bias || from.mlp_bias || to.attention_bias || to.mlp_bias
        {
            return Err(bad("growth needs the same activation and no biases".into()));
        }
        let hd = from.head_dim();
        let grown = LlamaConfig {
            hidden_size: to.hidden_size,
            intermediate_size: to.intermediate_size,
            num_hidden_layers: to.num_hidden_layers,
            num_attention_heads: to.num_attention_heads,
            num_key_value_heads: Some(to.kv_heads()),
            head_dim: (to.hidden_size != to.num_attention_heads * hd || from.head_dim.is_some()).then_some(hd),
            max_position_embeddings: to.max_position_embeddings,
            rms_norm_eps: from.rms_norm_eps * from.hidden_size as f64 / to.hidden_size as f64,
            ..from.clone()
        };
        grown.validate().map_err(bad)?;
        let (q_heads, kv_heads) = head_layout(from, &grown)?;
        let (l, l2) = (from.num_hidden_layers, grown.num_hidden_layers);
        let extra = l2 - l;
        let mut layers = Vec::with_capacity(l2 as usize);
        for k in 0..l {
            layers.push(Ok(k));
            let copy_of = layers.len() - 1;
            for _ in 0..((k + 1) * extra / l - k * extra / l) {
                layers.push(Err(copy_of));
            }
        }
        Ok(Growth { from: from.clone(), to: grown, q_heads, kv_heads, layers, seed })
    }

    /// The grown weights, by Hugging Face name, from the source's.
    pub fn weights(&self, source: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, ModelError> {
        self.map(source, Fill::Weights)
    }

    /// The grown AdamW first (`power` −1) or second (`power` −2) moments, from the source's:
    /// carried entries follow the weights' map, new entries are zero.
    pub fn moments(&self, source: &HashMap<String, Tensor>, power: i32) -> Result<HashMap<String, Tensor>, ModelError> {
        self.map(source, Fill::Moments { power })
    }

    /// The grown second moments with every new entry set to the mean of the carried entries of
    /// its kind of tensor (the same name in every layer, e.g. all `mlp.down_proj.weight`).
    ///
    /// AdamW's bias correction uses one step count for the whole model, so after growth at step
    /// t it is ≈ 1: a new entry whose second moment started at zero would take updates several
    /// times the learning rate (m/√v ≈ 0.1g/√(0.001g²) ≈ 3 at its first step, more over the next
    /// tens) until v catches up over ~1/(1−β₂) steps. Starting v at the typical size of its kind,
    /// with the first moment at zero, makes a new entry's first updates small instead.
    pub fn second_moments(&self, source: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, ModelError> {
        let mut out = self.moments(source, -2)?;
        // 1 where an entry was carried over, 0 where it is new.
        let ones: HashMap<String, Tensor> = source.iter().map(|(n, t)| (n.clone(), t.ones_like())).collect();
        let carried = self.map(&ones, Fill::Moments { power: 0 })?;
        let kind = |name: &str| -> String {
            match name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) {
                Some((_, rest)) => rest.to_owned(),
                None => name.to_owned(),
            }
        };
        let mut sums: HashMap<String, (f64, f64)> = HashMap::new();
        for (name, v) in &out {
            let mask = &carried[name];
            let e = sums.entry(kind(name)).or_default();
            e.0 += f64::try_from((v * mask).sum(Kind::Double)).unwrap_or(0.0);
            e.1 += f64::try_from(mask.sum(Kind::Double)).unwrap_or(0.0);
        }
        for (name, v) in out.iter_mut() {
            let (sum, count) = sums[&kind(name)];
            if count > 0.0 {
                let fresh = carried[name].ones_like() - &carried[name];
                *v = &*v + fresh * (sum / count);
            }
        }
        Ok(out)
    }

    /// √(d/d′): how much every old norm gain shrinks.
    fn norm_scale(&self) -> f64 {
        (self.from.hidden_size as f64 / self.to.hidden_size as f64).sqrt()
    }

    fn map(&self, source: &HashMap<String, Tensor>, fill: Fill) -> Result<HashMap<String, Tensor>, ModelError> {
        // Every source tensor must have its config's shape: the copies below index by it.
        let shapes: HashMap<String, Vec<i64>> = self.from.parameter_shapes().into_iter().collect();
        let get = |name: &str| -> Result<Tensor, ModelError> {
            let t = source.get(name).ok_or_else(|| bad(format!("the source has no tensor {name}")))?;
            if shapes.get(name) != Some(&t.size()) {
                return Err(bad(format!(
                    "source tensor {name} has shape {:?}, its config {:?}",
                    t.size(),
                    shapes.get(name)
                )));
            }
            Ok(t.to_device(tch::Device::Cpu).to_kind(Kind::Float))
        };
        let mut out = HashMap::new();
        let c = self.norm_scale();
        for (name, shape) in self.to.parameter_shapes() {
            let (layer, rest) = match name.strip_prefix("model.layers.") {
                Some(r) => {
                    let (i, rest) = r.split_once('.').ok_or_else(|| bad(format!("tensor name {name}")))?;
                    (Some(i.parse::<usize>().map_err(|_| bad(format!("tensor name {name}")))?), rest.to_owned())
                }
                None => (None, name.clone()),
            };
            let t = match layer {
                None => self.grow_top(&name, &get(&name)?, &shape, fill, c)?,
                Some(i) => match self.layers[i] {
                    Ok(k) => {
                        self.grow_layer(&name, &rest, &get(&format!("model.layers.{k}.{rest}"))?, &shape, fill, c)?
                    }
                    Err(copy) => {
                        let copied = out
                            .get(&format!("model.layers.{copy}.{rest}"))
                            .map(|t: &Tensor| t.shallow_clone())
                            .ok_or_else(|| bad(format!("layer {copy} is not grown before {name}")))?;
                        let zero_output = rest.ends_with("o_proj.weight") || rest.ends_with("down_proj.weight");
                        let zero_all = matches!(fill, Fill::Moments { .. });
                        if zero_output || zero_all { copied.zeros_like() } else { copied.copy() }
                    }
                },
            };
            out.insert(name, t);
        }
        Ok(out)
    }

    /// New entries: random (weights, when they read zeros) or zero.
    fn fresh(&self, name: &str, shape: &[i64], fill: Fill, random: bool) -> Tensor {
        match fill {
            Fill::Weights if random => {
                let n = shape.iter().product::<i64>() as usize;
                let key = format!("grow {name}");
                let v = crate::llama::seeded_normal(self.seed, &key, n, self.from.initializer_range as f32);
                Tensor::from_slice(&v).view(shape)
            }
            _ => Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)),
        }
    }

    fn grow_top(&self, name: &str, t: &Tensor, shape: &[i64], fill: Fill, c: f64) -> Result<Tensor, ModelError> {
        let d = self.from.hidden_size;
        Ok(match name {
            "model.norm.weight" => self.grow_norm(t, shape, fill, c),
            // New residual coordinates start at zero; an untied head may read them at random.
            "model.embed_tokens.weight" | "lm_head.weight" => {
                let random = name == "lm_head.weight";
                let out = self.fresh(name, shape, fill, random);
                out.narrow(1, 0, d).copy_(t);
                out
            }
            _ => return Err(bad(format!("unexpected tensor {name}"))),
        })
    }

    fn grow_norm(&self, t: &Tensor, shape: &[i64], fill: Fill, c: f64) -> Tensor {
        let d = self.from.hidden_size;
        let (old_scale, new) = match fill {
            Fill::Weights => (c, c),
            Fill::Moments { power } => (c.powi(power), 0.0),
        };
        let out = Tensor::full(shape, new, (Kind::Float, tch::Device::Cpu));
        out.narrow(0, 0, d).copy_(&(t * old_scale));
        out
    }

    /// Rows of a `[heads·hd, in]` projection laid out by `map` (old head or new), its first
    /// `in_old` columns copied, the rest random (they read zero residual coordinates).
    fn grow_rows_by_head(&self, name: &str, t: &Tensor, shape: &[i64], map: &[Option<i64>], fill: Fill) -> Tensor {
        let hd = self.from.head_dim();
        let d = self.from.hidden_size;
        let out = self.fresh(name, shape, fill, true);
        // A new head's rows stay as drawn (random weights, zero moments).
        for (new, old) in map.iter().enumerate() {
            if let Some(o) = old {
                out.narrow(0, new as i64 * hd, hd).narrow(1, 0, d).copy_(&t.narrow(0, o * hd, hd));
            }
        }
        out
    }

    fn grow_layer(
        &self,
        name: &str,
        rest: &str,
        t: &Tensor,
        shape: &[i64],
        fill: Fill,
        c: f64,
    ) -> Result<Tensor, ModelError> {
        let (d, f, hd) = (self.from.hidden_size, self.from.intermediate_size, self.from.head_dim());
        Ok(match rest {
            "input_layernorm.weight" | "post_attention_layernorm.weight" => self.grow_norm(t, shape, fill, c),
            "self_attn.q_proj.weight" => self.grow_rows_by_head(name, t, shape, &self.q_heads, fill),
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
                self.grow_rows_by_head(name, t, shape, &self.kv_heads, fill)
            }
            "self_attn.o_proj.weight" => {
                // Old rows, old heads' columns copied; new rows and new heads' columns zero.
                let out = Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu));
                for (new, old) in self.q_heads.iter().enumerate() {
                    if let Some(o) = old {
                        out.narrow(0, 0, d).narrow(1, new as i64 * hd, hd).copy_(&t.narrow(1, o * hd, hd));
                    }
                }
                out
            }
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => {
                let out = self.fresh(name, shape, fill, true);
                out.narrow(0, 0, f).narrow(1, 0, d).copy_(t);
                out
            }
            "mlp.down_proj.weight" => {
                let out = Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu));
                out.narrow(0, 0, d).narrow(1, 0, f).copy_(t);
                out
            }
            _ => return Err(bad(format!("unexpected tensor {name}"))),
        })
    }
}

/// Lays out query and K/V heads so every old query head reads a copy of its old K/V head under
/// the new grouping: returns, per new query head and per new K/V head, the old one (or new).
/// Per new head, the old head it is (`None`: new).
type HeadMap = Vec<Option<i64>>;

fn head_layout(from: &LlamaConfig, to: &LlamaConfig) -> Result<(HeadMap, HeadMap), ModelError> {
    let (h, kv, h2, kv2) = (from.num_attention_heads, from.kv_heads(), to.num_attention_heads, to.kv_heads());
    let (r, r2) = (h / kv, h2 / kv2);
    let per_group = (r + r2 - 1) / r2; // new K/V heads one old group needs
    if kv * per_group > kv2 {
        return Err(bad(format!(
            "{h2} query heads over {kv2} K/V heads cannot hold {h} query heads over {kv} K/V heads exactly: \
             it needs at least {} K/V heads",
            kv * per_group
        )));
    }
    let mut q = vec![None; h2 as usize];
    let mut kvm = vec![None; kv2 as usize];
    for g in 0..kv {
        for s in 0..per_group {
            let slot = g * per_group + s;
            kvm[slot as usize] = Some(g);
            for j in 0..r2 {
                let old = s * r2 + j;
                if old < r {
                    q[(slot * r2 + j) as usize] = Some(g * r + old);
                }
            }
        }
    }
    Ok((q, kvm))
}

/// The tensors of a model, by name, on the CPU in f32: what [`Growth::weights`] reads.
pub fn named_weights(model: &crate::Llama) -> HashMap<String, Tensor> {
    model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(tch::Device::Cpu).to_kind(Kind::Float)))
        .collect()
}

/// Grows `model` into a new model on the same device.
pub fn grow(model: &crate::Llama, to: &LlamaConfig, seed: u64) -> Result<(crate::Llama, Growth), ModelError> {
    let growth = Growth::plan(&model.config, to, seed)?;
    let weights = growth.weights(&named_weights(model))?;
    let grown = crate::Llama::zeroed(&growth.to, model.device())?;
    for (name, mut var) in grown.named_parameters() {
        let t = weights.get(&name).ok_or_else(|| bad(format!("growth produced no {name}")))?;
        tch::no_grad(|| var.f_copy_(&t.to_device(var.device())))?;
    }
    Ok((grown, growth))
}
