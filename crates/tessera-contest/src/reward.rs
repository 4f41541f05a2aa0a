//! Exact reward splitting: `units` are divided among shares by the largest-remainder method in
//! integer arithmetic, so the parts always add up to exactly `units` (nothing lost or created
//! by rounding) and the result is the same on every machine.

/// Shares are turned into integers of this many bits (the largest share is 2^52) before
/// splitting: f64 precision, and units × share × count still fits in u128.
const SHARE_BITS: u32 = 52;

/// Splits `units` in proportion to `shares` (non-negative, finite; anything else counts as 0).
/// Returns one amount per share, summing to exactly `units` — or all zeros when no share is
/// positive (the units are then not emitted at all). Remainders go to the largest fractional
/// parts, ties to the lower index.
pub fn split_units(units: u64, shares: &[f64]) -> Vec<u64> {
    let max = shares.iter().copied().filter(|s| s.is_finite() && *s > 0.0).fold(0.0f64, f64::max);
    if max <= 0.0 {
        return vec![0; shares.len()];
    }
    let scale = (1u64 << SHARE_BITS) as f64 / max;
    let q: Vec<u128> =
        shares.iter().map(|&s| if s.is_finite() && s > 0.0 { (s * scale).round() as u128 } else { 0 }).collect();
    // Each part is at most `units`, so it fits a u64.
    tessera_split::largest_remainder(u128::from(units), &q).into_iter().map(|p| p as u64).collect()
}

/// What a published round recorded of one submission, as far as its reward depends on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recorded {
    pub score: Option<f64>,
    pub fit_factor: Option<f64>,
    /// It earned nothing by a flag (copy, wrong data, not positive, below the top, unscored).
    pub flagged: bool,
}

impl Recorded {
    /// Its relative share: (score × fit factor)^`power` — what [`crate::judge`] gave it — or 0
    /// when flagged, unscored or not positive.
    pub fn share(&self, power: f64) -> f64 {
        match (self.score, self.fit_factor) {
            (Some(s), Some(f)) if !self.flagged && s > 0.0 && f > 0.0 => crate::judge::share(s, f, power),
            _ => 0.0,
        }
    }
}

/// A published round's reward split recomputed from its rows alone (in arrival order): each
/// row's share and its units. Anyone holding the rows can check the hub paid what the rule
/// says; [`crate::settle`] computed the same numbers when the round closed.
pub fn recompute(rows: &[Recorded], power: f64, units: u64) -> (Vec<f64>, Vec<u64>) {
    let shares: Vec<f64> = rows.iter().map(|r| r.share(power)).collect();
    let split = split_units(units, &shares);
    (shares, split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_exactly() {
        assert_eq!(split_units(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(split_units(100, &[3.0, 1.0, 0.0, -2.0, f64::NAN]), vec![75, 25, 0, 0, 0]);
        assert_eq!(split_units(7, &[0.0, -1.0]), vec![0, 0]);
        assert_eq!(split_units(0, &[1.0, 2.0]), vec![0, 0]);
        assert_eq!(
            split_units(u64::MAX, &[1.0, 1.0]).iter().map(|&x| u128::from(x)).sum::<u128>(),
            u128::from(u64::MAX)
        );
    }

    #[test]
    fn a_settled_round_recomputes_from_its_rows() {
        use crate::{Policy, Scored, settle};
        let scored: Vec<Scored> = [
            (0.03, Some(0.02), None),
            (0.01, Some(0.0), None),
            (0.02, Some(0.02), Some(0)),
            (-0.1, None, None),
            (0.05, Some(0.03), None),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(score, data_fit, copy_of))| Scored {
            contributor: i as u64,
            score,
            data_fit,
            copy_of,
            weight: 1.0,
            fit_factor: 1.0,
            score_se: None,
            norm_bound: None,
        })
        .collect();
        let history = [(0.2, 10), (0.0, 10), (0.1, 5), (0.0, 0), (0.3, 10)];
        let policy = Policy::default();
        let settled = settle(scored, &history, &[], &policy, 1_000_003);
        let rows: Vec<Recorded> = settled
            .scored
            .iter()
            .zip(&settled.judged)
            .map(|(s, j)| Recorded { score: Some(s.score), fit_factor: Some(s.fit_factor), flagged: j.flag.is_some() })
            .collect();
        let (shares, split) = recompute(&rows, policy.reward_power, 1_000_003);
        assert_eq!(split, settled.rewards);
        assert_eq!(shares, settled.judged.iter().map(|j| j.share).collect::<Vec<_>>());
        // A tampered record no longer reproduces the recorded units.
        let mut tampered = rows.clone();
        tampered[0].score = Some(0.06);
        assert_ne!(recompute(&tampered, policy.reward_power, 1_000_003).1, settled.rewards);
    }

    proptest! {
        #[test]
        fn nothing_is_lost_or_created(units in any::<u64>(), shares in proptest::collection::vec(prop_oneof![Just(0.0), 0.0f64..1e6, Just(f64::NAN), -5.0f64..0.0], 0..40)) {
            let out = split_units(units, &shares);
            prop_assert_eq!(out.len(), shares.len());
            let any_positive = shares.iter().any(|s| s.is_finite() && *s > 0.0);
            let sum: u128 = out.iter().map(|&x| u128::from(x)).sum();
            prop_assert_eq!(sum, if any_positive { u128::from(units) } else { 0 });
            for (o, s) in out.iter().zip(&shares) {
                if !(s.is_finite() && *s > 0.0) {
                    prop_assert_eq!(*o, 0);
                }
            }
            if any_positive {
                // Each part is within one unit of its proportional value, up to the 52-bit
                // quantisation of the shares.
                let positive: Vec<f64> = shares.iter().map(|&s| if s.is_finite() && s > 0.0 { s } else { 0.0 }).collect();
                let total: f64 = positive.iter().sum();
                for (o, s) in out.iter().zip(&positive) {
                    let exact = units as f64 * s / total;
                    let slack = 1.0 + units as f64 * shares.len() as f64 / 2f64.powi(51);
                    prop_assert!((*o as f64 - exact).abs() <= slack, "{o} vs {exact}");
                }
            }
        }
    }
}
