-- /health (issue 8): the journal proves it takes a durable write, as the embedded journal's
-- health_probe does. A round trip alone said "ok" for a read-only server (a standby after a failover).
CREATE TABLE health_probe (id INTEGER PRIMARY KEY CHECK (id = 1), at DOUBLE PRECISION NOT NULL);
