//! Text in, token streams out: loading real text (a UTF-8 file, a directory of them, or JSONL
//! with a `text` field), the embedded synthetic corpus, the fixed train/validation split, and
//! prepared datasets stored as token shards.

use std::path::{Path, PathBuf};

use crate::manifest::Manifest;
use crate::shard::ShardError;
use crate::synthetic::{SyntheticSource, SyntheticSpec};
use crate::tokenizer::{TessTokenizer, TokenizerError, TokenizerKind};

/// Fraction of a real-text corpus held out for validation (its last tokens).
pub const VALIDATION_FRACTION: f64 = 0.1;
/// Files larger than this are refused: a corpus that size belongs in prepared shards.
pub const TEXT_FILE_BYTES_MAX: u64 = 4 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error("{path}: not valid UTF-8 text (at byte {offset})")]
    NotUtf8 { path: PathBuf, offset: usize },
    #[error("{path}:{line}: {message}")]
    Jsonl { path: PathBuf, line: usize, message: String },
    #[error("{path}: no text found")]
    Empty { path: PathBuf },
    #[error("{path}: {bytes} bytes exceeds the {TEXT_FILE_BYTES_MAX}-byte limit for one text file")]
    TooLarge { path: PathBuf, bytes: u64 },
    #[error("corpus of {tokens} tokens is too small: need at least {needed}")]
    TooSmall { tokens: usize, needed: usize },
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Shard(#[from] ShardError),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CorpusError {
    CorpusError::Io { path: path.to_owned(), message: e.to_string() }
}

/// Where a corpus's documents come from.
pub struct TextSource;

impl TextSource {
    /// Reads every document under `path`: a text file is one document, a `.jsonl` file holds one
    /// document per line in its `text` field, a directory is all such files in name order.
    pub fn read(path: &Path) -> Result<Vec<String>, CorpusError> {
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, e))?;
        let mut docs = Vec::new();
        if meta.is_dir() {
            let mut files: Vec<PathBuf> = Vec::new();
            collect_files(path, &mut files)?;
            files.sort();
            for f in files {
                read_file(&f, &mut docs)?;
            }
        } else {
            read_file(path, &mut docs)?;
        }
        if docs.iter().all(|d| d.is_empty()) {
            return Err(CorpusError::Empty { path: path.to_owned() });
        }
        Ok(docs)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CorpusError> {
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let kind = entry.file_type().map_err(|e| io_err(&path, e))?;
        if kind.is_dir() {
            collect_files(&path, out)?;
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

fn read_file(path: &Path, docs: &mut Vec<String>) -> Result<(), CorpusError> {
    let bytes_len = std::fs::metadata(path).map_err(|e| io_err(path, e))?.len();
    if bytes_len > TEXT_FILE_BYTES_MAX {
        return Err(CorpusError::TooLarge { path: path.to_owned(), bytes: bytes_len });
    }
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| CorpusError::NotUtf8 { path: path.to_owned(), offset: e.utf8_error().valid_up_to() })?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let jsonl_err = |message: String| CorpusError::Jsonl { path: path.to_owned(), line: i + 1, message };
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| jsonl_err(e.to_string()))?;
            match value.get("text") {
                Some(serde_json::Value::String(s)) => docs.push(s.clone()),
                Some(_) => return Err(jsonl_err("field \"text\" is not a string".into())),
                None => return Err(jsonl_err("object has no \"text\" field".into())),
            }
        }
    } else {
        docs.push(text);
    }
    Ok(())
}

/// Where the tokens came from and what the best achievable loss is, if known.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetInfo {
    /// For people: a path or a description. Not used to decide whether two datasets agree.
    pub name: String,
    /// The true entropy rate in nats per token, when the source is known exactly.
    pub loss_floor: Option<f64>,
    /// BLAKE3 (hex) of both token streams: two datasets are the same data iff these match.
    pub fingerprint: String,
}

/// BLAKE3 of the training and validation tokens (u32 LE, each stream length-prefixed).
pub fn fingerprint(train: &[u32], validation: &[u32]) -> String {
    let mut hasher = blake3::Hasher::new();
    for stream in [train, validation] {
        hasher.update(&(stream.len() as u64).to_le_bytes());
        for t in stream {
            hasher.update(&t.to_le_bytes());
        }
    }
    hasher.finalize().to_hex().to_string()
}

/// A tokenized corpus with its fixed held-out validation split.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub info: DatasetInfo,
    pub tokenizer: TessTokenizer,
    pub train: Vec<u32>,
    pub validation: Vec<u32>,
}

impl Dataset {
    /// The embedded default corpus: `train_chars` of training text and `val_chars` of independent
    /// validation text, character-level, with its exact loss floor.
    pub fn synthetic(spec: SyntheticSpec, train_chars: usize, val_chars: usize) -> Result<Dataset, CorpusError> {
        let source = SyntheticSource::new(spec);
        let tokenizer = TessTokenizer::from_chars(&source.alphabet());
        let train = tokenizer.encode(&source.train_text(train_chars))?;
        let validation = tokenizer.encode(&source.validation_text(val_chars))?;
        Ok(Dataset {
            info: DatasetInfo {
                name: format!("synthetic(seed={}, words={})", spec.seed, spec.n_words),
                loss_floor: Some(source.entropy_rate_nats_per_char()),
                fingerprint: fingerprint(&train, &validation),
            },
            tokenizer,
            train,
            validation,
        })
    }

    /// Tokenizes documents (separated by EOS) and holds out the last tenth for validation.
    pub fn from_documents(name: &str, docs: &[String], tokenizer: TessTokenizer) -> Result<Dataset, CorpusError> {
        let mut tokens = Vec::new();
        for (i, doc) in docs.iter().enumerate() {
            if i > 0 {
                tokens.push(tokenizer.eos_id());
            }
            tokens.extend(tokenizer.encode(doc)?);
        }
        let needed = 64;
        if tokens.len() < needed {
            return Err(CorpusError::TooSmall { tokens: tokens.len(), needed });
        }
        let split = ((tokens.len() as f64) * (1.0 - VALIDATION_FRACTION)).round() as usize;
        let validation = tokens.split_off(split);
        let info =
            DatasetInfo { name: name.to_owned(), loss_floor: None, fingerprint: fingerprint(&tokens, &validation) };
        Ok(Dataset { info, tokenizer, train: tokens, validation })
    }

    /// Reads `path` and tokenizes it with `tokenizer`, or a new built-in tokenizer of `kind`.
    pub fn from_path(
        path: &Path,
        tokenizer: Option<TessTokenizer>,
        kind: TokenizerKind,
    ) -> Result<Dataset, CorpusError> {
        let docs = TextSource::read(path)?;
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => match kind {
                TokenizerKind::Byte => TessTokenizer::byte_level(),
                TokenizerKind::Char => TessTokenizer::char_level(&docs.concat()),
            },
        };
        Dataset::from_documents(&path.display().to_string(), &docs, tokenizer)
    }

    /// Writes the dataset as a published dataset in `dir` (`manifest.json`, `tokenizer.json`,
    /// `shards/`), each split cut into shards of at most `shard_tokens`; a shard's provenance is
    /// its token range in the split. Returns the manifest and its identity.
    pub fn write_manifest(&self, dir: &Path, shard_tokens: u64) -> Result<(Manifest, String), CorpusError> {
        use crate::manifest::{self, PrepareStats, Provenance, Split, TokenizerInfo};
        if shard_tokens == 0 {
            return Err(io_err(dir, "shard size must be positive"));
        }
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let tokenizer_path = dir.join(manifest::TOKENIZER_FILE);
        self.tokenizer.save(&tokenizer_path)?;
        let tokenizer_bytes = std::fs::read(&tokenizer_path).map_err(|e| io_err(&tokenizer_path, e))?;
        let vocab = self.tokenizer.vocab_size() as u32;
        let eos = self.tokenizer.eos_id();
        let mut shards = Vec::new();
        for (split, tokens, what) in
            [(Split::Train, &self.train, "train"), (Split::Validation, &self.validation, "validation")]
        {
            for (i, chunk) in tokens.chunks(shard_tokens as usize).enumerate() {
                let start = i as u64 * shard_tokens;
                let sources = vec![Provenance {
                    source: format!("{} ({what} tokens)", self.info.name),
                    rows: [start, start + chunk.len() as u64],
                }];
                let documents = chunk.iter().filter(|&&t| t == eos).count() as u64;
                let entry = manifest::write_shard(dir, split, chunk.to_vec(), vocab, documents, sources)
                    .map_err(|e| io_err(dir, e))?;
                shards.push(entry);
            }
        }
        let total = (self.train.len() + self.validation.len()).max(1) as f64;
        let m = Manifest {
            format: manifest::FORMAT.into(),
            name: self.info.name.clone(),
            tokenizer: TokenizerInfo {
                hash: manifest::hash_hex(&tokenizer_bytes),
                vocab_size: vocab,
                eos_id: eos,
                eos_token: self.tokenizer.eos_token(),
            },
            shard_tokens,
            validation_per_mille: ((self.validation.len() as f64 / total) * 1000.0).round() as u32,
            shards,
            stats: PrepareStats {
                train_tokens: self.train.len() as u64,
                validation_tokens: self.validation.len() as u64,
                ..PrepareStats::default()
            },
            loss_floor: self.info.loss_floor,
        };
        m.check().map_err(|e| io_err(dir, e))?;
        let bytes = m.to_bytes();
        let path = dir.join(manifest::MANIFEST_FILE);
        std::fs::write(&path, &bytes).map_err(|e| io_err(&path, e))?;
        Ok((m, manifest::hash_hex(&bytes)))
    }

    /// Reads a whole published dataset (a manifest file or the directory holding
    /// `manifest.json`, its `tokenizer.json` and `shards/`) into memory, checking the tokenizer
    /// and every shard against the manifest. Its fingerprint is the manifest's identity. For local
    /// training and small runs: a contributor holds only the shards it is assigned.
    pub fn from_manifest(path: &Path) -> Result<Dataset, CorpusError> {
        use crate::manifest::{self, Split};
        let (m, id) = Manifest::read(path).map_err(|e| io_err(path, e))?;
        let root = if path.is_dir() { path.to_owned() } else { path.parent().unwrap_or(Path::new(".")).to_owned() };
        let tokenizer_path = root.join(manifest::TOKENIZER_FILE);
        let tokenizer_bytes = std::fs::read(&tokenizer_path).map_err(|e| io_err(&tokenizer_path, e))?;
        if manifest::hash_hex(&tokenizer_bytes) != m.tokenizer.hash {
            return Err(io_err(&tokenizer_path, "this is not the tokenizer the manifest names (hash differs)"));
        }
        let tokenizer = TessTokenizer::load_with_eos(&tokenizer_path, Some(&m.tokenizer.eos_token))?;
        if tokenizer.vocab_size() as u32 != m.tokenizer.vocab_size || tokenizer.eos_id() != m.tokenizer.eos_id {
            return Err(io_err(&tokenizer_path, "vocabulary or end-of-text id differs from the manifest's"));
        }
        let read = |split| -> Result<Vec<u32>, CorpusError> {
            let mut out = Vec::with_capacity(m.tokens(split) as usize);
            for entry in m.split(split) {
                out.extend(manifest::read_shard(&root, entry, m.tokenizer.vocab_size).map_err(|e| io_err(&root, e))?);
            }
            Ok(out)
        };
        let info = DatasetInfo { name: m.name.clone(), loss_floor: m.loss_floor, fingerprint: id };
        Ok(Dataset { info, tokenizer, train: read(Split::Train)?, validation: read(Split::Validation)? })
    }

    /// Whether `path` is a manifest file or a directory holding one.
    pub fn is_manifest(path: &Path) -> bool {
        path.join(crate::manifest::MANIFEST_FILE).is_file()
            || (path.is_file() && path.extension().is_some_and(|e| e == "json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_dirs_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "first document").unwrap();
        std::fs::write(dir.path().join("b.jsonl"), "{\"text\": \"second\"}\n\n{\"text\": \"third\", \"id\": 3}\n")
            .unwrap();
        let docs = TextSource::read(dir.path()).unwrap();
        assert_eq!(docs, vec!["first document", "second", "third"]);
    }

    #[test]
    fn bad_inputs_name_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let jsonl = dir.path().join("bad.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
        let err = TextSource::read(&jsonl).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2") && err.contains("text"), "{err}");
        let bin = dir.path().join("bin.txt");
        std::fs::write(&bin, [b'a', 0xff, 0xfe]).unwrap();
        let err = TextSource::read(&bin).unwrap_err().to_string();
        assert!(err.contains("bin.txt") && err.contains("UTF-8"), "{err}");
        let missing = TextSource::read(&dir.path().join("missing.txt")).unwrap_err().to_string();
        assert!(missing.contains("missing.txt"), "{missing}");
    }

    #[test]
    fn split_is_ninety_ten_and_manifests_round_trip() {
        let text = "abcdefghij".repeat(100);
        let ds = Dataset::from_documents("t", &[text], TessTokenizer::char_level("abcdefghij")).unwrap();
        assert_eq!(ds.train.len(), 900);
        assert_eq!(ds.validation.len(), 100);
        let dir = tempfile::tempdir().unwrap();
        let (m, id) = ds.write_manifest(dir.path(), 400).unwrap();
        assert_eq!(m.shards.len(), 4);
        let back = Dataset::from_manifest(dir.path()).unwrap();
        assert_eq!((&back.train, &back.validation), (&ds.train, &ds.validation));
        assert_eq!(back.info.fingerprint, id);
        let shard = |i: usize| dir.path().join(crate::manifest::shard_path(&m.shards[i].hash));
        // A missing shard is named.
        std::fs::rename(shard(2), dir.path().join("moved.bin")).unwrap();
        let err = Dataset::from_manifest(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&m.shards[2].hash), "{err}");
        std::fs::rename(dir.path().join("moved.bin"), shard(2)).unwrap();
        // A corrupt shard is caught by its hash and named.
        let mut bytes = std::fs::read(shard(1)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(shard(1), bytes).unwrap();
        let err = Dataset::from_manifest(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&m.shards[1].hash) && err.contains("corrupt"), "{err}");
        // So is a tokenizer that is not the manifest's.
        TessTokenizer::byte_level().save(&dir.path().join("tokenizer.json")).unwrap();
        let err = Dataset::from_manifest(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer"), "{err}");
    }

    #[test]
    fn synthetic_dataset_has_a_floor_and_char_tokens() {
        let ds = Dataset::synthetic(SyntheticSpec::default(), 10_000, 2_000).unwrap();
        assert_eq!(ds.train.len(), 10_000);
        assert_eq!(ds.validation.len(), 2_000);
        let floor = ds.info.loss_floor.unwrap();
        assert!(floor > 0.0 && floor < 3.0);
    }
}
