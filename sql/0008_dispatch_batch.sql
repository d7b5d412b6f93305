-- pushsync base schema, migration 0008: the claim reads due rows in its own order.
--
-- Applied by `pushsync migrate --dsn DSN`, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0008_dispatch_batch.sql
-- Running it again changes nothing.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- The claim (sql/dispatcher.sql) takes due rows high priority first, then by
-- next_attempt_at, LIMIT one batch. On outbox_due (next_attempt_at alone) it
-- read and sorted every unfinished row for each batch: a backlog of 20,000
-- rows cost a sort of 20,000 rows per claim of 500. In this order an index
-- scan stops after the batch. It replaces outbox_due, which served nothing else.
CREATE INDEX IF NOT EXISTS outbox_claim
    ON pushsync.outbox ((CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END),
                        next_attempt_at)
    WHERE state IN ('pending', 'sending', 'sent');
DROP INDEX IF EXISTS pushsync.outbox_due;

INSERT INTO pushsync.schema_version (version, name) VALUES (8, 'dispatch_batch')
ON CONFLICT (version) DO NOTHING;
