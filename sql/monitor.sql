-- The read-only queries of `pushsync monitor`, the operator's console, one
-- named block each. Not a migration. Run by pushsync.monitor.data on
-- read-only connections; every parameter is bound, and every query is bounded:
-- by a time window over an index (outbox_history_finished,
-- outbox_history_device, sync_sessions_finished, sync_sessions_device), by a
-- primary key, or by a LIMIT. The hot outbox is read whole: it holds only
-- unfinished work and what finished in the last seconds (docs/operations.md).
-- bench/monitor_queries times each at 1,000,000 history rows.

-- monitor_pulse --
-- What the live updates watch, twice a second: when any of these moves, the
-- console fetches its view again. Aggregates over indexes and the small
-- tables only.
SELECT now() AS now,
       (SELECT count(*) FROM pushsync.devices) AS devices,
       (SELECT count(*) FROM pushsync.devices WHERE enabled) AS enabled,
       (SELECT count(*) FROM pushsync.sync_connections) AS connected,
       (SELECT coalesce(json_object_agg(state, n), '{}')
        FROM (SELECT state, count(*) AS n FROM pushsync.outbox GROUP BY state) AS s) AS outbox,
       (SELECT max(finished_at) FROM pushsync.outbox_history) AS history_last,
       (SELECT max(finished_at) FROM pushsync.sync_sessions) AS sync_last,
       (SELECT max(greatest(created_at, sent_at, confirmed_at)) FROM pushsync.outbox)
           AS outbox_last,
       (SELECT max(connected_at) FROM pushsync.sync_connections) AS connected_last,
       (SELECT count(*) FROM pushsync.dispatchers WHERE alive_until > now()) AS dispatchers

-- monitor_fleet --
-- One page of devices in id order (keyset: after the last id of the previous
-- page), matching a search and a filter; the page is chosen first (the
-- primary key's order, at most `limit` rows), then per device of the page:
-- its connection, addresses, last synchronization (sync_sessions_device),
-- unfinished messages (outbox_device) and finished ones since `since`
-- (outbox_history_device). The secret is never selected.
WITH page AS MATERIALIZED (
    SELECT d.device_id, d.enabled, d.created_at, d.last_seen_at,
           c.owner AS dispatcher, c.peer, c.connected_at
    FROM pushsync.devices AS d
    LEFT JOIN pushsync.sync_connections AS c ON c.device_id = d.device_id
    WHERE d.device_id > %(after)s
      AND (%(search)s = '' OR strpos(lower(d.device_id), lower(%(search)s)) > 0)
      AND CASE %(show)s
              WHEN 'connected' THEN c.device_id IS NOT NULL
              WHEN 'disconnected' THEN c.device_id IS NULL
              WHEN 'disabled' THEN NOT d.enabled
              ELSE true
          END
    ORDER BY d.device_id
    LIMIT %(limit)s
)
SELECT p.*,
       (SELECT coalesce(json_agg(json_build_object(
                   'medium', a.medium, 'source', a.source, 'address', a.address,
                   'active', a.active) ORDER BY a.medium, a.source), '[]')
        FROM pushsync.device_addresses AS a WHERE a.device_id = p.device_id) AS addresses,
       (SELECT json_build_object(
                   'finished_at', s.finished_at, 'outcome', s.outcome,
                   'upload_rows', s.upload_rows, 'download_rows', s.download_rows)
        FROM pushsync.sync_sessions AS s WHERE s.device_id = p.device_id
        ORDER BY s.finished_at DESC LIMIT 1) AS last_sync,
       o.pending, o.sent,
       h.confirmed, h.expired, h.failed
FROM page AS p
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE x.state IN ('pending', 'sending')) AS pending,
           count(*) FILTER (WHERE x.state = 'sent') AS sent
    FROM pushsync.outbox AS x WHERE x.device_id = p.device_id) AS o
CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE y.state = 'confirmed') AS confirmed,
           count(*) FILTER (WHERE y.state = 'expired') AS expired,
           count(*) FILTER (WHERE y.state = 'failed') AS failed
    FROM pushsync.outbox_history AS y
    WHERE y.device_id = p.device_id AND y.finished_at >= %(since)s) AS h
ORDER BY p.device_id

-- monitor_flow --
-- Notifications written, sent (last attempt), confirmed, expired and failed
-- per bucket of `step` ('second' or 'minute') since `since`, per rule and
-- gateway: finished rows from the history (finished_at >= since: whatever
-- happened to a row in the window, it finished after the window began), the
-- rest from the outbox.
WITH recent AS (
    SELECT h.rule, coalesce(h.gateway_used, h.gateway) AS gateway, h.state,
           h.created_at, h.sent_at, h.confirmed_at, h.finished_at AS ended
    FROM pushsync.outbox_history AS h
    WHERE h.finished_at >= %(since)s
    UNION ALL
    SELECT o.rule, coalesce(o.gateway_used, o.gateway), o.state,
           o.created_at, o.sent_at, o.confirmed_at,
           CASE o.state WHEN 'expired' THEN o.expires_at
                        WHEN 'failed' THEN coalesce(o.sent_at, o.created_at) END
    FROM pushsync.outbox AS o
)
SELECT date_trunc(%(step)s, e.at) AS bucket, r.rule, r.gateway, e.kind, count(*) AS n
FROM recent AS r
CROSS JOIN LATERAL (VALUES
    ('written', r.created_at),
    ('sent', r.sent_at),
    ('confirmed', r.confirmed_at),
    ('expired', CASE WHEN r.state = 'expired' THEN r.ended END),
    ('failed', CASE WHEN r.state = 'failed' THEN r.ended END)) AS e(kind, at)
WHERE e.at >= %(since)s
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4

-- monitor_latency --
-- Three series of durations in milliseconds since `since`: written -> sent
-- (messages sent once: a resend's sent_at is the resend's), sent ->
-- confirmed, and synchronizations that ended ok. Per series: how many,
-- p50/p95/p99, the largest, and a histogram over the upper bounds `bounds`
-- (width_bucket: bucket i counts values in [bounds[i], bounds[i+1])).
WITH rows_ AS (
    SELECT h.created_at, h.sent_at, h.confirmed_at, h.attempts
    FROM pushsync.outbox_history AS h
    WHERE h.finished_at >= %(since)s
    UNION ALL
    SELECT o.created_at, o.sent_at, o.confirmed_at, o.attempts
    FROM pushsync.outbox AS o
    WHERE o.sent_at >= %(since)s
), samples AS (
    SELECT 'written_to_sent' AS series,
           extract(epoch FROM r.sent_at - r.created_at) * 1000 AS ms
    FROM rows_ AS r
    WHERE r.attempts = 1 AND r.sent_at >= %(since)s
    UNION ALL
    SELECT 'sent_to_confirmed', extract(epoch FROM r.confirmed_at - r.sent_at) * 1000
    FROM rows_ AS r
    WHERE r.confirmed_at >= %(since)s AND r.sent_at IS NOT NULL
    UNION ALL
    SELECT 'sync', extract(epoch FROM s.finished_at - s.started_at) * 1000
    FROM pushsync.sync_sessions AS s
    WHERE s.finished_at >= %(since)s AND s.outcome = 'ok'
), buckets AS (
    SELECT series, width_bucket(ms::float8, %(bounds)s::float8[]) AS b, count(*) AS n
    FROM samples GROUP BY 1, 2
)
SELECT s.series, count(*) AS n,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY s.ms) AS pct,
       max(s.ms) AS most,
       (SELECT json_object_agg(b.b, b.n) FROM buckets AS b WHERE b.series = s.series)
           AS histogram
FROM samples AS s
GROUP BY s.series

-- monitor_timeline_pushes --
-- Pushes alive in [since, until] (written before until, finished after since),
-- of devices whose id contains `search`; at most `limit`, the latest first.
-- The history's side is bounded by finished_at in [since, until + 1 day].
(SELECT h.request_id, h.device_id, h.rule, h.subject, h.content, h.state,
        coalesce(h.gateway_used, h.gateway) AS gateway, h.attempts,
        h.created_at, h.sent_at, h.confirmed_at, h.finished_at
 FROM pushsync.outbox_history AS h
 WHERE h.finished_at >= %(since)s AND h.finished_at < %(until)s + interval '1 day'
   AND h.created_at <= %(until)s
   AND (%(search)s = '' OR strpos(lower(h.device_id), lower(%(search)s)) > 0)
 ORDER BY h.finished_at DESC
 LIMIT %(limit)s)
UNION ALL
(SELECT o.request_id, o.device_id, o.rule, o.subject, o.content, o.state,
        coalesce(o.gateway_used, o.gateway), o.attempts,
        o.created_at, o.sent_at, o.confirmed_at, NULL
 FROM pushsync.outbox AS o
 WHERE o.created_at <= %(until)s
   AND (%(search)s = '' OR strpos(lower(o.device_id), lower(%(search)s)) > 0)
 ORDER BY o.created_at DESC
 LIMIT %(limit)s)

-- monitor_timeline_syncs --
-- Synchronizations overlapping [since, until], bounded like the pushes.
SELECT s.session_id, s.device_id, s.publication, s.started_at, s.finished_at,
       s.upload_rows, s.download_rows, s.conflicts, s.outcome, s.error
FROM pushsync.sync_sessions AS s
WHERE s.finished_at >= %(since)s AND s.finished_at < %(until)s + interval '1 day'
  AND s.started_at <= %(until)s
  AND (%(search)s = '' OR strpos(lower(s.device_id), lower(%(search)s)) > 0)
ORDER BY s.finished_at DESC
LIMIT %(limit)s

-- monitor_request --
-- One request, in the outbox or its history (primary keys), with its rule and
-- its last attempts (attempt_log: at most 16, oldest first; `attempts` counts
-- them all, including any whose outcome was never recorded).
SELECT m.*, r.kind AS rule_kind, r.table_name AS rule_table, r.events AS rule_events,
       r.ttl AS rule_ttl, r.resend_every AS rule_resend_every, r.source AS rule_source
FROM (
    SELECT 'outbox' AS place, o.request_id, o.rule, o.device_id, o.subject, o.content,
           o.priority, o.gateway, o.coalesced, o.created_at, o.expires_at, o.attempts,
           o.state, o.sent_at, o.gateway_used, o.confirmed_at, o.last_error,
           o.next_attempt_at, o.lease_owner, NULL::timestamptz AS finished_at,
           o.attempt_log
    FROM pushsync.outbox AS o WHERE o.request_id = %(request_id)s
    UNION ALL
    SELECT 'history', h.request_id, h.rule, h.device_id, h.subject, h.content,
           h.priority, h.gateway, h.coalesced, h.created_at, h.expires_at, h.attempts,
           h.state, h.sent_at, h.gateway_used, h.confirmed_at, h.last_error,
           NULL, NULL, h.finished_at, h.attempt_log
    FROM pushsync.outbox_history AS h WHERE h.request_id = %(request_id)s
) AS m
LEFT JOIN pushsync.rules AS r ON r.name = m.rule
LIMIT 1

-- monitor_request_syncs --
-- The device's synchronizations that ended after the request was written:
-- what the push made the device do (sync_sessions_device).
SELECT s.session_id, s.publication, s.started_at, s.finished_at, s.upload_rows,
       s.download_rows, s.conflicts, s.outcome, s.error
FROM pushsync.sync_sessions AS s
WHERE s.device_id = %(device)s AND s.finished_at >= %(since)s
ORDER BY s.finished_at
LIMIT 10

-- monitor_flow_minutes --
-- monitor_flow for windows longer than 15 minutes, per bucket of `seconds`
-- (60 or a multiple: at most 360 buckets a window): the finished
-- notifications' counts from the roll-up pushsync.flow_minutes (a few rows per
-- minute, its primary key's range from the minute of `since`, which counts
-- whole), the unfinished ones from the outbox as in monitor_flow.
SELECT date_bin(make_interval(secs => %(seconds)s), c.bucket, timestamptz '2000-01-01 00:00Z')
           AS bucket,
       c.rule, c.gateway, c.kind, sum(c.n)::bigint AS n
FROM (
    SELECT f.minute AS bucket, f.rule, f.gateway, f.kind, f.n
    FROM pushsync.flow_minutes AS f
    WHERE f.minute >= date_trunc('minute', %(since)s::timestamptz) AND f.n > 0
    UNION ALL
    SELECT date_trunc('minute', e.at), o.rule, coalesce(o.gateway_used, o.gateway), e.kind, 1
    FROM pushsync.outbox AS o
    CROSS JOIN LATERAL (VALUES
        ('written', o.created_at),
        ('sent', o.sent_at),
        ('confirmed', o.confirmed_at),
        ('expired', CASE WHEN o.state = 'expired' THEN o.expires_at END),
        ('failed', CASE WHEN o.state = 'failed' THEN coalesce(o.sent_at, o.created_at) END))
        AS e(kind, at)
    WHERE e.at >= %(since)s
) AS c
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4

-- monitor_latency_minutes --
-- monitor_latency for windows longer than 15 minutes: per series, the counts
-- in pushsync.latency_bucket's log-scale buckets since the minute of `since`,
-- from the roll-up pushsync.latency_minutes (finished notifications and
-- synchronizations) and from the outbox's rows (unfinished ones). The
-- percentiles are estimated from them (pushsync.monitor.data).
SELECT c.series, c.bucket, sum(c.n)::bigint AS n
FROM (
    SELECT l.series, l.bucket, l.n
    FROM pushsync.latency_minutes AS l
    WHERE l.minute >= date_trunc('minute', %(since)s::timestamptz) AND l.n > 0
    UNION ALL
    SELECT e.series, pushsync.latency_bucket(extract(epoch FROM e.took)::float8 * 1000), 1
    FROM pushsync.outbox AS o
    CROSS JOIN LATERAL (VALUES
        ('written_to_sent', CASE WHEN o.attempts = 1 THEN o.sent_at END, o.sent_at - o.created_at),
        ('sent_to_confirmed', CASE WHEN o.sent_at IS NOT NULL THEN o.confirmed_at END,
         o.confirmed_at - o.sent_at)) AS e(series, at, took)
    WHERE e.at >= %(since)s
) AS c
GROUP BY 1, 2
ORDER BY 1, 2
