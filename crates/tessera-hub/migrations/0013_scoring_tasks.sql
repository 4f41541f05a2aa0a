-- Runs scored by many validators: which validator holds which task of the round being scored,
-- until when, and each validator's result on a task (its score report as posted, JSON, copy
-- samples included). Rows of a round are deleted when it is published: what outlives it is in
-- the scores table and, for a validator that was contradicted, in the ledger.
CREATE TABLE scoring_leases (
    round BIGINT NOT NULL,
    task BIGINT NOT NULL,
    validator TEXT NOT NULL,
    until_ms BIGINT NOT NULL,
    PRIMARY KEY (round, task, validator)
);
CREATE TABLE scoring_results (
    round BIGINT NOT NULL,
    task BIGINT NOT NULL,
    validator TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (round, task, validator)
);
