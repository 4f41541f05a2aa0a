-- Each contributor's conduct record: the scored rounds it took part in and those in which it was
-- caught cheating (a copy, work on other data, malformed or replayed bytes). Later shares are
-- discounted by it (`tessera_contest::Conduct`); the factor applied is kept with each score.
CREATE TABLE conduct (
    contributor BIGINT PRIMARY KEY,
    rounds BIGINT NOT NULL,
    caught BIGINT NOT NULL
);
ALTER TABLE scores ADD COLUMN conduct DOUBLE PRECISION;
