//! `tessera propose`, `tessera vote`, `tessera proposals`: a steered run's holders change it
//! by vote (`docs/governance.md`). Every message is signed by the holder's key and recorded in
//! the run's ledger at the next round boundary, where anyone can recount it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_protocol::Codec;
use tessera_protocol::api::governance::{Change, Choice, ProposalMessage, VoteMessage};

#[derive(Args)]
pub struct HolderArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// The holder's key (`tessera keygen`, or a contributor's `STATE_DIR/identity.pem`): the key
    /// its balance is held under, which signs the message.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

impl HolderArgs {
    /// A client that signs as the holder, pinned to the hub's key.
    fn client(&self) -> Result<(tessera_client::HubClient, tessera_protocol::api::RunInfo)> {
        let key = tessera_trust::Identity::load(&self.key).with_context(|| format!("key {}", self.key.display()))?;
        let hub = tessera_client::HubClient::new(self.hub.trim_end_matches('/'))?;
        let run = hub.run()?;
        let pinned = tessera_trust::PublicKey::parse(&run.hub_key)?;
        Ok((hub.signed_by(Arc::new(key)).pinning(pinned), run))
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(false)))]
pub struct ProposeArgs {
    #[command(flatten)]
    pub holder: HolderArgs,
    /// A short title shown with the proposal.
    #[arg(long)]
    pub title: String,
    /// Apply it at the start of this round (default: the round its vote closes).
    #[arg(long, value_name = "ROUND")]
    pub apply_at: Option<u64>,
    /// Change H, the inner steps per round.
    #[arg(long, group = "change", value_name = "H")]
    pub inner_steps: Option<u64>,
    /// Change the number of submissions that closes a round.
    #[arg(long, group = "change", value_name = "N")]
    pub quorum: Option<u32>,
    /// Change the outer learning rate.
    #[arg(long, group = "change", value_name = "LR")]
    pub outer_lr: Option<f32>,
    /// Change the submission codec (`f32`, `bf16`, `int8:64`, `topk:4096:16`…).
    #[arg(long, group = "change", value_name = "CODEC")]
    pub codec: Option<Codec>,
    /// Move the next phase's start to this round.
    #[arg(long, group = "change", value_name = "ROUND")]
    pub phase_start: Option<u64>,
    /// End the current phase once a round's loss reaches this.
    #[arg(long, group = "change", value_name = "LOSS")]
    pub phase_loss: Option<f64>,
    /// Change how many of the leaderboard's top qualify for the next phase.
    #[arg(long, group = "change", value_name = "N")]
    pub promote_top: Option<u32>,
    /// Release the checkpoint the run holds when it applies as this version (`tessera release`).
    #[arg(long, group = "change", value_name = "VERSION")]
    pub release: Option<String>,
    /// Change the weights of the run's data mixture, one per dataset, the run's own first
    /// (e.g. `1,3`).
    #[arg(long, group = "change", value_name = "W,W,…", value_delimiter = ',')]
    pub mixture: Option<Vec<u32>>,
}

impl ProposeArgs {
    fn change(&self) -> Result<Change> {
        Ok(match self {
            ProposeArgs { inner_steps: Some(value), .. } => Change::InnerSteps { value: *value },
            ProposeArgs { quorum: Some(value), .. } => Change::Quorum { value: *value },
            ProposeArgs { outer_lr: Some(value), .. } => Change::OuterLr { value: *value },
            ProposeArgs { codec: Some(value), .. } => Change::Codec { value: *value },
            ProposeArgs { phase_start: Some(round), .. } => Change::PhaseStart { round: *round },
            ProposeArgs { phase_loss: Some(loss), .. } => Change::PhaseLoss { loss: *loss },
            ProposeArgs { promote_top: Some(value), .. } => Change::PromoteTop { value: *value },
            ProposeArgs { release: Some(version), .. } => Change::Release { version: version.clone() },
            ProposeArgs { mixture: Some(weights), .. } => Change::Mixture { weights: weights.clone() },
            _ => bail!("give one change (see --help)"),
        })
    }
}

#[derive(Args)]
pub struct VoteArgs {
    #[command(flatten)]
    pub holder: HolderArgs,
    /// The proposal's id (`tessera proposals`).
    #[arg(long)]
    pub proposal: String,
    /// yes, no or abstain. A later vote replaces this one until the vote closes.
    pub choice: Choice,
}

#[derive(Args)]
pub struct ProposalsArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// Print the rules and proposals as JSON.
    #[arg(long)]
    pub json: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub fn propose(args: ProposeArgs) -> Result<()> {
    let change = args.change()?;
    let (hub, run) = args.holder.client()?;
    let message = ProposalMessage {
        run_id: run.run_id.clone(),
        title: args.title.clone(),
        change: change.clone(),
        apply_at: args.apply_at,
        time_ms: now_ms(),
    };
    let receipt = hub.propose(&message).context("the hub refused the proposal")?;
    println!("proposal {}", receipt.proposal);
    println!(
        "  {} — recorded in the ledger when round {} is published; vote with `tessera vote --proposal {} yes`",
        change.describe(),
        receipt.recorded_at_boundary_of,
        receipt.proposal
    );
    Ok(())
}

pub fn vote(args: VoteArgs) -> Result<()> {
    let (hub, run) = args.holder.client()?;
    let message =
        VoteMessage { run_id: run.run_id, proposal: args.proposal.clone(), choice: args.choice, time_ms: now_ms() };
    let receipt = hub.vote(&message).context("the hub refused the vote")?;
    println!(
        "voted {:?} on {}: recorded when round {} is published (a later vote replaces it until the vote closes)",
        args.choice, receipt.proposal, receipt.recorded_at_boundary_of
    );
    Ok(())
}

pub fn proposals(args: ProposalsArgs) -> Result<()> {
    let hub = tessera_client::HubClient::new(args.hub.trim_end_matches('/'))?;
    let list = hub.proposals()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let Some(g) = &list.governance else {
        println!("this run is not steered by its holders: its spec stays as created");
        return Ok(());
    };
    let pct = |ppm: u32| {
        let s = format!("{:.4}", f64::from(ppm) / 1e4);
        format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
    };
    println!(
        "round {}: votes stay open {} round(s); a proposal passes with at least {} of the power voting and at least {} of yes + no saying yes",
        list.round,
        g.voting_rounds,
        pct(g.quorum_ppm),
        pct(g.threshold_ppm)
    );
    if list.proposals.is_empty() {
        println!("no proposals yet (`tessera propose --help`)");
    }
    for p in &list.proposals {
        let t = &p.tally;
        println!("\n{} [{}] {}", p.id, p.state, p.title);
        println!("  {} — closes at round {}, applies at round {}", p.description, p.closes, p.apply_at);
        println!(
            "  yes {} no {} abstain {} of {} power, {} voter(s){}",
            t.yes,
            t.no,
            t.abstain,
            t.power,
            p.voters,
            if p.state == "pending" { " (waiting for the round boundary)" } else { "" }
        );
    }
    Ok(())
}
