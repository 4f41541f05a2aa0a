//! `tessera bench`: speed, memory and quality measurements, each against a baseline measured
//! in the same run (`docs/benchmarks.md` has their numbers and commands).

mod arena;
mod diloco;
mod feed;
mod grow;
mod hub;
mod overlap;
mod siege;
mod swarm;
mod train;
mod trust;
mod validator;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training throughput of presets on this machine: tokens/s, achieved GFLOP/s, model FLOPs
    /// utilisation (when the device's peak is known), peak resident memory while training, and
    /// where a step's time goes. `benchmarks/train_pytorch.py` runs it next to Python PyTorch.
    Train(train::BenchTrainArgs),
    /// What trust costs: sealing and opening a submission with HPKE (against BLAKE3 and memcpy
    /// of the same bytes, measured in the same run), signing and verifying a request, and
    /// writing and verifying ledger entries.
    Trust(trust::BenchTrustArgs),
    /// Growth against training from scratch: a model half as wide and deep, grown into the
    /// target part-way, on a fraction of the baseline's tokens; final losses side by side.
    Grow(Box<grow::BenchGrowArgs>),
    /// A contributor's compute utilisation on links limited so that one transfer of a round's
    /// payload takes a set share of a round's compute, without and with `--overlap`, and the
    /// final loss of each run.
    Overlap(Box<overlap::BenchOverlapArgs>),
    /// The hub's round: parse, checksum, decode and average pseudo-gradients from N contributors,
    /// then one outer step; reported against memcpy bandwidth measured in the same run.
    Hub(hub::HubBenchArgs),
    /// Each robust aggregation rule on one round of N contributors' decoded pseudo-gradients
    /// (one of them scaled ×100), as seconds and as a multiple of the plain mean's time
    /// measured in the same run.
    Robust(hub::RobustArgs),
    /// A scored run under attack: N contributors (some adversaries) against a real in-process
    /// hub and validator; final loss, rejections, attackers' rewards and ranks per scenario.
    Arena(Box<arena::ArenaArgs>),
    /// DiLoCo simulated in one process (M workers, H inner steps, outer Nesterov), optionally
    /// against synchronous data parallel on the same number of tokens.
    Diloco(Box<diloco::DilocoArgs>),
    /// A contributor's data path: shards of a dataset served over local HTTP, fetched through a
    /// link limited to what a round needs, prefetched while real training runs on the current
    /// one; the stall per round (target: 0 after the first) and the peak memory.
    Feed(feed::BenchFeedArgs),
    /// Many simulated contributors (real HTTP, real messages, no training) against one hub:
    /// errors and submission latency percentiles.
    Swarm(swarm::BenchSwarmArgs),
    /// The attacks of an outside review against a real `tessera hub` process on loopback
    /// (bodies under the limit, unsigned and signed; heads that never end; a flood from one
    /// address), with the hub's memory sampled against its memory at rest and `/healthz`
    /// probed from a second address throughout.
    Siege(siege::BenchSiegeArgs),
    /// What scoring costs a validator against what training costs a contributor, timed in the
    /// same run: a contributor's round (H inner steps) and one validator task of K submissions
    /// per preset; seconds per submission, and how many validators close a round of N
    /// contributors within 10% of its training time.
    Validator(validator::BenchValidatorArgs),
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train(args) => train::bench_train(&args),
        BenchCommand::Trust(args) => trust::bench_trust(args),
        BenchCommand::Grow(args) => grow::bench_grow(*args),
        BenchCommand::Overlap(args) => overlap::bench_overlap(*args),
        BenchCommand::Hub(args) => hub::bench_hub(args),
        BenchCommand::Robust(args) => hub::bench_robust(args),
        BenchCommand::Arena(args) => arena::bench_arena(*args),
        BenchCommand::Diloco(args) => diloco::bench_diloco(*args),
        BenchCommand::Feed(args) => feed::bench_feed(&args),
        BenchCommand::Swarm(args) => swarm::bench_swarm(args),
        BenchCommand::Siege(args) => siege::bench_siege(args),
        BenchCommand::Validator(args) => validator::bench_validator(&args),
    }
}
