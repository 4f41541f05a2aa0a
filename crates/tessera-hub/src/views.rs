//! Read-only answers: a round's announcement and evaluation seed, the run's status, the
//! leaderboard, a contributor's history and how its rewards were computed.
//!
//! Cost: `status` and `leaderboard` read every round, submission, score and rejection count
//! (O(history) rows), but once per change to the run: each keeps its last answer with the
//! journal sequence number it was computed at, and a request costs one indexed read of that
//! number while nothing changed. Concurrent requests after a change wait for one recomputation
//! (single flight), so scans are bounded by the rate of authenticated writes, never by the rate
//! of anonymous reads. The rest read one round or one contributor.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tessera_protocol::api::{ContributorStats, HubStatus, LeaderRow, Leaderboard, RewardExplanation, RoundSummary};
use tessera_protocol::{ApiError, ErrorCode};

use crate::HubError;
use crate::hub::{Hub, api, internal};

/// The last answers of the whole-run views.
#[derive(Default)]
pub(crate) struct Views {
    status: View<HubStatus>,
    leaderboard: View<Leaderboard>,
    pub(crate) proposals: View<tessera_protocol::api::governance::Proposals>,
}

/// A whole-run view's last answer, with the journal sequence number it is current at.
pub(crate) struct View<T>(tokio::sync::Mutex<Option<(u64, Arc<T>)>>);

impl<T> Default for View<T> {
    fn default() -> Self {
        View(tokio::sync::Mutex::new(None))
    }
}

impl<T> View<T> {
    /// The answer at journal sequence number `seq`: the one kept if it is current, else
    /// `compute`'s, kept in its place (one computation at a time; the others wait for it).
    pub(crate) async fn at<F>(
        &self,
        seq: u64,
        name: &'static str,
        compute: impl FnOnce() -> F,
    ) -> Result<Arc<T>, HubError>
    where
        F: std::future::Future<Output = Result<T, HubError>>,
    {
        let mut kept = self.0.lock().await;
        if let Some((at, answer)) = &*kept
            && *at == seq
        {
            return Ok(answer.clone());
        }
        metrics::counter!("tessera_hub_views_computed_total", "view" => name).increment(1);
        let answer = Arc::new(compute().await?);
        *kept = Some((seq, answer.clone()));
        Ok(answer)
    }
}

impl Hub {
    /// Round `round` as announced: its base, its seed commitment, what it published.
    pub async fn announcement(&self, round: u64) -> Result<tessera_protocol::api::RoundAnnouncement, ApiError> {
        let r = (self.db.round(round).await.map_err(internal)?)
            .ok_or_else(|| api(ErrorCode::NotFound, format!("round {round} has not opened")))?;
        let eval_commitment = match &self.spec().contest {
            Some(_) => Some(self.db.eval_seed(round).await.map_err(internal)?.1),
            None => None,
        };
        Ok(tessera_protocol::api::RoundAnnouncement {
            run_id: self.run_id().to_owned(),
            round,
            state: r.state,
            base_checkpoint: r.base_checkpoint,
            eval_commitment,
            result_checkpoint: r.result_checkpoint,
            opened_ms: r.opened_ms,
            closed_ms: r.closed_ms,
        })
    }

    /// Round `round`'s evaluation-seed commitment, with the seed once its submissions closed.
    pub async fn eval_seed(&self, round: u64) -> Result<tessera_protocol::api::EvalSeed, ApiError> {
        let revealed = self.live.lock().await.run.seed_revealed(round)?;
        let (seed, commitment) = self.db.eval_seed(round).await.map_err(internal)?;
        // A sealed round's seed is known only once its verdict revealed it.
        Ok(tessera_protocol::api::EvalSeed { round, commitment, seed: (revealed && !seed.is_empty()).then_some(seed) })
    }

    /// A registered contributor's scored submissions and rating history.
    pub async fn contributor_history(&self, id: u64) -> Result<tessera_protocol::api::ContributorHistory, ApiError> {
        let known = self.keys.read().map_err(|_| api(ErrorCode::Internal, "keys poisoned"))?.keys.contains_key(&id);
        if !known {
            return Err(api(ErrorCode::NotFound, format!("no contributor {id}")));
        }
        self.db.contributor_history(id).await.map_err(internal)
    }

    /// What published round `round`'s scores can be recomputed from — the job its validator was
    /// given, seed revealed — and what it published. One indexed read of the round, its
    /// submissions and its scores.
    pub async fn round_audit(&self, round: u64) -> Result<tessera_protocol::api::RoundAudit, ApiError> {
        let Some(contest) = self.spec().contest.clone() else {
            return Err(api(ErrorCode::NotScoring, "this run is not scored: there are no scores to audit"));
        };
        let (current, phase) = {
            let live = self.live.lock().await;
            (live.run.round(), live.run.phase_at(round))
        };
        if round >= current {
            return Err(api(ErrorCode::NotFound, format!("round {round} is not published yet")));
        }
        let r = (self.db.round(round).await.map_err(internal)?)
            .ok_or_else(|| api(ErrorCode::NotFound, format!("round {round} has not opened")))?;
        let (eval_seed, eval_commitment) = self.db.eval_seed(round).await.map_err(internal)?;
        let rows = self.db.submissions(Some(round)).await.map_err(internal)?;
        let scores = self.db.round_scores(round).await.map_err(internal)?;
        let scores: HashMap<(u64, u64), tessera_round::ScoreRow> =
            scores.into_iter().map(|s| ((s.contributor, s.base_round), s)).collect();
        let mut published = Vec::with_capacity(rows.len());
        let mut submissions = Vec::with_capacity(rows.len());
        for a in rows {
            let Some(s) = scores.get(&(a.contributor, a.base_round)) else {
                return Err(api(
                    ErrorCode::Internal,
                    format!("round {round} has no score for contributor {}", a.contributor),
                ));
            };
            published.push(tessera_protocol::api::PublishedScore {
                contributor: s.contributor,
                base_round: s.base_round,
                score: s.score,
                data_fit: s.data_fit,
                fit_factor: s.fit_factor,
                flag: s.flag.clone(),
                weight: s.weight,
                reward: s.reward,
                norm_bound: s.norm_bound,
            });
            submissions.push(self.job_submission(a));
        }
        Ok(tessera_protocol::api::RoundAudit {
            run_id: self.run_id().to_owned(),
            job: tessera_protocol::api::ScoringJob {
                revision: self.spec_revision(),
                round,
                phase: phase as u32,
                base_checkpoint: r.base_checkpoint,
                eval_seed,
                eval_commitment,
                submissions,
                // A run scored in tasks: the audit draws them from the seed, as the hub did.
                task: None,
            },
            scores: published,
            submissions_published: contest.publish_submissions,
        })
    }

    /// Where a published round's submission is: for anyone in a run that publishes them, and
    /// for its own contributor (`own`, from a signed request) in any run, so it can audit its
    /// own score. Another contributor's submission in a run that does not publish them is
    /// answered as absent.
    pub async fn published_submission_key(&self, round: u64, blob: &str, own: Option<u64>) -> Result<String, ApiError> {
        let public = self.spec().contest.as_ref().is_some_and(|c| c.publish_submissions);
        if !public && own.is_none() {
            return Err(api(
                ErrorCode::NotFound,
                "this run does not publish its submissions: a contributor fetches its own with a signed request",
            ));
        }
        if round >= self.live.lock().await.run.round() {
            return Err(api(ErrorCode::NotFound, format!("round {round} is not published yet")));
        }
        crate::intake::blob_name(blob)?;
        let absent = || api(ErrorCode::NotFound, format!("round {round} has no submission {blob}"));
        match self.db.blob_placement(blob).await.map_err(internal)? {
            Some((r, owner)) if r == round && (public || Some(owner) == own) => {}
            _ => return Err(absent()),
        }
        Ok(crate::store::submission_key(blob))
    }

    /// A published round's scores, flags, weights and rewards, in arrival order (one indexed
    /// read of the round's rows).
    pub async fn round_scores(&self, round: u64) -> Result<Vec<tessera_round::ScoreRow>, HubError> {
        self.db.round_scores(round).await
    }

    /// How each of a contributor's last `last` scored submissions became reward units: its
    /// numbers, the rule with them filled in, and whether the round's published rows give the
    /// recorded units again. Cost: one indexed read of the contributor's scores and one of each
    /// explained round's rows (O(`last` × round size)).
    pub async fn explain_rewards(&self, id: u64, last: usize) -> Result<Vec<RewardExplanation>, ApiError> {
        let history = self.contributor_history(id).await?;
        let Some(contest) = self.spec().contest.clone() else { return Ok(Vec::new()) };
        let (power, units) = (contest.reward_power, contest.reward_units);
        let skip = history.scores.len().saturating_sub(last);
        let mut out = Vec::new();
        for mine in &history.scores[skip..] {
            let rows = self.db.round_scores(mine.round).await.map_err(internal)?;
            let recorded: Vec<tessera_contest::Recorded> = rows
                .iter()
                .map(|r| tessera_contest::Recorded {
                    score: r.score,
                    fit_factor: r.fit_factor,
                    flagged: r.flag.is_some(),
                })
                .collect();
            let (shares, split) = tessera_contest::recompute(&recorded, power, units);
            let Some(at) = rows.iter().position(|r| r.contributor == id && r.base_round == mine.base_round) else {
                return Err(api(ErrorCode::Internal, format!("round {} lost contributor {id}'s row", mine.round)));
            };
            let round_shares: f64 = shares.iter().sum();
            let reproduced = rows.iter().map(|r| r.reward).eq(split.iter().copied());
            out.push(RewardExplanation {
                round: mine.round,
                base_round: mine.base_round,
                score: mine.score,
                data_fit: mine.data_fit,
                fit_factor: mine.fit_factor,
                conduct: mine.conduct,
                weight: mine.weight,
                flag: mine.flag.clone(),
                share: shares[at],
                round_shares,
                round_units: units,
                reward_power: power,
                reward: mine.reward,
                reproduced,
                formula: formula(mine, shares[at], round_shares, power, units, contest.top),
            });
        }
        Ok(out)
    }

    /// Contributors ranked by rating, with their records, and who qualified for the next phase
    /// (fixed at the phase boundary).
    pub async fn leaderboard(&self) -> Result<Arc<Leaderboard>, HubError> {
        let seq = self.db.last_seq().await?;
        self.views.leaderboard.at(seq, "leaderboard", || self.compute_leaderboard()).await
    }

    async fn compute_leaderboard(&self) -> Result<Leaderboard, HubError> {
        let (round, finished, ratings) = {
            let live = self.live.lock().await;
            (live.run.round(), live.run.finished(), live.run.ratings().clone())
        };
        let contributors = self.db.contributors().await?;
        let scores = self.db.scores().await?;
        let subs = self.db.submissions(None).await?;
        let rejected = self.db.rejection_counts().await?;
        let promote_top = self.spec().contest.as_ref().map_or(0, |c| c.promote_top);
        let promote_at = self.spec().contest.as_ref().map_or(self.spec().rounds, |c| c.boundary(self.spec().rounds));
        let qualified = self.db.qualified().await?;
        let names: HashMap<u64, String> = contributors.iter().map(|(id, n, _)| (*id, n.clone())).collect();
        // Per contributor, in one pass each: accepted, rejected, rewards, (score sum, scored).
        #[derive(Default)]
        struct Record {
            accepted: u64,
            rejected: u64,
            rewards: u64,
            score_sum: f64,
            scored: u64,
        }
        let mut records: HashMap<u64, Record> = HashMap::new();
        for s in &subs {
            records.entry(s.contributor).or_default().accepted += 1;
        }
        for (id, n) in rejected {
            records.entry(id).or_default().rejected = n;
        }
        for s in &scores {
            let rec = records.entry(s.contributor).or_default();
            rec.rewards += s.reward;
            if let Some(x) = s.score {
                rec.score_sum += x;
                rec.scored += 1;
            }
        }
        let qualified: std::collections::HashSet<u64> = qualified.into_iter().collect();
        let (rated, unrated): (Vec<_>, Vec<_>) =
            ratings.leaderboard(contributors.iter().map(|c| c.0)).into_iter().partition(|(_, r)| r.rounds > 0);
        let mut row = |rank: u64, (id, r): (u64, tessera_contest::Rating)| {
            let rec = records.remove(&id).unwrap_or_default();
            LeaderRow {
                rank,
                id,
                name: names.get(&id).cloned().unwrap_or_default(),
                mu: r.mu,
                sigma: r.sigma,
                ordinal: r.ordinal(),
                rounds: r.rounds,
                accepted: rec.accepted,
                rejected: rec.rejected,
                rewards: rec.rewards,
                mean_score: (rec.scored > 0).then(|| rec.score_sum / rec.scored as f64),
                qualified: qualified.contains(&id),
            }
        };
        let rows = rated.into_iter().enumerate().map(|(i, r)| row(i as u64 + 1, r)).collect();
        let mut unrated: Vec<LeaderRow> = unrated.into_iter().map(|r| row(0, r)).collect();
        unrated.sort_by_key(|r| r.id);
        Ok(Leaderboard {
            run_id: self.run_id().to_owned(),
            round,
            finished,
            promote_top,
            promote_at,
            promoted: round >= promote_at,
            rows,
            unrated,
        })
    }

    pub fn note_download(&self, bytes: u64) {
        self.bytes_down.fetch_add(bytes, Ordering::Relaxed);
        metrics::counter!("tessera_hub_bytes_total", "direction" => "down").increment(bytes);
    }

    pub async fn status(&self) -> Result<HubStatus, HubError> {
        let seq = self.db.last_seq().await?;
        let status = self.views.status.at(seq, "status", || self.compute_status()).await?;
        // Downloads are counted in memory, not journaled: always current.
        Ok(HubStatus { bytes_down: self.bytes_down.load(Ordering::Relaxed), ..(*status).clone() })
    }

    async fn compute_status(&self) -> Result<HubStatus, HubError> {
        let (round, finished) = {
            let live = self.live.lock().await;
            (live.run.round(), live.run.finished())
        };
        let rounds = self.db.rounds().await?;
        let subs = self.db.submissions(None).await?;
        let mut by_contributor: HashMap<u64, Vec<&tessera_round::Accepted>> = HashMap::new();
        for s in &subs {
            by_contributor.entry(s.contributor).or_default().push(s);
        }
        let rejected: HashMap<u64, u64> = self.db.rejection_counts().await?.into_iter().collect();
        let contributors = self
            .db
            .contributors()
            .await?
            .into_iter()
            .map(|(id, name, _)| {
                let mine = by_contributor.remove(&id).unwrap_or_default();
                let losses: Vec<f64> = mine.iter().filter_map(|s| s.inner_loss).collect();
                ContributorStats {
                    id,
                    name,
                    accepted: mine.len() as u64,
                    rejected: rejected.get(&id).copied().unwrap_or(0),
                    submitted_rounds: {
                        let mut r: Vec<u64> = mine.iter().map(|s| s.base_round).collect();
                        r.sort_unstable();
                        r
                    },
                    bytes_up: mine.iter().map(|s| s.bytes).sum(),
                    mean_inner_loss: (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64),
                    last_seen_ms: mine.iter().map(|s| s.received_ms).max(),
                }
            })
            .collect();
        let history = rounds
            .into_iter()
            .map(|r| RoundSummary {
                round: r.round,
                state: r.state,
                base_checkpoint: r.base_checkpoint,
                result_checkpoint: r.result_checkpoint,
                accepted: r.accepted,
                weight: r.weight,
                mean_inner_loss: r.mean_inner_loss,
                bytes_up: r.bytes_up,
                closed_by: r.closed_by,
                opened_ms: r.opened_ms,
                closed_ms: r.closed_ms,
            })
            .collect();
        Ok(HubStatus {
            run_id: self.run_id().to_owned(),
            round,
            rounds: self.spec().rounds,
            finished,
            num_params: self.spec().num_params(),
            bytes_up: subs.iter().map(|s| s.bytes).sum(),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
            history,
            contributors,
        })
    }
}

/// The reward rule with one submission's numbers in it.
fn formula(
    s: &tessera_protocol::api::ScoredSubmission,
    share: f64,
    total: f64,
    power: f64,
    units: u64,
    top: Option<u32>,
) -> String {
    let left_out = "left out of the aggregate; earns nothing";
    match s.flag.as_deref() {
        Some("unscored") => "the round's scoring did not finish (the validators', not the contributors', failure): \
             aggregated at its staleness weight; nobody in the round was rated, rewarded or penalised"
            .into(),
        Some("copy") => {
            format!("a copy of an earlier submission of the round (same direction on seeded coordinates): {left_out}")
        }
        Some("wrong_data") => format!(
            "fit factor {:.3}: its gain does not come from the data it was assigned: {left_out}",
            s.fit_factor.unwrap_or(0.0)
        ),
        Some("not_positive") => format!(
            "score {}: applying it alone did not lower the held-out loss: {left_out}",
            s.score.map_or("–".into(), |x| format!("{x:.6}"))
        ),
        Some("below_top") => {
            format!("outside the round's best {} by score: {left_out}", top.map_or("–".into(), |t| t.to_string()))
        }
        Some(other) => format!("flagged {other}: {left_out}"),
        None => {
            let (score, fit) = (s.score.unwrap_or(0.0), s.fit_factor.unwrap_or(1.0));
            let exact = if total > 0.0 { units as f64 * share / total } else { 0.0 };
            let staleness = if fit > 0.0 { s.weight / fit } else { 0.0 };
            let noise = s.score_se.map_or(String::new(), |se| format!(" ± {se:.6}"));
            let record = match s.conduct.filter(|&c| c < 1.0 && c > 0.0) {
                Some(c) => format!(
                    " (data fit record {:.3} × conduct record {c:.3}: caught cheating in earlier rounds)",
                    fit / c
                ),
                None => String::new(),
            };
            format!(
                "share = (score {score:.6}{noise} × fit factor {fit:.3}{record})^{power} = {share:.4e}; \
                 units = {units} × {share:.4e} / {total:.4e} (the round's shares) = {exact:.2} → {} \
                 (largest-remainder split: the round's units exactly); \
                 aggregation weight = staleness {staleness:.3} × fit factor {fit:.3} = {:.3}",
                s.reward, s.weight
            )
        }
    }
}
