//! The model configuration — Hugging Face's `LlamaConfig`, field for field — its presets, and
//! the back-of-the-envelope sums (parameters, FLOPs, memory) that every plan starts from.

use std::path::Path;

use crate::ModelError;

/// Hugging Face `LlamaConfig`. Unknown fields in a `config.json` are ignored; fields Tessera
/// cannot honour (biases, rope scaling, other activations) are refused by [`LlamaConfig::validate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default)]
    pub head_dim: Option<i64>,
    pub vocab_size: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<i64>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_hidden_act() -> String {
    "silu".to_owned()
}
fn default_initializer_range() -> f64 {
    0.02
}

/// Upper bounds on a config's dimensions: far above any planned model, low enough that a hostile
/// `config.json` cannot make us allocate absurd tensors before the weights are even checked.
pub const HIDDEN_SIZE_MAX: i64 = 1 << 17;
pub const LAYERS_MAX: i64 = 1 << 12;
pub const VOCAB_SIZE_MAX: i64 = 1 << 24;
pub const CONTEXT_MAX: i64 = 1 << 22;

/// Vocabulary of the production phases: a byte-level BPE trained by `tessera tokenizer train`.
pub const PHASE_VOCAB: i64 = 65_536;

/// A named configuration with what it is for.
pub struct Preset {
    pub name: &'static str,
    pub summary: &'static str,
    pub config: LlamaConfig,
}

#[allow(clippy::too_many_arguments)]
fn shape(
    d: i64,
    layers: i64,
    heads: i64,
    kv_heads: i64,
    ff: i64,
    vocab: i64,
    ctx: i64,
    tie: bool,
    theta: f64,
) -> LlamaConfig {
    LlamaConfig {
        hidden_size: d,
        intermediate_size: ff,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: None,
        vocab_size: vocab,
        max_position_embeddings: ctx,
        rope_theta: theta,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tie,
        hidden_act: "silu".to_owned(),
        attention_bias: false,
        mlp_bias: false,
        rope_scaling: None,
        initializer_range: 0.02,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// All presets, smallest first. Vocabulary sizes of `tiny`, `nano` and `micro` are replaced by
/// the tokenizer's when a run starts.
pub fn presets() -> Vec<Preset> {
    vec![
        Preset {
            name: "tiny",
            summary: "tests only: 2 layers, width 32, grouped-query attention, untied head",
            config: shape(32, 2, 4, 2, 64, 64, 32, false, 10_000.0),
        },
        Preset {
            name: "nano",
            summary: "4 layers, 4 heads, width 128, context 64: ≤1.90 val nats/char on tinyshakespeare in 2000 steps",
            config: shape(128, 4, 4, 4, 384, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "micro",
            summary: "6 layers, 6 heads, width 384, context 256",
            config: shape(384, 6, 6, 6, 1024, 66, 256, true, 10_000.0),
        },
        Preset {
            name: "small",
            summary: "8 layers, width 512, grouped-query attention (8 heads, 2 K/V), context 512",
            config: shape(512, 8, 8, 2, 1408, 66, 512, true, 10_000.0),
        },
        // The demo ladder: seven phases small enough for two CPU cores, each a function-preserving
        // growth of the one before (head size 16, full multi-head attention, context 64).
        Preset {
            name: "ladder1",
            summary: "demo ladder, phase 1",
            config: shape(32, 2, 2, 2, 96, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "ladder2",
            summary: "demo ladder, phase 2",
            config: shape(48, 2, 3, 3, 128, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "ladder3",
            summary: "demo ladder, phase 3",
            config: shape(64, 3, 4, 4, 192, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "ladder4",
            summary: "demo ladder, phase 4",
            config: shape(80, 3, 5, 5, 224, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "ladder5",
            summary: "demo ladder, phase 5",
            config: shape(96, 4, 6, 6, 256, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "ladder6",
            summary: "demo ladder, phase 6",
            config: shape(112, 4, 7, 7, 320, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "ladder7",
            summary: "demo ladder, phase 7",
            config: shape(128, 5, 8, 8, 384, 66, 64, true, 10_000.0),
        },
        Preset {
            name: "phase1",
            summary: "≈0.5B prototype anyone can train today",
            config: shape(1280, 24, 10, 2, 3584, PHASE_VOCAB, 2048, true, 10_000.0),
        },
        Preset {
            name: "phase2",
            summary: "≈1.9B",
            config: shape(2304, 28, 18, 6, 6144, PHASE_VOCAB, 4096, false, 500_000.0),
        },
        Preset {
            name: "phase3",
            summary: "≈7B",
            config: shape(4096, 30, 32, 8, 13824, PHASE_VOCAB, 8192, false, 500_000.0),
        },
        Preset {
            name: "phase4",
            summary: "≈26B",
            config: shape(6144, 52, 48, 8, 21504, PHASE_VOCAB, 8192, false, 500_000.0),
        },
        Preset {
            name: "phase5",
            summary: "≈99B",
            config: shape(10240, 72, 80, 8, 36864, PHASE_VOCAB, 8192, false, 500_000.0),
        },
        Preset {
            name: "phase6",
            summary: "≈371B",
            config: shape(16384, 108, 128, 16, 57344, PHASE_VOCAB, 8192, false, 500_000.0),
        },
        Preset {
            name: "phase7",
            summary: "≈1.4T",
            config: shape(24576, 176, 192, 16, 90112, PHASE_VOCAB, 8192, false, 500_000.0),
        },
    ]
}

pub fn preset(name: &str) -> Option<LlamaConfig> {
    presets().into_iter().find(|p| p.name == name).map(|p| p.config)
}

impl LlamaConfig {
    /// Reads and validates a `config.json`; errors name the file.
    ///
    /// Accepts `transformers` ≥ 5's `rope_parameters` (only `rope_type: "default"`) as well as
    /// the older top-level `rope_theta`.
    pub fn load(path: &Path) -> Result<LlamaConfig, ModelError> {
        let bad = |message: String| ModelError::Config { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        LlamaConfig::from_json(value).map_err(bad)
    }

    /// Parses and validates a `config.json` already read as JSON (e.g. from a hub's run spec).
    pub fn from_json(mut value: serde_json::Value) -> Result<LlamaConfig, String> {
        if let Some(params) = value.get("rope_parameters").cloned().filter(|p| p.is_object()) {
            let rope_type = params.get("rope_type").and_then(|t| t.as_str()).unwrap_or("default");
            if rope_type != "default" {
                return Err(format!("rope_parameters.rope_type {rope_type:?} is not supported"));
            }
            if let (Some(theta), Some(map)) = (params.get("rope_theta").cloned(), value.as_object_mut()) {
                map.entry("rope_theta").or_insert(theta);
            }
        }
        let config: LlamaConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Either a preset name or a path to a `config.json` (or a checkpoint directory holding one).
    pub fn from_preset_or_path(spec: &str) -> Result<LlamaConfig, ModelError> {
        if let Some(c) = preset(spec) {
            return Ok(c);
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return LlamaConfig::load(&path.join("config.json"));
        }
        if path.exists() {
            return LlamaConfig::load(path);
        }
        let names: Vec<&str> = presets().iter().map(|p| p.name).collect();
        Err(ModelError::UnknownPreset { name: spec.to_owned(), known: names.join(", ") })
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v <= 0 {
                return Err(format!("{name} must be positive, got {v}"));
            }
        }
        let bounded = [
            ("hidden_size", self.hidden_size, HIDDEN_SIZE_MAX),
            ("intermediate_size", self.intermediate_size, 8 * HIDDEN_SIZE_MAX),
            ("num_hidden_layers", self.num_hidden_layers, LAYERS_MAX),
            ("num_attention_heads", self.num_attention_heads, HIDDEN_SIZE_MAX),
            ("head_dim", self.head_dim(), HIDDEN_SIZE_MAX),
            ("vocab_size", self.vocab_size, VOCAB_SIZE_MAX),
            ("max_position_embeddings", self.max_position_embeddings, CONTEXT_MAX),
        ];
        for (name, v, max) in bounded {
            if v > max {
                return Err(format!("{name} = {v} exceeds the supported maximum of {max}"));
            }
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim.is_none() && self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size ({}) must be a multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim()));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta must be positive, got {}", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps must be positive, got {}", self.rms_norm_eps));
        }
        if self.hidden_act != "silu" {
            return Err(format!("hidden_act {:?} is not supported (only \"silu\")", self.hidden_act));
        }
        if self.attention_bias || self.mlp_bias {
            return Err("attention_bias / mlp_bias are not supported".to_owned());
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is not supported".to_owned());
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Every weight tensor's Hugging Face name and shape, in name order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (d, hd, ff) = (self.hidden_size, self.head_dim(), self.intermediate_size);
        let (q, kv) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        let mut shapes = vec![
            ("model.embed_tokens.weight".to_owned(), vec![self.vocab_size, d]),
            ("model.norm.weight".to_owned(), vec![d]),
        ];
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_owned(), vec![self.vocab_size, d]));
        }
        for i in 0..self.num_hidden_layers {
            let layer = [
                ("input_layernorm", vec![d]),
                ("post_attention_layernorm", vec![d]),
                ("self_attn.q_proj", vec![q, d]),
                ("self_attn.k_proj", vec![kv, d]),
                ("self_attn.v_proj", vec![kv, d]),
                ("self_attn.o_proj", vec![d, q]),
                ("mlp.gate_proj", vec![ff, d]),
                ("mlp.up_proj", vec![ff, d]),
                ("mlp.down_proj", vec![d, ff]),
            ];
            shapes.extend(layer.into_iter().map(|(name, shape)| (format!("model.layers.{i}.{name}.weight"), shape)));
        }
        shapes.sort_by(|a, b| a.0.cmp(&b.0));
        shapes
    }

    /// Parameters of one decoder layer.
    fn layer_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let q = (self.num_attention_heads * self.head_dim()) as u64;
        let kv = (self.kv_heads() * self.head_dim()) as u64;
        let ff = self.intermediate_size as u64;
        2 * d * q + 2 * d * kv + 3 * d * ff + 2 * d
    }

    /// The exact number of parameters (tied embeddings counted once).
    pub fn num_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        let head = if self.tie_word_embeddings { 0 } else { v * d };
        v * d + head + self.num_hidden_layers as u64 * self.layer_params() + d
    }

    /// Parameters that take part in matrix multiplies: everything but the embedding lookup (with
    /// tied embeddings the shared matrix still multiplies in the head, so it counts).
    pub fn matmul_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let v = self.vocab_size as u64;
        self.num_hidden_layers as u64 * self.layer_params() + v * d
    }

    /// Training FLOPs per token at sequence length `seq_len`: 6·N for the matrix multiplies
    /// (forward 2N, backward 4N) plus the attention term 12·L·(heads·head_dim)·T for the score and
    /// value products (PaLM's accounting, causal masking not discounted).
    pub fn train_flops_per_token(&self, seq_len: i64) -> u64 {
        let attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim() * seq_len;
        6 * self.matmul_params() + attn as u64
    }
}

/// Bytes for training in f32: weights, gradients and AdamW's two moments.
#[derive(Debug, Clone, Copy)]
pub struct TrainingMemory {
    pub weights: u64,
    pub gradients: u64,
    pub adamw_state: u64,
}

impl TrainingMemory {
    pub fn f32(config: &LlamaConfig) -> TrainingMemory {
        let n = config.num_params();
        TrainingMemory { weights: 4 * n, gradients: 4 * n, adamw_state: 8 * n }
    }

    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.adamw_state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_hit_their_targets_within_three_percent() {
        let targets = [0.5e9, 1.9e9, 7e9, 26e9, 99e9, 371e9, 1400e9];
        for (i, target) in targets.iter().enumerate() {
            let c = preset(&format!("phase{}", i + 1)).unwrap();
            c.validate().unwrap();
            let n = c.num_params() as f64;
            assert!((n / target - 1.0).abs() < 0.03, "phase{} has {n} params, target {target}", i + 1);
        }
    }

    #[test]
    fn small_presets_match_their_descriptions() {
        assert!(preset("tiny").unwrap().num_params() < 500_000);
        let nano = preset("nano").unwrap();
        assert_eq!(
            (nano.num_hidden_layers, nano.num_attention_heads, nano.hidden_size, nano.max_position_embeddings),
            (4, 4, 128, 64)
        );
        let micro = preset("micro").unwrap();
        assert_eq!(
            (micro.num_hidden_layers, micro.num_attention_heads, micro.hidden_size, micro.max_position_embeddings),
            (6, 6, 384, 256)
        );
    }

    #[test]
    fn param_count_by_hand_for_tiny() {
        let c = preset("tiny").unwrap();
        // embed 64·32 + head 64·32 + 2 layers·(q 32·32 + o 32·32 + k,v 2·32·16 + mlp 3·32·64 + norms 2·32) + final norm 32
        let per_layer = 1024 + 1024 + 2 * 512 + 3 * 2048 + 64;
        assert_eq!(c.num_params(), 2 * 2048 + 2 * per_layer + 32);
    }

    fn write_with_rope_type(path: &Path, v: &serde_json::Value, rope_type: &str) {
        let mut v = v.clone();
        v["rope_parameters"]["rope_type"] = serde_json::json!(rope_type);
        std::fs::write(path, v.to_string()).unwrap();
    }

    #[test]
    fn invalid_configs_are_refused_with_the_reason() {
        let mut c = preset("tiny").unwrap();
        c.num_key_value_heads = Some(3);
        assert!(c.validate().unwrap_err().contains("multiple of num_key_value_heads"));
        let mut c = preset("tiny").unwrap();
        c.hidden_act = "gelu".into();
        assert!(c.validate().unwrap_err().contains("gelu"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, "{\"hidden_size\": 64}").unwrap();
        let err = LlamaConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("intermediate_size"), "{err}");
        // transformers ≥ 5 writes rope_theta inside rope_parameters.
        let mut v = serde_json::to_value(preset("tiny").unwrap()).unwrap();
        let map = v.as_object_mut().unwrap();
        map.remove("rope_theta");
        map.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "rope_theta": 5000.0}));
        std::fs::write(&path, v.to_string()).unwrap();
        assert_eq!(LlamaConfig::load(&path).unwrap().rope_theta, 5000.0);
        write_with_rope_type(&path, &v, "yarn");
        assert!(LlamaConfig::load(&path).unwrap_err().to_string().contains("yarn"));
    }
}
