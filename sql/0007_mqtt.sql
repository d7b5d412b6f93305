-- pushsync base schema, migration 0007: the MQTT gateway.
--
-- Applied by `pushsync migrate --dsn DSN`, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0007_mqtt.sql
-- Running it again changes nothing.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- A rule (or `pushsync send`) may name the MQTT gateway.
ALTER TABLE pushsync.outbox DROP CONSTRAINT IF EXISTS outbox_gateway;
ALTER TABLE pushsync.outbox ADD CONSTRAINT outbox_gateway
    CHECK (gateway IN ('auto', 'sync', 'mqtt', 'udp', 'smtp'));

-- A device with an MQTT subscription on record: medium 'mqtt', address 'on'.
-- Source 'tracking' is written when the device announces itself on its ack
-- topic (a signed announcement, docs/protocol.md); source 'manual' by
-- `pushsync device set-address ID --mqtt on`. Automatic routing then prefers
-- MQTT to UDP and email for that device.
ALTER TABLE pushsync.device_addresses DROP CONSTRAINT IF EXISTS device_addresses_medium;
ALTER TABLE pushsync.device_addresses ADD CONSTRAINT device_addresses_medium
    CHECK (medium IN ('udp', 'email', 'mqtt'));

INSERT INTO pushsync.schema_version (version, name) VALUES (7, 'mqtt')
ON CONFLICT (version) DO NOTHING;
