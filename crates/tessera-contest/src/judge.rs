//! From a round's scores to what each submission gets: a weight in the aggregate (0: left out)
//! and a share of the round's reward units.
//!
//! A copy, and a submission whose held-out score is not positive (it does not help), are left
//! out and earn nothing. Every other submission's score is discounted by its contributor's
//! *fit factor* — how much of its gain comes from the data it was assigned ([`fit_factors`]):
//! about 1 for honest work, near 0 for work trained on other data, a fraction for an update
//! pooled from several assignments (a colluding group's). Of the rest, the best `top` (all if
//! unset) are aggregated with their staleness weight × fit factor and earn in proportion to
//! (score × fit factor)^`reward_power`: a power above 1 pays consistent, large contributions
//! more than many small ones (half the score earns a quarter at power 2).

use serde::{Deserialize, Serialize};

/// What a validator measured for one submission.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub contributor: u64,
    /// Held-out loss before minus after applying this submission alone at the run's score
    /// step, over the step (nats per token): positive when it helps.
    pub score: f64,
    /// Loss gain on windows the assignment trained on minus the other submissions' median gain
    /// on the same windows (nats per token); `None` when not measured this round.
    pub data_fit: Option<f64>,
    /// Index (in the round's list) of the earlier submission this one copies.
    pub copy_of: Option<usize>,
    /// The hub's staleness weight.
    pub weight: f64,
    /// From [`fit_factors`]: 1 when unknown.
    pub fit_factor: f64,
    /// The score's standard error over the held-out windows (`None`: not measured). Reported
    /// and shown with the score; it does not change the judgement.
    #[serde(default)]
    pub score_se: Option<f64>,
    /// The norm bound it was scored against: twice the median Δ norm of the submissions scored
    /// with it (`None`: not reported).
    #[serde(default)]
    pub norm_bound: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    Copy,
    WrongData,
    NotPositive,
    BelowTop,
}

impl Flag {
    /// Whether the flag says its contributor was caught cheating (a copy, work trained on other
    /// data), as opposed to work that did not help this round.
    pub fn is_misconduct(&self) -> bool {
        matches!(self, Flag::Copy | Flag::WrongData)
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Flag::Copy => "copy",
            Flag::WrongData => "wrong_data",
            Flag::NotPositive => "not_positive",
            Flag::BelowTop => "below_top",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub reward_power: f64,
    pub top: Option<usize>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { reward_power: 2.0, top: None }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.reward_power.is_finite() && self.reward_power > 0.0 && self.reward_power <= 8.0) {
            return Err(format!("reward power {} must be in (0, 8]", self.reward_power));
        }
        if self.top == Some(0) {
            return Err("top must be at least 1".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    /// Weight in the aggregate; 0 leaves the submission out.
    pub weight: f64,
    /// Relative share of the round's rewards (0: none).
    pub share: f64,
    /// Score × fit factor: what the round's rating ranks by (`None`: last place).
    pub effective: Option<f64>,
    pub flag: Option<Flag>,
}

/// Each submission's fit factor, from its contributor's data-fit record: `history[i]` the sum
/// and count of that contributor's earlier measured fits, `now[i]` this round's (if measured).
///
/// A contributor's fit is the mean of its record and this round's, shrunk toward the round's
/// median as if it had [`PRIOR_ROUNDS`] more rounds at that median (one round's measurement is
/// noisy; a newcomer gets the benefit of the doubt, and the record soon speaks for itself). The factor is that fit over the median, clamped to
/// [0, 1]: honest contributors sit around 1, work trained on other data near 0. When the median
/// is not clearly positive (nothing to compare against) every factor is 1.
pub const PRIOR_ROUNDS: u64 = 1;

pub fn fit_factors(history: &[(f64, u64)], now: &[Option<f64>]) -> Vec<f64> {
    let raw: Vec<Option<f64>> = history
        .iter()
        .zip(now)
        .map(|(&(sum, count), f)| {
            let (sum, count) = (sum + f.unwrap_or(0.0), count + u64::from(f.is_some()));
            (count > 0).then(|| sum / count as f64)
        })
        .collect();
    let mut known: Vec<f64> = raw.iter().flatten().copied().filter(|v| v.is_finite()).collect();
    known.sort_by(f64::total_cmp);
    let median = match known.len() {
        0 => return vec![1.0; now.len()],
        n if n % 2 == 1 => known[n / 2],
        n => 0.5 * (known[n / 2 - 1] + known[n / 2]),
    };
    // The median must stand clear of the spread of the records (2 standard errors, the spread
    // estimated robustly), or there is nothing yet to compare against: early in a run, or when
    // the check cannot see memorisation, every factor is 1.
    let mut deviations: Vec<f64> = known.iter().map(|v| (v - median).abs()).collect();
    deviations.sort_by(f64::total_cmp);
    let mad = deviations[deviations.len() / 2];
    if median.is_nan() || median <= 2.0 * 1.4826 * mad / (known.len() as f64).sqrt() {
        return vec![1.0; now.len()];
    }
    history
        .iter()
        .zip(now)
        .map(|(&(sum, count), f)| {
            let (sum, count) = (sum + f.unwrap_or(0.0), count + u64::from(f.is_some()));
            let shrunk = (sum + PRIOR_ROUNDS as f64 * median) / (count + PRIOR_ROUNDS) as f64;
            if shrunk.is_finite() { (shrunk / median).clamp(0.0, 1.0) } else { 0.0 }
        })
        .collect()
}

/// A contributor's conduct record: the rounds it took part in (a scored submission, or one
/// refused for a reason that counts against it) and those in which it was caught cheating (a
/// submission flagged [`Flag::is_misconduct`], or refused as malformed, a replay or trained on
/// other data).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conduct {
    pub rounds: u64,
    pub caught: u64,
}

/// Clean rounds a newcomer's record starts with: one early false alarm does not sink it.
pub const CONDUCT_PRIOR_ROUNDS: u64 = 2;
/// How steeply a record of being caught lowers later shares.
pub const CONDUCT_POWER: f64 = 4.0;

impl Conduct {
    /// What its later scores are discounted by: the clean share of its rounds (with
    /// [`CONDUCT_PRIOR_ROUNDS`] clean ones), to the power [`CONDUCT_POWER`]. An honest
    /// contributor with one false alarm in 50 rounds keeps 0.93; one caught in 4 rounds of 10
    /// keeps 0.20.
    pub fn factor(&self) -> f64 {
        let rounds = (self.rounds + CONDUCT_PRIOR_ROUNDS) as f64;
        let clean = rounds - self.caught.min(self.rounds) as f64;
        (clean / rounds).powf(CONDUCT_POWER)
    }
}

/// An unflagged submission's relative share of its round's rewards: (score × fit factor)^`power`,
/// the factor clamped to [0, 1]. The one formula [`judge`] pays by and a published round's rows
/// are checked against ([`crate::recompute`]).
pub fn share(score: f64, fit_factor: f64, power: f64) -> f64 {
    (score * fit_factor.clamp(0.0, 1.0)).powf(power)
}

/// Judges a round's scored submissions (in arrival order).
pub fn judge(scored: &[Scored], policy: &Policy) -> Vec<Judged> {
    let mut out: Vec<Judged> = scored
        .iter()
        .map(|s| {
            let flag = if s.copy_of.is_some() {
                Some(Flag::Copy)
            } else if !(s.score.is_finite() && s.score > 0.0) {
                Some(Flag::NotPositive)
            } else if s.fit_factor.is_nan() || s.fit_factor <= 0.0 {
                Some(Flag::WrongData)
            } else {
                None
            };
            let fit = s.fit_factor.clamp(0.0, 1.0);
            match flag {
                Some(_) => Judged { weight: 0.0, share: 0.0, effective: None, flag },
                None => Judged {
                    weight: s.weight * fit,
                    share: share(s.score, s.fit_factor, policy.reward_power),
                    effective: Some(s.score * fit),
                    flag: None,
                },
            }
        })
        .collect();
    if let Some(top) = policy.top {
        let mut eligible: Vec<usize> = (0..scored.len()).filter(|&i| out[i].flag.is_none()).collect();
        eligible.sort_by(|&a, &b| scored[b].score.total_cmp(&scored[a].score).then(a.cmp(&b)));
        for &i in eligible.iter().skip(top) {
            out[i] = Judged { weight: 0.0, share: 0.0, flag: Some(Flag::BelowTop), ..out[i] };
        }
    }
    out
}

/// A round settled: each submission's measurements (with its fit factor), what it gets, and its
/// reward units (summing to exactly the round's units, or to 0 if nothing earned).
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub scored: Vec<Scored>,
    pub judged: Vec<Judged>,
    pub rewards: Vec<u64>,
}

/// Settles a round: fit factors from each contributor's record (`history`: sum and count of
/// its earlier data-fit measurements, per submission), then [`judge`], then the exact split of
/// `reward_units`. The hub runs this for scored runs; a sealed run's validator runs it itself.
pub fn settle(
    mut scored: Vec<Scored>,
    history: &[(f64, u64)],
    conduct: &[Conduct],
    policy: &Policy,
    reward_units: u64,
) -> Settlement {
    let now: Vec<Option<f64>> = scored.iter().map(|s| s.data_fit).collect();
    for (i, (s, f)) in scored.iter_mut().zip(fit_factors(history, &now)).enumerate() {
        s.fit_factor = f * conduct.get(i).map_or(1.0, Conduct::factor);
    }
    let judged = judge(&scored, policy);
    let shares: Vec<f64> = judged.iter().map(|j| j.share).collect();
    let rewards = crate::split_units(reward_units, &shares);
    Settlement { scored, judged, rewards }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(score: f64, fit_factor: f64, copy_of: Option<usize>) -> Scored {
        Scored {
            contributor: 0,
            score,
            data_fit: None,
            copy_of,
            weight: 1.0,
            fit_factor,
            score_se: None,
            norm_bound: None,
        }
    }

    #[test]
    fn flags_and_shares() {
        let round = [
            s(0.02, 0.01, None),
            s(0.01, 0.01, None),
            s(0.02, 0.01, Some(0)),
            s(0.03, -0.001, None),
            s(-0.5, 0.01, None),
            s(f64::NAN, 0.01, None),
        ];
        let j = judge(&round, &Policy::default());
        let flags: Vec<Option<Flag>> = j.iter().map(|x| x.flag).collect();
        assert_eq!(
            flags,
            vec![None, None, Some(Flag::Copy), Some(Flag::WrongData), Some(Flag::NotPositive), Some(Flag::NotPositive)]
        );
        assert!((j[0].share / j[1].share - 4.0).abs() < 1e-9);
        assert_eq!(j[2].weight, 0.0);
        let top1 = judge(&round, &Policy { top: Some(1), ..Policy::default() });
        assert_eq!(top1[1].flag, Some(Flag::BelowTop));
        assert_eq!(top1[0].flag, None);
    }

    #[test]
    fn being_caught_lowers_later_shares_and_one_false_alarm_costs_little() {
        let c = |rounds, caught| Conduct { rounds, caught }.factor();
        assert_eq!(c(0, 0), 1.0);
        assert_eq!(c(50, 0), 1.0);
        assert!((c(50, 1) - (51.0f64 / 52.0).powi(4)).abs() < 1e-12 && c(50, 1) > 0.92);
        assert!((c(10, 4) - (8.0f64 / 12.0).powi(4)).abs() < 1e-12 && c(10, 4) < 0.2);
        // A newcomer caught in its first round keeps (2/3)^4; caught every round, it falls to 0.
        assert!((c(1, 1) - (2.0f64 / 3.0).powi(4)).abs() < 1e-12);
        assert!(c(100, 100) < 1e-5);
        // A record with more catches than rounds (a damaged store) stays within [0, 1].
        assert!((0.0..=1.0).contains(&c(1, 5)));
        // Settling multiplies it into the fit factor the share is paid by.
        let round = vec![s(0.02, 1.0, None), s(0.02, 1.0, None)];
        let settled = settle(
            round,
            &[(0.0, 0), (0.0, 0)],
            &[Conduct::default(), Conduct { rounds: 10, caught: 4 }],
            &Policy::default(),
            1000,
        );
        assert_eq!(settled.scored[0].fit_factor, 1.0);
        assert!((settled.scored[1].fit_factor - c(10, 4)).abs() < 1e-12);
        assert!(settled.rewards[1] < settled.rewards[0] / 20);
    }

    #[test]
    fn fit_factors_follow_the_record() {
        // Honest contributors around 0.02; one at 0 for many rounds; a newcomer; one unmeasured.
        let history = [(0.2, 10), (0.22, 10), (0.18, 10), (0.0, 10), (0.0, 0), (0.0, 0)];
        let now = [Some(0.02), Some(0.03), Some(0.01), Some(-0.01), Some(0.0), None];
        let f = fit_factors(&history, &now);
        assert!(f[..3].iter().all(|&x| x > 0.85), "{f:?}");
        assert!(f[3] < 0.15, "{f:?}");
        assert!((f[4] - 0.5).abs() < 0.05, "a newcomer at 0 keeps half the benefit of the doubt: {f:?}");
        assert_eq!(f[5], 1.0);
        assert_eq!(fit_factors(&[(0.0, 0); 2], &[None, None]), vec![1.0, 1.0]);
        assert_eq!(fit_factors(&[(-1.0, 2); 2], &[Some(-0.5), Some(-0.5)]), vec![1.0, 1.0]);
        // A median lost in the noise compares nothing.
        let noisy = [Some(0.03), Some(-0.02), Some(0.001), Some(-0.01), Some(0.02)];
        assert_eq!(fit_factors(&[(0.0, 0); 5], &noisy), vec![1.0; 5]);
    }
}
