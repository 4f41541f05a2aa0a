-- The validator fetches a submission by its blob (`GET /v1/validator/submissions/{blob}`):
-- one indexed lookup instead of a scan of every submission of the run.
CREATE INDEX submissions_blob ON submissions (blob);
