//! From a round's scores to what each submission gets: a weight in the aggregate (0: left out)
//! and a share of the round's reward units.
//!
//! Rules, in order: a copy, a submission whose gain on its assigned data is not above its gain
//! on random data by `min_data_fit` when one is set (not trained on what it was given; the
//! measurement is noisy at small sample sizes, so it is recorded but not enforced by default),
//! and one whose held-out
//! score is not positive (it does not help) are left out and earn nothing. Of the rest, the best
//! `top` (all if unset) are aggregated with their staleness weight and earn in proportion to
//! score^`reward_power` (a power above 1 pays consistent, large contributions more than many
//! small ones: a submission with half the score earns a quarter at power 2).

use serde::{Deserialize, Serialize};

/// What a validator measured for one submission.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    pub contributor: u64,
    /// Held-out loss before minus after applying this submission alone (nats per token):
    /// positive when it helps.
    pub score: f64,
    /// Loss gain on the windows the assignment trained on minus the gain on random training
    /// windows (nats per token).
    pub data_fit: f64,
    /// Index (in the round's list) of the earlier submission this one copies.
    pub copy_of: Option<usize>,
    /// The hub's staleness weight.
    pub weight: f64,
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
    pub min_data_fit: Option<f64>,
    pub top: Option<usize>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { reward_power: 2.0, min_data_fit: None, top: None }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.reward_power.is_finite() && self.reward_power > 0.0 && self.reward_power <= 8.0) {
            return Err(format!("reward power {} must be in (0, 8]", self.reward_power));
        }
        if self.min_data_fit.is_some_and(|m| !m.is_finite()) {
            return Err("minimum data fit must be finite".into());
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
    pub flag: Option<Flag>,
}

/// Judges a round's scored submissions (in arrival order).
pub fn judge(scored: &[Scored], policy: &Policy) -> Vec<Judged> {
    let mut out: Vec<Judged> = scored
        .iter()
        .map(|s| {
            let flag = if s.copy_of.is_some() {
                Some(Flag::Copy)
            } else if policy.min_data_fit.is_some_and(|m| s.data_fit.is_nan() || s.data_fit <= m) {
                Some(Flag::WrongData)
            } else if !(s.score.is_finite() && s.score > 0.0) {
                Some(Flag::NotPositive)
            } else {
                None
            };
            match flag {
                Some(_) => Judged { weight: 0.0, share: 0.0, flag },
                None => Judged { weight: s.weight, share: s.score.powf(policy.reward_power), flag: None },
            }
        })
        .collect();
    if let Some(top) = policy.top {
        let mut eligible: Vec<usize> = (0..scored.len()).filter(|&i| out[i].flag.is_none()).collect();
        eligible.sort_by(|&a, &b| scored[b].score.total_cmp(&scored[a].score).then(a.cmp(&b)));
        for &i in eligible.iter().skip(top) {
            out[i] = Judged { weight: 0.0, share: 0.0, flag: Some(Flag::BelowTop) };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(score: f64, data_fit: f64, copy_of: Option<usize>) -> Scored {
        Scored { contributor: 0, score, data_fit, copy_of, weight: 1.0 }
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
        let j = judge(&round, &Policy { min_data_fit: Some(0.0), ..Policy::default() });
        let flags: Vec<Option<Flag>> = j.iter().map(|x| x.flag).collect();
        assert_eq!(
            flags,
            vec![None, None, Some(Flag::Copy), Some(Flag::WrongData), Some(Flag::NotPositive), Some(Flag::NotPositive)]
        );
        assert!((j[0].share / j[1].share - 4.0).abs() < 1e-9);
        assert_eq!(j[2].weight, 0.0);
        let top1 = judge(&round, &Policy { top: Some(1), min_data_fit: Some(0.0), ..Policy::default() });
        assert_eq!(judge(&round, &Policy::default())[3].flag, None);
        assert_eq!(top1[1].flag, Some(Flag::BelowTop));
        assert_eq!(top1[0].flag, None);
    }
}
