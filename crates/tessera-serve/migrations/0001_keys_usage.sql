-- API keys are stored only as the BLAKE3 hash of the key; the key itself is shown once.
CREATE TABLE api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    requests_per_minute INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);

-- The epoch usage is billed to: one row, advanced by closing an epoch.
CREATE TABLE meter (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    open_epoch INTEGER NOT NULL
);
INSERT INTO meter (id, open_epoch) VALUES (0, 0);

-- One row per completed request.
CREATE TABLE usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id INTEGER NOT NULL REFERENCES api_keys(id),
    epoch INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL
);
CREATE INDEX usage_epoch ON usage (epoch, key_id);
