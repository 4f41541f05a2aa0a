//! Checkpoint decoding is fed hostile bytes: whatever the files hold, loading returns a value
//! or an error, never a panic.

use std::path::Path;

use proptest::prelude::*;
use tch::Device;
use tessera_model::checkpoint::load_config;
use tessera_model::{Llama, load_checkpoint, preset, save_checkpoint};

fn valid_checkpoint(dir: &Path) -> Vec<u8> {
    let model = Llama::new(&preset("tiny").unwrap(), Device::Cpu, 0).unwrap();
    save_checkpoint(&model, None, dir).unwrap();
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_weight_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let dir = tempfile::tempdir().unwrap();
        valid_checkpoint(dir.path());
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        prop_assert!(load_checkpoint(dir.path(), Device::Cpu).is_err());
    }

    #[test]
    fn corrupted_weights_never_panic(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in 0usize..64) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_checkpoint(dir.path());
        for (i, v) in flips {
            let at = i.index(bytes.len());
            bytes[at] = v;
        }
        bytes.truncate(bytes.len() - cut);
        std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
        let _ = load_checkpoint(dir.path(), Device::Cpu);
    }

    #[test]
    fn arbitrary_config_text_never_panics(text in "\\PC{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), &text).unwrap();
        prop_assert!(load_config(dir.path()).is_err());
    }

    #[test]
    fn arbitrary_config_numbers_never_panic(
        hidden in any::<i64>(), layers in any::<i64>(), heads in any::<i64>(), kv in any::<i64>(),
        ff in any::<i64>(), vocab in any::<i64>(), ctx in any::<i64>(), theta in any::<f64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        valid_checkpoint(dir.path());
        let config = serde_json::json!({
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "intermediate_size": ff, "vocab_size": vocab,
            "max_position_embeddings": ctx, "rope_theta": if theta.is_finite() { theta } else { 1.0 },
        });
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let _ = load_checkpoint(dir.path(), Device::Cpu);
    }
}
