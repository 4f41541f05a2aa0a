//! `tessera-contest`: how Tessera's contributors compete, on plain numbers (no libtorch).
//!
//! A round's submissions are scored by a validator (`tessera-validator`: held-out loss before
//! and after applying each submission alone). This crate turns those scores into decisions:
//!
//! - [`commit`]: the evaluation seed is committed (BLAKE3) when a round opens and revealed when
//!   its submissions close, so no contributor can know the evaluation data in advance;
//! - [`copies`]: near-identical pseudo-gradients (cosine on seeded sample coordinates) — the
//!   later arrival is a copy;
//! - [`judge`]: scores and flags → aggregation weights and reward shares;
//! - [`rating`]: a Weng–Lin (OpenSkill) rating per contributor across rounds, so one noisy round
//!   does not decide a rank; the leaderboard and promotion use its conservative estimate;
//! - [`reward`]: a round's fixed reward units split by share in exact integer arithmetic;
//! - [`adversary`]: the attacks Tessera is tested against (a testing tool, never a default).

pub mod adversary;
pub mod commit;
pub mod copies;
pub mod judge;
pub mod rating;
pub mod reward;
pub mod tasks;

pub use adversary::Adversary;
pub use judge::{Conduct, Flag, Judged, Policy, Scored, Settlement, fit_factors, judge, settle};
pub use rating::{Rating, Ratings};
pub use reward::{Recorded, recompute, split_units};
