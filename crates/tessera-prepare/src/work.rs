//! The preparation itself: documents in order → dedup → split → tokenize (all cores) → shards,
//! with a journal under `OUT/.prepare/` that lets a killed run resume.
//!
//! Journal: `state.json` (the cursor — input and row — the statistics, how many shard entries,
//! kept-document hashes and partial-shard tokens are valid), `shards.jsonl` (one finished
//! shard's entry per line), `seen.bin` (16-byte hashes of the kept documents), and
//! `pending-{train,validation}.bin` (each split's partial shard, u32 LE). Shards are written
//! (renamed into place) before the state that counts them, and the appendable files are cut back
//! to the state's lengths on resume, so whatever the moment of a kill, the resumed run writes
//! exactly the shards and manifest an uninterrupted one would.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tessera_data::TessTokenizer;
use tessera_data::manifest::{self, Manifest, PrepareStats, Provenance, ShardEntry, Split, TokenizerInfo};

use crate::source::{self, Batch, Input, RawDoc};
use crate::{PrepareConfig, PrepareError, io_err};

const JOURNAL: &str = ".prepare";
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Where a preparation is, for a progress line.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub input: usize,
    pub inputs: usize,
    pub input_name: String,
    pub stats: PrepareStats,
    pub shards: usize,
    pub elapsed_s: f64,
    /// Shards found finished in the journal when this run started.
    pub resumed_shards: usize,
}

/// A split's partial shard: tokens not yet in a shard, the documents that start in them and
/// where those came from (input index, row range).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Pending {
    #[serde(skip)]
    tokens: Vec<u32>,
    tokens_len: u64,
    documents: u64,
    sources: Vec<(usize, [u64; 2])>,
    /// Tokens already in the journal file; the rest are appended at the next checkpoint.
    #[serde(skip)]
    flushed: usize,
    /// The file must be rewritten (a shard was cut from the front since the last checkpoint).
    #[serde(skip)]
    rewrite: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    /// Hash of everything that decides the output: a journal of other settings is refused.
    config: String,
    input: usize,
    row: u64,
    stats: PrepareStats,
    shards: usize,
    seen: u64,
    train: Pending,
    validation: Pending,
}

struct Job<'a> {
    config: &'a PrepareConfig,
    inputs: &'a [Input],
    tokenizer: TessTokenizer,
    vocab: u32,
    journal: PathBuf,
    state: State,
    seen: HashSet<u128>,
    /// Kept-document hashes not yet appended to `seen.bin`.
    new_seen: Vec<u128>,
    /// Finished shard entries not yet appended to `shards.jsonl`.
    new_shards: Vec<ShardEntry>,
    shards: Vec<ShardEntry>,
}

fn config_hash(config: &PrepareConfig, inputs: &[Input], tokenizer_hash: &str) -> String {
    let described = serde_json::json!({
        "inputs": inputs.iter().map(|i| (&i.name, i.size)).collect::<Vec<_>>(),
        "tokenizer": tokenizer_hash, "eos": config.eos_token, "columns": config.columns,
        "shard_tokens": config.shard_tokens, "validation_per_mille": config.validation_per_mille,
        "refuse_invalid_utf8": config.refuse_invalid_utf8,
    });
    manifest::hash_hex(described.to_string().as_bytes())
}

/// A document after the checks that need no shared state.
enum Checked {
    Empty,
    NotUtf8,
    Text { hash: u128, split: Split, text: String },
}

fn check(RawDoc { id, text }: RawDoc, per_mille: u32) -> Checked {
    let Some(bytes) = text else { return Checked::Empty };
    match String::from_utf8(bytes) {
        Err(_) => Checked::NotUtf8,
        Ok(text) if text.trim().is_empty() => Checked::Empty,
        Ok(text) => {
            let hash = text_hash(&text);
            Checked::Text { hash, split: split_of(id.as_deref(), hash, per_mille), text }
        }
    }
}

/// Whitespace-normalised text's hash: documents that differ only in spacing are duplicates.
fn text_hash(text: &str) -> u128 {
    let mut h = blake3::Hasher::new();
    for (i, word) in text.split_whitespace().enumerate() {
        if i > 0 {
            h.update(b" ");
        }
        h.update(word.as_bytes());
    }
    let mut first = [0u8; 16];
    first.copy_from_slice(&h.finalize().as_bytes()[..16]);
    u128::from_le_bytes(first)
}

/// Validation iff the hash of the document's id (its text hash when it has none) falls in the
/// first `per_mille` thousandths.
fn split_of(id: Option<&str>, text: u128, per_mille: u32) -> Split {
    let key = match id {
        Some(id) => blake3::derive_key("tessera 2026 validation split v1", id.as_bytes()),
        None => blake3::derive_key("tessera 2026 validation split v1", &text.to_le_bytes()),
    };
    let mut first = [0u8; 8];
    first.copy_from_slice(&key[..8]);
    if u64::from_le_bytes(first) % 1000 < u64::from(per_mille) { Split::Validation } else { Split::Train }
}

/// Prepares `config.inputs` into `config.out`; returns the manifest and its identity. Resumes
/// an unfinished run of the same settings in `config.out`.
pub fn prepare(
    config: &PrepareConfig,
    progress: &mut dyn FnMut(&Progress),
) -> Result<(Manifest, String), PrepareError> {
    if config.shard_tokens == 0 || config.shard_tokens > tessera_data::shard::SHARD_TOKENS_MAX {
        return Err(PrepareError::Invalid(format!("--shard-tokens {} is out of range", config.shard_tokens)));
    }
    if config.validation_per_mille == 0 || config.validation_per_mille >= 1000 {
        return Err(PrepareError::Invalid("--validation-per-mille must be in 1..=999".into()));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| PrepareError::Invalid(e.to_string()))?;
    let inputs = runtime.block_on(source::resolve(&config.inputs))?;
    let tokenizer_bytes = std::fs::read(&config.tokenizer).map_err(|e| io_err(&config.tokenizer, e))?;
    let tokenizer = TessTokenizer::load_with_eos(&config.tokenizer, config.eos_token.as_deref())?;
    let tokenizer_hash = manifest::hash_hex(&tokenizer_bytes);
    let journal = config.out.join(JOURNAL);
    if config.restart && journal.exists() {
        std::fs::remove_dir_all(&journal).map_err(|e| io_err(&journal, e))?;
    }
    std::fs::create_dir_all(&journal).map_err(|e| io_err(&journal, e))?;
    let mut job = Job {
        config,
        inputs: &inputs,
        vocab: tokenizer.vocab_size() as u32,
        tokenizer,
        journal,
        state: State { config: config_hash(config, &inputs, &tokenizer_hash), ..State::default() },
        seen: HashSet::new(),
        new_seen: Vec::new(),
        new_shards: Vec::new(),
        shards: Vec::new(),
    };
    job.resume()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads)
        .build()
        .map_err(|e| PrepareError::Invalid(e.to_string()))?;
    let started = Instant::now();
    let resumed_shards = job.shards.len();
    let mut report = |job: &Job| {
        progress(&Progress {
            input: job.state.input,
            inputs: inputs.len(),
            input_name: inputs.get(job.state.input).map(|i| i.name.clone()).unwrap_or_default(),
            stats: job.state.stats.clone(),
            shards: job.shards.len() + job.new_shards.len(),
            elapsed_s: started.elapsed().as_secs_f64(),
            resumed_shards,
        })
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Batch, PrepareError>>(2);
    let (start_input, start_row) = (job.state.input, job.state.row);
    let reader_inputs = inputs.clone();
    let columns = config.columns.clone();
    let reader = runtime.spawn(async move {
        for (i, input) in reader_inputs.iter().enumerate().skip(start_input) {
            let skip = if i == start_input { start_row } else { 0 };
            match source::read_input(i, input, &columns, skip, &tx).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    let mut last_checkpoint = Instant::now();
    while let Some(batch) = rx.blocking_recv() {
        let batch = batch?;
        let emitted = pool.install(|| job.take(batch))?;
        if emitted || last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
            job.checkpoint()?;
            report(&job);
            last_checkpoint = Instant::now();
        }
    }
    runtime.block_on(reader).map_err(|e| PrepareError::Invalid(format!("the reader failed: {e}")))?;
    job.state.input = inputs.len();
    job.state.row = 0;
    let out = job.finish(&tokenizer_bytes)?;
    report(&job);
    Ok(out)
}

impl Job<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.journal.join(name)
    }

    /// Loads the journal of an unfinished run, cutting its appendable files back to what the
    /// last checkpoint counted.
    fn resume(&mut self) -> Result<(), PrepareError> {
        let state_path = self.path("state.json");
        let Ok(text) = std::fs::read(&state_path) else { return Ok(()) };
        let state: State = serde_json::from_slice(&text).map_err(|e| io_err(&state_path, e))?;
        if state.config != self.state.config {
            return Err(PrepareError::OtherJournal { out: self.config.out.clone() });
        }
        let seen = read_cut(&self.path("seen.bin"), state.seen * 16)?;
        self.seen = seen.chunks_exact(16).map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; 16]))).collect();
        let shards_path = self.path("shards.jsonl");
        let lines = std::fs::read_to_string(&shards_path).unwrap_or_default();
        for line in lines.lines().take(state.shards) {
            let entry: ShardEntry = serde_json::from_str(line).map_err(|e| io_err(&shards_path, e))?;
            self.shards.push(entry);
        }
        if self.shards.len() != state.shards {
            return Err(io_err(&shards_path, "the journal lists fewer shards than its state counts"));
        }
        rewrite(
            &shards_path,
            lines.lines().take(state.shards).map(|l| format!("{l}\n")).collect::<String>().as_bytes(),
        )?;
        self.state = state;
        for split in [Split::Train, Split::Validation] {
            let file = self.pending_path(split);
            let pending = self.pending(split);
            let bytes = read_cut(&file, pending.tokens_len * 4)?;
            pending.tokens = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            pending.flushed = pending.tokens.len();
        }
        tracing::info!(shards = self.shards.len(), input = self.state.input, row = self.state.row, "resuming");
        Ok(())
    }

    fn pending_path(&self, split: Split) -> PathBuf {
        self.path(match split {
            Split::Train => "pending-train.bin",
            Split::Validation => "pending-validation.bin",
        })
    }

    fn pending(&mut self, split: Split) -> &mut Pending {
        match split {
            Split::Train => &mut self.state.train,
            Split::Validation => &mut self.state.validation,
        }
    }

    /// Takes one batch: decides each document, tokenizes the kept ones on every core, appends
    /// them in order. Returns whether a shard was finished.
    fn take(&mut self, batch: Batch) -> Result<bool, PrepareError> {
        let input = &self.inputs[batch.input];
        let rows = batch.docs.len() as u64;
        let per_mille = self.config.validation_per_mille;
        // UTF-8, blank and hash checks on every core; only the dedup set is touched in order.
        let checked: Vec<Checked> = batch.docs.into_par_iter().map(|doc| check(doc, per_mille)).collect();
        let mut kept: Vec<(u64, Split, String)> = Vec::with_capacity(checked.len());
        for (offset, doc) in checked.into_iter().enumerate() {
            let row = batch.first_row + offset as u64;
            let stats = &mut self.state.stats;
            stats.documents_read += 1;
            match doc {
                Checked::Empty => stats.empty += 1,
                Checked::NotUtf8 if self.config.refuse_invalid_utf8 => {
                    return Err(PrepareError::InvalidUtf8 { input: input.name.clone(), row });
                }
                Checked::NotUtf8 => stats.invalid_utf8 += 1,
                Checked::Text { hash, .. } if !self.seen.insert(hash) => stats.duplicates += 1,
                Checked::Text { hash, split, text } => {
                    self.new_seen.push(hash);
                    kept.push((row, split, text));
                }
            }
        }
        let tokenizer = &self.tokenizer;
        let encoded: Vec<Vec<u32>> =
            kept.par_iter().map(|(_, _, text)| tokenizer.encode(text)).collect::<Result<_, _>>()?;
        let mut emitted = false;
        for ((row, split, _), tokens) in kept.into_iter().zip(encoded) {
            emitted |= self.append(split, batch.input, row, tokens)?;
        }
        // The cursor: the next unread row.
        self.state.input = batch.input;
        self.state.row = batch.first_row + rows;
        Ok(emitted)
    }

    fn append(&mut self, split: Split, input: usize, row: u64, mut tokens: Vec<u32>) -> Result<bool, PrepareError> {
        let eos = self.tokenizer.eos_id();
        let shard_tokens = self.config.shard_tokens as usize;
        let stats = &mut self.state.stats;
        match split {
            Split::Train => (stats.train_documents += 1, stats.train_tokens += tokens.len() as u64 + 1),
            Split::Validation => (stats.validation_documents += 1, stats.validation_tokens += tokens.len() as u64 + 1),
        };
        tokens.push(eos);
        let pending = self.pending(split);
        pending.documents += 1;
        match pending.sources.last_mut() {
            Some((i, rows)) if *i == input && rows[1] == row => rows[1] = row + 1,
            _ => pending.sources.push((input, [row, row + 1])),
        }
        pending.tokens.extend_from_slice(&tokens);
        let mut emitted = false;
        while self.pending(split).tokens.len() >= shard_tokens {
            self.emit(split, shard_tokens)?;
            emitted = true;
        }
        Ok(emitted)
    }

    /// Cuts the first `count` pending tokens of `split` into a shard.
    fn emit(&mut self, split: Split, count: usize) -> Result<(), PrepareError> {
        let pending = self.pending(split);
        let rest = pending.tokens.split_off(count);
        let tokens = std::mem::replace(&mut pending.tokens, rest);
        let documents = std::mem::take(&mut pending.documents);
        let sources = std::mem::take(&mut pending.sources);
        pending.rewrite = true;
        pending.flushed = 0;
        let sources =
            sources.into_iter().map(|(i, rows)| Provenance { source: self.inputs[i].name.clone(), rows }).collect();
        let entry = manifest::write_shard(&self.config.out, split, tokens, self.vocab, documents, sources)?;
        self.new_shards.push(entry);
        Ok(())
    }

    /// Makes the journal say what has been done: appendable files first, `state.json` last.
    fn checkpoint(&mut self) -> Result<(), PrepareError> {
        let seen: Vec<u8> = self.new_seen.drain(..).flat_map(u128::to_le_bytes).collect();
        append(&self.path("seen.bin"), &seen)?;
        self.state.seen = self.seen.len() as u64;
        let lines: String = self
            .new_shards
            .iter()
            .map(|e| serde_json::to_string(e).map(|l| l + "\n"))
            .collect::<Result<_, _>>()
            .map_err(|e| PrepareError::Invalid(e.to_string()))?;
        append(&self.path("shards.jsonl"), lines.as_bytes())?;
        self.shards.append(&mut self.new_shards);
        self.state.shards = self.shards.len();
        for split in [Split::Train, Split::Validation] {
            let file = self.pending_path(split);
            let pending = self.pending(split);
            let fresh: Vec<u8> = pending.tokens[pending.flushed..].iter().flat_map(|t| t.to_le_bytes()).collect();
            if pending.rewrite {
                rewrite(&file, &fresh)?;
            } else {
                append(&file, &fresh)?;
            }
            pending.rewrite = false;
            pending.flushed = pending.tokens.len();
            pending.tokens_len = pending.tokens.len() as u64;
        }
        let bytes = serde_json::to_vec(&self.state).map_err(|e| PrepareError::Invalid(e.to_string()))?;
        rewrite(&self.path("state.json"), &bytes)
    }

    /// Cuts the last partial shards, writes the tokenizer and the manifest, removes the journal.
    fn finish(&mut self, tokenizer_bytes: &[u8]) -> Result<(Manifest, String), PrepareError> {
        for split in [Split::Train, Split::Validation] {
            let left = self.pending(split).tokens.len();
            if left > 0 {
                self.emit(split, left)?;
            }
        }
        self.checkpoint()?;
        let out = &self.config.out;
        let manifest = Manifest {
            format: manifest::FORMAT.into(),
            name: self.config.name.clone(),
            tokenizer: TokenizerInfo {
                hash: manifest::hash_hex(tokenizer_bytes),
                vocab_size: self.vocab,
                eos_id: self.tokenizer.eos_id(),
                eos_token: self.tokenizer.eos_token(),
            },
            shard_tokens: self.config.shard_tokens,
            validation_per_mille: self.config.validation_per_mille,
            shards: self.shards.clone(),
            stats: self.state.stats.clone(),
            loss_floor: None,
        };
        manifest.check().map_err(|e| match e {
            tessera_data::ManifestError::Invalid(m) if m.contains("no ") => PrepareError::Invalid(format!(
                "{m}: too little text kept ({} documents read) for both splits",
                self.state.stats.documents_read
            )),
            other => other.into(),
        })?;
        rewrite(&out.join(manifest::TOKENIZER_FILE), tokenizer_bytes)?;
        let bytes = manifest.to_bytes();
        rewrite(&out.join(manifest::MANIFEST_FILE), &bytes)?;
        std::fs::remove_dir_all(&self.journal).map_err(|e| io_err(&self.journal, e))?;
        Ok((manifest, manifest::hash_hex(&bytes)))
    }
}

/// A file's first `len` bytes (the rest, written after the last checkpoint, is dropped).
fn read_cut(path: &Path, len: u64) -> Result<Vec<u8>, PrepareError> {
    let mut bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && len == 0 => Vec::new(),
        Err(e) => return Err(io_err(path, e)),
    };
    if (bytes.len() as u64) < len {
        return Err(io_err(path, format!("journal file is {} bytes, its state counts {len}", bytes.len())));
    }
    bytes.truncate(len as usize);
    rewrite(path, &bytes)?;
    Ok(bytes)
}

fn append(path: &Path, bytes: &[u8]) -> Result<(), PrepareError> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))
}

/// Replaces a file whole: written beside it, then renamed over it.
fn rewrite(path: &Path, bytes: &[u8]) -> Result<(), PrepareError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacing_does_not_make_a_document_new() {
        assert_eq!(text_hash("a  b\n c "), text_hash("a b c"));
        assert_ne!(text_hash("a b c"), text_hash("a b d"));
    }

    #[test]
    fn about_the_asked_fraction_is_validation_and_ids_decide() {
        let n = 100_000;
        let val = (0..n).filter(|i| split_of(Some(&format!("doc-{i}")), 0, 10) == Split::Validation).count();
        assert!((800..1200).contains(&val), "{val} of {n}");
        assert_eq!(split_of(Some("x"), 1, 10), split_of(Some("x"), 2, 10));
    }
}
