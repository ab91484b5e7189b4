-- use_subscription=N (issue 9): the workflow did not wait, so the worker creates the contact and sends
-- no answer. The embedded journal has had this column since i9-robot; without it here every job read
-- back from PostgreSQL wanted an answer.
ALTER TABLE jobs ADD COLUMN wants_answer BOOLEAN NOT NULL DEFAULT TRUE;
