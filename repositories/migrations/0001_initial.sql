-- The app's PostgreSQL schema, version 1: tokens, the job journal, pending OAuth states, and the
-- instances that share the database. Applied once by repositories/postgres.py `migrate`.

CREATE TABLE portal_tokens (
    member_id TEXT PRIMARY KEY,
    record JSONB NOT NULL,  -- schemas.PortalTokens; its token fields encrypted with TOKEN_ENCRYPTION_KEY
    updated_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE jobs (
    id BIGSERIAL PRIMARY KEY,
    event_token TEXT NOT NULL UNIQUE,
    member_id TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    document_id TEXT NOT NULL,
    properties JSONB NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    client_endpoint TEXT NOT NULL DEFAULT '',
    call_access_token TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    contact_id BIGINT NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    add_attempted BOOLEAN NOT NULL DEFAULT FALSE,
    deadline DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
-- Only unfinished jobs are ever looked up by due time; finished ones stay out of the index.
CREATE INDEX jobs_due ON jobs (next_attempt_at) WHERE state IN ('add', 'send');

CREATE TABLE oauth_states (
    state_hash TEXT PRIMARY KEY,
    nonce_hash TEXT NOT NULL,
    portal_url TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
);

CREATE TABLE instances (
    instance_id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    leader BOOLEAN NOT NULL DEFAULT FALSE
);
