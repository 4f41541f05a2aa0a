//! `tessera keygen` and `tessera ledger`: identities, and checking the reward ledger.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tessera_trust::Identity;
use tessera_trust::ledger::{Body, Ledger};

#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write the key (PKCS#8 PEM, owner-only; never overwritten).
    #[arg(long, default_value = "tessera-key.pem")]
    out: PathBuf,
}

pub fn keygen(args: KeygenArgs) -> Result<()> {
    let id = Identity::generate()?;
    id.save(&args.out).with_context(|| format!("write {}", args.out.display()))?;
    println!("{}", id.public());
    eprintln!(
        "wrote {} (owner-only); its public key is above. Use it with `tessera contribute --key`.",
        args.out.display()
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Verify a ledger from its bytes: every signature, the hash chain, every signed Merkle
    /// root, every validator's attestation under the run's policy, that each round's receipts
    /// sum to its emission and no epoch pays out more than it earned; then recompute every
    /// balance. Exits non-zero, naming the first problem, if anything is wrong.
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// A hub's URL: fetch its ledger (`GET /v1/ledger`).
    #[arg(long, conflicts_with = "file")]
    hub: Option<String>,
    /// An exported ledger file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Also save the fetched ledger here.
    #[arg(long, requires = "hub")]
    export: Option<PathBuf>,
    /// Print balances and validators as JSON.
    #[arg(long)]
    json: bool,
}

/// A ledger's bytes, from a hub (`GET /v1/ledger`) or a file, and where they came from.
pub(crate) fn ledger_bytes(hub: Option<&str>, file: Option<&std::path::Path>) -> Result<(Vec<u8>, String)> {
    Ok(match (hub, file) {
        (Some(hub), _) => {
            let client = tessera_client::HubClient::new(hub)?;
            (client.ledger(0)?, format!("{}/v1/ledger", client.url()))
        }
        (None, Some(file)) => {
            (std::fs::read(file).with_context(|| format!("read {}", file.display()))?, file.display().to_string())
        }
        (None, None) => bail!("give --hub URL or --file PATH"),
    })
}

/// Compares what the hub at `url` serves with its ledger: the spec (signed by the hub) must be
/// the ledger's own with every applied change, and no tally or change may be overdue. Returns
/// the hub's round.
fn check_steering(url: &str, ledger: &Ledger) -> Result<u64> {
    let client = tessera_client::HubClient::new(url)?;
    let run = client.run()?;
    ledger.check_served_run(&run).map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let overdue = ledger.overdue(run.round);
    if !overdue.is_empty() {
        bail!("{url}: the hub owes its ledger entries: {}", overdue.join("; "));
    }
    Ok(run.round)
}

pub fn ledger(cmd: LedgerCommand) -> Result<()> {
    let LedgerCommand::Verify(args) = cmd;
    let (bytes, source) = ledger_bytes(args.hub.as_deref(), args.file.as_deref())?;
    if let Some(out) = &args.export {
        std::fs::write(out, &bytes).with_context(|| format!("write {}", out.display()))?;
    }
    let ledger =
        Ledger::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{source}: the ledger does not verify: {e}"))?;
    // Against a live hub: the spec it serves (and signs) must be the one its ledger allows, and
    // it must owe no outcome or change.
    let steering = match &args.hub {
        Some(url) => Some(check_steering(url, &ledger)?),
        None => None,
    };
    let entries = ledger.entries();
    let rounds = entries.iter().filter(|e| matches!(e.body, Body::Emission { .. })).count();
    let validators: Vec<_> = ledger.validators().cloned().collect();
    if args.json {
        let out = serde_json::json!({
            "verified": true,
            "run_id": ledger.run_id(),
            "hub_key": ledger.hub().map(|k| k.hex()),
            "entries": ledger.len(),
            "rounds": rounds,
            "root": ledger.root(),
            "policy": ledger.policy(),
            "validators": validators,
            "units": ledger.units,
            "payouts": ledger.payouts,
            "validator_faults": ledger.faults,
            "spec_hash": ledger.spec().map(|(_, h)| h),
            "spec_changes": ledger.spec_changes(),
            "proposals": ledger.proposals(),
            "served_spec_matches": steering.is_some(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("{source}: verified: {} entries, {rounds} settled rounds, run {}", ledger.len(), ledger.run_id());
    println!("hub key {}", ledger.hub().map(|k| k.hex()).unwrap_or_default());
    println!("Merkle root of all entries {}", ledger.root());
    for v in &validators {
        if v.insecure {
            println!(
                "validator {} (entry {}): INSECURE development attestation — no TEE, nothing proven",
                v.key, v.seq
            );
        } else {
            println!("validator {} (entry {}): {} measurement {}", v.key, v.seq, v.kind, v.measurement);
        }
    }
    if let Some((_, hash)) = ledger.spec() {
        let proposals = ledger.proposals();
        let passed = proposals.values().filter(|p| p.outcome.is_some_and(|(_, t)| t.passed)).count();
        println!(
            "spec {hash}: {} change(s) applied by vote; {} proposal(s), {passed} passed",
            ledger.spec_changes(),
            proposals.len()
        );
    }
    if let Some(round) = steering {
        println!("the spec the hub serves at round {round} is the one its ledger allows");
    }
    for (name, faults) in &ledger.faults {
        println!("validator {name:?}: contradicted by the others on {faults} scoring task(s)");
    }
    let total: u64 = ledger.units.values().sum();
    println!("\n{:<66} {:>14} {:>8}", "contributor key", "reward units", "share");
    let mut rows: Vec<_> = ledger.units.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (key, units) in rows {
        println!("{key:<66} {units:>14} {:>7.2}%", 100.0 * *units as f64 / total.max(1) as f64);
    }
    if !ledger.payouts.is_empty() {
        println!("\n{:<66} {:>14}", "holder", "paid out");
        for (holder, amount) in &ledger.payouts {
            println!("{holder:<66} {amount:>14}");
        }
    }
    Ok(())
}
