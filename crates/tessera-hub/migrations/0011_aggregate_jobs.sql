-- Sharded aggregation (PostgreSQL; `tessera hub --aggregate-shards`): a closing round's plan,
-- and one job per stage and tensor range for `tessera aggregate-worker` processes to take
-- (`FOR UPDATE SKIP LOCKED`, held until the job's outcome commits). `outcome` is JSON: the
-- stage's per-tensor sums, or that the shard's part is stored, or why it failed.
CREATE TABLE aggregate_rounds (
    round BIGINT PRIMARY KEY,
    plan TEXT NOT NULL
);
CREATE TABLE aggregate_jobs (
    round BIGINT NOT NULL,
    stage INTEGER NOT NULL,
    shard INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    worker TEXT,
    PRIMARY KEY (round, stage, shard)
);
CREATE INDEX aggregate_jobs_pending ON aggregate_jobs (done, round, stage);
