-- Each scored submission's standard error over the held-out windows: a score within two of
-- them of zero is aggregated and rated but earns nothing, and the explanation says so.
ALTER TABLE scores ADD COLUMN score_se DOUBLE PRECISION;
