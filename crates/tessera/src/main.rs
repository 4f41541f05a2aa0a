//! `tessera`: the command line, a front door. It parses and validates arguments and composes
//! the library crates; each command lives in `cmd/`, each benchmark in `bench/`. `args` (the
//! arguments several commands share, and runtime set-up), `spec` (what defines a run) and `hf`
//! (uploads to a Hugging Face model repository) are leaves: `cmd` uses them, `bench` uses them and `cmd`, and nothing uses `main`.

mod args;
mod bench;
mod cmd;
mod hf;
mod plan;
mod spec;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Train one open language model together: a hub, many contributors, scored and paid.",
    long_about = "Tessera trains one open Llama-family model with many contributors over the internet \
                  (DiLoCo): each trains many local steps on its own machine and sends the hub a compressed \
                  pseudo-gradient; the hub merges them with an outer Nesterov step, scores and pays \
                  contributors, grows the model through its phases and publishes Hugging Face checkpoints.\n\n\
                  Start with `tessera demo`: a hub and four contributors on this machine train the `nano` model \
                  on the embedded corpus (no downloads) and report the loss against its exact entropy floor and \
                  the bytes moved against synchronous data parallel.\n\n\
                  Then join a real run with `tessera contribute --hub URL`, or serve your own with \
                  `tessera hub` (`tessera hub --print-spec > run.toml` writes a run's description to edit; \
                  `tessera hub --spec run.toml` serves it). `tessera train` trains on one machine alone; \
                  `tessera serve` puts a checkpoint behind an OpenAI-compatible API. Every command has --help."
)]
struct Cli {
    /// More log output (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub and N contributors on localhost as separate processes: DiLoCo end to end on
    /// the embedded corpus, with live progress and a summary (loss vs the entropy floor, bytes
    /// vs synchronous data parallel, per-contributor statistics).
    Demo(Box<cmd::demo::DemoArgs>),
    /// Serve a DiLoCo run: assignments, submissions, rounds, checkpoints (resumes the run in
    /// --database if there is one).
    Hub(Box<cmd::hub::HubArgs>),
    /// Take rounds' aggregation jobs from a hub's PostgreSQL database (`tessera hub
    /// --aggregate-shards N`): each a tensor range of a closing round, read from the store,
    /// averaged, stepped and stored as its part of the next checkpoint. Run any number, on any
    /// machines; one killed mid-job is replaced by the next to take the job.
    AggregateWorker(cmd::hub::WorkerArgs),
    /// Join a hub's run: train H inner steps per round from the published weights and upload
    /// the compressed pseudo-gradient, until the run finishes.
    Contribute(Box<cmd::contribute::ContributeArgs>),
    /// The validator role: score every submission of a scored run (`tessera hub --scored`) —
    /// held-out loss before and after each submission alone, on data drawn from the round's
    /// committed seed; a check that it was trained on its assigned data; copy detection. In a
    /// sealed run it attests its keys (SEV-SNP or TDX), opens the sealed submissions, settles
    /// and aggregates each round and signs the reward ledger.
    #[command(alias = "validate")]
    Validator(Box<cmd::validator::ValidateArgs>),
    /// The seven-phase plan: each phase's model, token budget, memory per contributor (and
    /// whether one contributor can hold it), bytes per round by codec against synchronous data
    /// parallel, and who qualifies — computed from the model configurations.
    Phases(cmd::phases::PhasesArgs),
    /// Grow a checkpoint into a larger model that computes exactly the same function
    /// (wider hidden size, MLP, more heads, more layers), written as a Hugging Face checkpoint.
    Grow(cmd::model::GrowArgs),
    /// Check this machine before it joins a run: accelerator, driver and CUDA against the
    /// pinned libtorch, memory against each phase's need, free disk, and with --hub the link
    /// (latency, bandwidth) and clock skew. Prints the phases it can contribute to and what to
    /// fix; exits non-zero when it cannot contribute at all.
    Doctor(cmd::doctor::DoctorArgs),
    /// Make an Ed25519 identity (owner-only PEM file) for `tessera contribute --key`.
    Keygen(cmd::trust::KeygenArgs),
    /// The reward ledger: verify a hub's (or an exported file) from its bytes alone.
    #[command(subcommand)]
    Ledger(cmd::trust::LedgerCommand),
    /// A hub's leaderboard: contributors by rating (μ − 3σ), rewards, and who qualified for the
    /// next phase at the phase boundary.
    Leaderboard(cmd::leaderboard::LeaderboardArgs),
    /// Recompute a published round's scores from its base checkpoint, its revealed seed and its
    /// submissions (a run started with --publish-submissions), and compare them with what the
    /// hub published; exits non-zero on any difference.
    Audit(cmd::audit::AuditArgs),
    /// Propose a change to a steered run (H, quorum, outer learning rate, codec, the next
    /// phase's start, loss target or promotion size, the data mixture's weights, or a release),
    /// signed with a holder's key; its holders then vote on it (`docs/governance.md`).
    Propose(Box<cmd::governance::ProposeArgs>),
    /// Vote yes, no or abstain on a proposal, with the power of your balance at its snapshot;
    /// a later vote replaces yours until the vote closes.
    Vote(cmd::governance::VoteArgs),
    /// A steered run's rules and proposals: open and closed, their tallies and what changed when.
    Proposals(cmd::governance::ProposalsArgs),
    /// Release a run's checkpoint as a named version: a Hugging Face model directory with a
    /// generated model card (data, tokens, contributors and their share, validation loss, the
    /// ledger it corresponds to), written to a directory and optionally uploaded to a model
    /// repository. In a steered run, only a version its holders voted to release.
    Release(Box<cmd::release::ReleaseArgs>),
    /// Train a model (by default `nano` on the embedded synthetic corpus).
    Train(Box<cmd::train::TrainArgs>),
    /// Sample text from a checkpoint with a KV cache.
    Generate(cmd::train::GenerateArgs),
    /// Serve a checkpoint through an OpenAI-compatible API (`/v1/models`, `/v1/completions`,
    /// `/v1/chat/completions`, streaming included): concurrent requests are decoded together
    /// with a shared KV cache, every request needs an API key and is metered under it.
    Serve(Box<cmd::serving::ServeArgs>),
    /// Check a `tessera serve --tee` server before trusting it: fresh TEE evidence for this
    /// client's nonce under a policy, the weights and binary it binds, TLS terminating inside,
    /// then plain and sealed completions, whole and streamed, each signed by the attested key.
    VerifyServe(Box<cmd::serving::VerifyServeArgs>),
    /// API keys for `tessera serve`: create (shown once, stored hashed), revoke, list.
    #[command(subcommand)]
    Keys(cmd::serving::KeysCommand),
    /// The usage economy: close an epoch of served usage into a run's ledger (exact pro-rata
    /// payouts to token holders), and report epochs, revenue, payouts and returns.
    #[command(subcommand)]
    Economy(cmd::serving::EconomyCommand),
    /// Inspect model configurations and presets.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Inspect and prepare training data.
    #[command(subcommand)]
    Data(cmd::data::DataCommand),
    /// Train tokenizers.
    #[command(subcommand)]
    Tokenizer(cmd::data::TokenizerCommand),
    /// Measure performance.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => cmd::demo::demo(*args),
        Command::Hub(args) => cmd::hub::hub(*args),
        Command::AggregateWorker(args) => cmd::hub::worker(args),
        Command::Contribute(args) => cmd::contribute::contribute(*args),
        Command::Validator(args) => cmd::validator::validate(*args),
        Command::Phases(args) => cmd::phases::phases(args),
        Command::Grow(args) => cmd::model::grow(args),
        Command::Doctor(args) => cmd::doctor::doctor(args),
        Command::Keygen(args) => cmd::trust::keygen(args),
        Command::Ledger(command) => cmd::trust::ledger(command),
        Command::Leaderboard(args) => cmd::leaderboard::leaderboard(args),
        Command::Audit(args) => cmd::audit::audit(args),
        Command::Propose(args) => cmd::governance::propose(*args),
        Command::Vote(args) => cmd::governance::vote(args),
        Command::Proposals(args) => cmd::governance::proposals(args),
        Command::Release(args) => cmd::release::release(*args),
        Command::Train(args) => cmd::train::train(*args),
        Command::Generate(args) => cmd::train::generate_text(args),
        Command::Serve(args) => cmd::serving::serve(*args),
        Command::VerifyServe(args) => cmd::serving::verify_serve(*args),
        Command::Keys(command) => cmd::serving::keys(command),
        Command::Economy(command) => cmd::serving::economy(command),
        Command::Model(command) => cmd::model::model(command),
        Command::Data(command) => cmd::data::data(command),
        Command::Tokenizer(command) => cmd::data::tokenizer(command),
        Command::Bench(command) => bench::run(command),
    }
}

/// Writing into a closed pipe (`tessera model info | head -3`) ends the process quietly, as it
/// does any Unix tool, instead of panicking in `println!`. Rust ignores SIGPIPE by default so
/// that writes fail with an error; sockets are unaffected either way (Rust sends with
/// MSG_NOSIGNAL), so only pipes and FIFOs end the process.
#[cfg(unix)]
fn die_quietly_on_closed_pipes() {
    // SAFETY: restoring the default disposition of a signal, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(not(unix))]
fn die_quietly_on_closed_pipes() {}

fn main() -> std::process::ExitCode {
    die_quietly_on_closed_pipes();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
