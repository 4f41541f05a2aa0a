-- Scored runs: each round's evaluation seed (committed when the round opens, revealed when its
-- submissions close), each submission's score and reward, and every contributor's rating.
ALTER TABLE rounds ADD COLUMN eval_seed TEXT;
ALTER TABLE rounds ADD COLUMN eval_commitment TEXT;
ALTER TABLE rejections ADD COLUMN round BIGINT;

CREATE TABLE scores (
    contributor BIGINT NOT NULL,
    base_round BIGINT NOT NULL,
    round BIGINT NOT NULL,
    score DOUBLE PRECISION,
    data_fit DOUBLE PRECISION,
    flag TEXT,
    weight DOUBLE PRECISION NOT NULL,
    reward BIGINT NOT NULL,
    PRIMARY KEY (contributor, base_round)
);
CREATE INDEX scores_round ON scores (round);

CREATE TABLE ratings (
    contributor BIGINT PRIMARY KEY,
    mu DOUBLE PRECISION NOT NULL,
    sigma DOUBLE PRECISION NOT NULL,
    rounds BIGINT NOT NULL
);
