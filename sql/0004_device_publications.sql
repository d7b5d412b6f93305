-- pushsync base schema, migration 0004: which publications each device may
-- synchronize, and the upload checks of published tables.
--
-- Applied by `pushsync migrate --dsn DSN` after 0003, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0004_device_publications.sql
-- Running it again changes nothing. docs/sync.md explains the design.
--
-- Upgrading: devices registered before this migration are granted nothing,
-- so they cannot synchronize until a publication is granted to them
-- (`pushsync device grant ID NAME`); see docs/sync.md, "Who may synchronize what".

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- The publications each device may synchronize. A device asking for any
-- other publication is answered as if it did not exist. Not a foreign key to
-- pushsync.publication_tables: a device may be granted a publication before
-- the rules file that defines it is applied.
CREATE TABLE IF NOT EXISTS pushsync.device_publications (
    device_id   text NOT NULL REFERENCES pushsync.devices ON DELETE CASCADE,
    publication text NOT NULL,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, publication)
);

-- The function deciding a published table's `upload_check:` (NULL: none);
-- maintained by the generated migration like the rest of the registry.
ALTER TABLE pushsync.publication_tables ADD COLUMN IF NOT EXISTS upload_check_function text;

INSERT INTO pushsync.schema_version (version, name) VALUES (4, 'device_publications')
ON CONFLICT (version) DO NOTHING;
