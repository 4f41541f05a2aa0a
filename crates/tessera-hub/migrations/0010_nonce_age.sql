-- Every replica's clock forgets nonces older than the signature window
-- (`DELETE FROM nonces WHERE seen_ms < …`): an index range instead of a scan of every nonce.
CREATE INDEX nonces_seen ON nonces (seen_ms);
