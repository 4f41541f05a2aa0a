//! What several commands share, and nothing else imports from the rest of the binary: the
//! data, runtime and codec arguments, and setting up the runtime (threads, device) and data
//! they describe. A leaf module: it uses the library crates only.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use tch::Device;
use tessera_data::{Dataset, SyntheticSpec, TessTokenizer, TokenizerKind};
use tessera_protocol::Codec;

/// Where training text comes from.
#[derive(Args, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataArgs {
    /// A prepared dataset (its manifest.json or directory, from `tessera data prepare`; or the
    /// http(s) URL it is published under, fetched into ~/.cache/tessera), a UTF-8 text file, a
    /// directory of them, or JSONL with a `text` field. Default: the embedded synthetic corpus.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokenizer for --data: `char`, `byte`, or a tokenizer.json (e.g. from `tessera tokenizer train`).
    #[arg(long, default_value = "char")]
    pub tokenizer: String,
    /// Characters of embedded training text to generate (validation gets a tenth).
    #[arg(long, default_value_t = 4_000_000)]
    pub synthetic_chars: usize,
    /// Seed of the embedded corpus's source (a different seed is a different language).
    #[arg(long, default_value_t = 1234)]
    pub synthetic_seed: u64,
}

impl Default for DataArgs {
    fn default() -> Self {
        clap_defaults()
    }
}

/// The values clap gives `A` when no flag is passed: the single source of every default, so a
/// spec file that leaves a setting out means what leaving out the flag means.
pub fn clap_defaults<A: Args + clap::FromArgMatches>() -> A {
    let command = A::augment_args(clap::Command::new("tessera"));
    let matches = command.try_get_matches_from(["tessera"]).expect("every flag has a default or is optional");
    A::from_arg_matches(&matches).expect("defaults parse")
}

#[derive(Args, Clone)]
pub struct RuntimeArgs {
    /// `cpu`, `cuda` or `cuda:N` (CUDA uses bf16 matrix multiplies).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads for libtorch (default: libtorch's choice, usually all cores).
    #[arg(long)]
    pub threads: Option<i32>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CodecName {
    F32,
    Bf16,
    Int8,
    Int4,
    Topk,
}

/// Parameters of the pseudo-gradient codecs.
#[derive(Args, Clone, Copy)]
pub struct CodecArgs {
    /// Block size of int8 / int4.
    #[arg(long, default_value_t = 64)]
    pub block: u32,
    /// Top-k chunk size.
    #[arg(long, default_value_t = 4096)]
    pub topk_chunk: u32,
    /// Top-k values kept per chunk.
    #[arg(long, default_value_t = 16)]
    pub topk_k: u32,
}

pub fn make_codec(name: CodecName, p: CodecArgs) -> Result<tessera_protocol::Codec> {
    let codec = match name {
        CodecName::F32 => Codec::F32,
        CodecName::Bf16 => Codec::Bf16,
        CodecName::Int8 => Codec::Int8 { block: p.block },
        CodecName::Int4 => Codec::Int4 { block: p.block },
        CodecName::Topk => Codec::TopK { chunk: p.topk_chunk, k: p.topk_k },
    };
    codec.validate()?;
    Ok(codec)
}

/// A codec in its string form (`int8:64`, `topk:4096:16`), for clap.
pub fn parse_codec(s: &str) -> Result<Codec, String> {
    s.parse()
}

/// Megabits per second as bytes per second; refuses what is not a positive finite rate.
pub fn mbps(flag: &str, v: Option<f64>) -> Result<Option<f64>> {
    match v {
        Some(m) if m.is_finite() && m > 0.0 => Ok(Some(m * 1e6 / 8.0)),
        Some(m) => bail!("{flag} must be a positive number of megabits per second, not {m}"),
        None => Ok(None),
    }
}

/// Loads libtorch's CUDA half. The binary links it, but nothing names its symbols, so linkers
/// that drop unused libraries (`--as-needed`, Debian's and Ubuntu's default) leave it out;
/// loading it only when a GPU is asked for keeps CPU runs from mapping the CUDA libraries.
/// Loading it again when it is already there (a linker that kept it) changes nothing.
pub fn load_torch_cuda() -> Result<()> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let loaded = LOADED.get_or_init(|| {
        // SAFETY (both loads below): the library's initialisers register libtorch's CUDA
        // backend with the libtorch this binary already runs (the same installation, found
        // through the binary's rpath or LD_LIBRARY_PATH); it is never unloaded, so nothing it
        // registered can dangle.
        // Global, as a preloaded library would be, so later libraries resolve against it too.
        #[cfg(unix)]
        let library = unsafe {
            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
            Library::open(Some("libtorch_cuda.so"), RTLD_NOW | RTLD_GLOBAL)
        };
        #[cfg(not(unix))]
        let library = unsafe { libloading::Library::new("torch_cuda.dll") };
        match library {
            Ok(library) => {
                std::mem::forget(library);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    });
    match loaded {
        Ok(()) => Ok(()),
        Err(e) => {
            bail!("--device cuda: libtorch's CUDA library could not be loaded ({e}); is this PyTorch a CPU-only build?")
        }
    }
}

/// `--device` as a comma-separated list (`cuda:0,cuda:1`): each device set up and checked.
pub fn setup_devices(runtime: &RuntimeArgs) -> Result<Vec<Device>> {
    runtime
        .device
        .split(',')
        .map(|d| setup_runtime(&RuntimeArgs { device: d.trim().to_owned(), threads: runtime.threads }))
        .collect()
}

pub fn setup_runtime(runtime: &RuntimeArgs) -> Result<Device> {
    if let Some(n) = runtime.threads {
        if n < 1 {
            bail!("--threads must be at least 1");
        }
        tch::set_num_threads(n);
    }
    let device = match runtime.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Device::Cuda(i),
            _ => bail!("unknown device {other:?}: use cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(i) = device {
        // Before any CUDA query: libtorch settles on its CUDA hooks at the first one, and a
        // query made before the CUDA library is loaded disables CUDA for the whole process.
        load_torch_cuda()?;
        let count = tch::Cuda::device_count();
        if !tch::Cuda::is_available() || i as i64 >= count {
            bail!("CUDA device {i} requested but {count} CUDA device(s) are available");
        }
    }
    Ok(device)
}

pub fn load_dataset(args: &DataArgs) -> Result<Dataset> {
    let Some(path) = &args.data else {
        if args.synthetic_chars < 10_000 {
            bail!("--synthetic-chars must be at least 10000");
        }
        let spec = SyntheticSpec { seed: args.synthetic_seed, ..SyntheticSpec::default() };
        return Ok(Dataset::synthetic(spec, args.synthetic_chars, args.synthetic_chars / 10)?);
    };
    if is_url(path) {
        return Ok(published(&path.to_string_lossy())?.whole()?);
    }
    if Dataset::is_manifest(path) {
        return Ok(Dataset::from_manifest(path)?);
    }
    let (tokenizer, kind) = match args.tokenizer.as_str() {
        "char" => (None, TokenizerKind::Char),
        "byte" => (None, TokenizerKind::Byte),
        file => (Some(TessTokenizer::load(Path::new(file))?), TokenizerKind::Byte),
    };
    Ok(Dataset::from_path(path, tokenizer, kind)?)
}

/// What evaluating a model on `--data` needs: for a published dataset at a URL, only its
/// validation shards (`ShardCache::held_out`); anything else is loaded as it is.
pub fn evaluation_dataset(args: &DataArgs) -> Result<Dataset> {
    match &args.data {
        Some(path) if is_url(path) => Ok(published(&path.to_string_lossy())?.held_out()?),
        _ => load_dataset(args),
    }
}

/// What creating a run needs of its data: all of it for the embedded source and plain text; for
/// a prepared or published dataset only the manifest and the tokenizer (no shard is read, so a
/// hub creates a run on a dataset of any size in constant memory).
pub fn dataset_header(args: &DataArgs) -> Result<Dataset> {
    match args.data.as_deref().map(published_source).transpose()?.flatten() {
        Some(source) => {
            // Only the manifest and the tokenizer are read: a scratch cache will do.
            let scratch = tempfile::tempdir()?;
            let cache = tessera_client::ShardCache::open(&[source], None, scratch.path(), 0, None)?;
            Ok(cache.dataset(Vec::new(), Vec::new())?)
        }
        None => load_dataset(args),
    }
}

/// Where a published or prepared dataset given as --data is fetched from: its URL, or its
/// directory's absolute path. `None` for other data (text, JSONL).
pub fn published_source(path: &Path) -> Result<Option<String>> {
    if is_url(path) {
        return Ok(Some(path.to_string_lossy().into_owned()));
    }
    if !Dataset::is_manifest(path) {
        return Ok(None);
    }
    let dir = if path.is_dir() { path } else { path.parent().unwrap_or(path) };
    Ok(Some(std::fs::canonicalize(dir)?.display().to_string()))
}

/// Whether a --data value is an http(s) URL (a published dataset).
pub fn is_url(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.starts_with("http://") || name.starts_with("https://")
}

/// The published dataset at `url` (or a prepared dataset's directory), with a cache of its
/// shards in the user's cache directory.
pub fn published(url: &str) -> Result<tessera_client::ShardCache> {
    let home = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    let key = blake3::hash(url.as_bytes()).to_hex();
    let cache = tessera_client::ShardCache::open(
        &[url.to_owned()],
        None,
        &home.join("tessera").join("datasets").join(&key.as_str()[..16]),
        u64::MAX,
        None,
    )?;
    Ok(cache)
}

/// The dataset given with `--data` (for runs whose data is external), if any.
pub fn external_data(data: &Option<PathBuf>, tokenizer: &str) -> Result<Option<Dataset>> {
    let Some(path) = data else { return Ok(None) };
    let args =
        DataArgs { data: Some(path.clone()), tokenizer: tokenizer.to_owned(), synthetic_chars: 0, synthetic_seed: 0 };
    Ok(Some(load_dataset(&args)?))
}

pub fn human(x: f64) -> String {
    for (scale, suffix) in [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")] {
        if x >= scale {
            return format!("{:.2}{suffix}", x / scale);
        }
    }
    format!("{x:.0}")
}

pub fn gib(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", b / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b / 1_048_576.0),
        _ => format!("{:.1} GiB", b / 1_073_741_824.0),
    }
}

/// How a listening process treats strangers: connection caps, read timeouts, rate limits.
#[derive(Args, Clone, Debug, PartialEq)]
pub struct EdgeArgs {
    /// Connections served at once; more wait in the kernel's backlog.
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub max_connections: usize,
    /// Connections served at once from one IP address; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_connections_per_address: usize,
    /// Seconds a connection has to send a whole request head (idle ones are closed after it).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub header_timeout: u64,
    /// Seconds a request body may pause between two pieces before its read fails.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub body_timeout: u64,
    /// Requests per second from one IP address (bursts of four times as many); 0: no limit.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub rate_per_address: u32,
}

impl Default for EdgeArgs {
    fn default() -> Self {
        clap_defaults()
    }
}

impl EdgeArgs {
    pub fn limits(&self) -> tessera_edge::Limits {
        tessera_edge::Limits {
            max_connections: self.max_connections.max(1),
            max_connections_per_address: self.max_connections_per_address.max(1),
            header_timeout: std::time::Duration::from_secs(self.header_timeout.max(1)),
            body_timeout: std::time::Duration::from_secs(self.body_timeout.max(1)),
            per_address: (self.rate_per_address > 0).then(|| tessera_edge::Rate {
                per_second: self.rate_per_address,
                burst: self.rate_per_address.saturating_mul(4),
            }),
            ..tessera_edge::Limits::default()
        }
    }
}

/// Where a scorer's data comes from: `tessera validator` and `tessera audit`.
#[derive(Args, Debug, Clone)]
pub struct ScoringDataArgs {
    /// Training data, for runs that do not use the embedded corpus (must match the run's fingerprint).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokenizer for --data: `char`, `byte` or a tokenizer.json.
    #[arg(long, default_value = "char")]
    pub tokenizer: String,
    /// Runs on a published dataset: where its shards are cached (default: a directory in the
    /// system's temporary directory named by the dataset).
    #[arg(long, value_name = "DIR")]
    pub data_cache: Option<PathBuf>,
    /// Runs on a published dataset: the most disk its cached shards may take (GiB); the least
    /// recently used go first. Only the validation shards and the shards of the round being
    /// scored are needed.
    #[arg(long, value_name = "GIB", default_value_t = 8.0)]
    pub data_cache_gib: f64,
}

impl ScoringDataArgs {
    pub fn config(&self) -> Result<tessera_validator::client::DataConfig> {
        if !self.data_cache_gib.is_finite() || self.data_cache_gib <= 0.0 {
            anyhow::bail!("--data-cache-gib must be positive");
        }
        Ok(tessera_validator::client::DataConfig {
            data: external_data(&self.data, &self.tokenizer)?,
            cache: self.data_cache.clone(),
            cache_bytes: (self.data_cache_gib * (1u64 << 30) as f64) as u64,
        })
    }
}
