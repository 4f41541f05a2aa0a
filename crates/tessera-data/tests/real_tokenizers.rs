//! Real Hugging Face tokenizers (GPT-2's and Llama-3's `tokenizer.json`, fetched by
//! `scripts/fetch-tokenizers` into `$TESSERA_TOKENIZERS`): they load with the end-of-text token
//! their `tokenizer_config.json` names, and documents round-trip through them.

use std::path::PathBuf;

use tessera_data::TessTokenizer;

fn tokenizers_dir() -> Option<PathBuf> {
    match std::env::var_os("TESSERA_TOKENIZERS") {
        Some(d) => Some(PathBuf::from(d)),
        None if std::env::var_os("TESSERA_TEST_REQUIRE_SERVICES").is_some() => {
            panic!("TESSERA_TOKENIZERS is not set: run scripts/fetch-tokenizers")
        }
        None => {
            eprintln!("skipped: TESSERA_TOKENIZERS is not set (scripts/fetch-tokenizers)");
            None
        }
    }
}

const DOCS: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog.\n\nIt's 2026 — naïve café, 東京, emoji 🧩.",
    "def f(x):\n    return x ** 2  # squares\n",
    "   leading spaces and trailing   ",
    "Ünïcödé and numbers 1234567890 and CAPS.",
];

#[test]
fn gpt2_and_llama3_round_trip_with_their_own_end_of_text() {
    let Some(dir) = tokenizers_dir() else { return };
    for (name, eos, eos_id, vocab) in
        [("gpt2", "<|endoftext|>", 50256, 50257), ("llama3", "<|end_of_text|>", 128001, 128256)]
    {
        let t = TessTokenizer::load(&dir.join(name).join("tokenizer.json")).unwrap();
        assert_eq!(t.eos_token(), eos, "{name}");
        assert_eq!(t.eos_id(), eos_id, "{name}");
        assert_eq!(t.vocab_size(), vocab, "{name}");
        for doc in DOCS {
            let ids = t.encode(doc).unwrap();
            assert!(ids.len() < doc.len(), "{name} should merge bytes: {doc:?}");
            assert_eq!(t.decode(&ids).unwrap(), doc, "{name}");
        }
    }
}

#[test]
fn without_its_config_a_tokenizer_needs_a_named_end_of_text() {
    let Some(dir) = tokenizers_dir() else { return };
    let alone = tempfile::tempdir().unwrap();
    let path = alone.path().join("tokenizer.json");
    std::fs::copy(dir.join("llama3").join("tokenizer.json"), &path).unwrap();
    // Llama-3 has 256 special tokens and none of the well-known end-of-text names but one.
    assert_eq!(TessTokenizer::load(&path).unwrap().eos_token(), "<|end_of_text|>");
    let named = TessTokenizer::load_with_eos(&path, Some("<|eot_id|>")).unwrap();
    assert_eq!(named.eos_id(), 128009);
    let err = TessTokenizer::load_with_eos(&path, Some("<|nope|>")).unwrap_err().to_string();
    assert!(err.contains("<|nope|>") && err.contains("tokenizer.json"), "{err}");
}
