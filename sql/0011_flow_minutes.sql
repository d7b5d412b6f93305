-- pushsync base schema, migration 0011: per-minute roll-ups of the finished
-- notifications and synchronizations, so the console's views over long windows
-- (docs/monitor.md) read a few rows per minute instead of every history row.
--
-- Applied by `pushsync migrate --dsn DSN` after 0010, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0011_flow_minutes.sql
-- Running it again changes nothing. The backfill reads outbox_history and
-- sync_sessions once (about a second per million rows on an idle machine).

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- What happened to finished notifications, per minute of the event: written
-- (created_at), sent (the last attempt's sent_at), confirmed (confirmed_at),
-- expired and failed (finished_at), per rule and gateway (the one used, else
-- the one asked for). The same counts monitor_flow takes from the history.
CREATE TABLE IF NOT EXISTS pushsync.flow_minutes (
    minute  timestamptz NOT NULL,
    rule    text NOT NULL,
    gateway text NOT NULL,
    kind    text NOT NULL
            CONSTRAINT flow_minutes_kind
            CHECK (kind IN ('written', 'sent', 'confirmed', 'expired', 'failed')),
    n       bigint NOT NULL,
    PRIMARY KEY (minute, rule, gateway, kind)
);
COMMENT ON TABLE pushsync.flow_minutes IS
    'pushsync: outbox_history counted per minute, kept by triggers on outbox_history';

-- Durations per minute, as counts in fixed log-scale buckets: bucket 0 holds
-- durations under 1 ms, bucket b >= 1 those in [2^((b-1)/4), 2^(b/4)) ms (each
-- bucket 19 % wider than the one before; 127 holds the rest), so a percentile
-- read from them is within 10 % of the exact one. Series:
--   written_to_sent    notifications sent once, at the minute of sent_at
--   sent_to_confirmed  confirmed notifications, at the minute of confirmed_at
--   sync               synchronizations that ended ok, at the minute of finished_at
CREATE TABLE IF NOT EXISTS pushsync.latency_minutes (
    minute timestamptz NOT NULL,
    series text NOT NULL
           CONSTRAINT latency_minutes_series
           CHECK (series IN ('written_to_sent', 'sent_to_confirmed', 'sync')),
    bucket smallint NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (minute, series, bucket)
);
COMMENT ON TABLE pushsync.latency_minutes IS
    'pushsync: durations of outbox_history and sync_sessions per minute, in log-scale buckets';

CREATE OR REPLACE FUNCTION pushsync.latency_bucket(ms float8) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN CASE WHEN ms IS NULL OR ms < 1 THEN 0
            ELSE least(1 + floor(4 * ln(ms) / ln(2.0)), 127) END;

-- The events of one history row, as rows of flow_minutes (n = 1).
CREATE OR REPLACE FUNCTION pushsync.flow_events(h pushsync.outbox_history)
RETURNS TABLE (minute timestamptz, rule text, gateway text, kind text)
LANGUAGE sql STABLE
AS $$
    SELECT date_trunc('minute', e.at), h.rule, coalesce(h.gateway_used, h.gateway), e.kind
    FROM (VALUES ('written', h.created_at),
                 ('sent', h.sent_at),
                 ('confirmed', h.confirmed_at),
                 ('expired', CASE WHEN h.state = 'expired' THEN h.finished_at END),
                 ('failed', CASE WHEN h.state = 'failed' THEN h.finished_at END)) AS e(kind, at)
    WHERE e.at IS NOT NULL
$$;

-- The durations of one history row, as rows of latency_minutes (n = 1).
CREATE OR REPLACE FUNCTION pushsync.latency_events(h pushsync.outbox_history)
RETURNS TABLE (minute timestamptz, series text, bucket smallint)
LANGUAGE sql STABLE
AS $$
    SELECT date_trunc('minute', e.at), e.series,
           pushsync.latency_bucket(extract(epoch FROM e.took)::float8 * 1000)
    FROM (VALUES ('written_to_sent',
                  CASE WHEN h.attempts = 1 THEN h.sent_at END, h.sent_at - h.created_at),
                 ('sent_to_confirmed',
                  CASE WHEN h.sent_at IS NOT NULL THEN h.confirmed_at END,
                  h.confirmed_at - h.sent_at)) AS e(series, at, took)
    WHERE e.at IS NOT NULL
$$;

-- Kept by the statement that archives (dispatcher.sql, archive) or prunes
-- history rows (a pruned minute keeps its key with n = 0), in its transaction: the roll-ups cannot disagree with the
-- history. Keys are written in key order, so two archivers at once wait for
-- each other instead of deadlocking. SECURITY DEFINER: the dispatcher needs
-- no right on the roll-ups.
CREATE OR REPLACE FUNCTION pushsync.outbox_history_rollup() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pushsync.flow_minutes AS f (minute, rule, gateway, kind, n)
        SELECT e.minute, e.rule, e.gateway, e.kind, count(*)
        FROM added AS h CROSS JOIN LATERAL pushsync.flow_events(h) AS e
        GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
        ON CONFLICT (minute, rule, gateway, kind) DO UPDATE SET n = f.n + excluded.n;
        INSERT INTO pushsync.latency_minutes AS l (minute, series, bucket, n)
        SELECT e.minute, e.series, e.bucket, count(*)
        FROM added AS h CROSS JOIN LATERAL pushsync.latency_events(h) AS e
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (minute, series, bucket) DO UPDATE SET n = l.n + excluded.n;
    ELSE
        UPDATE pushsync.flow_minutes AS f SET n = f.n - g.n
        FROM (SELECT e.minute, e.rule, e.gateway, e.kind, count(*) AS n
              FROM removed AS h CROSS JOIN LATERAL pushsync.flow_events(h) AS e
              GROUP BY 1, 2, 3, 4) AS g
        WHERE (f.minute, f.rule, f.gateway, f.kind) = (g.minute, g.rule, g.gateway, g.kind);
        UPDATE pushsync.latency_minutes AS l SET n = l.n - g.n
        FROM (SELECT e.minute, e.series, e.bucket, count(*) AS n
              FROM removed AS h CROSS JOIN LATERAL pushsync.latency_events(h) AS e
              GROUP BY 1, 2, 3) AS g
        WHERE (l.minute, l.series, l.bucket) = (g.minute, g.series, g.bucket);
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pushsync.sync_sessions_rollup() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO pushsync.latency_minutes AS l (minute, series, bucket, n)
        SELECT date_trunc('minute', s.finished_at), 'sync',
               pushsync.latency_bucket(extract(epoch FROM s.finished_at - s.started_at)::float8 * 1000),
               count(*)
        FROM added AS s WHERE s.outcome = 'ok'
        GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
        ON CONFLICT (minute, series, bucket) DO UPDATE SET n = l.n + excluded.n;
    ELSE
        UPDATE pushsync.latency_minutes AS l SET n = l.n - g.n
        FROM (SELECT date_trunc('minute', s.finished_at) AS minute,
                     pushsync.latency_bucket(
                         extract(epoch FROM s.finished_at - s.started_at)::float8 * 1000) AS bucket,
                     count(*) AS n
              FROM removed AS s WHERE s.outcome = 'ok' GROUP BY 1, 2) AS g
        WHERE (l.minute, l.series, l.bucket) = (g.minute, 'sync', g.bucket);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS outbox_history_rollup_insert ON pushsync.outbox_history;
CREATE TRIGGER outbox_history_rollup_insert AFTER INSERT ON pushsync.outbox_history
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION pushsync.outbox_history_rollup();
DROP TRIGGER IF EXISTS outbox_history_rollup_delete ON pushsync.outbox_history;
CREATE TRIGGER outbox_history_rollup_delete AFTER DELETE ON pushsync.outbox_history
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION pushsync.outbox_history_rollup();
DROP TRIGGER IF EXISTS sync_sessions_rollup_insert ON pushsync.sync_sessions;
CREATE TRIGGER sync_sessions_rollup_insert AFTER INSERT ON pushsync.sync_sessions
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION pushsync.sync_sessions_rollup();
DROP TRIGGER IF EXISTS sync_sessions_rollup_delete ON pushsync.sync_sessions;
CREATE TRIGGER sync_sessions_rollup_delete AFTER DELETE ON pushsync.sync_sessions
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION pushsync.sync_sessions_rollup();

-- The backfill: what the history held before the triggers (nothing when run again).
INSERT INTO pushsync.flow_minutes (minute, rule, gateway, kind, n)
SELECT e.minute, e.rule, e.gateway, e.kind, count(*)
FROM pushsync.outbox_history AS h CROSS JOIN LATERAL pushsync.flow_events(h) AS e
WHERE NOT EXISTS (SELECT 1 FROM pushsync.schema_version WHERE version = 11)
GROUP BY 1, 2, 3, 4;
INSERT INTO pushsync.latency_minutes (minute, series, bucket, n)
SELECT e.minute, e.series, e.bucket, count(*)
FROM pushsync.outbox_history AS h CROSS JOIN LATERAL pushsync.latency_events(h) AS e
WHERE NOT EXISTS (SELECT 1 FROM pushsync.schema_version WHERE version = 11)
GROUP BY 1, 2, 3;
INSERT INTO pushsync.latency_minutes (minute, series, bucket, n)
SELECT date_trunc('minute', s.finished_at), 'sync',
       pushsync.latency_bucket(extract(epoch FROM s.finished_at - s.started_at)::float8 * 1000),
       count(*)
FROM pushsync.sync_sessions AS s
WHERE s.outcome = 'ok'
  AND NOT EXISTS (SELECT 1 FROM pushsync.schema_version WHERE version = 11)
GROUP BY 1, 2, 3;

INSERT INTO pushsync.schema_version (version, name) VALUES (11, 'flow_minutes')
ON CONFLICT (version) DO NOTHING;
