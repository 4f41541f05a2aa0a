-- The round each later phase of a run began at: its planned boundary, or earlier when the phase
-- before reached its loss target. Written in the transaction that publishes the grown model.
CREATE TABLE phase_starts (
    phase BIGINT PRIMARY KEY,
    round BIGINT NOT NULL
);
