//! The price table: what a million prompt or completion tokens cost, in micro-units of the
//! currency revenue is counted in (µUSD by default), so every amount is an exact integer.

use serde::{Deserialize, Serialize};

use crate::EpochUsage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    /// Micro-units per million prompt tokens.
    pub prompt_per_million: u64,
    /// Micro-units per million completion tokens.
    pub completion_per_million: u64,
}

impl Default for Prices {
    /// $0.20 per million prompt tokens, $0.60 per million completion tokens.
    fn default() -> Self {
        Prices { prompt_per_million: 200_000, completion_per_million: 600_000 }
    }
}

impl Prices {
    /// Reads a TOML table `prompt_per_million = …`, `completion_per_million = …`.
    pub fn from_toml(text: &str) -> Result<Prices, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The revenue of one account's epoch usage: the token totals priced once, rounded down to
    /// a whole micro-unit (so splitting an account's requests never changes what it pays).
    pub fn revenue(&self, usage: &EpochUsage) -> u64 {
        let micro = (u128::from(usage.prompt_tokens) * u128::from(self.prompt_per_million))
            .saturating_add(u128::from(usage.completion_tokens) * u128::from(self.completion_per_million));
        u64::try_from(micro / 1_000_000).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revenue_is_priced_on_totals_and_rounds_down() {
        let p = Prices::default();
        let u = |prompt, completion| EpochUsage {
            epoch: 0,
            account: "a".into(),
            requests: 1,
            prompt_tokens: prompt,
            completion_tokens: completion,
        };
        assert_eq!(p.revenue(&u(1_000_000, 0)), 200_000);
        assert_eq!(p.revenue(&u(0, 1_000_000)), 600_000);
        assert_eq!(p.revenue(&u(4, 1)), 1); // 0.8 + 0.6 = 1.4 µ
        assert_eq!(p.revenue(&u(u64::MAX, 0)), (u128::from(u64::MAX) * 200_000 / 1_000_000) as u64);
        let dear = Prices { prompt_per_million: u64::MAX, completion_per_million: u64::MAX };
        assert_eq!(dear.revenue(&u(u64::MAX, u64::MAX)), u64::MAX, "saturates instead of wrapping");
        assert!(Prices::from_toml("prompt_per_million = 1\ncompletion_per_million = 2").is_ok());
        assert!(Prices::from_toml("prompt_per_million = -1\ncompletion_per_million = 2").is_err());
        assert!(Prices::from_toml("typo = 1").is_err());
    }
}
