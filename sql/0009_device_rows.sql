-- pushsync base schema, migration 0009: what each device holds, for exact incremental downloads.
--
-- Applied by `pushsync migrate --dsn DSN` after 0009, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0009_device_rows.sql
-- Running it again changes nothing. docs/sync.md ("How a download knows what
-- changed") explains the design and its costs.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- One row per device and publication it synchronized: `holder` numbers the
-- pair for pushsync.device_rows. `confirmed` is the watermark the device's
-- rows in device_rows belong to (NULL: nothing known); `pending` the watermark
-- of the last answer, whose changes wait in device_rows_pending until the
-- device comes back with it (then it applied them) or with `confirmed` (then it
-- never did). `known`: the tables (oids) whose rows are in device_rows;
-- `pending_full`: the tables the last answer sent in full.
CREATE TABLE IF NOT EXISTS pushsync.device_holdings (
    device_id    text NOT NULL REFERENCES pushsync.devices ON DELETE CASCADE,
    publication  text NOT NULL,
    holder       bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    confirmed    text,
    pending      text,
    known        oid[] NOT NULL DEFAULT '{}',
    pending_full oid[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (device_id, publication)
);

-- The rows a device holds, one per row: the published table (its oid), the
-- row's key (its JSON text, {"route_id": 20}, as bytes) and 8 bytes of the MD5
-- of the row's JSON text. A synchronization sends what differs from these.
CREATE TABLE IF NOT EXISTS pushsync.device_rows (
    holder bigint NOT NULL REFERENCES pushsync.device_holdings (holder) ON DELETE CASCADE,
    tbl    oid NOT NULL,
    key    bytea NOT NULL,
    hash   bytea NOT NULL,
    PRIMARY KEY (holder, tbl, key)
);

-- What the last answer changed, until the device confirms it: a row's new hash,
-- or NULL for a row the answer deleted.
CREATE TABLE IF NOT EXISTS pushsync.device_rows_pending (
    holder bigint NOT NULL REFERENCES pushsync.device_holdings (holder) ON DELETE CASCADE,
    tbl    oid NOT NULL,
    key    bytea NOT NULL,
    hash   bytea,
    PRIMARY KEY (holder, tbl, key)
);

INSERT INTO pushsync.schema_version (version, name) VALUES (9, 'device_rows')
ON CONFLICT (version) DO NOTHING;
