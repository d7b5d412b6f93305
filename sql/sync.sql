-- Runtime queries of the dispatcher's synchronizations, one named block each.
-- Not a migration: `pushsync migrate` does not run this file.
-- Run by pushsync.dispatcher.sync_store (docs/sync.md has the guarantees).
-- Statements that name a published table or its functions are composed per
-- table in Python, from the catalog's names through psycopg.sql.Identifier;
-- everything else is here. The primary key of a table is queries.sql's
-- primary_key, shared with `pushsync check --dsn`.

-- pinned --
-- The settings the download functions (inlined into the download queries, so
-- without SET clauses of their own) and upload checks run with, whatever the
-- connection's defaults. Three statements, run together without parameters.
SET LOCAL search_path = pg_catalog, pg_temp;
SET LOCAL standard_conforming_strings = on;
SET LOCAL jit = off

-- publication_granted --
-- The publication the device asked for (or, naming none, the only one it may
-- synchronize), one row per table in download order, with each table's
-- columns (name and format_type(), in the table's order: what a device's
-- local table is created from and compared with) and primary key as the
-- catalog has them now. `granted`, in every row, lists the device's
-- publications that the applied rules define. A publication neither granted
-- nor defined gives one row without a table: refused with one answer for
-- both, so a device learns nothing about what else the server publishes.
-- One statement, one round trip, whatever the number of tables.
WITH granted AS (
    SELECT g.publication
    FROM pushsync.device_publications AS g
    WHERE g.device_id = %(device)s
      AND EXISTS (SELECT 1 FROM pushsync.publication_tables AS p
                  WHERE p.publication = g.publication)),
chosen AS (
    SELECT coalesce(%(publication)s::text,
                    (SELECT min(publication) FROM granted HAVING count(*) = 1)) AS publication)
SELECT ARRAY(SELECT publication FROM granted ORDER BY 1) AS granted,
       c.publication, t.table_name, t.key_columns, t.upload, t.conflict, t.newest_column,
       t.download_function, t.depends_on, t.upload_check_function,
       t.upload_mode = 'atomic' AS atomic,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
             WHERE a.attrelid = to_regclass(t.table_name) AND a.attnum > 0
               AND NOT a.attisdropped ORDER BY a.attnum) AS column_names,
       ARRAY(SELECT format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute AS a
             WHERE a.attrelid = to_regclass(t.table_name) AND a.attnum > 0
               AND NOT a.attisdropped ORDER BY a.attnum) AS column_types,
       ARRAY(SELECT a.attname::text
             FROM pg_catalog.pg_index AS i
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indrelid = to_regclass(t.table_name) AND i.indisprimary
             ORDER BY k.ord) AS primary_key
FROM chosen AS c
LEFT JOIN pushsync.publication_tables AS t
       ON t.publication = c.publication AND c.publication IN (SELECT publication FROM granted)
ORDER BY t.position

-- device_enabled --
-- The row lock makes a concurrent `device disable` wait for the batch being
-- applied: once that command returns, no batch of the device commits any more.
SELECT enabled FROM pushsync.devices WHERE device_id = %(device)s FOR SHARE

-- upload_answered --
-- A batch seen before is answered from here, never applied twice.
SELECT result FROM pushsync.sync_uploads WHERE device_id = %(device)s AND batch = %(batch)s

-- upload_record --
-- In the transaction that applied the batch: recorded if and only if applied.
INSERT INTO pushsync.sync_uploads (device_id, batch, result)
VALUES (%(device)s, %(batch)s, %(result)s::jsonb)

-- session_record --
-- When a synchronization ends, whatever its outcome: one row, its own
-- transaction, after the device has its answer (pushsync.sync_sessions).
INSERT INTO pushsync.sync_sessions (
    device_id, publication, started_at, upload_rows, download_rows, conflicts, outcome, error)
VALUES (%(device)s, %(publication)s, %(started_at)s, %(upload_rows)s, %(download_rows)s,
        %(conflicts)s, %(outcome)s, %(error)s)

-- download_begin --
-- One snapshot for the whole download: it becomes the device's watermark. Not
-- READ ONLY: the device's holdings (pushsync.device_holdings) are written in
-- the same transaction, from the same snapshot as the rows sent. Sent first in
-- the download's first round trip (a pipeline), then `pinned`, then:
BEGIN ISOLATION LEVEL REPEATABLE READ

-- download_generic --
-- The statements of the download's first two round trips are the same text
-- each time: planned once per connection (psycopg prepares them), not at each
-- synchronization. Reset before a table is sent (download functions are
-- planned for their device, as usual).
SET LOCAL plan_cache_mode = force_generic_plan

-- download_planned --
RESET plan_cache_mode

-- download_snapshot --
-- The first statement to read: the transaction's snapshot is taken here.
SELECT pg_current_snapshot()::text

-- watermark_valid --
-- Only for a watermark that is neither of the device's last two: whether it is
-- a snapshot at all (an error if not; the synchronization is then refused).
SELECT %(watermark)s::pg_snapshot IS NOT NULL

-- download_frame --
-- One DOWNLOAD payload. Rows and keys arrive as PostgreSQL's own JSON text
-- (to_jsonb(row)::text) and stay that text: json, unlike jsonb, keeps it as
-- given, so numbers keep every digit and no row is parsed in Python. The two
-- arrays are sent in binary format: ten times faster than an array literal of
-- quoted JSON texts.
SELECT json_build_object(
    'table', %(table)s::text,
    'schema', %(schema)s::json,
    'full', %(full)s::boolean,
    'upserts', %(upserts)b::json[],
    'deletes', %(deletes)b::json[],
    'more', %(more)s::boolean)::text

-- holdings_open --
-- The device's holdings of the publication (created empty the first time),
-- locked: a second synchronization of the device (another dispatcher) waits
-- until this one commits, then fails rather than answer from stale holdings.
-- (A device that names no publication may have one only, else it is refused
-- and this is rolled back; so is a publication it may not synchronize.)
--
-- With them, in the same statement, what the download needs to decide whether
-- there is anything to send at all:
--   since     the watermark the device came with if it is the last answer's
--             (`pending`) or the one before (`confirmed`), and the change log
--             still holds every change since it; else NULL (every table in
--             full). Taken from the row, never cast from what the device sent.
--   changed   the tables the publication's downloads read (the published ones
--             and the ones they join) with a change since `since` that this
--             download's snapshot sees: a change committed after `since` was
--             taken, or by a transaction in flight then (pg_visible_in_snapshot
--             is false for both). One probe of changes_by_table per table read
--             (a scalar subquery with LIMIT 1: never a scan of the whole log);
--             a table not in the list changed nothing any download reads, and
--             no download function runs for it.
--   known, pending_full (as table names), pending_rows: what promote and
--             discard would change; when nothing, they are not run.
WITH h AS (
    INSERT INTO pushsync.device_holdings AS h (device_id, publication)
    SELECT g.device_id, g.publication
    FROM pushsync.device_publications AS g
    WHERE g.device_id = %(device)s
      AND g.publication = coalesce(%(publication)s::text, g.publication)
      AND EXISTS (SELECT 1 FROM pushsync.publication_tables AS p
                  WHERE p.publication = g.publication)
    ON CONFLICT (device_id, publication) DO UPDATE SET device_id = excluded.device_id
    RETURNING h.*),
s AS MATERIALIZED (
    SELECT h.*,
           (CASE %(watermark)s::text WHEN h.pending THEN h.pending
                                     WHEN h.confirmed THEN h.confirmed END)::pg_snapshot AS since
    FROM h),
u AS MATERIALIZED (
    SELECT s.*,
           CASE WHEN pg_snapshot_xmin(s.since) >= (SELECT pruned_below
                                                   FROM pushsync.changes_horizon)
                THEN s.since END AS usable
    FROM s)
SELECT u.holder, u.publication, u.confirmed, u.pending, u.usable::text AS since,
       ARRAY(SELECT n::regclass::text FROM unnest(u.known) AS n) AS known,
       ARRAY(SELECT n::regclass::text FROM unnest(u.pending_full) AS n) AS pending_full,
       EXISTS (SELECT 1 FROM pushsync.device_rows_pending AS p
               WHERE p.holder = u.holder) AS pending_rows,
       ARRAY(SELECT r.name
             FROM (SELECT DISTINCT unnest(t.table_name || t.depends_on)
                   FROM pushsync.publication_tables AS t
                   WHERE t.publication = u.publication) AS r(name)
             WHERE (SELECT true FROM pushsync.changes AS c
                    WHERE c.table_name = r.name
                      AND c.xid >= pg_snapshot_xmin(u.usable)
                      AND NOT pg_visible_in_snapshot(c.xid, u.usable)
                    LIMIT 1)
             ORDER BY 1) AS changed
FROM u

-- holdings_promote --
-- The device came back with the watermark of the last answer: it applied it.
-- Three statements, run together: tables sent in full replace what was held,
-- then each pending row replaces (or, NULL, deletes) the held one.
DELETE FROM pushsync.device_rows AS r
USING pushsync.device_holdings AS h
WHERE h.holder = %(holder)s AND r.holder = h.holder AND r.tbl = ANY (h.pending_full);
DELETE FROM pushsync.device_rows AS r
USING pushsync.device_rows_pending AS p
WHERE r.holder = %(holder)s AND p.holder = %(holder)s AND p.tbl = r.tbl AND p.key = r.key;
INSERT INTO pushsync.device_rows (holder, tbl, key, hash)
SELECT holder, tbl, key, hash FROM pushsync.device_rows_pending
WHERE holder = %(holder)s AND hash IS NOT NULL;
UPDATE pushsync.device_holdings
SET known = ARRAY(SELECT DISTINCT unnest(known || pending_full)), pending_full = '{}'
WHERE holder = %(holder)s

-- holdings_forget --
-- A watermark the server does not know (or none): nothing is known of what the
-- device holds; every table is sent in full.
DELETE FROM pushsync.device_rows WHERE holder = %(holder)s;
UPDATE pushsync.device_holdings SET known = '{}', pending_full = '{}'
WHERE holder = %(holder)s

-- holdings_discard --
-- Run after promote or forget, or alone when the device came back with the
-- watermark before the last answer: it never applied that answer. Not run
-- when there is nothing pending (holdings_open says).
DELETE FROM pushsync.device_rows_pending WHERE holder = %(holder)s;
UPDATE pushsync.device_holdings SET pending_full = '{}'
WHERE holder = %(holder)s AND pending_full <> '{}'

-- holdings_full --
-- After a full download of the table: what the device holds once it applied it.
-- keys: the rows' keys (JSON text as bytes); hashes: 8 bytes each, in order.
INSERT INTO pushsync.device_rows_pending (holder, tbl, key, hash)
SELECT %(holder)s, to_regclass(%(table)s)::oid, k.key, k.hash
FROM unnest(%(keys)s::bytea[], %(hashes)s::bytea[]) AS k(key, hash);
UPDATE pushsync.device_holdings
SET pending_full = pending_full || to_regclass(%(table)s)::oid
WHERE holder = %(holder)s

-- holdings_answered --
-- In the transaction of the answer: the device holds `confirmed` (or nothing
-- known, NULL) until it comes back with `pending`, the answer's watermark.
UPDATE pushsync.device_holdings
SET confirmed = %(confirmed)s, pending = %(pending)s
WHERE holder = %(holder)s
