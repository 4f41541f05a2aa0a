-- One database holds one run. Times are Unix milliseconds. Blobs live in the object store;
-- rows name them. Portable SQL: the same migration runs on SQLite and PostgreSQL.
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    round BIGINT NOT NULL,
    checkpoint TEXT NOT NULL,
    finished BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE rounds (
    round BIGINT PRIMARY KEY,
    base_checkpoint TEXT NOT NULL,
    state TEXT NOT NULL,
    opened_ms BIGINT NOT NULL,
    closed_ms BIGINT,
    closed_by TEXT,
    accepted BIGINT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    result_checkpoint TEXT,
    mean_inner_loss DOUBLE PRECISION,
    bytes_up BIGINT NOT NULL
);

CREATE TABLE contributors (
    id BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    registered_ms BIGINT NOT NULL
);

-- A contributor submits at most once per base round.
CREATE TABLE submissions (
    contributor BIGINT NOT NULL,
    base_round BIGINT NOT NULL,
    round BIGINT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    bytes BIGINT NOT NULL,
    inner_loss DOUBLE PRECISION,
    blob TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (contributor, base_round)
);
CREATE INDEX submissions_round ON submissions (round);

CREATE TABLE rejections (
    contributor BIGINT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    received_ms BIGINT NOT NULL
);
