-- pushsync base schema, migration 0005: dispatchers hear at once when a device loses access.
--
-- Applied by `pushsync migrate --dsn DSN` after 0004, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0005_device_changes.sql
-- Running it again changes nothing.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- A device disabled, given a new secret, renamed or removed: every dispatcher
-- LISTENs on channel pushsync_devices and, on commit, closes that device's
-- SYNC connections and forgets its secret (docs/security.md). The payload is
-- the device id it had. Not SECURITY DEFINER: it runs as whoever changed the
-- device, and NOTIFY needs no privilege.
CREATE OR REPLACE FUNCTION pushsync.device_access_changed() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('pushsync_devices', OLD.device_id);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS device_access_revoked ON pushsync.devices;
CREATE TRIGGER device_access_revoked
AFTER UPDATE OF enabled, secret, device_id ON pushsync.devices
FOR EACH ROW
WHEN (OLD.enabled AND NOT NEW.enabled
      OR OLD.secret IS DISTINCT FROM NEW.secret
      OR OLD.device_id IS DISTINCT FROM NEW.device_id)
EXECUTE FUNCTION pushsync.device_access_changed();

DROP TRIGGER IF EXISTS device_removed ON pushsync.devices;
CREATE TRIGGER device_removed
AFTER DELETE ON pushsync.devices
FOR EACH ROW
EXECUTE FUNCTION pushsync.device_access_changed();

INSERT INTO pushsync.schema_version (version, name) VALUES (5, 'device_changes')
ON CONFLICT (version) DO NOTHING;
