//! `tessera serve` and `tessera keys`: the model behind an OpenAI-compatible API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tessera_serve::{AppState, Engine, Store};

use crate::args::{RuntimeArgs, setup_runtime};

/// Where keys and usage live unless `--db` says otherwise.
const DEFAULT_DB: &str = "runs/serve/serve.sqlite";

#[derive(Args)]
pub struct ServeArgs {
    /// A Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json), as
    /// `tessera train`, `tessera release` or a hub writes them.
    #[arg(long, required_unless_present = "follow_hub", conflicts_with = "follow_hub")]
    checkpoint: Option<PathBuf>,
    /// Serve a run's latest published checkpoint from its hub, and switch to each new one as it
    /// is published (requests in flight finish on the model they began with). The model id is
    /// RUN-rN, the checkpoint round N trains from; the run's name is an alias of it.
    #[arg(long, value_name = "URL")]
    follow_hub: Option<String>,
    /// How often to ask the hub for a new checkpoint (with --follow-hub), in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    follow_every: u64,
    /// Runs on a published dataset (with --follow-hub): where its tokenizer is fetched to.
    #[arg(long, default_value = "runs/pull-cache")]
    cache: PathBuf,
    /// Address to listen on (port 0: any free port; see --addr-file).
    #[arg(long, default_value = "127.0.0.1:8000")]
    addr: SocketAddr,
    /// Write the address actually listened on to this file once ready (for scripts).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// The SQLite file holding API keys (hashed) and metered usage; `tessera keys` writes the
    /// same file.
    #[arg(long, default_value = DEFAULT_DB)]
    db: PathBuf,
    /// The model's id in the API (default: the checkpoint directory's name, or its parent's
    /// when it is called `checkpoint`).
    #[arg(long)]
    model_id: Option<String>,
    /// Sequences decoded together in one forward pass; more wait for a free slot.
    #[arg(long, default_value_t = 16)]
    slots: usize,
    /// The kind the weights are held and multiplied in: f32, or bf16 (half the bytes a
    /// decoding step reads: ~1.8× faster on a CPU with AVX512-BF16/AMX, logits within ~1% of
    /// f32's). Norms stay f32 and logits come out f32 either way.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// The largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Another name requests may use for the model (repeatable); a strict request
    /// (`x-tessera-strict: 1`) refuses it and must name the attested id.
    #[arg(long = "alias", value_name = "NAME")]
    aliases: Vec<String>,
    /// Serve from a SEV-SNP or TDX guest: make the response-signing, request-sealing (and with
    /// --tls, certificate) keys here, answer GET /v1/attestation/report?nonce= with fresh
    /// evidence (configfs-tsm) binding them, the model and this binary, sign every completion
    /// and accept requests sealed end to end. Check it with `tessera verify-serve`.
    #[arg(long)]
    tee: bool,
    /// DEVELOPMENT ONLY, INSECURE: as --tee, but attested by a software stand-in that proves
    /// nothing (clients must allow it, and are told so).
    #[arg(long, conflicts_with = "tee")]
    insecure_dev_tee: bool,
    /// SEV-SNP guests: this chip's VCEK (DER), fetched ahead of time from AMD's key
    /// distribution service.
    #[arg(long, requires = "tee")]
    vcek: Option<PathBuf>,
    /// TDX guests: the quote's DCAP collateral (JSON), fetched ahead of time.
    #[arg(long, requires = "tee")]
    tdx_collateral: Option<PathBuf>,
    /// The kernel's configfs-tsm report directory.
    #[arg(long, default_value = tessera_trust::tee::TSM_REPORTS)]
    tsm_dir: PathBuf,
    /// Terminate TLS in this process with a certificate whose key is made here and attested,
    /// so no proxy in front sees plaintext (needs --tee or --insecure-dev-tee). Clients pin the
    /// key through the attestation, not a CA.
    #[arg(long)]
    tls: bool,
    /// Names the self-signed certificate is issued for (with --tls).
    #[arg(long = "tls-name", value_name = "NAME", default_values_t = ["localhost".to_string()])]
    tls_names: Vec<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    edge: crate::args::EdgeArgs,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key; it is printed once and stored only as its hash.
    Create {
        /// A name for the key's owner: usage is metered and billed under it.
        name: String,
        /// Requests per minute allowed (a burst of this many, refilled evenly).
        #[arg(long, default_value_t = tessera_serve::keys::DEFAULT_REQUESTS_PER_MINUTE)]
        rpm: u32,
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// Revoke a key by name: refused from the next request on.
    Revoke {
        name: String,
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// List keys (names, prefixes, limits; never the keys).
    List {
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

pub fn keys(command: KeysCommand) -> Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        match command {
            KeysCommand::Create { name, rpm, db } => {
                let store = Store::open(&db).await?;
                let (key, info) = store.create_key(&name, rpm).await?;
                println!("{key}");
                eprintln!(
                    "created key {:?} ({}…, {} requests/minute) in {}: it is shown only now, store it safely",
                    info.name,
                    info.prefix,
                    info.requests_per_minute,
                    db.display()
                );
            }
            KeysCommand::Revoke { name, db } => {
                Store::open(&db).await?.revoke_key(&name).await?;
                println!("revoked {name:?}");
            }
            KeysCommand::List { db } => {
                let keys = Store::open(&db).await?.list_keys().await?;
                println!("{:<24} {:<12} {:>8} {:<8}", "name", "prefix", "req/min", "status");
                for k in keys {
                    let status = if k.revoked_ms.is_some() { "revoked" } else { "active" };
                    println!("{:<24} {:<12} {:>8} {:<8}", k.name, k.prefix, k.requests_per_minute, status);
                }
            }
        }
        Ok(())
    })
}

pub fn serve(args: ServeArgs) -> Result<()> {
    if args.slots == 0 || args.slots > 1024 {
        bail!("--slots must be from 1 to 1024");
    }
    let device = setup_runtime(&args.runtime)?;
    if args.tls && !(args.tee || args.insecure_dev_tee) {
        bail!("--tls serves with a key the attestation binds: it needs --tee (or --insecure-dev-tee to develop)");
    }
    let (first, tokenizer, follow) = match (&args.checkpoint, &args.follow_hub) {
        (Some(dir), _) => {
            let (model, tokenizer) =
                tessera_model::load_checkpoint(dir, device).with_context(|| format!("loading {}", dir.display()))?;
            let tokenizer = tokenizer.with_context(|| format!("{} has no tokenizer.json", dir.display()))?;
            let id = args.model_id.clone().unwrap_or_else(|| default_model_id(dir));
            let blake3 = file_blake3(&dir.join(tessera_model::checkpoint::WEIGHTS_FILE))?;
            (Loaded { id, blake3, model }, tokenizer, None)
        }
        (None, Some(url)) => {
            let follow = Follow::connect(url, &args, device)?;
            let (loaded, tokenizer) = follow.load_latest()?;
            (loaded, tokenizer, Some(follow))
        }
        (None, None) => bail!("give --checkpoint DIR or --follow-hub URL"),
    };
    let mut aliases = args.aliases.clone();
    if let Some(f) = &follow {
        aliases.push(f.base.clone());
    }
    if aliases.contains(&first.id) {
        bail!("--alias {} is the model's own id", first.id);
    }
    let bf16 = args.dtype == "bf16";
    let mut first = first;
    if bf16 {
        first.model.cast_weights(tch::Kind::BFloat16);
    }
    let model_id = first.id.clone();
    let model_blake3 = first.blake3;
    let context = first.context(&tokenizer)?;
    let params = first.model.config.num_params();
    if args.runtime.threads.is_none() && device == tch::Device::Cpu {
        tch::set_num_threads(default_threads(params));
    }
    let engine = Engine::start(first.model, args.slots, tokenizer.eos_id())?;
    let (tls, attested) = attestation(&args)?;
    let rt = runtime()?;
    rt.block_on(async {
        let store = Store::open(&args.db).await?;
        let mut state = AppState::new(engine, tokenizer, model_id.clone(), context, store, args.max_body_bytes)
            .with_model_blake3(model_blake3)
            .with_aliases(aliases);
        if let Some(attested) = attested {
            state = state.with_attestation(attested);
        }
        let state = Arc::new(state);
        if let Some(follow) = follow {
            let (state, slots) = (state.clone(), args.slots);
            std::thread::Builder::new()
                .name("follow-hub".into())
                .spawn(move || follow.run(&state, slots, bf16, model_blake3))?;
        }
        let listener =
            tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("listening on {}", args.addr))?;
        let addr = listener.local_addr()?;
        if let Some(f) = &args.addr_file {
            std::fs::write(f, addr.to_string()).with_context(|| format!("write {}", f.display()))?;
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        println!(
            "serving {model_id} ({params} parameters, context {context}, {} slots, {device:?}, {}, {} threads) on {scheme}://{addr}/v1",
            args.slots,
            args.dtype,
            tch::get_num_threads()
        );
        if let Some(a) = &state.attested {
            let how = if a.insecure() { "INSECURELY (software stand-in, no TEE)" } else { "by the TEE" };
            println!(
                "attested {how}: weights {}, signing key {}, sealing key {}; check with: tessera verify-serve {scheme}://{addr}",
                hex::encode(model_blake3),
                a.signing_key(),
                hex::encode(a.sealing_key().0)
            );
        }
        println!(
            "keys and usage: {} (create a key: tessera keys create NAME --db {})",
            args.db.display(),
            args.db.display()
        );
        let limits = tessera_edge::Limits { refusal: tessera_serve::edge_refusal, tls, ..args.edge.limits() };
        tessera_edge::serve(listener, tessera_serve::router(state), limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
}

/// A model loaded for serving: its id and the BLAKE3 of its weights.
struct Loaded {
    id: String,
    blake3: [u8; 32],
    model: tessera_model::Llama,
}

impl Loaded {
    /// The model's context, once it is known to cover the tokenizer's vocabulary.
    fn context(&self, tokenizer: &tessera_data::TessTokenizer) -> Result<usize> {
        if tokenizer.vocab_size() as i64 > self.model.config.vocab_size {
            bail!(
                "{}: the tokenizer has {} tokens but the model only {}: it cannot be served",
                self.id,
                tokenizer.vocab_size(),
                self.model.config.vocab_size
            );
        }
        Ok(self.model.config.max_position_embeddings as usize)
    }
}

/// `--follow-hub`: the run's latest checkpoint, and each new one as it is published.
struct Follow {
    hub: tessera_client::HubClient,
    /// The run's name (or --model-id): the stable alias; ids are BASE-rN.
    base: String,
    cache: PathBuf,
    every: std::time::Duration,
    device: tch::Device,
}

impl Follow {
    fn connect(url: &str, args: &ServeArgs, device: tch::Device) -> Result<Follow> {
        let hub = tessera_client::HubClient::new(url.trim_end_matches('/'))?;
        let info = hub.run().with_context(|| format!("asking {url} for its run"))?;
        let hub = hub.pinning(tessera_trust::PublicKey::parse(&info.hub_key)?);
        let base = args.model_id.clone().unwrap_or_else(|| info.spec.name.clone());
        Ok(Follow {
            hub,
            base,
            cache: args.cache.clone(),
            every: std::time::Duration::from_secs(args.follow_every.max(1)),
            device,
        })
    }

    fn id(&self, round: u64) -> String {
        format!("{}-r{round}", self.base)
    }

    /// The run's checkpoint now, with the run's tokenizer.
    fn load_latest(&self) -> Result<(Loaded, tessera_data::TessTokenizer)> {
        let info = self.hub.run()?;
        let (loaded, tokenizer) = self.load(&info)?;
        let tokenizer = tokenizer.context("the run's data names no tokenizer to serve its model with")?;
        Ok((loaded, tokenizer))
    }

    fn load(&self, info: &tessera_protocol::api::RunInfo) -> Result<(Loaded, Option<tessera_data::TessTokenizer>)> {
        let m =
            crate::cmd::release::run_model(&self.hub, info, &info.spec, &info.checkpoint, &self.cache, self.device)?;
        let mut blake3 = [0u8; 32];
        hex::decode_to_slice(&info.checkpoint, &mut blake3).context("the hub names its checkpoint oddly")?;
        Ok((Loaded { id: self.id(info.round), blake3, model: m.model }, m.tokenizer))
    }

    /// Asks the hub every `every` and serves each new checkpoint (a new round with the same
    /// weights only renames the model). Errors are logged; the model served stays.
    fn run(self, state: &AppState, slots: usize, bf16: bool, mut current: [u8; 32]) {
        loop {
            std::thread::sleep(self.every);
            let info = match self.hub.run() {
                Ok(info) => info,
                Err(e) => {
                    tracing::warn!(error = %e, "--follow-hub: the hub did not answer; still serving {}", state.served().id);
                    continue;
                }
            };
            let served = state.served();
            let id = self.id(info.round);
            if id == served.id {
                continue;
            }
            if info.checkpoint == hex::encode(current) {
                state.set_served(tessera_serve::Served { id: id.clone(), ..served });
                eprintln!("round {}: the weights did not change; now serving them as {id}", info.round);
                continue;
            }
            let started = std::time::Instant::now();
            let next = self.load(&info).and_then(|(mut loaded, _)| {
                let context = loaded.context(&state.tokenizer)?;
                if bf16 {
                    loaded.model.cast_weights(tch::Kind::BFloat16);
                }
                let engine = Engine::start(loaded.model, slots, state.tokenizer.eos_id())?;
                Ok(tessera_serve::Served::new(loaded.id, loaded.blake3, engine, context))
            });
            match next {
                Ok(next) => {
                    current = next.blake3;
                    state.set_served(next);
                    eprintln!(
                        "round {}: serving checkpoint {} as {id} (loaded in {:.1} s; requests in flight finish on {})",
                        info.round,
                        info.checkpoint.get(..16).unwrap_or(&info.checkpoint),
                        started.elapsed().as_secs_f64(),
                        served.id
                    );
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), round = info.round, "--follow-hub: could not load the new checkpoint; still serving {}", served.id)
                }
            }
        }
    }
}

/// The TLS acceptor (with --tls) and the attested keys (with --tee or --insecure-dev-tee).
#[allow(clippy::type_complexity)]
fn attestation(
    args: &ServeArgs,
) -> Result<(Option<tessera_serve::attested::TlsAcceptor>, Option<Arc<tessera_serve::Attested>>)> {
    let attester = if args.insecure_dev_tee {
        tracing::warn!("--insecure-dev-tee: attesting with an INSECURE software stand-in, not a TEE");
        eprintln!("WARNING: --insecure-dev-tee: this server's attestation is an INSECURE stand-in that proves nothing");
        tessera_trust::tee::Attester::InsecureDev
    } else if args.tee {
        tessera_trust::tee::Attester::Tsm {
            reports: args.tsm_dir.clone(),
            vcek: args.vcek.clone(),
            tdx_collateral: args.tdx_collateral.clone(),
        }
    } else {
        return Ok((None, None));
    };
    let (acceptor, spki) = match args.tls {
        true => {
            let (a, spki) = tessera_serve::attested::tls(args.tls_names.clone())?;
            (Some(a), Some(spki))
        }
        false => (None, None),
    };
    let exe = std::env::current_exe().context("finding this binary to hash it")?;
    let attested = tessera_serve::Attested::new(attester.clone(), file_blake3(&exe)?, spki)?;
    // One report now, so a guest that cannot attest fails at start rather than at a client.
    attester.evidence(&[0u8; 64]).map_err(|e| anyhow::anyhow!("--tee: {e}"))?;
    Ok((acceptor, Some(Arc::new(attested))))
}

/// libtorch's threads on the CPU unless `--threads` says: a small model's decoding step is a
/// few milliseconds, as short as the HTTP side's work per token, and libtorch's threads waiting
/// on the core that work takes cost more than they add, so it gets all cores but one; a large
/// model's step is long and bound by memory bandwidth, which every core adds to. Measured on
/// 2 cores (`docs/benchmarks.md`): `micro` (10.6M) serves 1 / 16 streams at 349 / 1801 tokens/s
/// with 1 thread against 160 / 1325 with 2; `phase1` (430M, 32 tokens a stream), 11.3 / 57.6
/// with 2 against 8.1 / 41.1 with 1.
fn default_threads(params: u64) -> i32 {
    const LARGE: u64 = 100_000_000;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = if params >= LARGE { cores } else { cores.saturating_sub(1).max(1) };
    i32::try_from(threads).unwrap_or(i32::MAX)
}

/// BLAKE3 of a file, read once.
fn file_blake3(path: &std::path::Path) -> Result<[u8; 32]> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(file).with_context(|| format!("reading {}", path.display()))?;
    Ok(*h.finalize().as_bytes())
}

fn default_model_id(checkpoint: &std::path::Path) -> String {
    let path = std::fs::canonicalize(checkpoint).unwrap_or_else(|_| checkpoint.to_path_buf());
    let name = |p: &std::path::Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match name(&path) {
        Some(n) if n == "checkpoint" => path.parent().and_then(name).unwrap_or(n),
        Some(n) => n,
        None => "tessera".into(),
    }
}

#[derive(Subcommand)]
pub enum EconomyCommand {
    /// Close the open epoch of served usage: price it per key, report it to the hub, which writes
    /// the usage, the funding share and each holder's exact payout into the run's ledger.
    Close {
        /// The serving database (`tessera serve --db`).
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
        /// The hub whose run's ledger records the epoch.
        #[arg(long)]
        hub: String,
        /// The operator's key file (its public key is the hub's --operator).
        #[arg(long)]
        key: PathBuf,
        /// The price table (TOML: prompt_per_million, completion_per_million, in micro-units);
        /// default $0.20 / $0.60 per million tokens.
        #[arg(long)]
        prices: Option<PathBuf>,
        /// Report an epoch closed earlier again (after a failed report) instead of closing the
        /// open one.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Per epoch, from a verified ledger: usage, revenue, the share funding the next phase,
    /// payouts, and each holder's balance and return.
    Report {
        #[arg(long)]
        hub: Option<String>,
        /// A ledger file (`tessera ledger verify --export`).
        #[arg(long)]
        file: Option<PathBuf>,
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

pub fn economy(command: EconomyCommand) -> Result<()> {
    match command {
        EconomyCommand::Close { db, hub, key, prices, epoch } => close_epoch(&db, &hub, &key, prices.as_deref(), epoch),
        EconomyCommand::Report { hub, file, json } => economy_report(hub.as_deref(), file.as_deref(), json),
    }
}

fn close_epoch(
    db: &std::path::Path,
    hub: &str,
    key: &std::path::Path,
    prices: Option<&std::path::Path>,
    epoch: Option<u64>,
) -> Result<()> {
    let prices = match prices {
        Some(p) => tessera_serve::Prices::from_toml(
            &std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        None => tessera_serve::Prices::default(),
    };
    let identity = tessera_trust::Identity::load(key).with_context(|| format!("operator key {}", key.display()))?;
    let rt = runtime()?;
    let (epoch, usage) = rt.block_on(async {
        let store = Store::open(db).await?;
        anyhow::Ok(match epoch {
            Some(e) => {
                if e >= store.open_epoch().await? {
                    bail!("epoch {e} is still open: close it without --epoch");
                }
                (e, store.usage(e).await?)
            }
            None => store.close_epoch().await?,
        })
    })?;
    let report = tessera_protocol::api::EpochReport {
        epoch,
        usage: usage
            .iter()
            .map(|u| tessera_protocol::api::AccountUsage {
                account: u.account.clone(),
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                revenue: prices.revenue(u),
            })
            .collect(),
    };
    let client = tessera_client::HubClient::new(hub)?.signed_by(Arc::new(identity));
    let settled = client.close_epoch(&report).map_err(|e| {
        anyhow::anyhow!(
            "epoch {epoch} was not closed into the ledger: {e}\n(retry with: tessera economy close --epoch {epoch} …)"
        )
    })?;
    println!(
        "epoch {epoch} closed: {} accounts, revenue {} µ, funding {} µ, paid out {} µ to {} holders (ledger entries {}..{})",
        report.usage.len(),
        settled.revenue,
        settled.funding,
        settled.payable,
        settled.payouts.len(),
        settled.ledger_from,
        settled.ledger_to
    );
    Ok(())
}

fn economy_report(hub: Option<&str>, file: Option<&std::path::Path>, json: bool) -> Result<()> {
    let (bytes, source) = crate::cmd::trust::ledger_bytes(hub, file)?;
    let ledger = tessera_trust::ledger::Ledger::from_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("{source}: the ledger does not verify: {e}"))?;
    let balances = ledger.balances();
    if json {
        println!("{}", serde_json::to_string_pretty(&ledger.economy())?);
        return Ok(());
    }
    println!(
        "ledger verified: {} entries, {} closed epochs (amounts in micro-units)",
        ledger.len(),
        ledger.epochs.len()
    );
    println!(
        "\n{:>6} {:>9} {:>12} {:>14} {:>12} {:>12} {:>12} {:>8}",
        "epoch", "accounts", "prompt tok", "completion tok", "revenue", "funding", "paid out", "holders"
    );
    for (epoch, e) in &ledger.epochs {
        let usage = ledger.usage.get(epoch);
        let (p, c) = usage.map_or((0, 0), |u| u.values().fold((0, 0), |a, r| (a.0 + r.0, a.1 + r.1)));
        println!(
            "{epoch:>6} {:>9} {p:>12} {c:>14} {:>12} {:>12} {:>12} {:>8}",
            usage.map_or(0, |u| u.len()),
            e.revenue,
            e.funding,
            e.payable,
            e.holders
        );
    }
    let total: u64 = balances.values().sum();
    println!("\n{:<66} {:>14} {:>8} {:>12} {:>14}", "holder", "balance", "share", "paid out", "µ per token");
    for (holder, balance) in &balances {
        let paid = ledger.payouts.get(holder).copied().unwrap_or(0);
        println!(
            "{holder:<66} {balance:>14} {:>7.2}% {paid:>12} {:>14.6}",
            100.0 * *balance as f64 / total.max(1) as f64,
            paid as f64 / *balance as f64
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct VerifyServeArgs {
    /// The server's base URL (http:// or https://, without /v1).
    url: String,
    /// An API key of the server's (`tessera keys create`); sent only after the attestation
    /// checked out. Default: $TESSERA_API_KEY.
    #[arg(long, env = "TESSERA_API_KEY", hide_env_values = true)]
    api_key: String,
    /// SEV-SNP launch measurements accepted (96 hex digits; repeatable).
    #[arg(long = "sev-snp-measurement", value_name = "HEX")]
    sev_snp_measurements: Vec<String>,
    /// TDX MRTDs accepted (96 hex digits; repeatable).
    #[arg(long = "tdx-mrtd", value_name = "HEX")]
    tdx_mrtds: Vec<String>,
    /// TDX TCB statuses accepted besides UpToDate (repeatable).
    #[arg(long = "tdx-status", value_name = "STATUS")]
    tdx_statuses: Vec<String>,
    /// DEVELOPMENT ONLY: accept the INSECURE software stand-in (`serve --insecure-dev-tee`),
    /// which proves nothing.
    #[arg(long)]
    allow_insecure_dev: bool,
    /// The weights' BLAKE3 expected (from a release's model card or `b3sum model.safetensors`).
    #[arg(long, value_name = "HEX")]
    model_blake3: Option<String>,
    /// The serving binary's BLAKE3 expected (from a reproducible build).
    #[arg(long, value_name = "HEX")]
    binary_blake3: Option<String>,
    /// The prompt of the checked completions.
    #[arg(long, default_value = "The weather today is")]
    prompt: String,
    /// Check the attestation only; send no completion.
    #[arg(long)]
    attestation_only: bool,
    /// Write the verified attestation (keys, model, evidence) here as JSON, for clients that
    /// pin its keys (the Python example in docs/serving.md does).
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
}

/// `tessera verify-serve`: the attestation, then a completion of each kind — plain and sealed,
/// whole and streamed — each checked against the attested keys.
pub fn verify_serve(args: VerifyServeArgs) -> Result<()> {
    let mut statuses = args.tdx_statuses.clone();
    if !statuses.is_empty() {
        statuses.push("UpToDate".into());
    }
    let policy = tessera_trust::AttestationPolicy {
        sev_snp_measurements: args.sev_snp_measurements.iter().map(|m| m.to_ascii_lowercase()).collect(),
        tdx_mrtds: args.tdx_mrtds.iter().map(|m| m.to_ascii_lowercase()).collect(),
        tdx_statuses: statuses,
        allow_insecure_dev: args.allow_insecure_dev,
    };
    policy.validate().map_err(|e| anyhow::anyhow!("{e} (--sev-snp-measurement, --tdx-mrtd)"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    runtime()?.block_on(async {
        use tessera_serve::verify::Verifier;
        let v = Verifier::connect(
            &args.url,
            &args.api_key,
            &policy,
            args.model_blake3.clone(),
            args.binary_blake3.clone(),
            now,
        )
        .await
        .context("the attestation does not check out")?;
        let a = &v.attestation;
        println!("ok  attestation: {}", v.verified);
        println!("ok  nonce: fresh (this client's, {})", a.nonce.get(..16).unwrap_or(&a.nonce));
        println!("ok  model: {} weights {}{}", a.model, a.model_blake3, pinned(&args.model_blake3));
        println!("ok  binary: {}{}", a.binary_blake3, pinned(&args.binary_blake3));
        println!("ok  signing key {}  sealing key {}", a.signing_key, a.sealing_key);
        match v.tls() {
            true => println!("ok  TLS terminates in the attested server (certificate key is the attested one)"),
            false => println!("--  no TLS to the server: a proxy in front sees plaintext unless requests are sealed"),
        }
        if let Some(path) = &args.save {
            std::fs::write(path, serde_json::to_vec_pretty(a)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("ok  saved the verified attestation to {}", path.display());
        }
        if args.attestation_only {
            return Ok(());
        }
        for sealed in [false, true] {
            for stream in [false, true] {
                let body = serde_json::json!({
                    "model": a.model, "messages": [{"role": "user", "content": args.prompt}],
                    "max_tokens": 16, "stream": stream, "stream_options": {"include_usage": true},
                });
                let body = if stream { body } else { without(body, "stream_options") };
                let what = format!(
                    "{} {}",
                    if sealed { "sealed" } else { "plain" },
                    if stream { "stream" } else { "completion" }
                );
                let c = v.complete("/v1/chat/completions", &body, sealed).await.with_context(|| what.clone())?;
                println!("ok  {what:<17} {} signed over request and {} response bytes", c.id, c.response_bytes);
            }
        }
        if v.verified.insecure {
            println!("NOTE the server's TEE is the INSECURE development stand-in: none of the above is proven");
        }
        Ok(())
    })
}

fn pinned(expected: &Option<String>) -> &'static str {
    if expected.is_some() { " (as expected)" } else { " (not pinned: pass --model-blake3/--binary-blake3 to check)" }
}

fn without(mut v: serde_json::Value, key: &str) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove(key);
    }
    v
}
