//! Tokenizers: byte-level and character-level built in, BPE trained with Hugging Face's
//! `tokenizers`. All three are plain `tokenizers::Tokenizer`s saved as `tokenizer.json`, so
//! `transformers.AutoTokenizer` reads exactly what Tessera trained with.

use std::path::{Path, PathBuf};

use serde_json::json;
use tokenizers::Tokenizer;

/// The end-of-text token of the tokenizers Tessera builds itself (byte, character, trained BPE).
/// A loaded `tokenizer.json` names its own (`tokenizer_config.json`'s `eos_token`, or a flag).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// End-of-text tokens recognised among a loaded tokenizer's special tokens when no
/// `tokenizer_config.json` or flag names one: GPT-2's, Llama-3's, and SentencePiece's.
const KNOWN_EOS: [&str; 4] = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>"];
const UNK_TOKEN: &str = "<unk>";
/// Text is encoded in chunks of about this many bytes, cut after a newline.
const ENCODE_CHUNK_BYTES: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer file {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("writing tokenizer {path}: {message}")]
    Save { path: PathBuf, message: String },
    #[error("tokenizer has no end-of-text token {0:?}")]
    NoEos(String),
    #[error(
        "tokenizer names no end-of-text token: put a tokenizer_config.json with \"eos_token\" beside it, \
         or name it (--eos-token); its special tokens are {0:?}"
    )]
    EosUnknown(Vec<String>),
    #[error("BPE vocabulary size {0} is too small: it must exceed the 256 byte symbols plus {EOS_TOKEN}")]
    VocabTooSmall(usize),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

fn tk_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// Which tokenizer a run builds when it is not given a `tokenizer.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per UTF-8 byte (256 + EOS).
    Byte,
    /// One token per character seen in the training text (+ `<unk>` + EOS).
    Char,
}

/// A Hugging Face tokenizer plus the facts Tessera needs about it.
#[derive(Clone)]
pub struct TessTokenizer {
    inner: Tokenizer,
    eos_id: u32,
}

impl std::fmt::Debug for TessTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TessTokenizer").field("vocab_size", &self.vocab_size()).field("eos_id", &self.eos_id).finish()
    }
}

/// GPT-2's reversible map from bytes to printable characters, used by byte-level tokenizers.
fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

fn added_token(id: u32, content: &str) -> serde_json::Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// `eos_token` from the `tokenizer_config.json` beside `tokenizer`, if there is one. It is a
/// string or an added-token object (`{"content": …}`).
fn configured_eos(tokenizer: &Path) -> Result<Option<String>, String> {
    let config = tokenizer.with_file_name("tokenizer_config.json");
    let text = match std::fs::read_to_string(&config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", config.display())),
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", config.display()))?;
    Ok(match value.get("eos_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    })
}

/// The one well-known end-of-text token among `inner`'s special tokens.
fn known_eos(inner: &Tokenizer) -> Result<String, TokenizerError> {
    let specials: Vec<String> =
        inner.get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect();
    let found: Vec<&str> = KNOWN_EOS.iter().copied().filter(|k| specials.iter().any(|s| s == k)).collect();
    match found.as_slice() {
        [one] => Ok((*one).to_owned()),
        _ => Err(TokenizerError::EosUnknown(specials.into_iter().take(8).collect())),
    }
}

impl TessTokenizer {
    fn from_inner(inner: Tokenizer) -> Result<TessTokenizer, TokenizerError> {
        TessTokenizer::with_eos(inner, EOS_TOKEN)
    }

    fn with_eos(inner: Tokenizer, eos: &str) -> Result<TessTokenizer, TokenizerError> {
        let eos_id = inner.token_to_id(eos).ok_or_else(|| TokenizerError::NoEos(eos.to_owned()))?;
        Ok(TessTokenizer { inner, eos_id })
    }

    fn from_json(value: serde_json::Value) -> Result<TessTokenizer, TokenizerError> {
        let inner: Tokenizer = serde_json::from_value(value).map_err(tk_err)?;
        TessTokenizer::from_inner(inner)
    }

    /// One token per byte: ids 0..=255 are the byte values, 256 is EOS.
    pub fn byte_level() -> TessTokenizer {
        let table = byte_to_char();
        let vocab: serde_json::Map<String, serde_json::Value> =
            (0..256).map(|b| (table[b].to_string(), json!(b))).chain([(EOS_TOKEN.to_string(), json!(256))]).collect();
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        TessTokenizer::from_json(json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added_token(256, EOS_TOKEN)],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        }))
        .expect("the built-in byte-level tokenizer is valid")
    }

    /// One token per character of `text` (sorted), then `<unk>` and EOS.
    pub fn char_level(text: &str) -> TessTokenizer {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        TessTokenizer::from_chars(&chars)
    }

    pub fn from_chars(chars: &[char]) -> TessTokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        let unk = chars.len() as u32;
        let eos = unk + 1;
        vocab.insert(UNK_TOKEN.to_string(), json!(unk));
        vocab.insert(EOS_TOKEN.to_string(), json!(eos));
        TessTokenizer::from_json(json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [added_token(unk, UNK_TOKEN), added_token(eos, EOS_TOKEN)],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {"type": "BPE", "dropout": null, "unk_token": UNK_TOKEN, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        }))
        .expect("a character-level tokenizer is valid")
    }

    /// Trains a GPT-2-style byte-level BPE tokenizer on `texts` with `vocab_size` entries.
    pub fn train_bpe<I, S>(texts: I, vocab_size: usize) -> Result<TessTokenizer, TokenizerError>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
    {
        use tokenizers::models::TrainerWrapper;
        use tokenizers::models::bpe::BpeTrainer;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        if vocab_size <= 257 {
            return Err(TokenizerError::VocabTooSmall(vocab_size));
        }
        let byte_level =
            json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let mut inner: Tokenizer = serde_json::from_value(json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": {}, "merges": []}
        }))
        .map_err(tk_err)?;
        let trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .special_tokens(vec![tokenizers::AddedToken::from(EOS_TOKEN, true)])
            .build();
        let mut trainer = TrainerWrapper::from(trainer);
        inner.train(&mut trainer, texts).map_err(tk_err)?;
        TessTokenizer::from_inner(inner)
    }

    /// Loads a Hugging Face `tokenizer.json` (BPE, byte-level, WordPiece, Unigram…). Its
    /// end-of-text token is the `eos_token` of a `tokenizer_config.json` beside it, else the one
    /// known end-of-text token among its special tokens.
    pub fn load(path: &Path) -> Result<TessTokenizer, TokenizerError> {
        TessTokenizer::load_with_eos(path, None)
    }

    /// [`TessTokenizer::load`], with the end-of-text token named by the caller when `eos` is set.
    pub fn load_with_eos(path: &Path, eos: Option<&str>) -> Result<TessTokenizer, TokenizerError> {
        let load_err = |message: String| TokenizerError::Load { path: path.to_owned(), message };
        let text = std::fs::read_to_string(path).map_err(|e| load_err(e.to_string()))?;
        let invalid = |e: String| load_err(format!("not a valid tokenizer.json: {e}"));
        // Parse the JSON first: `tokenizers` 0.22 panics (an `expect` in its decoder
        // deserializer) on some malformed text, but not on a well-formed `Value`. The
        // `catch_unwind` keeps any other such panic in that crate from taking the process down.
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let parsed = std::panic::catch_unwind(move || serde_json::from_value::<Tokenizer>(value));
        let inner = match parsed {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(invalid(e.to_string())),
            Err(_) => return Err(invalid("the tokenizers library rejected it".to_owned())),
        };
        let eos = match eos {
            Some(e) => e.to_owned(),
            None => match configured_eos(path).map_err(load_err)? {
                Some(e) => e,
                None => known_eos(&inner)?,
            },
        };
        TessTokenizer::with_eos(inner, &eos).map_err(|e| load_err(e.to_string()))
    }

    /// The end-of-text token's text.
    pub fn eos_token(&self) -> String {
        self.inner.id_to_token(self.eos_id).unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner.save(path, true).map_err(|e| TokenizerError::Save { path: path.to_owned(), message: e.to_string() })
    }

    /// `tokenizer_config.json` for `transformers`: tells `AutoTokenizer` to read `tokenizer.json`
    /// as is, without the model-specific wrapper adding BOS tokens.
    pub fn hf_tokenizer_config(&self) -> serde_json::Value {
        json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token(),
            "model_max_length": 1_000_000_000_000_000_000u64,
            "clean_up_tokenization_spaces": false,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len());
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + ENCODE_CHUNK_BYTES).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            if end < text.len()
                && let Some(nl) = text[start..end].rfind('\n')
            {
                end = start + nl + 1;
            }
            let enc = self.inner.encode_fast(&text[start..end], false).map_err(tk_err)?;
            ids.extend_from_slice(enc.get_ids());
            start = end;
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(tk_err)
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_is_identity_on_bytes() {
        let t = TessTokenizer::byte_level();
        assert_eq!(t.vocab_size(), 257);
        let text = "héllo\n\tworld ✓";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids).unwrap(), text);
    }

    #[test]
    fn char_level_round_trips_and_maps_unknowns() {
        let t = TessTokenizer::char_level("hello world\n");
        assert_eq!(t.vocab_size(), 9 + 2); // h e l o w r d, space, newline
        let ids = t.encode("hello\nworld").unwrap();
        assert_eq!(ids.len(), 11);
        assert_eq!(t.decode(&ids).unwrap(), "hello\nworld");
        let unk = t.encode("hz").unwrap();
        assert_eq!(unk[1], t.inner().token_to_id(UNK_TOKEN).unwrap());
    }

    #[test]
    fn bpe_trains_saves_and_loads() {
        let text = "the cat sat on the mat. the dog sat on the log. ".repeat(50);
        let t = TessTokenizer::train_bpe(std::iter::once(text.as_str()), 300).unwrap();
        let ids = t.encode("the cat sat").unwrap();
        assert!(ids.len() < "the cat sat".len(), "BPE should merge: {ids:?}");
        assert_eq!(t.decode(&ids).unwrap(), "the cat sat");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        t.save(&path).unwrap();
        let back = TessTokenizer::load(&path).unwrap();
        assert_eq!(back.encode("the dog").unwrap(), t.encode("the dog").unwrap());
        assert!(matches!(TessTokenizer::train_bpe(std::iter::once("x"), 100), Err(TokenizerError::VocabTooSmall(100))));
    }

    #[test]
    fn malformed_tokenizer_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, "{\"model\": 3}").unwrap();
        let err = TessTokenizer::load(&path).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let missing = TessTokenizer::load(&dir.path().join("nope.json")).unwrap_err().to_string();
        assert!(missing.contains("nope.json"), "{missing}");
    }
}
