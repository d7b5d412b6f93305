-- Runtime statements of the SYNC gateway's bookkeeping, one named block each.
-- Not a migration: `pushsync migrate` does not run this file.
-- Each statement serves a batch: the requests of many connections that
-- gathered while the previous batch was at the database
-- (pushsync.dispatcher.records, run by pushsync.dispatcher.nodes.PoolStore).
-- %(owner)s is the dispatcher's lease owner. Arrays passed side by side have
-- one element per device, and a device appears once in a batch.

-- secrets --
-- The secrets of the enabled devices among device_ids: SYNC authentication
-- and UDP ack verification. A device not returned is unknown or disabled.
SELECT device_id, secret
FROM pushsync.devices
WHERE device_id = ANY(%(device_ids)s::text[]) AND enabled

-- connected --
-- Devices that subscribed on this dispatcher's SYNC port: device_ids[i] on
-- connection peers[i] since since[i]. Notes each device as seen (which also
-- skips a device removed meanwhile, and holds its row until the commit) and
-- records the connection, replacing a record held elsewhere unless that one is
-- newer (a batch written late must not take back a device that has moved on).
-- Registers this dispatcher too if its first heartbeat has not run yet, so that
-- the others leave these devices' rows to it from this moment. In the same
-- transaction, `due_now` of sql/dispatcher.sql then makes what these devices
-- have not confirmed due now, to go down the new connection
-- (pushsync.dispatcher.nodes). Run unprepared, so that each batch is planned
-- with its array's size: a generic plan guesses ten devices.
WITH node AS (
    INSERT INTO pushsync.dispatchers (owner, host, pid, alive_until)
    VALUES (%(owner)s, %(host)s, %(pid)s, now() + %(alive_for)s::interval)
    ON CONFLICT (owner) DO NOTHING
), seen AS (
    UPDATE pushsync.devices AS d
    SET last_seen_at = now()
    FROM unnest(%(device_ids)s::text[], %(peers)s::text[], %(since)s::timestamptz[])
         AS g(device_id, peer, since)
    WHERE d.device_id = g.device_id
    RETURNING g.device_id, g.peer, g.since
)
INSERT INTO pushsync.sync_connections AS c (device_id, owner, peer, connected_at)
SELECT device_id, %(owner)s, peer, since FROM seen
ON CONFLICT (device_id) DO UPDATE
SET owner = excluded.owner, peer = excluded.peer, connected_at = excluded.connected_at
WHERE c.owner = excluded.owner OR c.connected_at <= excluded.connected_at

-- tracked --
-- The UDP endpoints devices reported over SYNC (addresses[i] for
-- device_ids[i]), as their 'tracking' addresses (a 'manual' one still wins:
-- pushsync.effective_addresses); the devices are noted as seen.
WITH seen AS (
    UPDATE pushsync.devices AS d
    SET last_seen_at = now()
    FROM unnest(%(device_ids)s::text[], %(addresses)s::text[]) AS g(device_id, address)
    WHERE d.device_id = g.device_id
    RETURNING g.device_id, g.address
)
INSERT INTO pushsync.device_addresses (device_id, medium, source, address)
SELECT device_id, 'udp', 'tracking', address FROM seen
ON CONFLICT (device_id, medium, source) DO UPDATE
SET address = excluded.address, active = true, modified_at = now()
WHERE pushsync.device_addresses.address IS DISTINCT FROM excluded.address
   OR NOT pushsync.device_addresses.active

-- disconnected --
-- Connections that ended: only this dispatcher's record of that very
-- connection (device_ids[i] from peers[i]) goes; the device may have
-- connected elsewhere, or again here, since.
DELETE FROM pushsync.sync_connections AS c
USING unnest(%(device_ids)s::text[], %(peers)s::text[]) AS g(device_id, peer)
WHERE c.device_id = g.device_id
  AND c.owner = %(owner)s
  AND c.peer = g.peer
