//! The Llama decoder, top to bottom in one file.
//!
//! ```text
//! tokens ─ embed_tokens ─┬─ [ x + o_proj(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))),  n = input_layernorm(x)
//!                        │     x + down_proj(silu(gate_proj(n)) · up_proj(n)) ]  n = post_attention_layernorm(x)
//!                        └─ × num_hidden_layers ─ norm ─ lm_head (or embed_tokens, tied) ─ logits
//! ```
//!
//! Matches `transformers.LlamaForCausalLM` numerically (rotate-half RoPE, RMSNorm in f32,
//! grouped-query attention by repeating K/V heads); `scripts/hf_roundtrip.py` checks it to 1e-4.
//! Training `nano` on tinyshakespeare (char level, 2000 steps, batch 12, lr 1e-3) reaches
//! ≤ 1.90 validation nats per character — see `docs/benchmarks.md`.

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::{LlamaConfig, ModelError};

struct Attention {
    q_proj: Tensor,
    k_proj: Tensor,
    v_proj: Tensor,
    o_proj: Tensor,
}

struct Mlp {
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
}

struct Layer {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
    /// After [`Llama::fuse_for_decoding`]: `[q; k; v]` and `[gate; up]` stacked, the separate
    /// weights being views into them.
    fused: Option<(Tensor, Tensor)>,
}

/// Keys and values of past positions, per layer: `[batch, kv_heads, past, head_dim]`.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Number of positions already cached.
    pub fn len(&self) -> i64 {
        match self.layers.first() {
            Some(Some((k, _))) => k.size()[2],
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Decoding slots that share one cache, so several sequences of different lengths advance in one
/// forward pass: per layer, keys and values `[slots, kv_heads, context, head_dim]` (allocated at
/// the first write, in the kind the model computes in), and each slot's length. A sequence is
/// prefilled ([`Llama::forward`] with a [`KvCache`], alone or right-padded with others) and moved
/// into a free slot with [`BatchCache::load`] or [`BatchCache::load_row`]; [`Llama::decode_step`] then advances any set of slots by one token.
pub struct BatchCache {
    slots: usize,
    context: i64,
    layers: Vec<Option<(Tensor, Tensor)>>,
    lens: Vec<i64>,
}

impl BatchCache {
    pub fn new(model: &Llama, slots: usize) -> BatchCache {
        BatchCache {
            slots,
            context: model.config.max_position_embeddings,
            layers: (0..model.layers.len()).map(|_| None).collect(),
            lens: vec![0; slots],
        }
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions held by `slot`.
    pub fn len(&self, slot: usize) -> i64 {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// Positions each slot holds at most (the model's context).
    pub fn context(&self) -> i64 {
        self.context
    }

    /// Whether `slot` can take another token.
    pub fn has_room(&self, slot: usize) -> bool {
        self.len(slot) < self.context
    }

    /// Moves a prefilled single-sequence cache into `slot`, replacing what it held.
    pub fn load(&mut self, slot: usize, prefilled: &KvCache) -> Result<(), ModelError> {
        self.load_row(slot, prefilled, 0, prefilled.len())
    }

    /// Moves the first `len` positions of row `row` of a batched prefill into `slot`: prompts
    /// prefilled together, right-padded to the longest, each keep only their own positions (a
    /// causal model's positions before the padding never saw it).
    pub fn load_row(&mut self, slot: usize, prefilled: &KvCache, row: i64, len: i64) -> Result<(), ModelError> {
        let rows = match prefilled.layers.first() {
            Some(Some((k, _))) => k.size()[0],
            _ => 0,
        };
        if slot >= self.slots || prefilled.layers.len() != self.layers.len() || row >= rows || len > prefilled.len() {
            return Err(ModelError::Config {
                path: "<batch cache>".into(),
                message: format!(
                    "slot {slot} of {}, row {row} of {rows}, {len} of {} positions, or a cache of another model",
                    self.slots,
                    prefilled.len()
                ),
            });
        }
        for (layer, held) in self.layers.iter_mut().zip(&prefilled.layers) {
            let Some((k, v)) = held else { continue };
            let (kvh, hd) = (k.size()[1], k.size()[3]);
            let (ck, cv) = layer.get_or_insert_with(|| {
                let shape = [self.slots as i64, kvh, self.context, hd];
                (Tensor::zeros(shape, (k.kind(), k.device())), Tensor::zeros(shape, (v.kind(), v.device())))
            });
            ck.get(slot as i64).narrow(1, 0, len).copy_(&k.get(row).narrow(1, 0, len));
            cv.get(slot as i64).narrow(1, 0, len).copy_(&v.get(row).narrow(1, 0, len));
        }
        self.lens[slot] = len;
        Ok(())
    }
}

pub struct Llama {
    pub config: LlamaConfig,
    pub vs: nn::VarStore,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    /// Rotary inverse frequencies `[head_dim / 2]`, f32.
    inv_freq: Tensor,
    /// Matrix multiplies run in this kind (bf16 on CUDA); weights and norms stay f32.
    compute_kind: Kind,
}

impl Llama {
    /// A freshly initialised model: N(0, initializer_range) for matrices, with the residual
    /// projections (`o_proj`, `down_proj`) scaled by 1/√(2·layers) as in GPT-2; norms at one.
    ///
    /// Each tensor is drawn from its own ChaCha stream keyed by `(seed, name)`, on the CPU: the
    /// same seed gives the same weights on every device and thread, whatever else is using
    /// libtorch's global generator.
    pub fn new(config: &LlamaConfig, device: Device, seed: u64) -> Result<Llama, ModelError> {
        let model = Llama::zeroed(config, device)?;
        let c = &model.config;
        let std = c.initializer_range;
        let residual_std = std / (2.0 * c.num_hidden_layers as f64).sqrt();
        for (name, mut var) in model.named_parameters() {
            if var.dim() < 2 {
                continue; // norm gains stay at one
            }
            let scale =
                if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") { residual_std } else { std };
            let values = seeded_normal(seed, &name, var.numel(), scale as f32);
            let init = Tensor::from_slice(&values).view(var.size().as_slice()).to_device(device);
            tch::no_grad(|| var.f_copy_(&init))?;
        }
        Ok(model)
    }

    /// The model's structure with every matrix at zero and norms at one, for loading weights into.
    pub fn zeroed(config: &LlamaConfig, device: Device) -> Result<Llama, ModelError> {
        config.validate().map_err(|message| ModelError::Config { path: "<in memory>".into(), message })?;
        let vs = nn::VarStore::new(device);
        let c = config;
        let (d, hd) = (c.hidden_size, c.head_dim());
        let q_dim = c.num_attention_heads * hd;
        let kv_dim = c.kv_heads() * hd;
        let zero = Init::Const(0.0);

        let root = vs.root();
        let model = &root / "model";
        let embed_tokens = (&model / "embed_tokens").var("weight", &[c.vocab_size, d], zero);
        let mut layers = Vec::with_capacity(c.num_hidden_layers as usize);
        for i in 0..c.num_hidden_layers {
            let p = &model / "layers" / i;
            let attn = &p / "self_attn";
            let mlp = &p / "mlp";
            layers.push(Layer {
                input_layernorm: (&p / "input_layernorm").var("weight", &[d], Init::Const(1.0)),
                self_attn: Attention {
                    q_proj: (&attn / "q_proj").var("weight", &[q_dim, d], zero),
                    k_proj: (&attn / "k_proj").var("weight", &[kv_dim, d], zero),
                    v_proj: (&attn / "v_proj").var("weight", &[kv_dim, d], zero),
                    o_proj: (&attn / "o_proj").var("weight", &[d, q_dim], zero),
                },
                post_attention_layernorm: (&p / "post_attention_layernorm").var("weight", &[d], Init::Const(1.0)),
                mlp: Mlp {
                    gate_proj: (&mlp / "gate_proj").var("weight", &[c.intermediate_size, d], zero),
                    up_proj: (&mlp / "up_proj").var("weight", &[c.intermediate_size, d], zero),
                    down_proj: (&mlp / "down_proj").var("weight", &[d, c.intermediate_size], zero),
                },
                fused: None,
            });
        }
        let norm = (&model / "norm").var("weight", &[d], Init::Const(1.0));
        let lm_head = (!c.tie_word_embeddings).then(|| (&root / "lm_head").var("weight", &[c.vocab_size, d], zero));

        // HF: inv_freq = 1 / θ^(2i/hd) in f32; angles = position · inv_freq; emb = [angles, angles].
        let exponent = Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(Kind::Float) / hd as f64;
        let inv_freq = Tensor::pow_scalar(c.rope_theta, &exponent).reciprocal();
        let compute_kind = if device.is_cuda() { Kind::BFloat16 } else { Kind::Float };
        Ok(Llama { config: c.clone(), embed_tokens, layers, norm, lm_head, inv_freq, vs, compute_kind })
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// For serving: holds every matrix (the embedding, the head and the layers' projections;
    /// not the norms) in `kind`, and multiplies in it. In bf16 a decoding step reads half the
    /// bytes: on a CPU with AVX512-BF16/AMX it is ~1.8× faster (`docs/benchmarks.md`).
    pub fn cast_weights(&mut self, kind: Kind) {
        let _guard = tch::no_grad_guard();
        let cast = |t: &mut Tensor| {
            let c = t.to_kind(kind);
            t.set_data(&c);
        };
        cast(&mut self.embed_tokens);
        if let Some(h) = self.lm_head.as_mut() {
            cast(h);
        }
        let was_fused = self.layers.iter().any(|l| l.fused.is_some());
        for l in &mut self.layers {
            // Unstacked first: each matrix gets its own copy in `kind`, the old storage goes.
            l.fused = None;
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            for t in [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ] {
                cast(t);
            }
        }
        self.compute_kind = kind;
        if was_fused {
            self.fuse_for_decoding();
        }
    }

    /// For serving: stacks each layer's query, key and value weights into one matrix and its
    /// gate and up weights into another, so a decoding step multiplies by two matrices where it
    /// multiplied by five (fewer, larger products; the same numbers). The separate weights become
    /// views into the stacked ones: no memory is added. Not for training (the variables now share
    /// storage).
    pub fn fuse_for_decoding(&mut self) {
        let _guard = tch::no_grad_guard();
        for layer in &mut self.layers {
            if layer.fused.is_some() {
                continue;
            }
            let a = &mut layer.self_attn;
            let qkv = Tensor::cat(&[&a.q_proj, &a.k_proj, &a.v_proj], 0);
            let (q, k) = (a.q_proj.size()[0], a.k_proj.size()[0]);
            a.q_proj.set_data(&qkv.narrow(0, 0, q));
            a.k_proj.set_data(&qkv.narrow(0, q, k));
            a.v_proj.set_data(&qkv.narrow(0, q + k, k));
            let m = &mut layer.mlp;
            let gate_up = Tensor::cat(&[&m.gate_proj, &m.up_proj], 0);
            let g = m.gate_proj.size()[0];
            m.gate_proj.set_data(&gate_up.narrow(0, 0, g));
            m.up_proj.set_data(&gate_up.narrow(0, g, g));
            layer.fused = Some((qkv, gate_up));
        }
    }

    /// The kind matrix multiplies run in.
    pub fn compute_kind(&self) -> Kind {
        self.compute_kind
    }

    /// Overrides the kind matrix multiplies run in (f32 on CPU, bf16 on CUDA by default).
    pub fn set_compute_kind(&mut self, kind: Kind) {
        self.compute_kind = kind;
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Tensor {
        if self.compute_kind == Kind::Float {
            x.linear::<Tensor>(w, None)
        } else {
            x.to_kind(self.compute_kind).linear::<Tensor>(&w.to_kind(self.compute_kind), None)
        }
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Tensor {
        let kind = x.kind();
        upcast(x).rms_norm([self.config.hidden_size], Some(weight), self.config.rms_norm_eps).to_kind(kind)
    }

    // `x = x + …`, not `x += …`: the residual stream is an input of the norms' backward pass, so
    // it must not be updated in place.
    #[allow(clippy::assign_op_pattern)]
    /// Logits `[batch, seq, vocab]` (f32, or f64 for an f64 model) for `tokens` `[batch, seq]`. With a cache, `tokens`
    /// continue the cached positions and the cache is extended.
    pub fn forward(&self, tokens: &Tensor, mut cache: Option<&mut KvCache>) -> Result<Tensor, ModelError> {
        let (b, t) = tokens.size2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + t > self.config.max_position_embeddings {
            return Err(ModelError::TooLong { len: past + t, max: self.config.max_position_embeddings });
        }
        // HF: angles = position · inv_freq in f32; emb = [angles, angles].
        let positions = Tensor::arange_start(past, past + t, (Kind::Int64, self.device())).to_kind(Kind::Float);
        let angles = positions.outer(&self.inv_freq);
        let emb = Tensor::cat(&[&angles, &angles], -1);
        let (cos, sin) = (emb.cos(), emb.sin());
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize_with(self.layers.len(), || None);
        }
        // Positions attend to every cached position and causally among themselves.
        let mask = (past > 0 && t > 1).then(|| Tensor::ones([t, past + t], (Kind::Bool, self.device())).tril(past));

        let mut x = Tensor::embedding(&self.embed_tokens, tokens, -1, false, false);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let h = self.rms_norm(&x, &layer.input_layernorm);
            x = x + self.attention(&layer.self_attn, &h, &cos, &sin, mask.as_ref(), slot, b, t);
            let h = self.rms_norm(&x, &layer.post_attention_layernorm);
            let m = &layer.mlp;
            x = x + self.linear(&(self.linear(&h, &m.gate_proj).silu() * self.linear(&h, &m.up_proj)), &m.down_proj);
        }
        let x = self.rms_norm(&x, &self.norm);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(upcast(&self.linear(&x, head)))
    }

    /// One decoding step: `tokens[i]` continues the sequence in slot `slots[i]`. Returns the
    /// next-token logits `[slots.len(), vocab]` and extends each slot by one position. Every
    /// slot must hold a loaded sequence with room left.
    #[allow(clippy::assign_op_pattern)]
    pub fn decode_step(&self, slots: &[usize], tokens: &[i64], cache: &mut BatchCache) -> Result<Tensor, ModelError> {
        let n = slots.len();
        let bad = |message: String| ModelError::Config { path: "<decode step>".into(), message };
        if n == 0 || tokens.len() != n {
            return Err(bad(format!("{} tokens for {n} slots", tokens.len())));
        }
        for &s in slots {
            if s >= cache.slots || cache.lens[s] == 0 {
                return Err(bad(format!("slot {s} holds no sequence")));
            }
            if cache.lens[s] >= cache.context {
                return Err(ModelError::TooLong { len: cache.lens[s] + 1, max: cache.context });
            }
        }
        let device = self.device();
        let index = Tensor::from_slice(&slots.iter().map(|&s| s as i64).collect::<Vec<_>>()).to_device(device);
        let pos: Vec<i64> = slots.iter().map(|&s| cache.lens[s]).collect();
        let positions = Tensor::from_slice(&pos).to_device(device);
        let angles = positions.to_kind(Kind::Float).outer(&self.inv_freq);
        let emb = Tensor::cat(&[&angles, &angles], -1).view([n as i64, 1, 1, -1]);
        let (cos, sin) = (emb.cos(), emb.sin());
        // Attention reads only the positions some slot has reached; slot i sees its own 0..=pos[i].
        let span = pos.iter().max().copied().unwrap_or(0) + 1;
        let mask =
            Tensor::arange(span, (Kind::Int64, device)).view([1, 1, 1, -1]).le_tensor(&positions.view([-1, 1, 1, 1]));
        let whole = n == cache.slots && slots.iter().enumerate().all(|(i, &s)| i == s);
        let c = &self.config;
        let (h, kvh, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let tokens = Tensor::from_slice(tokens).view([n as i64, 1]).to_device(device);
        let mut x = Tensor::embedding(&self.embed_tokens, &tokens, -1, false, false);
        for (layer, held) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (ck, cv) = held.as_mut().ok_or_else(|| bad("the batch cache holds no sequence".into()))?;
            let a = &layer.self_attn;
            let hn = self.rms_norm(&x, &layer.input_layernorm);
            let (q, k, v) = match &layer.fused {
                Some((qkv, _)) => {
                    let all = self.linear(&hn, qkv);
                    (
                        all.narrow(-1, 0, h * hd),
                        all.narrow(-1, h * hd, kvh * hd),
                        all.narrow(-1, (h + kvh) * hd, kvh * hd),
                    )
                }
                None => (self.linear(&hn, &a.q_proj), self.linear(&hn, &a.k_proj), self.linear(&hn, &a.v_proj)),
            };
            let q = rope(&q.reshape([n as i64, 1, h, hd]).transpose(1, 2), &cos, &sin);
            let k = rope(&k.reshape([n as i64, 1, kvh, hd]).transpose(1, 2), &cos, &sin);
            let v = v.reshape([n as i64, 1, kvh, hd]).transpose(1, 2);
            // Write this position's keys and values into each slot.
            let at = [Some(index.shallow_clone()), None, Some(positions.shallow_clone())];
            let _ = ck.index_put_(&at, &k.squeeze_dim(2).to_kind(ck.kind()), false);
            let _ = cv.index_put_(&at, &v.squeeze_dim(2).to_kind(cv.kind()), false);
            let (held_k, held_v) = (ck.narrow(2, 0, span), cv.narrow(2, 0, span));
            let (keys, values) =
                if whole { (held_k, held_v) } else { (held_k.index_select(0, &index), held_v.index_select(0, &index)) };
            let (keys, values) = (repeat_kv(&keys, h / kvh), repeat_kv(&values, h / kvh));
            let y = Tensor::scaled_dot_product_attention(
                &q.to_kind(keys.kind()),
                &keys,
                &values,
                Some(&mask),
                0.0,
                false,
                None,
                false,
            );
            x = x + self.linear(&y.transpose(1, 2).contiguous().view([n as i64, 1, h * hd]), &a.o_proj);
            let hn = self.rms_norm(&x, &layer.post_attention_layernorm);
            let m = &layer.mlp;
            let inner = match &layer.fused {
                Some((_, gate_up)) => {
                    let both = self.linear(&hn, gate_up);
                    let i = c.intermediate_size;
                    both.narrow(-1, 0, i).silu() * both.narrow(-1, i, i)
                }
                None => self.linear(&hn, &m.gate_proj).silu() * self.linear(&hn, &m.up_proj),
            };
            x = x + self.linear(&inner, &m.down_proj);
        }
        for &s in slots {
            cache.lens[s] += 1;
        }
        let x = self.rms_norm(&x, &self.norm);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(upcast(&self.linear(&x, head)).view([n as i64, -1]))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        b: i64,
        t: i64,
    ) -> Tensor {
        let c = &self.config;
        let (h, kvh, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let q = self.linear(x, &a.q_proj).view([b, t, h, hd]).transpose(1, 2);
        let k = self.linear(x, &a.k_proj).view([b, t, kvh, hd]).transpose(1, 2);
        let v = self.linear(x, &a.v_proj).view([b, t, kvh, hd]).transpose(1, 2);
        let (q, k) = (rope(&q, cos, sin), rope(&k, cos, sin));
        let (k, v) = match cache {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
                    None => (k, v),
                };
                *slot = Some((k.shallow_clone(), v.shallow_clone()));
                (k, v)
            }
            None => (k, v),
        };
        let (k, v) = (repeat_kv(&k, h / kvh), repeat_kv(&v, h / kvh));
        let causal = mask.is_none() && t > 1;
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, false);
        self.linear(&y.transpose(1, 2).contiguous().view([b, t, h * hd]), &a.o_proj)
    }

    /// Mean next-token cross-entropy of `inputs` predicting `targets`, both `[batch, seq]`.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.forward(inputs, None)?;
        let v = self.config.vocab_size;
        Ok(logits.view([-1, v]).cross_entropy_loss::<Tensor>(
            &targets.view([-1]),
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        ))
    }

    /// Per-position cross-entropy `[batch, seq]`, for evaluation.
    pub fn token_losses(&self, inputs: &Tensor, targets: &Tensor) -> Result<Tensor, ModelError> {
        let logits = self.forward(inputs, None)?;
        let (b, t) = inputs.size2()?;
        let v = self.config.vocab_size;
        Ok(logits
            .view([-1, v])
            .cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::None, -100, 0.0)
            .view([b, t]))
    }

    /// Trainable tensors in a fixed order (sorted by Hugging Face name), for the optimizer.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }
}

/// `n` samples of N(0, std²) from the ChaCha stream keyed by `(seed, name)`.
pub(crate) fn seeded_normal(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut key = seed.to_le_bytes().to_vec();
    key.extend_from_slice(name.as_bytes());
    let mut rng = rand_chacha::ChaCha8Rng::from_seed(blake3::derive_key("tessera 2026 weight init v1", &key));
    let normal = rand_distr::Normal::new(0.0f32, std).expect("finite, non-negative std");
    (0..n).map(|_| normal.sample(&mut rng)).collect()
}

/// Half-precision tensors go to f32; f32 and f64 stay as they are.
fn upcast(x: &Tensor) -> Tensor {
    match x.kind() {
        Kind::Half | Kind::BFloat16 => x.to_kind(Kind::Float),
        _ => x.shallow_clone(),
    }
}

/// Rotate-half rotary embedding on `[b, heads, t, hd]` with tables `[t, hd]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], 3);
    let kind = x.kind();
    x * cos.to_kind(kind) + rotated * sin.to_kind(kind)
}

/// `[b, kv_heads, s, hd]` → `[b, kv_heads·n_rep, s, hd]`, head `h` reading kv head `h / n_rep`.
fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let (b, kvh, s, hd) = x.size4().expect("4-d keys");
    x.unsqueeze(2).expand([b, kvh, n_rep, s, hd], false).reshape([b, kvh * n_rep, s, hd])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset;

    fn tiny() -> Llama {
        Llama::new(&preset("tiny").unwrap(), Device::Cpu, 0).unwrap()
    }

    #[test]
    fn parameter_names_and_count_match_the_config() {
        let m = tiny();
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.embed_tokens.weight".to_string()));
        assert!(names.contains(&"model.layers.1.self_attn.k_proj.weight".to_string()));
        assert!(names.contains(&"model.layers.0.mlp.down_proj.weight".to_string()));
        assert!(names.contains(&"lm_head.weight".to_string()));
        let count: i64 = m.named_parameters().iter().map(|(_, t)| t.numel() as i64).sum();
        assert_eq!(count as u64, m.config.num_params());
        let shapes: Vec<(String, Vec<i64>)> = m.named_parameters().into_iter().map(|(n, t)| (n, t.size())).collect();
        assert_eq!(shapes, m.config.parameter_shapes());
    }

    #[test]
    fn init_is_seeded_and_scaled() {
        let a = tiny();
        let b = tiny();
        let c = Llama::new(&preset("tiny").unwrap(), Device::Cpu, 1).unwrap();
        for (((name, x), (_, y)), (_, z)) in
            a.named_parameters().iter().zip(b.named_parameters().iter()).zip(c.named_parameters().iter())
        {
            assert!(x.equal(y), "{name}: same seed, different weights");
            if x.dim() == 2 {
                assert!(!x.equal(z), "{name}: different seeds, same weights");
            }
        }
        let emb = a.named_parameters().into_iter().find(|(n, _)| n == "model.embed_tokens.weight").unwrap().1;
        let std = f64::try_from(emb.std(true)).unwrap();
        assert!((std - 0.02).abs() < 0.002, "embedding std {std}");
    }

    #[test]
    fn bf16_weights_give_nearly_the_f32_logits_fused_or_not() {
        let tokens = Tensor::from_slice(&[1i64, 2, 3, 4, 5]).view([1, 5]);
        let m = tiny();
        let want = m.forward(&tokens, None).unwrap();
        for fuse_first in [false, true] {
            let mut b = tiny();
            if fuse_first {
                b.fuse_for_decoding();
            }
            b.cast_weights(Kind::BFloat16);
            assert_eq!(b.compute_kind(), Kind::BFloat16);
            let got = b.forward(&tokens, None).unwrap();
            assert_eq!(got.kind(), Kind::Float, "logits stay f32");
            let diff = f64::try_from((&got - &want).abs().max()).unwrap();
            assert!(diff < 0.05, "bf16 differs by {diff}");
            assert!(diff > 0.0, "the weights were not cast");
            let matrices = b.named_parameters().into_iter().filter(|(n, _)| !n.contains("norm"));
            assert!(matrices.into_iter().all(|(_, t)| t.kind() == Kind::BFloat16));
        }
    }

    #[test]
    fn causal_future_tokens_do_not_change_past_logits() {
        let m = tiny();
        let a = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6]).view([1, 6]);
        let b = Tensor::from_slice(&[1i64, 2, 3, 9, 9, 9]).view([1, 6]);
        let la = m.forward(&a, None).unwrap().narrow(1, 0, 3);
        let lb = m.forward(&b, None).unwrap().narrow(1, 0, 3);
        assert!(la.allclose(&lb, 1e-6, 1e-6, false));
    }

    /// Sequences of different lengths advanced together give what each gives alone, with the
    /// projections fused for decoding or not.
    #[test]
    fn batched_decoding_matches_each_sequence_alone() {
        for fused in [false, true] {
            let mut m = tiny();
            if fused {
                let before = m.forward(&Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]), None).unwrap();
                let params: Vec<Tensor> = m.named_parameters().into_iter().map(|(_, t)| t.copy()).collect();
                m.fuse_for_decoding();
                let after = m.forward(&Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]), None).unwrap();
                assert!(before.equal(&after), "fusing changed the model");
                for (p, (name, q)) in params.iter().zip(m.named_parameters()) {
                    assert!(p.equal(&q), "{name} changed");
                }
            }
            batched_decoding_with(&m);
        }
    }

    fn batched_decoding_with(m: &Llama) {
        let prompts: [&[i64]; 3] = [&[1, 2, 3, 4, 5], &[7], &[9, 8, 7]];
        let mut batch = BatchCache::new(m, 4);
        // Slots 0, 2 and 3 hold the prompts; slot 1 stays empty.
        let slots = [0usize, 2, 3];
        let mut next = Vec::new();
        for (&slot, p) in slots.iter().zip(prompts) {
            let mut kv = KvCache::new();
            let logits = m.forward(&Tensor::from_slice(p).view([1, -1]), Some(&mut kv)).unwrap();
            batch.load(slot, &kv).unwrap();
            next.push(logits.get(0).get(-1).argmax(0, false).int64_value(&[]));
        }
        let mut seqs: Vec<Vec<i64>> = prompts.iter().map(|p| p.to_vec()).collect();
        for _ in 0..4 {
            for (s, &t) in seqs.iter_mut().zip(&next) {
                s.push(t);
            }
            let logits = m.decode_step(&slots, &next, &mut batch).unwrap();
            for (i, s) in seqs.iter().enumerate() {
                let alone = m.forward(&Tensor::from_slice(s).view([1, -1]), None).unwrap().get(0).get(-1);
                let diff = f64::try_from((&alone - logits.get(i as i64)).abs().max()).unwrap();
                assert!(diff < 1e-4, "sequence {i} differs by {diff}");
            }
            next = (0..3).map(|i| logits.get(i).argmax(0, false).int64_value(&[])).collect();
        }
        // A subset of slots, out of order, advances alone.
        let before = batch.len(2);
        let _ = m.decode_step(&[3, 0], &[1, 1], &mut batch).unwrap();
        assert_eq!((batch.len(2), batch.len(3)), (before, seqs[2].len() as i64 + 1));
        assert!(m.decode_step(&[1], &[1], &mut batch).is_err(), "an empty slot is refused");
    }

    /// Prompts prefilled together, right-padded to the longest, load into slots exactly as each
    /// alone would, and decode on from there.
    #[test]
    fn a_padded_batch_prefill_loads_each_prompt_as_alone() {
        let m = tiny();
        let prompts: [&[i64]; 3] = [&[1, 2, 3, 4, 5], &[7], &[9, 8, 7]];
        let padded: Vec<i64> =
            prompts.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat_n(0, 5 - p.len()))).collect();
        let mut kv = KvCache::new();
        let logits = m.forward(&Tensor::from_slice(&padded).view([3, 5]), Some(&mut kv)).unwrap();
        let mut batch = BatchCache::new(&m, 3);
        for (row, p) in prompts.iter().enumerate() {
            batch.load_row(row, &kv, row as i64, p.len() as i64).unwrap();
            let alone = m.forward(&Tensor::from_slice(p).view([1, -1]), None).unwrap().get(0).get(-1);
            let diff = f64::try_from((&alone - logits.get(row as i64).get(p.len() as i64 - 1)).abs().max()).unwrap();
            assert!(diff < 1e-4, "prompt {row}'s last logits differ by {diff}");
            assert_eq!(batch.len(row), p.len() as i64);
        }
        let next = [3i64, 4, 5];
        let stepped = m.decode_step(&[0, 1, 2], &next, &mut batch).unwrap();
        for (row, p) in prompts.iter().enumerate() {
            let mut s = p.to_vec();
            s.push(next[row]);
            let alone = m.forward(&Tensor::from_slice(&s).view([1, -1]), None).unwrap().get(0).get(-1);
            let diff = f64::try_from((&alone - stepped.get(row as i64)).abs().max()).unwrap();
            assert!(diff < 1e-4, "sequence {row} differs by {diff} after a step");
        }
        assert!(batch.load_row(0, &kv, 3, 1).is_err(), "no fourth row");
        assert!(batch.load_row(0, &kv, 0, 6).is_err(), "no sixth position");
    }

    #[test]
    fn kv_cache_matches_full_forward() {
        let m = tiny();
        let tokens = Tensor::from_slice(&[5i64, 7, 11, 13, 17, 19, 23, 29]).view([1, 8]);
        let full = m.forward(&tokens, None).unwrap();
        let mut cache = KvCache::new();
        let first = m.forward(&tokens.narrow(1, 0, 3), Some(&mut cache)).unwrap();
        let second = m.forward(&tokens.narrow(1, 3, 2), Some(&mut cache)).unwrap();
        let mut steps = vec![first, second];
        for i in 5..8 {
            steps.push(m.forward(&tokens.narrow(1, i, 1), Some(&mut cache)).unwrap());
        }
        assert_eq!(cache.len(), 8);
        let incremental = Tensor::cat(&steps, 1);
        let diff = f64::try_from((full - incremental).abs().max()).unwrap();
        assert!(diff < 1e-5, "max |Δ| = {diff}");
    }

    #[test]
    fn too_long_input_is_an_error_not_a_panic() {
        let m = tiny();
        let tokens = Tensor::zeros([1, 33], (Kind::Int64, Device::Cpu));
        assert!(matches!(m.forward(&tokens, None), Err(ModelError::TooLong { len: 33, max: 32 })));
    }

    /// Autograd against central finite differences, in f64, on a handful of coordinates of
    /// every kind of weight.
    #[test]
    fn gradients_match_finite_differences() {
        let mut m = tiny();
        m.vs.double();
        let inputs = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3]).view([2, 5]);
        let targets = Tensor::from_slice(&[1i64, 4, 1, 5, 9, 2, 6, 5, 3, 5]).view([2, 5]);
        let loss = m.loss(&inputs, &targets).unwrap();
        loss.backward();
        let eps = 1e-6;
        for (name, param) in m.named_parameters() {
            let grad = param.grad();
            let flat = param.view([-1]);
            for idx in [0, flat.size()[0] / 2, flat.size()[0] - 1] {
                let orig = f64::try_from(flat.get(idx)).unwrap();
                let f = |v: f64| {
                    tch::no_grad(|| {
                        let _ = flat.get(idx).fill_(v);
                        f64::try_from(m.loss(&inputs, &targets).unwrap()).unwrap()
                    })
                };
                let numeric = (f(orig + eps) - f(orig - eps)) / (2.0 * eps);
                tch::no_grad(|| {
                    let _ = flat.get(idx).fill_(orig);
                });
                let analytic = f64::try_from(grad.view([-1]).get(idx)).unwrap();
                let tol = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
                assert!((numeric - analytic).abs() < tol, "{name}[{idx}]: autograd {analytic} vs numeric {numeric}");
            }
        }
    }
}
