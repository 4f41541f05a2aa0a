-- Each scored submission's fit factor (from its contributor's data-fit record), so its reward
-- can be explained and recomputed from the round's rows alone.
ALTER TABLE scores ADD COLUMN fit_factor DOUBLE PRECISION;
