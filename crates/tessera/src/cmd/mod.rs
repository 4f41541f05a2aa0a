//! The commands, one module each. They use the shared leaves (`crate::args`, `crate::spec`)
//! and the library crates, never each other.

pub mod audit;
pub mod contribute;
pub mod data;
pub mod demo;
pub mod doctor;
pub mod governance;
pub mod hub;
pub mod leaderboard;
pub mod model;
pub mod phases;
pub mod release;
pub mod serving;
pub mod train;
pub mod trust;
pub mod validator;
