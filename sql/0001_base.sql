-- pushsync base schema, migration 0001: devices, addresses, the outbox and its history.
--
-- Applied by `pushsync migrate --dsn DSN`, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0001_base.sql
-- Running it again changes nothing. Needs PostgreSQL 14 or newer.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

CREATE SCHEMA IF NOT EXISTS pushsync;
COMMENT ON SCHEMA pushsync IS
    'pushsync: devices, the notification outbox and the trigger functions generated from rules';

-- Which of these files have been applied.
CREATE TABLE IF NOT EXISTS pushsync.schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Devices that may receive notifications. The secret signs every message to
-- the device and authenticates it on the SYNC port; it never leaves the
-- server otherwise.
CREATE TABLE IF NOT EXISTS pushsync.devices (
    device_id    text PRIMARY KEY
                 CONSTRAINT devices_device_id_format
                 CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    secret       bytea NOT NULL
                 CONSTRAINT devices_secret_length CHECK (octet_length(secret) >= 16),
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz
);

-- Where a device can be reached, per medium. A listener reports its own
-- address (source 'tracking'); an operator may pin one (source 'manual'),
-- which then decides for that medium whatever tracking reports, as
-- MobiLink's ignore_tracking does.
CREATE TABLE IF NOT EXISTS pushsync.device_addresses (
    device_id   text NOT NULL REFERENCES pushsync.devices ON DELETE CASCADE,
    medium      text NOT NULL
                CONSTRAINT device_addresses_medium CHECK (medium IN ('udp', 'email')),
    source      text NOT NULL
                CONSTRAINT device_addresses_source CHECK (source IN ('tracking', 'manual')),
    address     text NOT NULL,
    active      boolean NOT NULL DEFAULT true,
    modified_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, medium, source)
);

-- The address to use per device and medium: the manual row if there is one,
-- else the tracked one; only active addresses.
CREATE OR REPLACE VIEW pushsync.effective_addresses AS
SELECT device_id, medium, address, source, modified_at
FROM (
    SELECT DISTINCT ON (device_id, medium) *
    FROM pushsync.device_addresses
    ORDER BY device_id, medium, source = 'manual' DESC
) AS chosen
WHERE active;

-- The durable outbox. Trigger functions generated from rules insert here in
-- the application's transaction; the dispatcher claims, sends and finishes.
--
-- state: pending   written, never sent; coalescing merges later changes into it
--        sending   claimed by a dispatcher (lease_owner) until lease_expires_at
--        sent      sent at least once; resent at next_attempt_at until confirmed
--        confirmed the device said it has it
--        expired   expires_at passed before a confirmation; never sent again
--        failed    cannot be delivered (last_error says why)
CREATE TABLE IF NOT EXISTS pushsync.outbox (
    request_id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    rule             text NOT NULL,
    device_id        text NOT NULL REFERENCES pushsync.devices ON DELETE CASCADE,
    subject          text NOT NULL DEFAULT '',
    content          text NOT NULL DEFAULT '',
    priority         text NOT NULL DEFAULT 'normal'
                     CONSTRAINT outbox_priority CHECK (priority IN ('low', 'normal', 'high')),
    gateway          text NOT NULL DEFAULT 'auto'
                     CONSTRAINT outbox_gateway CHECK (gateway IN ('auto', 'sync', 'udp', 'smtp')),
    coalescing       boolean NOT NULL DEFAULT true,
    coalesced        integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    resend_every     interval NOT NULL,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    state            text NOT NULL DEFAULT 'pending'
                     CONSTRAINT outbox_state CHECK (
                         state IN ('pending', 'sending', 'sent', 'confirmed', 'expired', 'failed')),
    lease_owner      text,
    lease_expires_at timestamptz,
    sent_at          timestamptz,
    gateway_used     text,
    confirmed_at     timestamptz,
    last_error       text
);
COMMENT ON TABLE pushsync.outbox IS
    'pushsync: notifications waiting to be sent, resent or confirmed; finished rows move to outbox_history';

-- The dispatcher's claim: rows due now, oldest first. Finished rows are not in it.
CREATE INDEX IF NOT EXISTS outbox_due
    ON pushsync.outbox (next_attempt_at)
    WHERE state IN ('pending', 'sending', 'sent');

-- Coalescing: at most one unsent row per (rule, device). A row leaves this
-- index when it is claimed, so a change committed after the claim gets a
-- message of its own and is never folded into one already on its way.
CREATE UNIQUE INDEX IF NOT EXISTS outbox_coalesce
    ON pushsync.outbox (rule, device_id)
    WHERE coalescing AND state = 'pending';

CREATE INDEX IF NOT EXISTS outbox_device ON pushsync.outbox (device_id);

-- Expiry finds unfinished rows past expires_at; archiving finds finished rows.
CREATE INDEX IF NOT EXISTS outbox_expiry
    ON pushsync.outbox (expires_at)
    WHERE state IN ('pending', 'sending', 'sent');
CREATE INDEX IF NOT EXISTS outbox_finished
    ON pushsync.outbox (state)
    WHERE state IN ('confirmed', 'expired', 'failed');

-- Finished notifications (confirmed, expired, failed), moved out of the
-- outbox in batches so that it stays small.
CREATE TABLE IF NOT EXISTS pushsync.outbox_history (
    request_id   uuid PRIMARY KEY,
    rule         text NOT NULL,
    device_id    text NOT NULL,
    subject      text NOT NULL,
    content      text NOT NULL,
    priority     text NOT NULL,
    gateway      text NOT NULL,
    coalesced    integer NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    attempts     integer NOT NULL,
    state        text NOT NULL
                 CONSTRAINT outbox_history_state CHECK (state IN ('confirmed', 'expired', 'failed')),
    sent_at      timestamptz,
    gateway_used text,
    confirmed_at timestamptz,
    last_error   text,
    finished_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS outbox_history_finished ON pushsync.outbox_history (finished_at);

-- The rules and polls of the rules file last applied; maintained by the
-- generated migration.
CREATE TABLE IF NOT EXISTS pushsync.rules (
    name          text PRIMARY KEY,
    kind          text NOT NULL CONSTRAINT rules_kind CHECK (kind IN ('rule', 'poll')),
    table_name    text,
    events        text[],
    every         interval,
    function_name text,
    gateway       text NOT NULL,
    priority      text NOT NULL,
    ttl           interval NOT NULL,
    resend_every  interval NOT NULL,
    coalescing    boolean NOT NULL,
    source        text NOT NULL,
    source_sha256 text NOT NULL
);

-- "old"."id" = "new"."id" AND ... for the key that pairs old and new rows of
-- an update: the given columns, else the table's primary key. Used when a
-- generated migration is applied, never while triggers run.
CREATE OR REPLACE FUNCTION pushsync.key_join(
    tbl regclass, key_columns text[], left_alias text, right_alias text
) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    columns text[] := key_columns;
    missing text;
BEGIN
    IF coalesce(cardinality(columns), 0) = 0 THEN
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO columns
        FROM pg_index AS i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = tbl AND i.indisprimary;
        IF columns IS NULL THEN
            RAISE EXCEPTION 'pushsync: table % has no primary key to pair old and new rows', tbl
                USING HINT = 'give its update rules a key: [column, ...]';
        END IF;
    END IF;
    SELECT c INTO missing FROM unnest(columns) AS c
    WHERE NOT EXISTS (
        SELECT 1 FROM pg_attribute AS a
        WHERE a.attrelid = tbl AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
    LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'pushsync: key column % is not a column of %', missing, tbl;
    END IF;
    RETURN (
        SELECT string_agg(format('%I.%I = %I.%I', left_alias, c, right_alias, c), ' AND ')
        FROM unnest(columns) AS c);
END
$$;

INSERT INTO pushsync.schema_version (version, name) VALUES (1, 'base')
ON CONFLICT (version) DO NOTHING;
