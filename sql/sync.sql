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

-- publications_granted --
-- The device's publications that the applied rules define. A publication
-- neither granted nor defined is refused with one answer for both, so a
-- device learns nothing about what else the server publishes.
SELECT g.publication
FROM pushsync.device_publications AS g
WHERE g.device_id = %(device)s
  AND EXISTS (SELECT 1 FROM pushsync.publication_tables AS p
              WHERE p.publication = g.publication)
ORDER BY 1

-- publication_tables --
-- In download order.
SELECT table_name, key_columns, upload, conflict, newest_column,
       download_function, depends_on, upload_check_function
FROM pushsync.publication_tables
WHERE publication = %(publication)s
ORDER BY position

-- publication_atomic --
-- Whether the publication's uploads are all or nothing (`upload: atomic`).
SELECT coalesce(bool_or(upload_mode = 'atomic'), false)
FROM pushsync.publication_tables
WHERE publication = %(publication)s

-- table_columns --
-- Name and format_type() of each column, in the table's order: what a device's
-- local table is created from, and compared with.
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute AS a
WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum

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
-- the same transaction, from the same snapshot as the rows sent.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ

-- download_snapshot --
SELECT pg_current_snapshot()::text

-- watermark_usable --
-- Whether the change log still holds every change since the watermark; if not,
-- every table is downloaded in full.
SELECT pg_snapshot_xmin(%(watermark)s::pg_snapshot) >= h.pruned_below
FROM pushsync.changes_horizon AS h

-- tables_changed_each --
-- For each published table: whether a table it reads (itself or another)
-- changed since the watermark, and whether one of the others did. One
-- statement for the whole publication.
SELECT t.name,
       EXISTS (SELECT 1 FROM pushsync.changes AS c
               WHERE c.table_name = ANY (t.reads)
                 AND c.xid >= pg_snapshot_xmin(%(since)s::pg_snapshot)
                 AND NOT pg_visible_in_snapshot(c.xid, %(since)s::pg_snapshot)),
       EXISTS (SELECT 1 FROM pushsync.changes AS c
               WHERE c.table_name = ANY (t.depends)
                 AND c.xid >= pg_snapshot_xmin(%(since)s::pg_snapshot)
                 AND NOT pg_visible_in_snapshot(c.xid, %(since)s::pg_snapshot))
FROM jsonb_to_recordset(%(tables)s::jsonb) AS t(name text, reads text[], depends text[])

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

-- holdings_lock --
-- The device's holdings of the publication (created empty the first time),
-- locked: a second synchronization of the device (another dispatcher) waits
-- until this one commits, then fails rather than answer from stale holdings.
INSERT INTO pushsync.device_holdings AS h (device_id, publication)
VALUES (%(device)s, %(publication)s)
ON CONFLICT (device_id, publication) DO UPDATE SET device_id = excluded.device_id
RETURNING h.holder, h.confirmed, h.pending

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
-- watermark before the last answer: it never applied that answer.
DELETE FROM pushsync.device_rows_pending WHERE holder = %(holder)s;
UPDATE pushsync.device_holdings SET pending_full = '{}'
WHERE holder = %(holder)s AND pending_full <> '{}'

-- holdings_known --
-- The tables whose rows on the device are known.
SELECT n.oid::regclass::text
FROM pushsync.device_holdings AS h CROSS JOIN LATERAL unnest(h.known) AS n(oid)
WHERE h.holder = %(holder)s

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
