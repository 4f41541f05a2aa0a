-- Holders' signed proposals and votes taken since the last round boundary, written to the ledger
-- in the transaction that publishes the round (so a sealed round's validator-signed entries
-- always chain to the ledger it was given). One live vote per holder and proposal.
CREATE TABLE governance_pending (
    id BIGINT PRIMARY KEY,
    kind TEXT NOT NULL,
    proposal TEXT NOT NULL,
    holder TEXT NOT NULL,
    signed TEXT NOT NULL,
    time_ms BIGINT NOT NULL
);
CREATE INDEX governance_pending_vote ON governance_pending (proposal, holder);
