//! `tessera audit`: recompute a published round's scores and compare them with what the hub
//! published (`tessera_validator::audit`): every submission's, in a run that publishes them,
//! or a contributor's own (`--identity`), in any unsealed run.

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::args::{RuntimeArgs, ScoringDataArgs, setup_runtime};

#[derive(Args)]
pub struct AuditArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// The published round to recompute.
    #[arg(long)]
    pub round: u64,
    /// Audit as a contributor: recompute only the scores of this key's own submissions (the
    /// `identity.pem` in its `tessera contribute --state-dir`), fetched with requests it signs.
    /// Works in runs that do not publish submissions; data fit and copy flags need the others'
    /// submissions and are not rechecked.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<std::path::PathBuf>,
    /// A published number agrees when the recomputed one lies within ABS + REL × |published|.
    #[arg(long, value_name = "ABS", default_value_t = 1e-4)]
    pub tolerance_abs: f64,
    /// The relative part of the tolerance (see --tolerance-abs).
    #[arg(long, value_name = "REL", default_value_t = 1e-2)]
    pub tolerance_rel: f64,
    /// Print the whole report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub data: ScoringDataArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn audit(args: AuditArgs) -> Result<()> {
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    if !ok(args.tolerance_abs) || !ok(args.tolerance_rel) {
        bail!("--tolerance-abs and --tolerance-rel must be finite and non-negative");
    }
    let data = args.data.config()?;
    let device = setup_runtime(&args.runtime)?;
    // The hub's key is pinned on first contact: every later answer must carry its signature.
    let hub = tessera_client::HubClient::new(args.hub.trim_end_matches('/'))?;
    let key = tessera_trust::PublicKey::parse(&hub.run()?.hub_key)?;
    let hub = hub.pinning(key);
    let tolerance = tessera_validator::audit::Tolerance { absolute: args.tolerance_abs, relative: args.tolerance_rel };
    let report = match &args.identity {
        Some(file) => {
            let me = std::sync::Arc::new(
                tessera_trust::Identity::load(file).with_context(|| format!("identity {}", file.display()))?,
            );
            let public = me.public();
            eprintln!(
                "tessera audit: recomputing the scores of {}'s submissions to round {} of {}",
                public.hex(),
                args.round,
                args.hub
            );
            tessera_validator::audit::audit_own(&hub.signed_by(me), &public, args.round, &data, device, tolerance)?
        }
        None => {
            eprintln!(
                "tessera audit: recomputing round {} of {} (one validator's work for that round)",
                args.round, args.hub
            );
            tessera_validator::audit::audit(&hub, args.round, &data, device, tolerance)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "round {}: {} {}submissions recomputed",
            report.round,
            report.submissions.len(),
            if report.own_only { "of your own " } else { "" }
        );
        println!(
            "{:>5} {:>6} {:>12} {:>12} {:>12} {:>12}  verdict",
            "#", "id", "score", "recomputed", "data fit", "recomputed"
        );
        let num = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.6}"));
        for (i, c) in report.submissions.iter().enumerate() {
            println!(
                "{:>5} {:>6} {:>12} {:>12} {:>12} {:>12}  {}",
                i,
                c.published.contributor,
                num(c.published.score),
                num(Some(c.recomputed.score)),
                num(c.published.data_fit),
                num(c.recomputed.data_fit),
                if c.problems.is_empty() { "agrees".into() } else { format!("DIFFERS: {}", c.problems.join("; ")) }
            );
        }
        if report.own_only {
            println!("data fit and copy flags: not rechecked (they need the other submissions of the round)");
        }
        println!(
            "rewards: {}",
            if report.rewards_reproduced {
                "the published rows give the published units"
            } else {
                "DIFFER from what the rule gives on the published rows"
            }
        );
    }
    if !report.agrees() {
        bail!("round {} does not match what it published", report.round);
    }
    eprintln!("tessera audit: round {} agrees with what it published", report.round);
    Ok(())
}
