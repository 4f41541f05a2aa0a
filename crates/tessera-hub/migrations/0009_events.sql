-- The journal of the run's decisions, one row per event in the order they were committed:
-- hub replicas on one database catch up by reading what came after the last event they
-- applied. `seq` is allocated under the writers' lock, so commit order is `seq` order.
CREATE TABLE events (
    seq BIGINT PRIMARY KEY,
    body TEXT NOT NULL
);
