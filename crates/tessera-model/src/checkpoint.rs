//! Hugging Face checkpoints: a directory with `model.safetensors` (Llama tensor names),
//! `config.json`, `generation_config.json`, `tokenizer.json` and `tokenizer_config.json`,
//! loadable as is by `transformers.AutoModelForCausalLM` / `AutoTokenizer`. Checkpoints written
//! by `transformers` (f32, f16 or bf16; single file or sharded with an index) load here too.
//!
//! Loading trusts nothing in the directory: every tensor the config implies must be present with
//! the right shape and finite values, and every error names the file and the problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::json;
use tch::{Device, Kind, Tensor};
use tessera_data::TessTokenizer;

use crate::{Llama, LlamaConfig, ModelError};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

fn ckpt_err(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint { path: path.display().to_string(), message: message.to_string() }
}

/// Writes `tensors` (converted to f32) as a safetensors file with `{"format": "pt"}` metadata.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), ModelError> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values = Vec::<f32>::try_from(t.view([-1]))?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape, bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v)).map_err(|e| ckpt_err(path, e))
        })
        .collect::<Result<_, _>>()?;
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), path).map_err(|e| ckpt_err(path, e))
}

/// Reads every tensor of a safetensors file as f32 CPU tensors.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ckpt_err(path, e))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| ckpt_err(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            Dtype::F64 => Kind::Double,
            other => return Err(ckpt_err(path, format!("tensor {name} has unsupported dtype {other:?}"))),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?.to_kind(Kind::Float);
        out.insert(name, t);
    }
    Ok(out)
}

/// Saves `model` (and its tokenizer) as a Hugging Face Llama checkpoint directory.
pub fn save_checkpoint(model: &Llama, tokenizer: Option<&TessTokenizer>, dir: &Path) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ckpt_err(dir, e))?;
    write_safetensors(&dir.join(WEIGHTS_FILE), &model.named_parameters())?;
    let eos = tokenizer.map(|t| t.eos_id());
    let mut config = serde_json::to_value(&model.config).map_err(|e| ckpt_err(dir, e))?;
    if let serde_json::Value::Object(map) = &mut config {
        map.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        map.insert("model_type".into(), json!("llama"));
        map.insert("torch_dtype".into(), json!("float32"));
        map.insert("use_cache".into(), json!(true));
        map.insert("attention_dropout".into(), json!(0.0));
        map.insert("pretraining_tp".into(), json!(1));
        map.insert("head_dim".into(), json!(model.config.head_dim()));
        map.insert("num_key_value_heads".into(), json!(model.config.kv_heads()));
        if let Some(eos) = eos {
            map.insert("eos_token_id".into(), json!(eos));
        }
    }
    write_json(&dir.join("config.json"), &config)?;
    let mut generation = json!({"do_sample": true, "temperature": 0.8, "top_p": 0.95,
                                 "max_length": model.config.max_position_embeddings});
    if let Some(eos) = eos {
        generation["eos_token_id"] = json!(eos);
    }
    write_json(&dir.join("generation_config.json"), &generation)?;
    if let Some(t) = tokenizer {
        t.save(&dir.join("tokenizer.json"))?;
        write_json(&dir.join("tokenizer_config.json"), &t.hf_tokenizer_config())?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ckpt_err(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| ckpt_err(path, e))
}

/// The config of a checkpoint directory (`config.json`, see [`LlamaConfig::load`]).
pub fn load_config(dir: &Path) -> Result<LlamaConfig, ModelError> {
    LlamaConfig::load(&dir.join("config.json"))
}

/// Which files hold the weights: `model.safetensors`, or the shards an index names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join(WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if !index.exists() {
        return Err(ckpt_err(dir, format!("neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE} found")));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ckpt_err(&index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| ckpt_err(&index, e))?;
    let map = value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ckpt_err(&index, "no weight_map"))?;
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    files.sort();
    files.dedup();
    files
        .into_iter()
        .map(|f| {
            if f.contains('/') || f.contains("..") {
                Err(ckpt_err(&index, format!("shard name {f:?} leaves the checkpoint directory")))
            } else {
                Ok(dir.join(f))
            }
        })
        .collect()
}

/// Loads a checkpoint directory onto `device`; the tokenizer is returned when the directory has one.
pub fn load_checkpoint(dir: &Path, device: Device) -> Result<(Llama, Option<TessTokenizer>), ModelError> {
    let config = load_config(dir)?;
    let mut tensors: HashMap<String, (Tensor, PathBuf)> = HashMap::new();
    for file in weight_files(dir)? {
        for (name, t) in read_safetensors(&file)? {
            tensors.insert(name, (t, file.clone()));
        }
    }
    // Check names, shapes and values against the config before allocating the model, so a
    // config that disagrees with its weights is reported, not allocated.
    let weights_path = dir.join(WEIGHTS_FILE);
    let mut ordered = Vec::new();
    for (name, shape) in config.parameter_shapes() {
        let (t, file) =
            tensors.remove(&name).ok_or_else(|| ckpt_err(&weights_path, format!("missing tensor {name}")))?;
        if t.size() != shape {
            return Err(ckpt_err(&file, format!("tensor {name} has shape {:?}, config implies {shape:?}", t.size())));
        }
        if !bool::try_from(t.isfinite().all())? {
            return Err(ckpt_err(&file, format!("tensor {name} contains NaN or infinite values")));
        }
        ordered.push(t);
    }
    // Tied checkpoints may still carry lm_head.weight; older ones carry rotary buffers.
    let ignorable =
        |name: &str| (name == "lm_head.weight" && config.tie_word_embeddings) || name.ends_with("rotary_emb.inv_freq");
    tensors.retain(|name, _| !ignorable(name));
    if let Some((name, (_, file))) = tensors.iter().next() {
        return Err(ckpt_err(file, format!("unexpected tensor {name} (not part of a Llama with this config)")));
    }
    let model = Llama::zeroed(&config, device)?;
    for ((_, mut var), t) in model.named_parameters().into_iter().zip(ordered) {
        tch::no_grad(|| var.f_copy_(&t.to_device(device)))?;
    }
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() { Some(TessTokenizer::load(&tokenizer_path)?) } else { None };
    Ok((model, tokenizer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preset;

    fn saved_tiny() -> (tempfile::TempDir, Llama) {
        let model = Llama::new(&preset("tiny").unwrap(), Device::Cpu, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        save_checkpoint(&model, Some(&TessTokenizer::byte_level()), dir.path()).unwrap();
        (dir, model)
    }

    #[test]
    fn round_trip_is_exact() {
        let (dir, model) = saved_tiny();
        let (back, tok) = load_checkpoint(dir.path(), Device::Cpu).unwrap();
        assert!(tok.is_some());
        for ((na, a), (nb, b)) in model.named_parameters().iter().zip(back.named_parameters().iter()) {
            assert_eq!(na, nb);
            assert!(a.equal(b), "{na} differs");
        }
    }

    fn rewrite(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
        let path = dir.join(WEIGHTS_FILE);
        let mut tensors = read_safetensors(&path).unwrap();
        edit(&mut tensors);
        let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        write_safetensors(&path, &list).unwrap();
    }

    fn load_err(dir: &Path) -> String {
        match load_checkpoint(dir, Device::Cpu) {
            Ok(_) => panic!("a malformed checkpoint loaded"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn missing_tensor_is_named() {
        let (dir, _) = saved_tiny();
        rewrite(dir.path(), |t| {
            t.remove("model.layers.1.mlp.up_proj.weight");
        });
        let err = load_err(dir.path());
        assert!(
            err.contains("model.safetensors") && err.contains("missing tensor model.layers.1.mlp.up_proj.weight"),
            "{err}"
        );
    }

    #[test]
    fn wrong_shape_is_named() {
        let (dir, _) = saved_tiny();
        rewrite(dir.path(), |t| {
            t.insert("model.norm.weight".into(), Tensor::ones([31], (Kind::Float, Device::Cpu)));
        });
        let err = load_err(dir.path());
        assert!(err.contains("model.norm.weight") && err.contains("[31]"), "{err}");
    }

    #[test]
    fn nan_weights_are_refused() {
        let (dir, _) = saved_tiny();
        rewrite(dir.path(), |t| {
            let w = t["model.embed_tokens.weight"].copy();
            let _ = w.get(3).get(4).fill_(f64::NAN);
            t.insert("model.embed_tokens.weight".into(), w);
        });
        let err = load_err(dir.path());
        assert!(err.contains("model.embed_tokens.weight") && err.contains("NaN"), "{err}");
    }

    #[test]
    fn truncated_file_is_refused() {
        let (dir, _) = saved_tiny();
        let path = dir.path().join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_err(dir.path());
        assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors"), "{err}");
        std::fs::write(&path, b"").unwrap();
        assert!(load_err(dir.path()).contains("model.safetensors"));
    }

    #[test]
    fn unexpected_tensor_and_bad_config_are_refused() {
        let (dir, _) = saved_tiny();
        rewrite(dir.path(), |t| {
            t.insert("model.layers.7.extra.weight".into(), Tensor::ones([2], (Kind::Float, Device::Cpu)));
        });
        assert!(load_err(dir.path()).contains("unexpected tensor model.layers.7.extra.weight"));
        std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
        let err = load_err(dir.path());
        assert!(err.contains("config.json"), "{err}");
    }
}
