-- Statements of the MQTT gateway (dispatcher/mqtt.py), one named block each.

-- mqtt_announced --
-- A device announced, signed and fresh, that it listens on its MQTT topic: its
-- 'tracking' record for medium 'mqtt' (a 'manual' one still decides, as for
-- UDP). Only an enabled device; an unchanged record is not rewritten.
WITH seen AS (
    UPDATE pushsync.devices SET last_seen_at = now()
    WHERE device_id = %(device_id)s AND enabled
    RETURNING device_id
)
INSERT INTO pushsync.device_addresses (device_id, medium, source, address)
SELECT device_id, 'mqtt', 'tracking', 'on' FROM seen
ON CONFLICT (device_id, medium, source) DO UPDATE
SET address = excluded.address, active = true, modified_at = now()
WHERE pushsync.device_addresses.address IS DISTINCT FROM excluded.address
   OR NOT pushsync.device_addresses.active
