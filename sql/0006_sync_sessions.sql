-- pushsync base schema, migration 0006: a record of every synchronization, and
-- the indexes the operator's console (`pushsync monitor`) reads history with.
--
-- Applied by `pushsync migrate --dsn DSN` after 0005, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0006_sync_sessions.sql
-- Running it again changes nothing. On a large outbox_history the index
-- outbox_history_device takes a while to build (once).

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- One row per synchronization, written by the dispatcher when it ends (one
-- INSERT after the device has its answer; a failure to write it is logged and
-- never fails the synchronization). Like outbox_history, a record for audits
-- and the console: no foreign key, so it outlives the device, and pushsync
-- never prunes it (docs/operations.md, "Outbox retention and housekeeping").
--
-- outcome: ok       the device got SYNC_END
--          refused  the server refused it (publication, limits, a protocol error)
--          failed   the database or the connection failed under it
CREATE TABLE IF NOT EXISTS pushsync.sync_sessions (
    session_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id     text NOT NULL,
    publication   text,
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    upload_rows   integer NOT NULL DEFAULT 0,
    download_rows integer NOT NULL DEFAULT 0,
    conflicts     integer NOT NULL DEFAULT 0,
    outcome       text NOT NULL
                  CONSTRAINT sync_sessions_outcome CHECK (outcome IN ('ok', 'refused', 'failed')),
    error         text
);
COMMENT ON TABLE pushsync.sync_sessions IS
    'pushsync: one row per synchronization, for audits and pushsync monitor; pruned by the owner';

-- Time windows (the console's timeline and latency views, and pruning) and
-- each device's latest synchronizations (the fleet view).
CREATE INDEX IF NOT EXISTS sync_sessions_finished ON pushsync.sync_sessions (finished_at);
CREATE INDEX IF NOT EXISTS sync_sessions_device
    ON pushsync.sync_sessions (device_id, finished_at);

-- One device's finished notifications by time (the fleet's counts per device,
-- the timeline of a few devices).
CREATE INDEX IF NOT EXISTS outbox_history_device
    ON pushsync.outbox_history (device_id, finished_at);

INSERT INTO pushsync.schema_version (version, name) VALUES (6, 'sync_sessions')
ON CONFLICT (version) DO NOTHING;
