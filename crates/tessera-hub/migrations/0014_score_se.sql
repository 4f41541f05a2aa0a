-- Each scored submission's standard error over the held-out windows, as its validator reported
-- it: shown beside the score when its reward is explained.
ALTER TABLE scores ADD COLUMN score_se DOUBLE PRECISION;
