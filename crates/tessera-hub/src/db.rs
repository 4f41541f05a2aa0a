//! Run metadata in SQL, through sqlx's `Any` driver: SQLite by default, PostgreSQL given a
//! `postgres://` URL. One migration set serves both (portable types only; no SQL aggregates
//! whose result type differs between the two).
//!
//! The round core's events are persisted here, each in one transaction, as
//! [`tessera_round::Snapshot::record`] describes them table by table; [`Db::snapshot`] reads
//! them back for [`tessera_round::Run::restore`].
//!
//! Several hub replicas may share one PostgreSQL database. Every transaction that persists a
//! decision first takes the writers' lock (a transaction-scoped advisory lock; SQLite has one
//! writer anyway), checks that the journal ends where the deciding replica's state does (`at`),
//! and appends its events to the journal (`events`) with the rows they change: a replica that
//! decided on a stale state gets [`Written::Stale`], catches up ([`Db::events_since`]) and
//! decides again. A commit notifies the other replicas (`NOTIFY tessera_events`).

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};
use tessera_contest::{Rating, Ratings};
use tessera_protocol::RunSpec;
use tessera_protocol::api::{ContributorHistory, Rejection, RoundState, ScoredSubmission};
use tessera_round::{Accepted, Closed, Publication, ScoreRow, Snapshot, counts_against_sender};

use crate::HubError;

macro_rules! select_rounds {
    () => {
        "SELECT round, base_checkpoint, state, opened_ms, closed_ms, closed_by, accepted, weight, \
         result_checkpoint, mean_inner_loss, bytes_up FROM rounds"
    };
}

macro_rules! select_submissions {
    () => {
        "SELECT contributor, base_round, round, weight, bytes, inner_loss, blob, received_ms FROM submissions"
    };
}

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

pub struct Db {
    pool: AnyPool,
    /// PostgreSQL (replicas may share it), not SQLite.
    postgres: bool,
    url: String,
}

/// The advisory lock every writer of a run's decisions takes (PostgreSQL).
const WRITERS_LOCK: i64 = 0x7465_7373_6572_6131;
/// Round r's aggregation claim is advisory lock `ROUND_LOCKS + r` (PostgreSQL).
const ROUND_LOCKS: i64 = 0x7465_7373_0000_0000;
/// The channel a commit notifies replicas on.
pub const EVENTS_CHANNEL: &str = "tessera_events";

/// The channel job creation and completion are notified on.
pub const JOBS_CHANNEL: &str = "tessera_jobs";

/// An aggregation job a worker holds: its row locked in an open transaction on a connection of
/// its own, until [`JobLease::done`].
pub struct JobLease {
    pub round: u64,
    pub stage: u32,
    pub shard: usize,
    conn: sqlx::AnyConnection,
}

impl JobLease {
    /// Records the job's outcome and releases it, in one commit; notifies whoever waits.
    pub async fn done(mut self, outcome: &str, worker: &str) -> Result<(), HubError> {
        sqlx::query("UPDATE aggregate_jobs SET done = 1, outcome = $1, worker = $2 WHERE round = $3 AND stage = $4 AND shard = $5")
            .bind(outcome)
            .bind(worker)
            .bind(self.round as i64)
            .bind(self.stage as i32)
            .bind(self.shard as i32)
            .execute(&mut self.conn)
            .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(JOBS_CHANNEL)
            .bind(self.round.to_string())
            .execute(&mut self.conn)
            .await?;
        sqlx::raw_sql("COMMIT").execute(&mut self.conn).await?;
        Ok(())
    }
}

/// A decision as the journal records it, for other replicas to apply.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Journal {
    Registered {
        contributor: u64,
        key: String,
    },
    Accepted(Accepted),
    Refused {
        contributor: u64,
        round: u64,
        code: tessera_protocol::ErrorCode,
        message: String,
        at_ms: i64,
    },
    Closed {
        round: u64,
        closed: Closed,
    },
    /// A round was published: a replica reloads the run's state.
    Published {
        round: u64,
    },
    /// Ledger entries were appended (an epoch, a validator): a replica reloads the ledger.
    Ledger,
    /// A holder's proposal or vote was taken (it reaches the ledger at the next boundary): what
    /// the proposals' view depends on changed.
    Governance,
    /// A sealed run's validator committed the current round's evaluation seed.
    Committed {
        round: u64,
        commitment: String,
    },
}

/// A replica's claim on aggregating a round; dropping it closes its connection, which
/// releases the lock.
pub struct RoundClaim(#[allow(dead_code)] Option<sqlx::AnyConnection>);

/// A holder's proposal or vote waiting for the next round boundary.
#[derive(Debug, Clone)]
pub struct PendingGovernance {
    pub id: i64,
    /// `proposal` or `vote`.
    pub kind: String,
    /// The proposal's id (the one voted on, for a vote).
    pub proposal: String,
    pub holder: String,
    /// The `Signed` message, as JSON.
    pub signed: String,
    pub time_ms: i64,
}

/// What a round boundary changes in a steered run, written with the round's publication: the
/// spec after the changes that apply (its JSON), and the pending rows now in the ledger.
#[derive(Debug, Clone, Default)]
pub struct Steered {
    pub spec: Option<String>,
    pub done: Vec<i64>,
}

/// What a decision's write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Committed; the journal now ends at this sequence number.
    At(u64),
    /// Nothing written: another replica's decisions came after `at`; catch up and decide again.
    Stale,
    /// Nothing written: the submission was already recorded.
    Duplicate,
}

pub struct RunRow {
    pub id: String,
    pub spec: String,
    pub round: u64,
    pub finished: bool,
}

#[derive(Debug, Clone)]
pub struct RoundRow {
    pub round: u64,
    pub base_checkpoint: String,
    pub state: RoundState,
    pub opened_ms: i64,
    pub closed_ms: Option<i64>,
    pub closed_by: Option<String>,
    pub accepted: u64,
    pub weight: f64,
    pub result_checkpoint: Option<String>,
    pub mean_inner_loss: Option<f64>,
    pub bytes_up: u64,
}

/// A new round's evaluation seed and its commitment (hex): the seed stays secret until the
/// round's submissions close.
pub struct Seed {
    pub seed: String,
    pub commitment: String,
}

impl Seed {
    /// A sealed run's round: its validator draws the seed and commits it later
    /// (`Db::commit_seed`); the hub learns it only from the round's verdict.
    pub fn from_validator() -> Seed {
        Seed { seed: String::new(), commitment: String::new() }
    }

    /// A fresh secret seed from the operating system.
    pub fn fresh() -> Result<Seed, HubError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| HubError::Config(format!("no randomness: {e}")))?;
        let commitment = tessera_contest::commit::commitment(&seed);
        Ok(Seed { seed: hex::encode(seed), commitment: hex::encode(commitment) })
    }
}

fn state_name(s: RoundState) -> &'static str {
    match s {
        RoundState::Open => "open",
        RoundState::Collecting => "collecting",
        RoundState::Scoring => "scoring",
        RoundState::Aggregating => "aggregating",
        RoundState::Published => "published",
    }
}

fn parse_state(s: &str) -> Result<RoundState, HubError> {
    Ok(match s {
        "open" => RoundState::Open,
        "collecting" => RoundState::Collecting,
        "scoring" => RoundState::Scoring,
        "aggregating" => RoundState::Aggregating,
        "published" => RoundState::Published,
        other => return Err(HubError::Corrupt(format!("unknown round state {other:?}"))),
    })
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

impl Db {
    /// Connects to `url` (`sqlite://path`, created if missing, or `postgres://…`) and migrates.
    pub async fn connect(url: &str) -> Result<Db, HubError> {
        install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        if sqlite {
            let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
            let path = std::path::Path::new(path.split('?').next().unwrap_or_default());
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| HubError::Config(format!("database directory {}: {e}", parent.display())))?;
            }
        }
        let url = if sqlite && !url.contains('?') { format!("{url}?mode=rwc") } else { url.to_owned() };
        // SQLite allows one writer; one connection keeps it free of SQLITE_BUSY.
        let pool = AnyPoolOptions::new().max_connections(if sqlite { 1 } else { 8 }).connect(&url).await?;
        if sqlite {
            // Write-ahead logging: one sync per commit instead of several; a committed
            // transaction still survives the process being killed.
            sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await?;
        }
        MIGRATOR.run(&pool).await?;
        Ok(Db { pool, postgres: !sqlite, url })
    }

    /// Whether replicas may share this database (PostgreSQL).
    pub fn shared(&self) -> bool {
        self.postgres
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A writer's transaction: the writers' lock taken, and the journal checked to end at `at`
    /// (else `None`: the caller's state is stale).
    async fn begin_at(&self, at: u64) -> Result<Option<sqlx::Transaction<'static, sqlx::Any>>, HubError> {
        let mut tx = self.pool.begin().await?;
        if self.postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(WRITERS_LOCK).execute(&mut *tx).await?;
        }
        let last = last_seq(&mut tx).await?;
        Ok((last == at).then_some(tx))
    }

    /// Appends `events` after `at` and commits, notifying the other replicas.
    async fn commit_at(
        &self,
        mut tx: sqlx::Transaction<'static, sqlx::Any>,
        at: u64,
        events: &[Journal],
    ) -> Result<Written, HubError> {
        let mut seq = at;
        for e in events {
            seq += 1;
            let body = serde_json::to_string(e).map_err(|e| HubError::Corrupt(format!("journal: {e}")))?;
            sqlx::query("INSERT INTO events (seq, body) VALUES ($1, $2)")
                .bind(seq as i64)
                .bind(body)
                .execute(&mut *tx)
                .await?;
        }
        if self.postgres {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(EVENTS_CHANNEL)
                .bind(seq.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Written::At(seq))
    }

    /// The right to aggregate `round`, held until the claim is dropped: a session advisory lock
    /// on a connection of its own (PostgreSQL), so a replica that dies mid-round releases it
    /// with its connection. `None`: another replica holds it. SQLite has one hub process.
    pub async fn claim_round(&self, round: u64) -> Result<Option<RoundClaim>, HubError> {
        if !self.postgres {
            return Ok(Some(RoundClaim(None)));
        }
        let mut conn = self.pool.acquire().await?.detach();
        let key = ROUND_LOCKS.wrapping_add(round as i64);
        let row = sqlx::query("SELECT pg_try_advisory_lock($1) AS held").bind(key).fetch_one(&mut conn).await?;
        Ok(row.try_get::<bool, _>("held")?.then_some(RoundClaim(Some(conn))))
    }

    /// Sets up `round`'s sharded aggregation: its plan and a job per stage and shard. A
    /// replica taking a round over with the same plan finds the jobs (and what was done) there;
    /// a different plan (the round judged otherwise since) replaces them, waiting for any job
    /// of the old one still held to commit.
    pub async fn create_jobs(&self, round: u64, plan: &str, stages: u32, shards: usize) -> Result<(), HubError> {
        self.require_postgres("sharded aggregation")?;
        let mut tx = self.pool.begin().await?;
        let stored = sqlx::query("SELECT plan FROM aggregate_rounds WHERE round = $1 FOR UPDATE")
            .bind(round as i64)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<String, _>("plan"))
            .transpose()?;
        if stored.as_deref() != Some(plan) {
            if stored.is_some() {
                tracing::warn!(round, "the round's aggregation plan changed: its jobs start again");
                for delete in
                    ["DELETE FROM aggregate_jobs WHERE round = $1", "DELETE FROM aggregate_rounds WHERE round = $1"]
                {
                    sqlx::query(delete).bind(round as i64).execute(&mut *tx).await?;
                }
            }
            sqlx::query("INSERT INTO aggregate_rounds (round, plan) VALUES ($1, $2)")
                .bind(round as i64)
                .bind(plan)
                .execute(&mut *tx)
                .await?;
            for stage in 0..stages {
                for shard in 0..shards {
                    sqlx::query("INSERT INTO aggregate_jobs (round, stage, shard) VALUES ($1, $2, $3)")
                        .bind(round as i64)
                        .bind(stage as i32)
                        .bind(shard as i32)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        sqlx::query("SELECT pg_notify($1, $2)").bind(JOBS_CHANNEL).bind(round.to_string()).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// `round`'s plan, as [`Db::create_jobs`] stored it.
    pub async fn job_plan(&self, round: u64) -> Result<Option<String>, HubError> {
        let row = sqlx::query("SELECT plan FROM aggregate_rounds WHERE round = $1")
            .bind(round as i64)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("plan")).transpose()?)
    }

    /// Every job of `round` and stage `stage` (all stages if `None`): (stage, shard, outcome
    /// once done), by stage and shard.
    pub async fn jobs(&self, round: u64, stage: Option<u32>) -> Result<Vec<(u32, usize, Option<String>)>, HubError> {
        let rows = sqlx::query(
            "SELECT stage, shard, done, outcome FROM aggregate_jobs WHERE round = $1 AND ($2 < 0 OR stage = $2) \
             ORDER BY stage, shard",
        )
        .bind(round as i64)
        .bind(stage.map_or(-1, |s| s as i32))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let done: i32 = r.try_get("done")?;
                let outcome: Option<String> = r.try_get("outcome")?;
                Ok((
                    u(i64::from(r.try_get::<i32, _>("stage")?)) as u32,
                    u(i64::from(r.try_get::<i32, _>("shard")?)) as usize,
                    outcome.filter(|_| done != 0),
                ))
            })
            .collect()
    }

    /// How many of `round`'s jobs are not done.
    pub async fn pending_jobs(&self, round: u64) -> Result<u64, HubError> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM aggregate_jobs WHERE round = $1 AND done = 0")
            .bind(round as i64)
            .fetch_one(&self.pool)
            .await?;
        Ok(u(row.try_get("n")?))
    }

    /// Takes the first job whose stage's predecessors are all done, locked until the lease
    /// commits its outcome or its connection goes (a worker that dies mid-job leaves it to
    /// the next). `None`: nothing to do now.
    pub async fn take_job(&self) -> Result<Option<JobLease>, HubError> {
        self.require_postgres("aggregation workers")?;
        let mut conn = self.pool.acquire().await?.detach();
        sqlx::raw_sql("BEGIN").execute(&mut conn).await?;
        let row = sqlx::query(
            "SELECT round, stage, shard FROM aggregate_jobs j WHERE done = 0 AND NOT EXISTS \
             (SELECT 1 FROM aggregate_jobs p WHERE p.round = j.round AND p.stage < j.stage AND p.done = 0) \
             ORDER BY round, stage, shard LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut conn)
        .await?;
        let Some(row) = row else {
            sqlx::raw_sql("COMMIT").execute(&mut conn).await?;
            return Ok(None);
        };
        Ok(Some(JobLease {
            round: u(row.try_get("round")?),
            stage: u(i64::from(row.try_get::<i32, _>("stage")?)) as u32,
            shard: u(i64::from(row.try_get::<i32, _>("shard")?)) as usize,
            conn,
        }))
    }

    /// Forgets the jobs of rounds before `round` (their parts are published or moot).
    pub async fn clear_jobs(&self, round: u64) -> Result<Vec<u64>, HubError> {
        if !self.postgres {
            return Ok(Vec::new());
        }
        let rows = sqlx::query("DELETE FROM aggregate_rounds WHERE round < $1 RETURNING round")
            .bind(round as i64)
            .fetch_all(&self.pool)
            .await?;
        sqlx::query("DELETE FROM aggregate_jobs WHERE round < $1").bind(round as i64).execute(&self.pool).await?;
        rows.iter().map(|r| Ok(u(r.try_get("round")?))).collect()
    }

    fn require_postgres(&self, what: &str) -> Result<(), HubError> {
        if self.postgres {
            Ok(())
        } else {
            Err(HubError::Config(format!("{what} need a PostgreSQL database (--database postgres://…)")))
        }
    }

    /// The journal's last sequence number (0 when empty).
    pub async fn last_seq(&self) -> Result<u64, HubError> {
        let mut conn = self.pool.acquire().await?;
        last_seq(&mut conn).await
    }

    /// The journal after `seq`, in order; `None` if some of it was already pruned (the caller
    /// reloads the whole state instead).
    pub async fn events_since(&self, seq: u64) -> Result<Option<Vec<(u64, Journal)>>, HubError> {
        let rows = sqlx::query("SELECT seq, body FROM events WHERE seq > $1 ORDER BY seq")
            .bind(seq as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, r) in rows.iter().enumerate() {
            let s = u(r.try_get("seq")?);
            if s != seq + 1 + k as u64 {
                return Ok(None);
            }
            let body: String = r.try_get("body")?;
            out.push((s, serde_json::from_str(&body).map_err(|e| HubError::Corrupt(format!("journal {s}: {e}")))?));
        }
        Ok(Some(out))
    }

    /// Forgets the journal but its last `keep` events (a replica further behind reloads).
    pub async fn prune_events(&self, keep: u64) -> Result<(), HubError> {
        let last = self.last_seq().await?;
        sqlx::query("DELETE FROM events WHERE seq <= $1")
            .bind(last.saturating_sub(keep) as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn load_run(&self) -> Result<Option<RunRow>, HubError> {
        let row = sqlx::query("SELECT id, spec, round, finished FROM runs").fetch_optional(&self.pool).await?;
        Ok(match row {
            None => None,
            Some(r) => Some(RunRow {
                id: r.try_get("id")?,
                spec: r.try_get("spec")?,
                round: u(r.try_get("round")?),
                finished: r.try_get::<i64, _>("finished")? != 0,
            }),
        })
    }

    pub async fn create_run(
        &self,
        id: &str,
        spec: &str,
        checkpoint: &str,
        now: i64,
        seed: &Seed,
    ) -> Result<(), HubError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO runs (id, spec, round, checkpoint, finished, created_ms) VALUES ($1, $2, 0, $3, 0, $4)",
        )
        .bind(id)
        .bind(spec)
        .bind(checkpoint)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        open_round(&mut tx, 0, checkpoint, now, seed).await?;
        tx.commit().await?;
        Ok(())
    }

    /// What the round core needs of the run `run`, read back: the recent rounds' bases, the
    /// current round (its commitment, whether it closed), the phases, who may train, every
    /// contributor, the current round's submissions and counted refusals, ratings, data fits
    /// and who ever earned. Scans the scores once (O(history)), at start-up only.
    pub async fn snapshot(&self, run: &RunRow, spec: RunSpec) -> Result<Snapshot, HubError> {
        let oldest = run.round.saturating_sub(spec.max_staleness);
        let rows = sqlx::query(
            "SELECT round, base_checkpoint, state, opened_ms, closed_ms, closed_by, eval_commitment FROM rounds \
             WHERE round >= $1 ORDER BY round",
        )
        .bind(oldest as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut bases = Vec::with_capacity(rows.len() + 1);
        let (mut closed, mut commitment) = (None, String::new());
        for r in &rows {
            let round = u(r.try_get("round")?);
            bases.push((round, r.try_get::<String, _>("base_checkpoint")?));
            if round == run.round && !run.finished {
                commitment = r.try_get::<Option<String>, _>("eval_commitment")?.unwrap_or_default();
                let state = parse_state(&r.try_get::<String, _>("state")?)?;
                if matches!(state, RoundState::Scoring | RoundState::Aggregating) {
                    let opened: i64 = r.try_get("opened_ms")?;
                    let closed_by: Option<String> = r.try_get("closed_by")?;
                    let at_ms: Option<i64> = r.try_get("closed_ms")?;
                    closed = Some(Closed {
                        closed_by: closed_by.unwrap_or_else(|| "quorum".into()),
                        at_ms: at_ms.unwrap_or(opened),
                    });
                }
            }
        }
        if run.finished {
            // The final weights: the result of the last round.
            let last = sqlx::query("SELECT result_checkpoint FROM rounds WHERE round = $1")
                .bind(run.round as i64 - 1)
                .fetch_optional(&self.pool)
                .await?;
            let hash: Option<String> = last.map(|r| r.try_get("result_checkpoint")).transpose()?.flatten();
            bases.push((run.round, hash.ok_or_else(|| HubError::Corrupt("a finished run without a result".into()))?));
        }
        let starts: Vec<u64> = self.phase_starts().await?.into_iter().map(|(_, r)| r).collect();
        let phase = starts.len();
        let members = match phase.checked_sub(1).and_then(|i| spec.phases.get(i)).and_then(|p| p.qualify_top) {
            Some(_) => Some(self.phase_members(phase as u64).await?),
            None => None,
        };
        let contributors = self.contributors().await?.into_iter().map(|c| c.0).collect();
        let pending = if run.finished { Vec::new() } else { self.submissions(Some(run.round)).await? };
        // The current round's refusals: those that count against their sender, and those that
        // caught a cheat.
        let rejections = self.rejections(run.round).await?;
        let senders = |keep: fn(&str) -> bool| -> Vec<u64> {
            let mut ids: Vec<u64> = rejections.iter().filter(|(_, code, _)| keep(code)).map(|(c, _, _)| *c).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let (refused, caught) = (senders(code_counts), senders(code_caught));
        let mut fit: Vec<(u64, f64, u64)> = Vec::new();
        let mut earned = std::collections::BTreeSet::new();
        for s in self.scores().await? {
            if let Some(f) = s.data_fit.filter(|f| f.is_finite()) {
                match fit.iter_mut().find(|e| e.0 == s.contributor) {
                    Some(e) => {
                        e.1 += f;
                        e.2 += 1;
                    }
                    None => fit.push((s.contributor, f, 1)),
                }
            }
            if s.reward > 0 {
                earned.insert(s.contributor);
            }
        }
        Ok(Snapshot {
            spec,
            run_id: run.id.clone(),
            round: run.round,
            finished: run.finished,
            bases,
            commitment,
            closed,
            starts,
            members,
            contributors,
            pending,
            refused,
            ratings: self.ratings().await?,
            fit,
            conduct: self.conduct().await?,
            caught,
            earned: earned.into_iter().collect(),
        })
    }

    /// One round's row.
    pub async fn round(&self, round: u64) -> Result<Option<RoundRow>, HubError> {
        let row = sqlx::query(concat!(select_rounds!(), " WHERE round = $1"))
            .bind(round as i64)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(round_row).transpose()
    }

    pub async fn rounds(&self) -> Result<Vec<RoundRow>, HubError> {
        let rows = sqlx::query(concat!(select_rounds!(), " ORDER BY round")).fetch_all(&self.pool).await?;
        rows.iter().map(round_row).collect()
    }

    /// The current round's submissions closed: a scored run's round waits for its scores
    /// (`scoring`), an unscored one is being aggregated (`aggregating`).
    /// Records a sealed round's seed commitment from its validator.
    pub async fn commit_seed(&self, round: u64, commitment: &str, at: u64) -> Result<Written, HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok(Written::Stale) };
        sqlx::query("UPDATE rounds SET eval_commitment = $1 WHERE round = $2")
            .bind(commitment)
            .bind(round as i64)
            .execute(&mut *tx)
            .await?;
        self.commit_at(tx, at, &[Journal::Committed { round, commitment: commitment.to_owned() }]).await
    }

    /// Records a sealed round's evaluation seed as its verdict revealed it.
    pub async fn reveal_seed(&self, round: u64, seed: &str) -> Result<(), HubError> {
        sqlx::query("UPDATE rounds SET eval_seed = $1 WHERE round = $2")
            .bind(seed)
            .bind(round as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn close_round(&self, round: u64, closed: &Closed, scored: bool, at: u64) -> Result<Written, HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok(Written::Stale) };
        set_closed(&mut tx, round, closed, scored).await?;
        self.commit_at(tx, at, &[Journal::Closed { round, closed: closed.clone() }]).await
    }

    /// Registers a contributor's public key under the next free id (or returns the id it
    /// already has, writing nothing). The id is allocated by the database in the insert itself,
    /// under the writers' lock, so replicas on one PostgreSQL never hand out the same one.
    pub async fn register(&self, name: &str, public_key: &str, now: i64, at: u64) -> Result<(Written, u64), HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok((Written::Stale, 0)) };
        let known = sqlx::query("SELECT id FROM contributors WHERE public_key = $1")
            .bind(public_key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = known {
            return Ok((Written::At(at), u(row.try_get("id")?)));
        }
        // Under the writers' lock, so no other insert takes the id. (`WHERE true`: SQLite
        // parses ON CONFLICT after INSERT … SELECT only with a WHERE.)
        let row = sqlx::query(
            "INSERT INTO contributors (id, name, token_hash, public_key, registered_ms) \
             SELECT COALESCE(MAX(id) + 1, 0), $1, '', $2, $3 FROM contributors WHERE true \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(name)
        .bind(public_key)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| HubError::Corrupt("a contributor id was taken under the writers' lock".into()))?;
        let id = u(row.try_get("id")?);
        let written =
            self.commit_at(tx, at, &[Journal::Registered { contributor: id, key: public_key.to_owned() }]).await?;
        Ok((written, id))
    }

    /// (id, name, public key) of every contributor.
    pub async fn contributors(&self) -> Result<Vec<(u64, String, String)>, HubError> {
        let rows =
            sqlx::query("SELECT id, name, public_key FROM contributors ORDER BY id").fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let key: Option<String> = r.try_get("public_key")?;
                Ok((u(r.try_get("id")?), r.try_get("name")?, key.unwrap_or_default()))
            })
            .collect()
    }

    /// Records a signed request's nonce; `Ok(false)` if this key used it before.
    pub async fn use_nonce(&self, public_key: &str, nonce: &str, now: i64) -> Result<bool, HubError> {
        let r =
            sqlx::query("INSERT INTO nonces (public_key, nonce, seen_ms) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
                .bind(public_key)
                .bind(nonce)
                .bind(now)
                .execute(&self.pool)
                .await?;
        Ok(r.rows_affected() == 1)
    }

    /// Forgets nonces seen before `before` (their requests' timestamps are no longer accepted).
    pub async fn forget_nonces(&self, before: i64) -> Result<(), HubError> {
        sqlx::query("DELETE FROM nonces WHERE seen_ms < $1").bind(before).execute(&self.pool).await?;
        Ok(())
    }

    /// The ledger's entries, in order (hex bytes).
    pub async fn ledger(&self) -> Result<Vec<String>, HubError> {
        let rows = sqlx::query("SELECT entry FROM ledger ORDER BY seq").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(r.try_get("entry")?)).collect()
    }

    /// The ledger's entries from `from` on (hex), in order.
    pub async fn ledger_from(&self, from: u64) -> Result<Vec<String>, HubError> {
        let rows = sqlx::query("SELECT entry FROM ledger WHERE seq >= $1 ORDER BY seq")
            .bind(from as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("entry")?)).collect()
    }

    /// Appends ledger entries (`(seq, hex bytes)`), all or none.
    pub async fn append_ledger(&self, entries: &[(u64, String)], at: u64) -> Result<Written, HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok(Written::Stale) };
        insert_ledger(&mut tx, entries).await?;
        self.commit_at(tx, at, &[Journal::Ledger]).await
    }

    /// Takes a holder's signed proposal or vote until the next round boundary writes it to the
    /// ledger. A vote replaces the holder's pending vote on the same proposal when it is signed
    /// later; [`Written::Duplicate`] (nothing written) when the proposal is pending already or
    /// the pending vote is as late.
    pub async fn add_governance(&self, g: &PendingGovernance, at: u64) -> Result<Written, HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok(Written::Stale) };
        let same = if g.kind == "proposal" {
            sqlx::query("SELECT time_ms FROM governance_pending WHERE kind = 'proposal' AND proposal = $1")
                .bind(&g.proposal)
                .fetch_optional(&mut *tx)
                .await?
        } else {
            sqlx::query("SELECT time_ms FROM governance_pending WHERE kind = 'vote' AND proposal = $1 AND holder = $2")
                .bind(&g.proposal)
                .bind(&g.holder)
                .fetch_optional(&mut *tx)
                .await?
        };
        if let Some(row) = same {
            let t: i64 = row.try_get("time_ms")?;
            if g.kind == "proposal" || t >= g.time_ms {
                return Ok(Written::Duplicate);
            }
            sqlx::query("DELETE FROM governance_pending WHERE kind = 'vote' AND proposal = $1 AND holder = $2")
                .bind(&g.proposal)
                .bind(&g.holder)
                .execute(&mut *tx)
                .await?;
        }
        let id: i64 = sqlx::query("SELECT COALESCE(MAX(id), 0) + 1 AS next FROM governance_pending")
            .fetch_one(&mut *tx)
            .await?
            .try_get("next")?;
        sqlx::query(
            "INSERT INTO governance_pending (id, kind, proposal, holder, signed, time_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(&g.kind)
        .bind(&g.proposal)
        .bind(&g.holder)
        .bind(&g.signed)
        .bind(g.time_ms)
        .execute(&mut *tx)
        .await?;
        self.commit_at(tx, at, &[Journal::Governance]).await
    }

    /// Whether proposal `id` waits for the next round boundary (one indexed lookup).
    pub async fn proposal_pending(&self, id: &str) -> Result<bool, HubError> {
        let row = sqlx::query("SELECT 1 AS one FROM governance_pending WHERE proposal = $1 AND kind = 'proposal'")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// The proposals and votes waiting for the next round boundary, in the order taken.
    pub async fn pending_governance(&self) -> Result<Vec<PendingGovernance>, HubError> {
        let rows =
            sqlx::query("SELECT id, kind, proposal, holder, signed, time_ms FROM governance_pending ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                Ok(PendingGovernance {
                    id: r.try_get("id")?,
                    kind: r.try_get("kind")?,
                    proposal: r.try_get("proposal")?,
                    holder: r.try_get("holder")?,
                    signed: r.try_get("signed")?,
                    time_ms: r.try_get("time_ms")?,
                })
            })
            .collect()
    }

    /// Records an accepted submission and, when it completed the quorum, that the round
    /// closed; [`Written::Duplicate`] (nothing written) if this contributor already submitted
    /// for this base round.
    pub async fn accept(
        &self,
        s: &Accepted,
        closed: Option<&Closed>,
        scored: bool,
        at: u64,
    ) -> Result<Written, HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok(Written::Stale) };
        let exists = sqlx::query("SELECT 1 AS one FROM submissions WHERE contributor = $1 AND base_round = $2")
            .bind(s.contributor as i64)
            .bind(s.base_round as i64)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if exists {
            return Ok(Written::Duplicate);
        }
        sqlx::query(
            "INSERT INTO submissions (contributor, base_round, round, weight, bytes, inner_loss, blob, received_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(s.contributor as i64)
        .bind(s.base_round as i64)
        .bind(s.round as i64)
        .bind(s.weight)
        .bind(s.bytes as i64)
        .bind(s.inner_loss)
        .bind(&s.blob)
        .bind(s.received_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE rounds SET state = 'collecting' WHERE round = $1 AND state = 'open'")
            .bind(s.round as i64)
            .execute(&mut *tx)
            .await?;
        let mut events = vec![Journal::Accepted(s.clone())];
        if let Some(c) = closed {
            set_closed(&mut tx, s.round, c, scored).await?;
            events.push(Journal::Closed { round: s.round, closed: c.clone() });
        }
        self.commit_at(tx, at, &events).await
    }

    pub async fn has_submitted(&self, contributor: u64, base_round: u64) -> Result<bool, HubError> {
        Ok(sqlx::query("SELECT 1 AS one FROM submissions WHERE contributor = $1 AND base_round = $2")
            .bind(contributor as i64)
            .bind(base_round as i64)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Submissions applied in `round` (in the order they arrived) or in every round.
    pub async fn submissions(&self, round: Option<u64>) -> Result<Vec<Accepted>, HubError> {
        let rows = match round {
            Some(r) => {
                sqlx::query(concat!(
                    select_submissions!(),
                    " WHERE round = $1 ORDER BY received_ms, contributor, base_round"
                ))
                .bind(r as i64)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(concat!(select_submissions!(), " ORDER BY round, contributor, base_round"))
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter()
            .map(|r| {
                Ok(Accepted {
                    contributor: u(r.try_get("contributor")?),
                    base_round: u(r.try_get("base_round")?),
                    round: u(r.try_get("round")?),
                    weight: r.try_get("weight")?,
                    bytes: u(r.try_get("bytes")?),
                    inner_loss: r.try_get("inner_loss")?,
                    blob: r.try_get("blob")?,
                    received_ms: r.try_get("received_ms")?,
                })
            })
            .collect()
    }

    pub async fn insert_rejection(
        &self,
        contributor: u64,
        round: u64,
        code: tessera_protocol::ErrorCode,
        message: &str,
        now: i64,
        at: u64,
    ) -> Result<Written, HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok(Written::Stale) };
        sqlx::query(
            "INSERT INTO rejections (contributor, round, code, message, received_ms) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(contributor as i64)
        .bind(round as i64)
        .bind(code.wire_name())
        .bind(message)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let event = Journal::Refused { contributor, round, code, message: message.to_owned(), at_ms: now };
        self.commit_at(tx, at, &[event]).await
    }

    /// Rejections per contributor.
    /// Rejections per contributor, counted by the database (one row per contributor moves).
    pub async fn rejection_counts(&self) -> Result<Vec<(u64, u64)>, HubError> {
        let rows =
            sqlx::query("SELECT contributor, COUNT(*) AS n FROM rejections GROUP BY contributor ORDER BY contributor")
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(|r| Ok((u(r.try_get("contributor")?), u(r.try_get("n")?)))).collect()
    }

    /// (contributor, code, message) of every rejection recorded while `round` was open.
    pub async fn rejections(&self, round: u64) -> Result<Vec<(u64, String, String)>, HubError> {
        let rows = sqlx::query("SELECT contributor, code, message FROM rejections WHERE round = $1")
            .bind(round as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((u(r.try_get("contributor")?), r.try_get("code")?, r.try_get("message")?))).collect()
    }

    /// The round each later phase began at, by phase.
    pub async fn phase_starts(&self) -> Result<Vec<(u64, u64)>, HubError> {
        let rows = sqlx::query("SELECT phase, round FROM phase_starts ORDER BY phase").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok((u(r.try_get("phase")?), u(r.try_get("round")?)))).collect()
    }

    /// Who may train in `phase` (contributor ids, best first).
    pub async fn phase_members(&self, phase: u64) -> Result<Vec<u64>, HubError> {
        let rows = sqlx::query("SELECT contributor FROM phase_members WHERE phase = $1 ORDER BY rank")
            .bind(phase as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(u(r.try_get("contributor")?))).collect()
    }

    /// Who qualified at the phase boundary (contributor ids, best first).
    pub async fn qualified(&self) -> Result<Vec<u64>, HubError> {
        let rows = sqlx::query("SELECT contributor FROM qualified ORDER BY rank").fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(u(r.try_get("contributor")?))).collect()
    }

    /// The contributor whose accepted submission is stored as `blob`, if any.
    pub async fn blob_owner(&self, blob: &str) -> Result<Option<u64>, HubError> {
        let row = sqlx::query("SELECT contributor FROM submissions WHERE blob = $1")
            .bind(blob)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok(u(r.try_get("contributor")?))).transpose()
    }

    /// The round whose aggregate included the submission stored as `blob`, and its contributor,
    /// if any (one indexed lookup).
    pub async fn blob_placement(&self, blob: &str) -> Result<Option<(u64, u64)>, HubError> {
        let row = sqlx::query("SELECT round, contributor FROM submissions WHERE blob = $1")
            .bind(blob)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((u(r.try_get("round")?), u(r.try_get("contributor")?)))).transpose()
    }

    /// Round `round`'s evaluation seed and commitment (hex).
    pub async fn eval_seed(&self, round: u64) -> Result<(String, String), HubError> {
        let r = sqlx::query("SELECT eval_seed, eval_commitment FROM rounds WHERE round = $1")
            .bind(round as i64)
            .fetch_one(&self.pool)
            .await?;
        let seed: Option<String> = r.try_get("eval_seed")?;
        let commitment: Option<String> = r.try_get("eval_commitment")?;
        seed.zip(commitment).ok_or_else(|| HubError::Corrupt(format!("round {round} has no evaluation seed")))
    }

    /// One contributor's scored submissions (round, base round, score, data fit, flag, weight,
    /// reward) and its rating after each round that changed it (round, μ, σ), oldest first.
    pub async fn contributor_history(&self, contributor: u64) -> Result<ContributorHistory, HubError> {
        let rows = sqlx::query(
            "SELECT round, base_round, score, data_fit, flag, weight, reward, fit_factor, score_se, norm_bound, \
             conduct FROM scores WHERE contributor = $1 ORDER BY round, base_round",
        )
        .bind(contributor as i64)
        .fetch_all(&self.pool)
        .await?;
        let scores = rows
            .iter()
            .map(|r| ScoredSubmission {
                round: r.get::<i64, _>(0) as u64,
                base_round: r.get::<i64, _>(1) as u64,
                score: r.get(2),
                data_fit: r.get(3),
                flag: r.get(4),
                weight: r.get(5),
                reward: r.get::<i64, _>(6).max(0) as u64,
                fit_factor: r.get(7),
                score_se: r.get(8),
                norm_bound: r.get(9),
                conduct: r.get(10),
            })
            .collect();
        let rows = sqlx::query("SELECT round, mu, sigma FROM rating_history WHERE contributor = $1 ORDER BY round")
            .bind(contributor as i64)
            .fetch_all(&self.pool)
            .await?;
        let ratings = rows.iter().map(|r| (r.get::<i64, _>(0) as u64, r.get(1), r.get(2))).collect();
        let rows = sqlx::query(
            "SELECT round, code, message, received_ms FROM rejections WHERE contributor = $1 ORDER BY received_ms",
        )
        .bind(contributor as i64)
        .fetch_all(&self.pool)
        .await?;
        let rejections = rows
            .iter()
            .map(|r| Rejection {
                round: r.get::<Option<i64>, _>(0).map(u),
                code: r.get(1),
                message: r.get(2),
                received_ms: r.get(3),
            })
            .collect();
        Ok(ContributorHistory { contributor, scores, ratings, rejections })
    }

    /// Every contributor's conduct record (O(contributors)).
    pub async fn conduct(&self) -> Result<Vec<(u64, tessera_contest::Conduct)>, HubError> {
        let rows = sqlx::query("SELECT contributor, rounds, caught FROM conduct ORDER BY contributor")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let c = tessera_contest::Conduct { rounds: u(r.try_get("rounds")?), caught: u(r.try_get("caught")?) };
                Ok((u(r.try_get("contributor")?), c))
            })
            .collect()
    }

    pub async fn ratings(&self) -> Result<Ratings, HubError> {
        let rows = sqlx::query("SELECT contributor, mu, sigma, rounds FROM ratings").fetch_all(&self.pool).await?;
        let mut out = Ratings::default();
        for r in &rows {
            let rating = Rating { mu: r.try_get("mu")?, sigma: r.try_get("sigma")?, rounds: u(r.try_get("rounds")?) };
            out.0.insert(u(r.try_get("contributor")?), rating);
        }
        Ok(out)
    }

    pub async fn scores(&self) -> Result<Vec<ScoreRow>, HubError> {
        let rows = sqlx::query(
            "SELECT contributor, base_round, round, score, data_fit, flag, weight, reward, fit_factor, score_se, \
             norm_bound, conduct FROM scores ORDER BY round, contributor",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(score_row).collect()
    }

    /// One published round's scores in arrival order (the order its reward split ran in). One
    /// indexed read of the round's rows.
    pub async fn round_scores(&self, round: u64) -> Result<Vec<ScoreRow>, HubError> {
        let rows = sqlx::query(
            "SELECT s.contributor, s.base_round, s.round, s.score, s.data_fit, s.flag, s.weight, s.reward, \
             s.fit_factor, s.score_se, s.norm_bound, s.conduct FROM scores s LEFT JOIN submissions u \
             ON u.contributor = s.contributor AND u.base_round = s.base_round \
             WHERE s.round = $1 ORDER BY u.received_ms, s.contributor, s.base_round",
        )
        .bind(round as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(score_row).collect()
    }
}

/// A run scored by many validators: the leases and results of the round being scored.
impl Db {
    pub async fn leases(&self, round: u64) -> Result<Vec<tessera_round::scoring::Lease>, HubError> {
        let rows = sqlx::query("SELECT task, validator, until_ms FROM scoring_leases WHERE round = $1")
            .bind(round as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(tessera_round::scoring::Lease {
                    task: task_of(r)?,
                    validator: r.try_get("validator")?,
                    until_ms: r.try_get("until_ms")?,
                })
            })
            .collect()
    }

    /// Gives `task` to `validator` until `until_ms` (a lease it already holds is replaced).
    pub async fn lease(&self, round: u64, task: u32, validator: &str, until_ms: i64) -> Result<(), HubError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM scoring_leases WHERE round = $1 AND task = $2 AND validator = $3")
            .bind(round as i64)
            .bind(i64::from(task))
            .bind(validator)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO scoring_leases (round, task, validator, until_ms) VALUES ($1, $2, $3, $4)")
            .bind(round as i64)
            .bind(i64::from(task))
            .bind(validator)
            .bind(until_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Ends every lease `validator` holds in `round` (it said it cannot score).
    pub async fn release(&self, round: u64, validator: &str, now_ms: i64) -> Result<(), HubError> {
        sqlx::query("UPDATE scoring_leases SET until_ms = $1 WHERE round = $2 AND validator = $3 AND until_ms > $1")
            .bind(now_ms)
            .bind(round as i64)
            .bind(validator)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Which (task, validator) results `round` holds.
    pub async fn result_keys(&self, round: u64) -> Result<Vec<(u32, String)>, HubError> {
        let rows = sqlx::query("SELECT task, validator FROM scoring_results WHERE round = $1")
            .bind(round as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((task_of(r)?, r.try_get("validator")?))).collect()
    }

    /// One stored result: when it came, and the report as posted (JSON).
    pub async fn task_result(&self, round: u64, task: u32, validator: &str) -> Result<(i64, String), HubError> {
        let r =
            sqlx::query("SELECT at_ms, report FROM scoring_results WHERE round = $1 AND task = $2 AND validator = $3")
                .bind(round as i64)
                .bind(i64::from(task))
                .bind(validator)
                .fetch_one(&self.pool)
                .await?;
        Ok((r.try_get("at_ms")?, r.try_get("report")?))
    }

    /// Stores a result; false when this validator's result on the task is already stored.
    pub async fn put_result(
        &self,
        round: u64,
        task: u32,
        validator: &str,
        at_ms: i64,
        report: &str,
    ) -> Result<bool, HubError> {
        let done = sqlx::query(
            "INSERT INTO scoring_results (round, task, validator, at_ms, report) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT DO NOTHING",
        )
        .bind(round as i64)
        .bind(i64::from(task))
        .bind(validator)
        .bind(at_ms)
        .bind(report)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// A scoring row's task number.
fn task_of(r: &sqlx::any::AnyRow) -> Result<u32, HubError> {
    u32::try_from(r.try_get::<i64, _>("task")?).map_err(|_| HubError::Corrupt("a task number beyond u32".into()))
}

fn score_row(r: &sqlx::any::AnyRow) -> Result<ScoreRow, HubError> {
    Ok(ScoreRow {
        contributor: u(r.try_get("contributor")?),
        base_round: u(r.try_get("base_round")?),
        round: u(r.try_get("round")?),
        score: r.try_get("score")?,
        data_fit: r.try_get("data_fit")?,
        flag: r.try_get("flag")?,
        weight: r.try_get("weight")?,
        reward: u(r.try_get("reward")?),
        fit_factor: r.try_get("fit_factor")?,
        score_se: r.try_get("score_se")?,
        norm_bound: r.try_get("norm_bound")?,
        conduct: r.try_get("conduct")?,
    })
}

impl Db {
    /// Publishes `p.round` and opens the next one with `next` (unless the run finished), with
    /// the ledger entries that record it (sealed runs), in one transaction.
    pub async fn publish(
        &self,
        p: &Publication,
        next: Option<&Seed>,
        ledger: &[(u64, String)],
        steered: &Steered,
        at: u64,
    ) -> Result<Written, HubError> {
        let Some(mut tx) = self.begin_at(at).await? else { return Ok(Written::Stale) };
        for id in &steered.done {
            sqlx::query("DELETE FROM governance_pending WHERE id = $1").bind(*id).execute(&mut *tx).await?;
        }
        if let Some(spec) = &steered.spec {
            sqlx::query("UPDATE runs SET spec = $1").bind(spec).execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE rounds SET state = 'published', closed_ms = $1, closed_by = $2, accepted = $3, weight = $4, \
             result_checkpoint = $5, mean_inner_loss = $6, bytes_up = $7 WHERE round = $8",
        )
        .bind(p.closed_ms)
        .bind(&p.closed_by)
        .bind(p.used as i64)
        .bind(p.weight)
        .bind(&p.result_checkpoint)
        .bind(p.mean_inner_loss)
        .bind(p.bytes_up as i64)
        .bind(p.round as i64)
        .execute(&mut *tx)
        .await?;
        for sc in &p.scores {
            sqlx::query(
                "INSERT INTO scores (contributor, base_round, round, score, data_fit, flag, weight, reward, fit_factor, \
                 score_se, norm_bound, conduct) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(sc.contributor as i64)
            .bind(sc.base_round as i64)
            .bind(sc.round as i64)
            .bind(sc.score)
            .bind(sc.data_fit)
            .bind(sc.flag.as_deref())
            .bind(sc.weight)
            .bind(i64::try_from(sc.reward).map_err(|_| HubError::Corrupt("reward beyond i64".into()))?)
            .bind(sc.fit_factor)
            .bind(sc.score_se)
            .bind(sc.norm_bound)
            .bind(sc.conduct)
            .execute(&mut *tx)
            .await?;
        }
        for (contributor, c) in &p.conduct {
            sqlx::query("DELETE FROM conduct WHERE contributor = $1")
                .bind(*contributor as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO conduct (contributor, rounds, caught) VALUES ($1, $2, $3)")
                .bind(*contributor as i64)
                .bind(c.rounds as i64)
                .bind(c.caught as i64)
                .execute(&mut *tx)
                .await?;
        }
        for (contributor, r) in &p.ratings {
            sqlx::query("DELETE FROM ratings WHERE contributor = $1")
                .bind(*contributor as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO ratings (contributor, mu, sigma, rounds) VALUES ($1, $2, $3, $4)")
                .bind(*contributor as i64)
                .bind(r.mu)
                .bind(r.sigma)
                .bind(r.rounds as i64)
                .execute(&mut *tx)
                .await?;
            sqlx::query("INSERT INTO rating_history (contributor, round, mu, sigma) VALUES ($1, $2, $3, $4)")
                .bind(*contributor as i64)
                .bind(p.round as i64)
                .bind(r.mu)
                .bind(r.sigma)
                .execute(&mut *tx)
                .await?;
        }
        for (rank, contributor) in p.qualified.iter().enumerate() {
            sqlx::query("INSERT INTO qualified (contributor, round, rank) VALUES ($1, $2, $3)")
                .bind(*contributor as i64)
                .bind(p.round as i64)
                .bind(rank as i64 + 1)
                .execute(&mut *tx)
                .await?;
        }
        insert_ledger(&mut tx, ledger).await?;
        for table in ["DELETE FROM scoring_leases WHERE round <= $1", "DELETE FROM scoring_results WHERE round <= $1"] {
            sqlx::query(table).bind(p.round as i64).execute(&mut *tx).await?;
        }
        if let Some((phase, round)) = p.phase_start {
            sqlx::query("INSERT INTO phase_starts (phase, round) VALUES ($1, $2)")
                .bind(phase as i64)
                .bind(round as i64)
                .execute(&mut *tx)
                .await?;
        }
        if let Some((phase, members)) = &p.members {
            for (rank, contributor) in members.iter().enumerate() {
                sqlx::query("INSERT INTO phase_members (phase, contributor, rank) VALUES ($1, $2, $3)")
                    .bind(*phase as i64)
                    .bind(*contributor as i64)
                    .bind(rank as i64 + 1)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let next_round = p.round + 1;
        match (p.finished, next) {
            (false, Some(seed)) => open_round(&mut tx, next_round, &p.result_checkpoint, p.closed_ms, seed).await?,
            (false, None) => return Err(HubError::Corrupt("a round opened without an evaluation seed".into())),
            (true, _) => {}
        }
        sqlx::query("UPDATE runs SET round = $1, checkpoint = $2, finished = $3")
            .bind(next_round as i64)
            .bind(&p.result_checkpoint)
            .bind(i64::from(p.finished))
            .execute(&mut *tx)
            .await?;
        let mut events = vec![Journal::Published { round: p.round }];
        if !ledger.is_empty() {
            events.push(Journal::Ledger);
        }
        self.commit_at(tx, at, &events).await
    }
}

/// Whether a refusal recorded with the wire name `code` counts against its sender.
fn code_counts(code: &str) -> bool {
    serde_json::from_value::<tessera_protocol::ErrorCode>(serde_json::Value::String(code.to_owned()))
        .map_or(true, counts_against_sender)
}

/// Whether a recorded refusal's code says its sender was caught cheating.
fn code_caught(code: &str) -> bool {
    serde_json::from_value::<tessera_protocol::ErrorCode>(serde_json::Value::String(code.to_owned()))
        .is_ok_and(tessera_round::caught_by_refusal)
}

fn round_row(r: &sqlx::any::AnyRow) -> Result<RoundRow, HubError> {
    Ok(RoundRow {
        round: u(r.try_get("round")?),
        base_checkpoint: r.try_get("base_checkpoint")?,
        state: parse_state(&r.try_get::<String, _>("state")?)?,
        opened_ms: r.try_get("opened_ms")?,
        closed_ms: r.try_get("closed_ms")?,
        closed_by: r.try_get("closed_by")?,
        accepted: u(r.try_get("accepted")?),
        weight: r.try_get("weight")?,
        result_checkpoint: r.try_get("result_checkpoint")?,
        mean_inner_loss: r.try_get("mean_inner_loss")?,
        bytes_up: u(r.try_get("bytes_up")?),
    })
}

async fn set_closed(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    round: u64,
    closed: &Closed,
    scored: bool,
) -> Result<(), HubError> {
    let state = if scored { RoundState::Scoring } else { RoundState::Aggregating };
    sqlx::query("UPDATE rounds SET state = $1, closed_by = $2, closed_ms = $3 WHERE round = $4")
        .bind(state_name(state))
        .bind(&closed.closed_by)
        .bind(closed.at_ms)
        .bind(round as i64)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn insert_ledger(tx: &mut sqlx::Transaction<'_, sqlx::Any>, entries: &[(u64, String)]) -> Result<(), HubError> {
    for (seq, entry) in entries {
        sqlx::query("INSERT INTO ledger (seq, entry) VALUES ($1, $2)")
            .bind(*seq as i64)
            .bind(entry)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// Opens `round` with its secret evaluation seed; only the commitment is shown until the
/// round's submissions close.
async fn open_round(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    round: u64,
    base: &str,
    now: i64,
    seed: &Seed,
) -> Result<(), HubError> {
    sqlx::query(
        "INSERT INTO rounds (round, base_checkpoint, state, opened_ms, accepted, weight, bytes_up, eval_seed, \
         eval_commitment) VALUES ($1, $2, 'open', $3, 0, 0, 0, $4, $5)",
    )
    .bind(round as i64)
    .bind(base)
    .bind(now)
    .bind(&seed.seed)
    .bind(&seed.commitment)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn last_seq(conn: &mut sqlx::AnyConnection) -> Result<u64, HubError> {
    // The primary key's last entry: one index probe however long the journal.
    let row = sqlx::query("SELECT seq FROM events ORDER BY seq DESC LIMIT 1").fetch_optional(&mut *conn).await?;
    row.map_or(Ok(0), |r| Ok(u(r.try_get("seq")?)))
}
