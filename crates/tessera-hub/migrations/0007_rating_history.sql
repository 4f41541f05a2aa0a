-- Each contributor's rating after every round that changed it, for its history on the dashboard.
-- Written in the transaction that publishes the round, beside the current rating.
CREATE TABLE rating_history (
    contributor BIGINT NOT NULL,
    round BIGINT NOT NULL,
    mu DOUBLE PRECISION NOT NULL,
    sigma DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (contributor, round)
);
