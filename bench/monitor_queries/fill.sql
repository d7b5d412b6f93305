-- The benchmark's fleet and its past, written by PostgreSQL itself.
-- Parameters: %(devices)s devices, %(history)s finished notifications spread over
-- the last 30 days (denser in the last hour, as a live system's are), a fifth as
-- many synchronizations, and a few unfinished rows in the outbox. Rows go in
-- in time order, as the dispatcher archives and records them.
INSERT INTO pushsync.devices (device_id, secret, last_seen_at)
SELECT format('truck-%%s', n), decode(md5(n::text), 'hex') || decode(md5(n::text), 'hex'),
       now() - random() * interval '1 day'
FROM generate_series(1, %(devices)s) AS n;

INSERT INTO pushsync.device_addresses (device_id, medium, source, address)
SELECT format('truck-%%s', n), 'udp', 'tracking', format('10.0.%%s.%%s:5001', n / 250, n %% 250)
FROM generate_series(1, %(devices)s) AS n;

INSERT INTO pushsync.sync_connections (device_id, owner, peer)
SELECT format('truck-%%s', n), 'node-' || (n %% 3), format('10.0.%%s.%%s:40000', n / 250, n %% 250)
FROM generate_series(1, %(devices)s, 2) AS n;

INSERT INTO pushsync.rules (name, kind, table_name, events, gateway, priority, ttl, resend_every,
                            coalescing, source, source_sha256)
SELECT r, 'rule', 'public.routes', ARRAY['update'], 'auto', 'normal', interval '1 hour',
       interval '5 minutes', true, 'rules.yaml', repeat('0', 64)
FROM unnest(ARRAY['route_disruption', 'route_changed', 'catalog_refresh']) AS r;

-- 1 in 100 rows in the last hour, the rest over 30 days.
INSERT INTO pushsync.outbox_history (
    request_id, rule, device_id, subject, content, priority, gateway, coalesced, created_at,
    expires_at, attempts, state, sent_at, gateway_used, confirmed_at, finished_at)
SELECT gen_random_uuid(),
       (ARRAY['route_disruption', 'route_changed', 'catalog_refresh'])[1 + n %% 3],
       format('truck-%%s', 1 + (n * 7919) %% %(devices)s),
       'sync', 'disruption ' || n, 'normal', 'auto', 0,
       t.created, t.created + interval '1 hour', 1 + (n %% 17 = 0)::int,
       CASE WHEN n %% 50 = 0 THEN 'expired' WHEN n %% 211 = 0 THEN 'failed' ELSE 'confirmed' END,
       t.created + interval '3 ms' * (1 + n %% 40),
       (ARRAY['sync', 'udp', 'smtp'])[1 + n %% 3],
       CASE WHEN n %% 50 = 0 OR n %% 211 = 0 THEN NULL
            ELSE t.created + interval '3 ms' * (1 + n %% 40) + interval '1 ms' * (5 + n %% 200) END,
       t.created + interval '1 second' * (1 + n %% 5)
FROM generate_series(1::bigint, %(history)s) AS n
CROSS JOIN LATERAL (
    SELECT now() - CASE WHEN n %% 100 = 0 THEN random() * interval '1 hour'
                        ELSE random() * interval '30 days' END AS created) AS t
ORDER BY t.created;

INSERT INTO pushsync.sync_sessions (device_id, publication, started_at, finished_at,
                                    upload_rows, download_rows, conflicts, outcome)
SELECT format('truck-%%s', 1 + (n * 104729) %% %(devices)s), 'driver', t.started,
       t.started + interval '1 ms' * (20 + n %% 900), n %% 7, n %% 31, (n %% 97 = 0)::int,
       CASE WHEN n %% 400 = 0 THEN 'failed' ELSE 'ok' END
FROM generate_series(1::bigint, %(history)s / 5) AS n
CROSS JOIN LATERAL (
    SELECT now() - CASE WHEN n %% 100 = 0 THEN random() * interval '1 hour'
                        ELSE random() * interval '30 days' END AS started) AS t
ORDER BY t.started;

INSERT INTO pushsync.outbox (rule, device_id, subject, content, coalescing, created_at,
                             expires_at, resend_every, state, sent_at, attempts)
SELECT 'route_changed', format('truck-%%s', 1 + (n * 31) %% %(devices)s), 'sync', 'in flight',
       false, now() - interval '1 second' * n, now() + interval '1 hour', interval '5 minutes',
       CASE WHEN n %% 2 = 0 THEN 'sent' ELSE 'pending' END,
       CASE WHEN n %% 2 = 0 THEN now() - interval '1 second' * n / 2 END, (n %% 2)
FROM generate_series(1, greatest(%(history)s / 500, 10)) AS n;
