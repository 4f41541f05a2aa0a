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
    /// Show at most this many rows (with `--explain`: the latest this many submissions).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Explain how contributor ID's scored submissions became reward units: score, fit
    /// factor, weight, flag and the rule with its numbers, each checked against its round's
    /// published rows.
    #[arg(long, value_name = "ID")]
    pub explain: Option<u64>,
}

pub fn leaderboard(args: LeaderboardArgs) -> Result<()> {
    let hub = tessera_client::HubClient::new(&args.hub)?;
    if let Some(id) = args.explain {
        return explain(&hub, id, args.limit.min(200), args.json);
    }
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
    let header = || {
        println!(
            "{:>4} {:>5} {:<20} {:>8} {:>7} {:>8} {:>6} {:>8} {:>8} {:>12} {:>10}",
            "rank", "id", "name", "μ−3σ", "μ", "σ", "rounds", "accepted", "rejected", "rewards", "mean score"
        )
    };
    let line = |r: &tessera_protocol::api::LeaderRow| {
        println!(
            "{:>4} {:>5} {:<20} {:>8.2} {:>7.2} {:>8.3} {:>6} {:>8} {:>8} {:>12} {:>10}{}",
            if r.rank > 0 { r.rank.to_string() } else { "–".into() },
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
        )
    };
    if board.rows.is_empty() {
        println!("nobody is rated yet (an unscored run, or no round scored so far)");
    } else {
        header();
        board.rows.iter().take(args.limit).for_each(line);
    }
    if !board.unrated.is_empty() {
        println!("\nnot yet rated ({}), unranked: no scored round yet", board.unrated.len());
        header();
        board.unrated.iter().take(args.limit).for_each(line);
    }
    Ok(())
}

fn explain(hub: &tessera_client::HubClient, id: u64, last: usize, json: bool) -> Result<()> {
    let explained = hub.rewards(id, last)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&explained)?);
        return Ok(());
    }
    if explained.is_empty() {
        println!("contributor {id} has no scored submission yet (or the run is unscored)");
        return Ok(());
    }
    println!(
        "contributor {id}: {} scored submission(s); each round splits {} units by (score × fit factor)^{}",
        explained.len(),
        explained[0].round_units,
        explained[0].reward_power
    );
    for e in &explained {
        let num = |x: Option<f64>, digits: usize| x.map_or("–".into(), |v| format!("{v:.digits$}"));
        println!(
            "\nround {} (trained from round {}): score {}, data fit {}, fit factor {}, weight {:.3}, {} units{}",
            e.round,
            e.base_round,
            num(e.score, 6),
            num(e.data_fit, 6),
            num(e.fit_factor, 3),
            e.weight,
            e.reward,
            e.flag.as_deref().map_or(String::new(), |f| format!(", flagged {f}"))
        );
        println!("  {}", e.formula);
        if !e.reproduced {
            println!("  WARNING: the round's published rows do not give these units again under the rule");
        }
    }
    Ok(())
}
