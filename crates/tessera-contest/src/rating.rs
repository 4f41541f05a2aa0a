//! Skill ratings across rounds: Weng–Lin (the rating OpenSkill uses; `skillratings` crate).
//! Each round is one free-for-all match among the contributors who submitted: ranked by score,
//! equal scores tie, and a rejected or flagged submission shares last place. One noisy round
//! moves a rating a little; a consistent record moves it far. The leaderboard orders by the
//! conservative estimate μ − 3σ, so a newcomer with one lucky round does not top it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use skillratings::MultiTeamOutcome;
use skillratings::weng_lin::{WengLinConfig, WengLinRating, weng_lin_multi_team};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    pub mu: f64,
    pub sigma: f64,
    /// Rounds this contributor took part in.
    pub rounds: u64,
}

impl Default for Rating {
    fn default() -> Self {
        let r = WengLinRating::new();
        Rating { mu: r.rating, sigma: r.uncertainty, rounds: 0 }
    }
}

impl Rating {
    /// The conservative skill estimate μ − 3σ the leaderboard ranks by.
    pub fn ordinal(&self) -> f64 {
        self.mu - 3.0 * self.sigma
    }
}

/// One contributor's place in a round: its score, or `None` for last place (rejected/flagged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub contributor: u64,
    pub score: Option<f64>,
}

/// Every contributor's rating, by id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratings(pub BTreeMap<u64, Rating>);

impl Ratings {
    pub fn get(&self, contributor: u64) -> Rating {
        self.0.get(&contributor).copied().unwrap_or_default()
    }

    /// Rates one round. A contributor listed twice keeps its best standing. Fewer than two
    /// participants is no match and changes nothing.
    pub fn update(&mut self, standings: &[Standing]) {
        let mut best: BTreeMap<u64, Option<f64>> = BTreeMap::new();
        for s in standings {
            let score = s.score.filter(|x| x.is_finite());
            let slot = best.entry(s.contributor).or_insert(score);
            if score.is_some_and(|x| slot.is_none_or(|y| x > y)) {
                *slot = score;
            }
        }
        if best.len() < 2 {
            return;
        }
        // Distinct scores, best first, give the ranks; equal scores tie; unscored come last.
        let mut distinct: Vec<f64> = best.values().filter_map(|s| *s).collect();
        distinct.sort_by(|a, b| b.total_cmp(a));
        distinct.dedup();
        let rank_of = |s: Option<f64>| match s {
            Some(x) => 1 + distinct.iter().position(|&d| d == x).unwrap_or(distinct.len()),
            None => distinct.len() + 1,
        };
        let ids: Vec<u64> = best.keys().copied().collect();
        let teams: Vec<[WengLinRating; 1]> = ids
            .iter()
            .map(|id| {
                let r = self.get(*id);
                [WengLinRating { rating: r.mu, uncertainty: r.sigma }]
            })
            .collect();
        let input: Vec<(&[WengLinRating], MultiTeamOutcome)> =
            ids.iter().zip(&teams).map(|(id, t)| (&t[..], MultiTeamOutcome::new(rank_of(best[id])))).collect();
        let rated = weng_lin_multi_team(&input, &WengLinConfig::new());
        for (id, team) in ids.iter().zip(rated) {
            if let Some(r) = team.first() {
                let old = self.get(*id);
                self.0.insert(*id, Rating { mu: r.rating, sigma: r.uncertainty, rounds: old.rounds + 1 });
            }
        }
    }

    /// Contributor ids, best first by μ − 3σ (ties: higher μ, then lower id); everyone rated in
    /// at least one round comes before everyone never rated, whose default μ − 3σ of 0 says
    /// nothing about them.
    pub fn leaderboard(&self, contributors: impl IntoIterator<Item = u64>) -> Vec<(u64, Rating)> {
        let mut rows: Vec<(u64, Rating)> = contributors.into_iter().map(|c| (c, self.get(c))).collect();
        rows.sort_by(|(a, ra), (b, rb)| {
            (rb.rounds > 0)
                .cmp(&(ra.rounds > 0))
                .then(rb.ordinal().total_cmp(&ra.ordinal()))
                .then(rb.mu.total_cmp(&ra.mu))
                .then(a.cmp(b))
        });
        rows.dedup_by_key(|(c, _)| *c);
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_rated_contributors_rank_after_every_rated_one() {
        let mut r = Ratings::default();
        // One rated contributor far below the default ordinal of 0.
        r.0.insert(1, Rating { mu: 10.0, sigma: 5.0, rounds: 3 });
        let board: Vec<u64> = r.leaderboard([7, 1]).into_iter().map(|(id, _)| id).collect();
        assert_eq!(board, vec![1, 7]);
    }

    fn st(contributor: u64, score: Option<f64>) -> Standing {
        Standing { contributor, score }
    }

    #[test]
    fn consistent_winners_rise_and_one_round_does_not_decide() {
        let mut r = Ratings::default();
        r.update(&[st(1, Some(3.0)), st(2, Some(2.0)), st(3, Some(1.0)), st(4, None)]);
        let after_one = r.leaderboard([1, 2, 3, 4]);
        assert_eq!(after_one.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        // Player 3 wins once after losing many times: still below the consistent player 1.
        for _ in 0..10 {
            r.update(&[st(1, Some(3.0)), st(2, Some(2.0)), st(3, Some(1.0)), st(4, None)]);
        }
        r.update(&[st(3, Some(5.0)), st(1, Some(3.0)), st(2, Some(2.0)), st(4, None)]);
        let board = r.leaderboard([1, 2, 3, 4]);
        assert_eq!(board[0].0, 1);
        assert_eq!(board[3].0, 4);
        assert!(r.get(1).sigma < Rating::default().sigma);
        assert_eq!(r.get(1).rounds, 12);
    }

    #[test]
    fn ties_and_degenerate_rounds() {
        let mut r = Ratings::default();
        r.update(&[st(1, Some(1.0))]);
        assert_eq!(r, Ratings::default());
        r.update(&[st(1, Some(1.0)), st(2, Some(1.0))]);
        assert!((r.get(1).mu - r.get(2).mu).abs() < 1e-12);
        // A contributor listed twice keeps its best standing; NaN counts as unscored.
        r.update(&[st(5, None), st(5, Some(2.0)), st(6, Some(f64::NAN))]);
        assert!(r.get(5).mu > r.get(6).mu);
    }
}
