-- Who qualified for the next phase, frozen at the phase boundary (the leaderboard moves on as
-- the others keep contributing).
CREATE TABLE qualified (
    contributor BIGINT PRIMARY KEY,
    round BIGINT NOT NULL,
    rank BIGINT NOT NULL
);
