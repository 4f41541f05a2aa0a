-- Contributors are their Ed25519 keys; every request they sign carries a nonce, kept until
-- its timestamp is too old to be accepted anyway. The ledger is its entries' bytes (hex), in order.
ALTER TABLE contributors ADD COLUMN public_key TEXT;
CREATE UNIQUE INDEX contributors_public_key ON contributors (public_key);

CREATE TABLE nonces (
    public_key TEXT NOT NULL,
    nonce TEXT NOT NULL,
    seen_ms BIGINT NOT NULL,
    PRIMARY KEY (public_key, nonce)
);

CREATE TABLE ledger (
    seq BIGINT PRIMARY KEY,
    entry TEXT NOT NULL
);
