-- pushsync base schema, migration 0010: publications whose uploads are all or nothing.
--
-- Applied by `pushsync migrate --dsn DSN` after 0009, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0010_atomic_upload.sql
-- Running it again changes nothing. docs/sync.md ("Atomic uploads") explains it.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- The publication's `upload:` (the same on each of its tables' rows): `rows`,
-- each row of a batch applied or refused on its own; `atomic`, every batch of
-- one upload applied in one transaction, or nothing of it.
ALTER TABLE pushsync.publication_tables
    ADD COLUMN IF NOT EXISTS upload_mode text NOT NULL DEFAULT 'rows';
DO $pushsync$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'publication_tables_upload_mode'
                     AND conrelid = 'pushsync.publication_tables'::regclass) THEN
        ALTER TABLE pushsync.publication_tables
            ADD CONSTRAINT publication_tables_upload_mode
            CHECK (upload_mode IN ('rows', 'atomic'));
    END IF;
END
$pushsync$;

INSERT INTO pushsync.schema_version (version, name) VALUES (10, 'atomic_upload')
ON CONFLICT (version) DO NOTHING;
