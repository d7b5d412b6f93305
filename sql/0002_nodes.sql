-- pushsync base schema, migration 0002: running dispatchers and SYNC connections.
--
-- Applied by `pushsync migrate --dsn DSN` after 0001, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0002_nodes.sql
-- Running it again changes nothing.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- One row per running dispatcher, refreshed by its heartbeat. A dispatcher
-- counts as alive while alive_until is in the future; one that stops cleanly
-- deletes its row, one that dies leaves it to run out (and to be swept by the
-- others a while later).
CREATE TABLE IF NOT EXISTS pushsync.dispatchers (
    owner        text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    sync_address text,
    udp_address  text,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    alive_until  timestamptz NOT NULL
);

-- Which dispatcher holds each device's SYNC connection. A notification for
-- a connected device is claimed only by that dispatcher (while it is alive),
-- so it goes down the open connection whichever node the trigger woke.
-- Not a foreign key to dispatchers: a device may connect before its
-- dispatcher's first heartbeat; records of dispatchers that are gone are
-- swept with them.
CREATE TABLE IF NOT EXISTS pushsync.sync_connections (
    device_id    text PRIMARY KEY REFERENCES pushsync.devices ON DELETE CASCADE,
    owner        text NOT NULL,
    peer         text NOT NULL,
    connected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sync_connections_owner ON pushsync.sync_connections (owner);

INSERT INTO pushsync.schema_version (version, name) VALUES (2, 'nodes')
ON CONFLICT (version) DO NOTHING;
