//! `tessera leaderboard`: a hub's contributors by rating.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct LeaderboardArgs {
    /// The hub's URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub hub: String,
    /// Print the hub's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show at most this many rows.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

pub fn leaderboard(args: LeaderboardArgs) -> Result<()> {
    let hub = tessera_client::HubClient::new(&args.hub)?;
    if args.json {
        println!("{}", hub.leaderboard_text()?);
        return Ok(());
    }
    let board = hub.leaderboard()?;
    println!(
        "run {} at round {}{}",
        board.run_id,
        board.round,
        if board.promoted {
            format!(", phase boundary passed at round {}: the top {} qualified", board.promote_at, board.promote_top)
        } else {
            format!(", the top {} qualify after round {}", board.promote_top, board.promote_at)
        }
    );
    println!(
        "{:>4} {:>5} {:<20} {:>8} {:>7} {:>8} {:>6} {:>8} {:>8} {:>12} {:>10}",
        "rank", "id", "name", "μ−3σ", "μ", "σ", "rounds", "accepted", "rejected", "rewards", "mean score"
    );
    for r in board.rows.iter().take(args.limit) {
        println!(
            "{:>4} {:>5} {:<20} {:>8.2} {:>7.2} {:>8.3} {:>6} {:>8} {:>8} {:>12} {:>10}{}",
            r.rank,
            r.id,
            r.name.chars().take(20).collect::<String>(),
            r.ordinal,
            r.mu,
            r.sigma,
            r.rounds,
            r.accepted,
            r.rejected,
            r.rewards,
            r.mean_score.map_or("–".into(), |s| format!("{s:.4}")),
            if r.qualified { "  qualified" } else { "" }
        );
    }
    Ok(())
}
