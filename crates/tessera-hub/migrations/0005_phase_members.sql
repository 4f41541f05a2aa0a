-- Who may train in each later phase of a run that limits it: the top of the leaderboard when
-- the phase began, written in the transaction that publishes the phase's first checkpoint.
CREATE TABLE phase_members (
    phase BIGINT NOT NULL,
    contributor BIGINT NOT NULL,
    rank BIGINT NOT NULL,
    PRIMARY KEY (phase, contributor)
);
