-- pushsync base schema, migration 0003: synchronization (publications, change capture, uploads).
--
-- Applied by `pushsync migrate --dsn DSN` after 0002, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0003_sync.sql
-- Running it again changes nothing. docs/sync.md explains the design.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- The tables of each publication, as the rules file's `publications:` say;
-- maintained by the generated migration.
CREATE TABLE IF NOT EXISTS pushsync.publication_tables (
    publication       text NOT NULL,
    position          integer NOT NULL,
    table_name        text NOT NULL,
    key_columns       text[] NOT NULL,
    upload            text[] NOT NULL,
    conflict          text NOT NULL
                      CONSTRAINT publication_tables_conflict
                      CHECK (conflict IN ('server_wins', 'client_wins', 'newest')),
    newest_column     text,
    download_function text NOT NULL,
    depends_on        text[] NOT NULL,
    PRIMARY KEY (publication, table_name)
);

-- Which rows of published tables (and which tables a download depends on)
-- changed, and in which transaction. A sync sends the device the rows whose
-- change is visible in its snapshot but was not in the snapshot of the
-- device's last sync (its watermark); key NULL means "this table changed":
-- the downloads that depend on it are sent in full.
CREATE TABLE IF NOT EXISTS pushsync.changes (
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    table_name text NOT NULL,
    key        jsonb,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS changes_by_table ON pushsync.changes (table_name, xid);
CREATE INDEX IF NOT EXISTS changes_age ON pushsync.changes (changed_at);

-- Changes older than the retention are deleted by the dispatcher; a device
-- whose watermark is older than what was deleted gets a full download.
CREATE TABLE IF NOT EXISTS pushsync.changes_horizon (
    singleton    boolean PRIMARY KEY DEFAULT true CONSTRAINT changes_horizon_one CHECK (singleton),
    pruned_below xid8 NOT NULL
);
INSERT INTO pushsync.changes_horizon (pruned_below) VALUES ('0'::xid8)
ON CONFLICT (singleton) DO NOTHING;

-- Upload batches applied, per device: a batch sent again (the device did not
-- hear the answer) is answered from here and not applied twice.
CREATE TABLE IF NOT EXISTS pushsync.sync_uploads (
    device_id  text NOT NULL REFERENCES pushsync.devices ON DELETE CASCADE,
    batch      text NOT NULL,
    result     jsonb NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, batch)
);
CREATE INDEX IF NOT EXISTS sync_uploads_age ON pushsync.sync_uploads (applied_at);

-- The trigger function of change capture, shared by every captured table.
-- Arguments: the table's name, then its key columns (none: record only that
-- the table changed). Statement-level, over the transition tables.
CREATE OR REPLACE FUNCTION pushsync.capture_changes() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keys text[] := TG_ARGV[1:];
BEGIN
    IF cardinality(keys) = 0 THEN
        INSERT INTO pushsync.changes (table_name, key) VALUES (TG_ARGV[0], NULL);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO pushsync.changes (table_name, key)
        SELECT DISTINCT TG_ARGV[0], (SELECT jsonb_object_agg(k, r.j -> k) FROM unnest(keys) AS k)
        FROM (SELECT to_jsonb(n) AS j FROM pushsync_new AS n) AS r;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO pushsync.changes (table_name, key)
        SELECT DISTINCT TG_ARGV[0], (SELECT jsonb_object_agg(k, r.j -> k) FROM unnest(keys) AS k)
        FROM (SELECT to_jsonb(n) AS j FROM pushsync_new AS n
              UNION ALL
              SELECT to_jsonb(o) FROM pushsync_old AS o) AS r;
    ELSE
        INSERT INTO pushsync.changes (table_name, key)
        SELECT DISTINCT TG_ARGV[0], (SELECT jsonb_object_agg(k, r.j -> k) FROM unnest(keys) AS k)
        FROM (SELECT to_jsonb(o) AS j FROM pushsync_old AS o) AS r;
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION pushsync.capture_changes() FROM PUBLIC;

-- (Re)install change capture on a table: key_columns NULL records only that
-- the table changed; an empty array means its primary key.
CREATE OR REPLACE FUNCTION pushsync.capture(tbl regclass, key_columns text[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    columns text[] := key_columns;
    args text;
    event text;
BEGIN
    IF columns IS NOT NULL AND cardinality(columns) = 0 THEN
        SELECT array_agg(a.attname::text ORDER BY k.ord) INTO columns
        FROM pg_index AS i
        CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
        JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
        WHERE i.indrelid = tbl AND i.indisprimary;
        IF columns IS NULL THEN
            RAISE EXCEPTION 'pushsync: published table % has no primary key', tbl
                USING HINT = 'give the publication table a key: [column, ...]';
        END IF;
    END IF;
    SELECT string_agg(quote_literal(a), ', ')
    INTO args
    FROM unnest(ARRAY[tbl::text] || coalesce(columns, ARRAY[]::text[])) AS a;
    FOREACH event IN ARRAY ARRAY['insert', 'update', 'delete'] LOOP
        EXECUTE format(
            'CREATE OR REPLACE TRIGGER %I AFTER %s ON %s REFERENCING %s '
            'FOR EACH STATEMENT EXECUTE FUNCTION pushsync.capture_changes(%s)',
            'pushsync_capture_' || event, upper(event), tbl,
            CASE event
                WHEN 'insert' THEN 'NEW TABLE AS pushsync_new'
                WHEN 'update' THEN 'OLD TABLE AS pushsync_old NEW TABLE AS pushsync_new'
                ELSE 'OLD TABLE AS pushsync_old'
            END,
            args);
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pushsync.capture(regclass, text[]) FROM PUBLIC;

-- Remove change capture from every table except `keep`.
CREATE OR REPLACE FUNCTION pushsync.uncapture_except(keep regclass[])
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    stale record;
BEGIN
    FOR stale IN
        SELECT t.tgname, t.tgrelid::regclass AS tbl
        FROM pg_trigger AS t
        WHERE t.tgfoid = 'pushsync.capture_changes()'::regprocedure
          AND t.tgrelid <> ALL (keep)
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', stale.tgname, stale.tbl);
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION pushsync.uncapture_except(regclass[]) FROM PUBLIC;

INSERT INTO pushsync.schema_version (version, name) VALUES (3, 'sync')
ON CONFLICT (version) DO NOTHING;
