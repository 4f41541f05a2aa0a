//! `tessera release`: a run's checkpoint as a named version, in a Hugging Face model directory
//! with a generated model card, written to a directory and optionally uploaded to a model
//! repository. In a steered run only a version its holders voted for can be released (the
//! checkpoint is the one the ledger's applied entry names); in an unsteered one, the operator
//! names it with the hub's key.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tch::Device;
use tessera_model::{Llama, LlamaConfig, save_checkpoint};
use tessera_protocol::api::governance::{Change, check_version};
use tessera_protocol::api::{DataSource, HubStatus, RunInfo};
use tessera_protocol::{RunSpec, decode_weights};
use tessera_train::Trainer;
use tessera_train::diloco::write_params;
use tessera_train::run::{inner_config, run_dataset};
use tessera_trust::ledger::{Body, Ledger};

#[derive(Args)]
pub struct ReleaseArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// The version's name: in a steered run, one a passed proposal released
    /// (`tessera propose --release NAME`).
    #[arg(long)]
    pub version: String,
    /// Where to write the model directory (default: release-VERSION).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also upload it to this Hugging Face model repository (NAMESPACE/NAME), created if absent.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub repo: Option<String>,
    /// The Hugging Face Hub to upload to.
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,
    /// A write token for the repository.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,
    /// A run its holders do not steer: the hub's key file (`tessera hub --key`). Only the
    /// operator names its releases.
    #[arg(long, value_name = "FILE")]
    pub operator_key: Option<PathBuf>,
    /// Runs on a published dataset: where its tokenizer is fetched to.
    #[arg(long, default_value = "runs/pull-cache")]
    pub cache: PathBuf,
}

/// A run's checkpoint as a model: its weights as published, the phase's model, the run's
/// tokenizer, and (embedded data) the run's dataset.
pub struct RunModel {
    pub model: Llama,
    pub tokenizer: Option<tessera_data::TessTokenizer>,
    /// The checkpoint's bytes as the hub published them (their BLAKE3 is its name).
    pub bytes: Vec<u8>,
    /// The run at the checkpoint's phase.
    pub at: RunInfo,
    pub dataset: Option<tessera_data::Dataset>,
}

/// Fetches `checkpoint` from `hub` (checked against its name and the pinned hub key) and
/// builds the model of whichever of the run's phases it fits. `cache`: where a published
/// dataset's tokenizer is fetched to.
pub fn run_model(
    hub: &tessera_client::HubClient,
    info: &RunInfo,
    spec: &RunSpec,
    checkpoint: &str,
    cache: &std::path::Path,
    device: Device,
) -> Result<RunModel> {
    let bytes = hub.checkpoint(checkpoint, None)?;
    let (phase, weights) = (0..=spec.phases.len())
        .rev()
        .find_map(|k| decode_weights(&bytes, &spec.at_phase(k).tensors).ok().map(|w| (k, w)))
        .context("the checkpoint is none of the run's models")?;
    let at = RunInfo { spec: spec.at_phase(phase), phase: phase as u32, ..info.clone() };
    let dataset = match &at.spec.data.source {
        DataSource::Embedded { .. } => Some(run_dataset(&at, None)?),
        _ => None,
    };
    let tokenizer = match (&at.spec.data.source, &dataset) {
        (_, Some(d)) => Some(d.tokenizer.clone()),
        (DataSource::Manifest { urls, .. }, None) => {
            let shards = tessera_client::ShardCache::open(urls, Some(&at.spec.data.fingerprint), cache, 1 << 30, None)?;
            Some(shards.tokenizer()?)
        }
        _ => None,
    };
    let config = LlamaConfig::from_json(at.spec.model.clone()).map_err(anyhow::Error::msg)?;
    let model = Llama::zeroed(&config, device)?;
    write_params(&model, &weights)?;
    Ok(RunModel { model, tokenizer, bytes, at, dataset })
}

/// What authorises a release, for its card.
enum Authority {
    Vote { proposal: String, title: String, yes: u64, no: u64, abstain: u64, power: u64, seq: u64 },
    Operator { key: String },
}

pub fn release(args: ReleaseArgs) -> Result<()> {
    check_version(&args.version).map_err(anyhow::Error::msg)?;
    let hub = tessera_client::HubClient::new(args.hub.trim_end_matches('/'))?;
    let info = hub.run()?;
    let hub = hub.pinning(tessera_trust::PublicKey::parse(&info.hub_key)?);
    let ledger =
        Ledger::from_bytes(&hub.ledger(0)?).map_err(|e| anyhow::anyhow!("the run's ledger does not verify: {e}"))?;
    // The ledger must be this hub's (its genesis signed by the key that signs the run), and the
    // spec it serves the one its ledger allows.
    ledger.check_served_run(&info).map_err(anyhow::Error::msg)?;
    let spec: RunSpec = ledger.spec().map_or_else(|| info.spec.clone(), |(s, _)| s.clone());
    let (checkpoint, round, authority) = if spec.governance.is_some() {
        released_by_vote(&ledger, &args.version)?
    } else {
        let Some(file) = &args.operator_key else {
            bail!(
                "this run is not steered by its holders: its operator names releases (give --operator-key, the hub's key file)"
            );
        };
        let key = tessera_trust::Identity::load(file).with_context(|| format!("key {}", file.display()))?;
        if Some(key.public()) != ledger.hub() {
            bail!("{} is not the key of this run's hub: only its operator names releases", file.display());
        }
        (info.checkpoint.clone(), info.round, Authority::Operator { key: key.public().hex() })
    };
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("release-{}", args.version)));
    eprintln!(
        "tessera release: version {} of run {} ({}) is checkpoint {checkpoint} at round {round}",
        args.version, info.run_id, spec.name
    );

    let RunModel { model, tokenizer, bytes, at, dataset } =
        run_model(&hub, &info, &spec, &checkpoint, &args.cache, Device::Cpu)?;
    // An earlier release of this command is replaced; anything else there is left alone.
    if out.exists() {
        let empty = std::fs::read_dir(&out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !empty && !out.join("tessera-release.json").is_file() {
            bail!("{} exists and is not a Tessera release: choose another --out", out.display());
        }
        std::fs::remove_dir_all(&out).with_context(|| format!("clear {}", out.display()))?;
    }
    save_checkpoint(&model, tokenizer.as_ref(), &out)?;
    // The weights as the hub published them, byte for byte: their BLAKE3 is the checkpoint's name.
    let weights_file = out.join(tessera_model::checkpoint::WEIGHTS_FILE);
    std::fs::write(&weights_file, &bytes).with_context(|| format!("write {}", weights_file.display()))?;
    drop(bytes);
    let eval = match dataset {
        Some(d) => {
            eprintln!("evaluating on the run's validation split…");
            Some(Trainer::from_model(inner_config(&at, 0), model, d)?.evaluate()?.val_loss)
        }
        None => None,
    };
    let status = hub.status()?;
    let card = model_card(&Card {
        info: &at,
        spec: &spec,
        ledger: &ledger,
        status: &status,
        version: &args.version,
        checkpoint: &checkpoint,
        round,
        eval,
        authority: &authority,
        hub: &args.hub,
    });
    std::fs::write(out.join("README.md"), card)
        .with_context(|| format!("write {}", out.join("README.md").display()))?;
    let provenance = serde_json::json!({
        "version": args.version,
        "run_id": info.run_id,
        "round": round,
        "checkpoint_blake3": checkpoint,
        "phase": at.phase,
        "ledger_entries": ledger.len(),
        "ledger_root": ledger.root(),
        "spec_blake3": ledger.spec().map(|(_, h)| h.to_owned()),
        "hub_key": info.hub_key,
        "validation_loss": eval,
    });
    std::fs::write(out.join("tessera-release.json"), serde_json::to_string_pretty(&provenance)? + "\n")?;
    let short = checkpoint.get(..16).unwrap_or(&checkpoint);
    println!("wrote {} (version {}, round {round}, checkpoint {short})", out.display(), args.version);
    if let Some(repo) = &args.repo {
        let repo =
            crate::hf::Repo { endpoint: args.hf_endpoint.clone(), id: repo.clone(), token: args.hf_token.clone() };
        let commit = repo.upload_dir(&out, &format!("Tessera release {} of {}", args.version, spec.name))?;
        println!("uploaded to {}/{}: {commit}", args.hf_endpoint.trim_end_matches('/'), repo.id);
    }
    Ok(())
}

/// The checkpoint a passed, applied release proposal named `version` recorded, its round, and
/// the vote behind it.
fn released_by_vote(ledger: &Ledger, version: &str) -> Result<(String, u64, Authority)> {
    let mut names = Vec::new();
    for p in ledger.proposals().values() {
        let Change::Release { version: v } = &p.message.change else { continue };
        let (Some(seq), Some((_, tally))) = (p.applied, p.outcome) else { continue };
        if v != version {
            names.push(v.clone());
            continue;
        }
        let Some(Body::Applied { checkpoint, .. }) = ledger.entry(seq).map(|e| e.body) else {
            bail!("ledger entry {seq} is not the applied release it should be");
        };
        let authority = Authority::Vote {
            proposal: p.id.clone(),
            title: p.message.title.clone(),
            yes: tally.yes,
            no: tally.no,
            abstain: tally.abstain,
            power: tally.power,
            seq,
        };
        return Ok((checkpoint, p.apply_at, authority));
    }
    if names.is_empty() {
        bail!(
            "no release named {version:?} passed a vote in this run: propose one with `tessera propose --release {version}`"
        );
    }
    bail!("no release named {version:?} passed a vote in this run; released: {}", names.join(", "))
}

struct Card<'a> {
    info: &'a RunInfo,
    spec: &'a RunSpec,
    ledger: &'a Ledger,
    status: &'a HubStatus,
    version: &'a str,
    checkpoint: &'a str,
    round: u64,
    eval: Option<f64>,
    authority: &'a Authority,
    hub: &'a str,
}

/// The generated model card (`README.md`): Hugging Face's metadata header, then what the
/// release is, how it was trained, on what, by whom, how good it is and how to verify it.
fn model_card(c: &Card) -> String {
    let spec = &c.info.spec;
    let published: Vec<_> =
        c.status.history.iter().filter(|h| h.result_checkpoint.is_some() && h.round < c.round).collect();
    let per_step = u64::from(spec.inner.batch_size) * u64::from(spec.inner.seq_len);
    let tokens: u64 = published
        .iter()
        .map(|h| h.accepted * c.ledger.inner_steps_at(h.round).unwrap_or(c.spec.inner_steps) * per_step)
        .sum();
    let mut work: Vec<(String, u64)> = c
        .status
        .contributors
        .iter()
        .map(|k| (k.name.clone(), k.submitted_rounds.iter().filter(|&&r| r < c.round).count() as u64))
        .filter(|(_, n)| *n > 0)
        .collect();
    work.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: u64 = work.iter().map(|w| w.1).sum();
    let config = LlamaConfig::from_json(spec.model.clone()).ok();
    let mut s = String::new();
    let line = |s: &mut String, t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(&mut s, "---".into());
    line(&mut s, "library_name: transformers".into());
    line(&mut s, "pipeline_tag: text-generation".into());
    line(&mut s, "tags:\n- tessera\n- diloco\n- collaborative-training".into());
    line(&mut s, "---\n".into());
    line(&mut s, format!("# {} — {}\n", c.spec.name, c.version));
    line(
        &mut s,
        format!(
            "A Llama-family model trained collaboratively with Tessera (DiLoCo): {} contributor(s), {} round(s) published up to round {}.\n",
            work.len(),
            published.len(),
            c.round
        ),
    );
    line(&mut s, "| | |\n|---|---|".into());
    line(&mut s, format!("| version | `{}` |", c.version));
    line(&mut s, format!("| run | `{}` |", c.info.run_id));
    line(&mut s, format!("| round | {} (phase {}) |", c.round, c.info.phase));
    line(&mut s, format!("| checkpoint (BLAKE3 of its safetensors) | `{}` |", c.checkpoint));
    line(&mut s, format!("| parameters | {} |", spec.num_params()));
    if let Some(cfg) = &config {
        line(
            &mut s,
            format!(
                "| shape | {} layers, hidden {}, {} heads, context {}, vocabulary {} |",
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.num_attention_heads,
                cfg.max_position_embeddings,
                cfg.vocab_size
            ),
        );
    }
    line(&mut s, format!("| ledger | {} entries, Merkle root `{}` |", c.ledger.len(), c.ledger.root()));
    if let Some((_, h)) = c.ledger.spec() {
        line(&mut s, format!("| run spec (BLAKE3) | `{h}`, {} change(s) by vote |", c.ledger.spec_changes()));
    }
    line(&mut s, format!("| hub key | `{}` |\n", c.info.hub_key));

    line(&mut s, "## Data\n".into());
    line(&mut s, format!("- dataset: {} (fingerprint `{}`)", spec.data.name, spec.data.fingerprint));
    match &spec.data.source {
        DataSource::Embedded { seed, train_chars, val_chars } => line(
            &mut s,
            format!(
                "- source: Tessera's embedded synthetic corpus (seed {seed}, {train_chars} training and {val_chars} validation characters)"
            ),
        ),
        DataSource::Manifest { urls, train_shards, slots_per_round, mixture, .. } => {
            line(
                &mut s,
                format!(
                    "- source: published manifest at {} ({train_shards} training shards, {slots_per_round} data slots per round)",
                    urls.join(", ")
                ),
            );
            let weights = spec.data.source.weights_at(c.round);
            for (m, w) in mixture.iter().zip(weights.iter().skip(1)) {
                line(
                    &mut s,
                    format!(
                        "- mixed in: {} (manifest `{}`, {} training shards, weight {w} against the run's own {})",
                        m.name,
                        m.fingerprint,
                        m.train_shards,
                        weights.first().copied().unwrap_or(1)
                    ),
                );
            }
        }
        DataSource::External => {
            line(&mut s, "- source: data supplied by each contributor, checked by fingerprint".into())
        }
    }
    line(
        &mut s,
        format!(
            "- tokens trained: {tokens} ({} accepted submissions × H inner steps × {} sequences × {} tokens)\n",
            published.iter().map(|h| h.accepted).sum::<u64>(),
            spec.inner.batch_size,
            spec.inner.seq_len
        ),
    );

    line(&mut s, "## Training\n".into());
    // H by round, as the ledger records it (a vote may have changed it).
    let mut spans: Vec<(u64, u64, u64)> = Vec::new();
    for r in 0..c.round.max(1) {
        let h = c.ledger.inner_steps_at(r).unwrap_or(spec.inner_steps);
        match spans.last_mut() {
            Some(last) if last.2 == h => last.1 = r,
            _ => spans.push((r, r, h)),
        }
    }
    let h = spans.iter().map(|(a, b, h)| format!("{h} (rounds {a}–{b})")).collect::<Vec<_>>().join(", ");
    line(
        &mut s,
        format!(
            "DiLoCo: H inner AdamW steps per round: {h}; peak inner lr {}; outer Nesterov step (lr {}, momentum {}); submissions in `{}`, aggregated by `{:?}` (as the run stands at release).\n",
            spec.inner.lr, spec.outer.lr, spec.outer.momentum, spec.codec, spec.aggregation
        ),
    );

    line(&mut s, "## Contributors\n".into());
    line(&mut s, "| contributor | accepted submissions | share of the work |\n|---|---|---|".into());
    for (name, n) in &work {
        line(&mut s, format!("| {name} | {n} | {:.1}% |", 100.0 * *n as f64 / total.max(1) as f64));
    }
    line(&mut s, String::new());

    line(&mut s, "## Evaluation\n".into());
    match (c.eval, published.last().and_then(|h| h.mean_inner_loss)) {
        (Some(l), _) => line(
            &mut s,
            format!(
                "Validation loss {l:.4} nats per token on the run's validation split, measured by `tessera release`.\n"
            ),
        ),
        (None, Some(l)) => line(
            &mut s,
            format!("No validation split is held here; the last round's mean inner (training) loss was {l:.4}.\n"),
        ),
        (None, None) => line(&mut s, "Not measured.\n".into()),
    }

    line(&mut s, "## How this version was released\n".into());
    match c.authority {
        Authority::Vote { proposal, title, yes, no, abstain, power, seq } => line(
            &mut s,
            format!(
                "By a vote of the run's token holders: proposal `{proposal}` (\"{title}\") passed with {yes} yes, {no} no and {abstain} abstaining of {power} power at its snapshot, and was applied at round {} (ledger entry {seq}).\n",
                c.round
            ),
        ),
        Authority::Operator { key } => {
            line(&mut s, format!("By the run's operator (hub key `{key}`); the run is not steered by its holders.\n"))
        }
    }
    line(&mut s, "## Verify\n".into());
    line(
        &mut s,
        format!(
            "```sh\ntessera ledger verify --hub {}   # signatures, chain, roots, tallies, the spec served\nb3sum model.safetensors               # equals the checkpoint above\n```",
            c.hub
        ),
    );
    s
}
