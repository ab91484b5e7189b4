-- Find or create (issue 13): the workflow log line of a job whose contact was found, not created.
-- Written before the contact id, so a job in `send` answers duplicate=Y/N truthfully after a crash.
ALTER TABLE jobs ADD COLUMN found_note TEXT NOT NULL DEFAULT '';
