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
    /// `tessera train` or a hub writes them.
    #[arg(long)]
    checkpoint: PathBuf,
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
    /// The largest request body accepted, in bytes (larger ones get 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
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
    let (model, tokenizer) = tessera_model::load_checkpoint(&args.checkpoint, device)
        .with_context(|| format!("loading {}", args.checkpoint.display()))?;
    let tokenizer = tokenizer.with_context(|| format!("{} has no tokenizer.json", args.checkpoint.display()))?;
    if tokenizer.vocab_size() as i64 > model.config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model only {}: this checkpoint cannot be served",
            args.checkpoint.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
    }
    let model_id = args.model_id.clone().unwrap_or_else(|| default_model_id(&args.checkpoint));
    let context = model.config.max_position_embeddings as usize;
    let params = model.config.num_params();
    let engine = Engine::start(model, args.slots, tokenizer.eos_id())?;
    let rt = runtime()?;
    rt.block_on(async {
        let store = Store::open(&args.db).await?;
        let state = Arc::new(AppState::new(engine, tokenizer, model_id.clone(), context, store, args.max_body_bytes));
        let listener =
            tokio::net::TcpListener::bind(args.addr).await.with_context(|| format!("listening on {}", args.addr))?;
        let addr = listener.local_addr()?;
        if let Some(f) = &args.addr_file {
            std::fs::write(f, addr.to_string()).with_context(|| format!("write {}", f.display()))?;
        }
        println!(
            "serving {model_id} ({params} parameters, context {context}, {} slots, {device:?}) on http://{addr}/v1",
            args.slots
        );
        println!(
            "keys and usage: {} (create a key: tessera keys create NAME --db {})",
            args.db.display(),
            args.db.display()
        );
        let limits = tessera_edge::Limits { refusal: tessera_serve::edge_refusal, ..args.edge.limits() };
        tessera_edge::serve(listener, tessera_serve::router(state), limits, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok(())
    })
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
