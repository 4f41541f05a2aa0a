//! Fetching a published dataset (`tessera data publish`): its manifest, its tokenizer and only
//! the shards asked for, from one or more base URLs (mirrors, tried in turn) or a local
//! directory. Every shard is checked against its BLAKE3 before it is used; downloads resume with
//! a Range request after a dropped connection; a disk cache holds at most `cap` bytes of shards,
//! dropping the least recently used; [`ShardCache::prefetch`] fetches the next shards on a
//! background thread while the current ones are trained on.
//!
//! Costs: memory, one shard being decoded (the caller's) plus a 64 KiB copy buffer per download;
//! disk, at most `cap` bytes of shards plus the tokenizer; network, each shard's bytes once while
//! it stays in the cache.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client;
use reqwest::header::{CONTENT_RANGE, RANGE};
use tessera_data::corpus::DatasetInfo;
use tessera_data::manifest::{self, Manifest, ShardEntry, Split};
use tessera_data::{Dataset, TessTokenizer};

use crate::link::{Link, pass};
use crate::{ClientError, Result};

/// Attempts per file before a download fails; each one resumes where the last stopped.
pub const ATTEMPTS: u32 = 6;

/// What the cache has done so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FetchStats {
    pub downloaded_bytes: u64,
    pub shards_fetched: u64,
    pub cache_hits: u64,
    pub evicted: u64,
    /// Attempts that failed and were resumed.
    pub retries: u64,
    /// Time callers spent waiting in [`ShardCache::shard`] for a shard not yet on disk.
    pub stall_s: f64,
}

/// A published dataset and a disk cache of its shards.
pub struct ShardCache {
    sources: Vec<String>,
    http: Client,
    link: Option<Link>,
    dir: PathBuf,
    cap: u64,
    pub manifest: Manifest,
    pub id: String,
    stats: Mutex<FetchStats>,
    /// Shards being downloaded (by hash): a second asker waits rather than fetching twice.
    busy: Mutex<HashSet<String>>,
}

fn io(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Io { path: path.display().to_string(), message: e.to_string() }
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://")
}

/// Every dataset a manifest run trains on: the run's own (`fingerprint`, cached in `dir`) then
/// each of its mixture's (cached in `dir/mix-I`), each checked against its identity and to use
/// the run's tokenizer, each with its own cap of `cap` bytes. Empty for other sources.
pub fn open_run_datasets(
    source: &tessera_protocol::api::DataSource,
    fingerprint: &str,
    dir: &Path,
    cap: u64,
    link: Option<Link>,
) -> Result<Vec<ShardCache>> {
    let tessera_protocol::api::DataSource::Manifest { urls, mixture, .. } = source else { return Ok(Vec::new()) };
    let own = ShardCache::open(urls, Some(fingerprint), dir, cap, link.clone())?;
    let mut all = Vec::with_capacity(mixture.len() + 1);
    for (i, m) in mixture.iter().enumerate() {
        let cache =
            ShardCache::open(&m.urls, Some(&m.fingerprint), &dir.join(format!("mix-{}", i + 1)), cap, link.clone())?;
        if cache.manifest.tokenizer.hash != own.manifest.tokenizer.hash {
            return Err(ClientError::BadAnswer {
                url: m.urls[0].clone(),
                message: format!("mixed dataset {:?} does not use the run's tokenizer", m.name),
            });
        }
        all.push(cache);
    }
    all.insert(0, own);
    Ok(all)
}

impl ShardCache {
    /// Opens the dataset at `sources` (base URLs or a directory), checking its manifest against
    /// `expected` (its identity) when given, with a cache in `dir` of at most `cap` bytes.
    pub fn open(
        sources: &[String],
        expected: Option<&str>,
        dir: &Path,
        cap: u64,
        link: Option<Link>,
    ) -> Result<ShardCache> {
        if sources.is_empty() {
            return Err(ClientError::Usage("a dataset needs at least one URL or directory".into()));
        }
        let http = Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // A stalled server is cut off; the next attempt resumes where this one stopped.
            .timeout(crate::REQUEST_TIMEOUT)
            .build()
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let sources: Vec<String> = sources.iter().map(|s| s.trim_end_matches('/').to_owned()).collect();
        let bytes = small(&http, &sources, manifest::MANIFEST_FILE)?;
        let (manifest, id) = Manifest::parse(&bytes).map_err(|e| ClientError::BadAnswer {
            url: format!("{}/{}", sources[0], manifest::MANIFEST_FILE),
            message: e.to_string(),
        })?;
        if let Some(want) = expected
            && want != id
        {
            return Err(ClientError::BadAnswer {
                url: sources[0].clone(),
                message: format!("the manifest there is dataset {id}, not {want}"),
            });
        }
        let tokenizer = small(&http, &sources, manifest::TOKENIZER_FILE)?;
        if manifest::hash_hex(&tokenizer) != manifest.tokenizer.hash {
            return Err(ClientError::BadAnswer {
                url: sources[0].clone(),
                message: "its tokenizer.json is not the one the manifest names".into(),
            });
        }
        let cache = ShardCache {
            sources,
            http,
            link,
            dir: dir.to_owned(),
            cap,
            manifest,
            id,
            stats: Mutex::default(),
            busy: Mutex::default(),
        };
        let path = cache.tokenizer_path();
        std::fs::write(&path, tokenizer).map_err(|e| io(&path, e))?;
        Ok(cache)
    }

    /// The dataset's tokenizer, with the manifest's end-of-text token.
    pub fn tokenizer(&self) -> Result<TessTokenizer> {
        let path = self.tokenizer_path();
        TessTokenizer::load_with_eos(&path, Some(&self.manifest.tokenizer.eos_token)).map_err(|e| io(&path, e))
    }

    /// A dataset of this manifest's tokenizer and identity holding the tokens given.
    pub fn dataset(&self, train: Vec<u32>, validation: Vec<u32>) -> Result<Dataset> {
        let info = DatasetInfo {
            name: self.manifest.name.clone(),
            loss_floor: self.manifest.loss_floor,
            fingerprint: self.id.clone(),
        };
        Ok(Dataset { info, tokenizer: self.tokenizer()?, train, validation })
    }

    /// The whole dataset in memory: every training shard, then every validation shard, in
    /// manifest order (each fetched and checked). For local training.
    pub fn whole(&self) -> Result<Dataset> {
        self.dataset(self.split_tokens(Split::Train)?, self.split_tokens(Split::Validation)?)
    }

    /// What evaluating a model on this dataset needs: every validation shard (fetched and
    /// checked), and no training shard. A `Trainer` wants a training split; it gets the same
    /// tokens, since nothing trains on it (the validator cuts each submission's data-fit windows
    /// from the shard its assignment named).
    pub fn held_out(&self) -> Result<Dataset> {
        let validation = self.split_tokens(Split::Validation)?;
        self.dataset(validation.clone(), validation)
    }

    /// Every shard of `split`, in manifest order, one after another.
    fn split_tokens(&self, split: Split) -> Result<Vec<u32>> {
        let mut tokens = Vec::with_capacity(self.manifest.tokens(split) as usize);
        for (i, entry) in self.manifest.shards.iter().enumerate() {
            if entry.split == split {
                tokens.extend(self.shard(i)?);
            }
        }
        Ok(tokens)
    }

    /// The manifest index of the `k`-th training shard, the one an assignment's `shard` names.
    pub fn train_index(&self, k: u32) -> Result<usize> {
        self.manifest.train_shard(k).ok_or_else(|| {
            ClientError::Usage(format!(
                "the assignment names training shard {k}; the dataset has {} training shards",
                self.manifest.split(Split::Train).count()
            ))
        })
    }

    /// The dataset's `tokenizer.json`, checked against the manifest, in the cache.
    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    pub fn stats(&self) -> FetchStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn bump(&self, f: impl FnOnce(&mut FetchStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }

    fn shard_file(&self, entry: &ShardEntry) -> PathBuf {
        self.dir.join(format!("{}.tshard", entry.hash))
    }

    /// The tokens of shard `index` (manifest order), fetched if it is not in the cache.
    pub fn shard(&self, index: usize) -> Result<Vec<u32>> {
        let entry = self.entry(index)?.clone();
        let (path, _claim) = self.ensure(&entry, true)?;
        let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
        match manifest::decode_shard(&bytes, &entry, self.manifest.tokenizer.vocab_size) {
            Ok(tokens) => Ok(tokens),
            Err(message) => {
                // Changed on disk since it was checked: drop it so the next ask fetches it again.
                let _ = std::fs::remove_file(&path);
                Err(ClientError::BadAnswer { url: path.display().to_string(), message })
            }
        }
    }

    fn entry(&self, index: usize) -> Result<&ShardEntry> {
        self.manifest.shards.get(index).ok_or_else(|| {
            ClientError::Usage(format!("the dataset has {} shards, not {}", self.manifest.shards.len(), index + 1))
        })
    }

    /// Fetches shards `indices` in the background, in order; returns at once.
    pub fn prefetch(self: &Arc<Self>, indices: Vec<usize>) -> std::thread::JoinHandle<Result<()>> {
        let cache = Arc::clone(self);
        std::thread::spawn(move || {
            for i in indices {
                let entry = cache.entry(i)?.clone();
                cache.ensure(&entry, false)?;
            }
            Ok(())
        })
    }

    /// Makes sure the shard is on disk and whole; returns its path and a claim on it: while the
    /// claim lives no eviction removes the file. A shard another thread is fetching (a prefetch)
    /// is waited for, not fetched twice. `asked`: a caller needs it now, so any wait counts as a
    /// stall.
    fn ensure(&self, entry: &ShardEntry, asked: bool) -> Result<(PathBuf, Claim<'_>)> {
        let path = self.shard_file(entry);
        let started = Instant::now();
        let mut waited = false;
        while !self.busy.lock().map(|mut b| b.insert(entry.hash.clone())).unwrap_or(true) {
            waited = true;
            std::thread::sleep(Duration::from_millis(5));
        }
        let claim = Claim { cache: self, hash: entry.hash.clone() };
        let fetched = !path.is_file();
        if fetched {
            self.download(entry, &path)?;
            self.evict();
        } else {
            touch(&path);
            self.bump(|s| s.cache_hits += 1);
        }
        if asked && (waited || fetched) {
            let stall = started.elapsed().as_secs_f64();
            self.bump(|s| s.stall_s += stall);
        }
        Ok((path, claim))
    }

    /// Downloads a shard into `<hash>.partial`, resuming from what is there, then checks its
    /// BLAKE3 and renames it into place.
    fn download(&self, entry: &ShardEntry, path: &Path) -> Result<()> {
        let partial = path.with_extension("partial");
        let key = manifest::shard_path(&entry.hash);
        let mut last = String::new();
        for source in &self.sources {
            if !is_url(source) {
                let from = Path::new(source).join(&key);
                match std::fs::copy(&from, &partial) {
                    Ok(_) => return self.finish(entry, &partial, path),
                    Err(e) => last = format!("{}: {e}", from.display()),
                }
                continue;
            }
            let url = format!("{source}/{key}");
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    self.bump(|s| s.retries += 1);
                    std::thread::sleep(Duration::from_millis(200 << attempt.min(4)));
                }
                match self.get_rest(&url, &partial, entry.bytes) {
                    Ok(()) => return self.finish(entry, &partial, path),
                    Err(e) => last = format!("{url}: {e}"),
                }
            }
        }
        Err(ClientError::Unavailable { url: format!("shard {}", entry.hash), message: last })
    }

    /// GETs the bytes of `url` that `partial` lacks (a Range request when it has some) and
    /// appends them.
    fn get_rest(&self, url: &str, partial: &Path, total: u64) -> std::result::Result<(), String> {
        let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if have > total {
            let _ = std::fs::remove_file(partial);
            return Err("a partial download longer than the shard was dropped".into());
        }
        if have == total {
            return Ok(());
        }
        let mut request = self.http.get(url);
        if have > 0 {
            request = request.header(RANGE, format!("bytes={have}-"));
        }
        let mut response = request.send().map_err(|e| e.to_string())?;
        let mut file =
            std::fs::OpenOptions::new().create(true).append(true).open(partial).map_err(|e| e.to_string())?;
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {
                let starts_right = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
                if !starts_right {
                    let _ = std::fs::remove_file(partial);
                    return Err("the server answered a different range".into());
                }
            }
            StatusCode::OK if have > 0 => {
                // No Range support: start over.
                file.set_len(0).map_err(|e| e.to_string())?;
            }
            StatusCode::OK => {}
            other => return Err(format!("HTTP {other}")),
        }
        let chunk = self.link.as_ref().and_then(|l| l.lock().ok().map(|b| b.chunk())).unwrap_or(64 << 10).min(64 << 10);
        let mut buf = vec![0u8; chunk.max(1024)];
        let mut at = have;
        loop {
            let n = response.read(&mut buf).map_err(|e| format!("connection dropped: {e}"))?;
            if n == 0 {
                break;
            }
            at += n as u64;
            if at > total {
                // A server sending more than the shard holds is not serving this shard.
                let _ = std::fs::remove_file(partial);
                return Err(format!("the server sent more than the shard's {total} bytes"));
            }
            pass(self.link.as_ref(), n);
            file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
            self.bump(|s| s.downloaded_bytes += n as u64);
        }
        let now = file.metadata().map_err(|e| e.to_string())?.len();
        if now != total {
            return Err(format!("connection ended at byte {now} of {total}"));
        }
        Ok(())
    }

    fn finish(&self, entry: &ShardEntry, partial: &Path, path: &Path) -> Result<()> {
        let bytes = std::fs::read(partial).map_err(|e| io(partial, e))?;
        let got = manifest::hash_hex(&bytes);
        if got != entry.hash {
            let _ = std::fs::remove_file(partial);
            return Err(ClientError::BadAnswer {
                url: format!("shard {}", entry.hash),
                message: format!("the bytes served hash to {got}: corrupt or not this shard"),
            });
        }
        std::fs::rename(partial, path).map_err(|e| io(path, e))?;
        self.bump(|s| s.shards_fetched += 1);
        Ok(())
    }

    /// Drops the least recently used shards (never a claimed one: being fetched or read) until
    /// the cache fits its cap.
    fn evict(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut shards: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "tshard"))
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        let mut total: u64 = shards.iter().map(|s| s.1).sum();
        shards.sort();
        let busy = self.busy.lock().map(|b| b.clone()).unwrap_or_default();
        for (_, len, path) in shards {
            if total <= self.cap {
                break;
            }
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if busy.contains(&stem) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                self.bump(|s| s.evicted += 1);
            }
        }
    }
}

/// A small file (manifest, tokenizer) from the first source that has it.
fn small(http: &Client, sources: &[String], name: &str) -> Result<Vec<u8>> {
    let mut last = String::new();
    for source in sources {
        if !is_url(source) {
            let path = Path::new(source).join(name);
            match std::fs::read(&path) {
                Ok(b) => return Ok(b),
                Err(e) => last = format!("{}: {e}", path.display()),
            }
            continue;
        }
        let url = format!("{source}/{name}");
        for _ in 0..ATTEMPTS {
            let got = http.get(&url).send().and_then(|r| r.error_for_status()).map_err(|e| e.to_string());
            match got.and_then(|r| read_capped(r, manifest::MANIFEST_BYTES_MAX)) {
                Ok(b) => return Ok(b),
                Err(e) => last = format!("{url}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Err(ClientError::Unavailable { url: sources.join(", "), message: last })
}

/// A response body of at most `cap` bytes; a longer one is refused before it is all in memory.
fn read_capped(response: reqwest::blocking::Response, cap: usize) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    response.take(cap as u64 + 1).read_to_end(&mut out).map_err(|e| e.to_string())?;
    if out.len() > cap {
        return Err(format!("the answer is over {cap} bytes"));
    }
    Ok(out)
}

/// A shard in use: eviction leaves it alone until this is dropped.
struct Claim<'a> {
    cache: &'a ShardCache,
    hash: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.cache.busy.lock() {
            busy.remove(&self.hash);
        }
    }
}

/// Marks a cached shard as just used.
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}
