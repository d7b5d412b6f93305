-- Runtime queries of the pushsync commands, one named block each.
-- Not a migration: `pushsync migrate` does not run this file.

-- migrate_lock --
SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0))

-- applied_versions --
SELECT version FROM pushsync.schema_version ORDER BY version

-- schema_applied --
-- `pushsync migrate --status`: the base-schema migrations applied, and when.
SELECT version, name, applied_at FROM pushsync.schema_version ORDER BY version

-- rules_applied --
-- The rules and polls of the rules file last applied, and which file that was.
SELECT kind, name, source, source_sha256 FROM pushsync.rules ORDER BY kind, name

-- schema_exists --
SELECT to_regclass('pushsync.schema_version') IS NOT NULL

-- device_insert --
INSERT INTO pushsync.devices (device_id, secret)
VALUES (%(device_id)s, %(secret)s)
ON CONFLICT (device_id) DO NOTHING
RETURNING created_at

-- address_upsert --
INSERT INTO pushsync.device_addresses (device_id, medium, source, address)
VALUES (%(device_id)s, %(medium)s, 'manual', %(address)s)
ON CONFLICT (device_id, medium, source) DO UPDATE
SET address = excluded.address, active = true, modified_at = now()

-- devices_existing --
SELECT device_id FROM pushsync.devices WHERE device_id = ANY(%(devices)s) ORDER BY 1

-- device_set_secret --
-- The old secret is refused from the commit on (trigger device_access_revoked).
UPDATE pushsync.devices SET secret = %(secret)s WHERE device_id = %(device_id)s
RETURNING device_id

-- address_drop --
DELETE FROM pushsync.device_addresses
WHERE device_id = %(device_id)s AND medium = %(medium)s AND source = 'manual'

-- send_push --
-- `pushsync send`: the row a rule would write, for an enabled device only.
INSERT INTO pushsync.outbox
    (rule, device_id, subject, content, gateway, coalescing, expires_at, resend_every)
SELECT %(rule)s, device_id, %(subject)s, %(content)s, %(gateway)s, false,
       now() + %(ttl)s, %(resend_every)s
FROM pushsync.devices WHERE device_id = %(device_id)s AND enabled
RETURNING request_id

-- device_enabled --
SELECT enabled FROM pushsync.devices WHERE device_id = %(device_id)s

-- send_outcome --
SELECT state, gateway_used, attempts, last_error
FROM pushsync.outbox WHERE request_id = %(request_id)s
UNION ALL
SELECT state, gateway_used, attempts, last_error
FROM pushsync.outbox_history WHERE request_id = %(request_id)s

-- device_lock --
-- Grants change under the device's row lock: two changes of one device's
-- grants run one after the other, and a removed device is reported as such.
SELECT device_id FROM pushsync.devices WHERE device_id = %(device_id)s FOR UPDATE

-- publication_grant --
INSERT INTO pushsync.device_publications (device_id, publication)
SELECT %(device_id)s, p FROM unnest(%(publications)s::text[]) AS p
ON CONFLICT (device_id, publication) DO NOTHING

-- publication_revoke --
DELETE FROM pushsync.device_publications
WHERE device_id = %(device_id)s AND publication = ANY (%(publications)s::text[])

-- publications_granted --
SELECT publication FROM pushsync.device_publications
WHERE device_id = %(device_id)s
ORDER BY publication

-- publications_defined --
-- Which of these publications the applied rules define (a grant may come first).
SELECT DISTINCT publication FROM pushsync.publication_tables
WHERE publication = ANY (%(publications)s::text[])

-- device_list --
SELECT d.device_id, d.enabled, d.created_at, d.last_seen_at,
       coalesce(
           jsonb_agg(
               jsonb_build_object(
                   'medium', a.medium, 'address', a.address, 'source', a.source,
                   'active', a.active, 'modified_at', a.modified_at,
                   'effective', e.device_id IS NOT NULL)
               ORDER BY a.medium, a.source)
           FILTER (WHERE a.device_id IS NOT NULL),
           '[]') AS addresses,
       (SELECT c.owner FROM pushsync.sync_connections AS c
        JOIN pushsync.dispatchers AS n ON n.owner = c.owner
        WHERE c.device_id = d.device_id AND n.alive_until > now()) AS connected_to
FROM pushsync.devices AS d
LEFT JOIN pushsync.device_addresses AS a ON a.device_id = d.device_id
LEFT JOIN pushsync.effective_addresses AS e
       ON e.device_id = a.device_id AND e.medium = a.medium AND e.source = a.source
GROUP BY d.device_id
ORDER BY d.device_id

-- table_columns --
SELECT a.attname::text
FROM pg_attribute AS a
WHERE a.attrelid = to_regclass(%(table)s) AND a.attnum > 0 AND NOT a.attisdropped

-- table_kind --
SELECT c.relkind::text
FROM pg_class AS c
WHERE c.oid = to_regclass(%(table)s)

-- primary_key --
-- The table's primary key columns, in key order; no row if it has none.
-- Shared by `pushsync check --dsn` and the synchronizations.
SELECT a.attname::text
FROM pg_index AS i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = to_regclass(%(table)s) AND i.indisprimary
ORDER BY k.ord

-- status_states --
SELECT state, count(*) FROM pushsync.outbox GROUP BY state ORDER BY state

-- status_oldest_unsent --
SELECT extract(epoch FROM now() - min(created_at))::float8
FROM pushsync.outbox
WHERE state IN ('pending', 'sending')

-- status_gateways --
SELECT gateway_used, state, count(*)
FROM (
    SELECT gateway_used, state FROM pushsync.outbox
    WHERE gateway_used IS NOT NULL AND state IN ('sent', 'confirmed', 'expired', 'failed')
    UNION ALL
    SELECT gateway_used, state FROM pushsync.outbox_history
    WHERE gateway_used IS NOT NULL AND finished_at > now() - interval '24 hours'
) AS finished
GROUP BY gateway_used, state
ORDER BY gateway_used, state

-- status_history --
SELECT state, count(*) FROM pushsync.outbox_history
WHERE finished_at > now() - interval '24 hours'
GROUP BY state ORDER BY state

-- status_dispatchers --
SELECT owner, host, pid, sync_address, udp_address, started_at,
       extract(epoch FROM now() - heartbeat_at)::float8 AS heartbeat_age,
       alive_until > now() AS alive,
       (SELECT count(*) FROM pushsync.sync_connections AS c WHERE c.owner = d.owner) AS devices
FROM pushsync.dispatchers AS d
ORDER BY started_at, owner

-- status_connected --
SELECT count(*)
FROM pushsync.sync_connections AS c
JOIN pushsync.dispatchers AS d ON d.owner = c.owner
WHERE d.alive_until > now()

-- device_set_enabled --
-- Disabling is seen by every dispatcher at once (trigger device_access_revoked).
UPDATE pushsync.devices SET enabled = %(enabled)s WHERE device_id = %(device_id)s
RETURNING device_id

-- device_remove --
-- Its addresses, grants, upload records and unfinished notifications go with
-- it (ON DELETE CASCADE); the outbox history keeps what was sent.
DELETE FROM pushsync.devices WHERE device_id = %(device_id)s
RETURNING device_id
