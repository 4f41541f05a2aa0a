-- The norm bound each submission was scored against (twice the median Δ norm of its round or
-- task), as its validator reported it: with it, a contributor recomputes its own score from its
-- own Δ alone in a run that does not publish submissions (`tessera audit --identity`).
ALTER TABLE scores ADD COLUMN norm_bound DOUBLE PRECISION;
