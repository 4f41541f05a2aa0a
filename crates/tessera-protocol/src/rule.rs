//! How the hub combines a round's pseudo-gradients: the run's aggregation rule, and its string
//! form (`mean`, `norm-clip:2`, `trimmed-mean:0.25`, `median`, `centered-clip:2:3`). The
//! arithmetic lives in `tessera-aggregate::robust`; this is the part both sides must agree on.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    /// The weighted mean: optimal with honest contributors, broken by a single bad one.
    Mean,
    /// Each submission's whole Δ is scaled down to at most `factor` × the median norm of the
    /// round's submissions, then the weighted mean.
    NormClip { factor: f32 },
    /// Per coordinate, the ⌊trim·n⌋ largest and smallest values are dropped and the rest
    /// averaged (unweighted). `trim` in [0, 0.5).
    TrimmedMean { trim: f32 },
    /// The coordinate-wise median (unweighted).
    Median,
    /// Centred clipping (Karimireddy, He & Jaggi 2021), started from the coordinate-wise median:
    /// `iters` times, v ← v + Σ wᵢ·(xᵢ − v)·min(1, τ/‖xᵢ − v‖) / Σ wᵢ, with τ = `factor` × the
    /// median of ‖xᵢ − v‖ at that iteration.
    CenteredClip { factor: f32, iters: u32 },
}

impl Aggregation {
    /// The rule new runs use unless told otherwise.
    pub const DEFAULT: Aggregation = Aggregation::CenteredClip { factor: 2.0, iters: 3 };

    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Aggregation::Mean | Aggregation::Median => Ok(()),
            Aggregation::NormClip { factor } | Aggregation::CenteredClip { factor, .. }
                if !(factor.is_finite() && factor > 0.0) =>
            {
                Err(format!("clipping factor {factor} must be finite and positive"))
            }
            Aggregation::CenteredClip { iters: 0 | 101.., .. } => {
                Err("centred clipping takes 1 to 100 iterations".into())
            }
            Aggregation::TrimmedMean { trim } if !(0.0..0.5).contains(&trim) => {
                Err(format!("trim fraction {trim} must be in [0, 0.5)"))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Aggregation::Mean => write!(f, "mean"),
            Aggregation::NormClip { factor } => write!(f, "norm-clip:{factor}"),
            Aggregation::TrimmedMean { trim } => write!(f, "trimmed-mean:{trim}"),
            Aggregation::Median => write!(f, "median"),
            Aggregation::CenteredClip { factor, iters } => write!(f, "centered-clip:{factor}:{iters}"),
        }
    }
}

impl FromStr for Aggregation {
    type Err = String;

    /// `mean`, `norm-clip[:factor]` (2), `trimmed-mean[:trim]` (0.25), `median`,
    /// `centered-clip[:factor[:iters]]` (2, 3).
    fn from_str(s: &str) -> Result<Aggregation, String> {
        let mut parts = s.split(':');
        let kind = parts.next().unwrap_or_default();
        let nums: Vec<f32> = parts
            .map(|p| p.parse::<f32>().map_err(|_| format!("aggregation {s:?}: {p:?} is not a number")))
            .collect::<Result<_, _>>()?;
        let iters = |x: f32| {
            if x.fract() == 0.0 && (1.0..=100.0).contains(&x) {
                Ok(x as u32)
            } else {
                Err(format!("aggregation {s:?}: {x} iterations must be a whole number from 1 to 100"))
            }
        };
        let rule = match (kind, nums.as_slice()) {
            ("mean", []) => Aggregation::Mean,
            ("norm-clip", []) => Aggregation::NormClip { factor: 2.0 },
            ("norm-clip", [f]) => Aggregation::NormClip { factor: *f },
            ("trimmed-mean", []) => Aggregation::TrimmedMean { trim: 0.25 },
            ("trimmed-mean", [t]) => Aggregation::TrimmedMean { trim: *t },
            ("median", []) => Aggregation::Median,
            ("centered-clip", []) => Aggregation::CenteredClip { factor: 2.0, iters: 3 },
            ("centered-clip", [f]) => Aggregation::CenteredClip { factor: *f, iters: 3 },
            ("centered-clip", [f, i]) => Aggregation::CenteredClip { factor: *f, iters: iters(*i)? },
            _ => {
                return Err(format!(
                    "unknown aggregation {s:?}: use mean, norm-clip[:factor], trimmed-mean[:trim], median or \
                     centered-clip[:factor[:iters]]"
                ));
            }
        };
        rule.validate()?;
        Ok(rule)
    }
}

impl Serialize for Aggregation {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Aggregation {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Aggregation, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strings_round_trip() {
        for r in [
            Aggregation::Mean,
            Aggregation::NormClip { factor: 1.5 },
            Aggregation::TrimmedMean { trim: 0.2 },
            Aggregation::Median,
            Aggregation::CenteredClip { factor: 2.0, iters: 5 },
            Aggregation::DEFAULT,
        ] {
            assert_eq!(r.to_string().parse::<Aggregation>().unwrap(), r);
        }
        for bad in [
            "",
            "avg",
            "trimmed-mean:0.5",
            "norm-clip:0",
            "norm-clip:nan",
            "centered-clip:2:0",
            "centered-clip:2:1.5",
            "median:1",
        ] {
            assert!(bad.parse::<Aggregation>().is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in ".{0,32}") {
            let _ = s.parse::<Aggregation>();
        }
    }
}
