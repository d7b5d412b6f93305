-- pushsync base schema, migration 0012: what became of each attempt to send.
--
-- Applied by `pushsync migrate --dsn DSN` after 0011, or by hand:
--     psql -v ON_ERROR_STOP=1 -1 -f sql/0012_attempt_log.sql
-- Running it again changes nothing. Adding the columns rewrites no row.

SELECT pg_advisory_xact_lock(hashtextextended('pushsync.migrate', 0));

-- The last attempts of a notification, oldest first, one JSON object each:
--   at       when the outcome was recorded
--   gateway  the gateway that sent it (sync, mqtt, udp, smtp), which says the
--            kind of address: the SYNC connection, the MQTT subscription, the
--            UDP address, the email address; absent when none sent it
--   outcome  'sent', 'retry' (not sent, tried again at the next resend) or
--            'failed' (cannot be delivered, ever)
--   error    why not (the gateways tried, each with its error), for retry and failed
-- Appended by the statement that records the send or the failure
-- (sql/dispatcher.sql: sent, sent_many, failed), so recording it costs no
-- statement of its own; `attempts` still counts every claim, including one
-- whose dispatcher stopped before recording anything. Archiving carries it
-- into outbox_history.
ALTER TABLE pushsync.outbox
    ADD COLUMN IF NOT EXISTS attempt_log jsonb NOT NULL DEFAULT '[]';
ALTER TABLE pushsync.outbox_history
    ADD COLUMN IF NOT EXISTS attempt_log jsonb NOT NULL DEFAULT '[]';

-- `log` with `attempt` appended, keeping at most the last 16: a row resent
-- every minute for a day stays a few kilobytes. A plain SQL expression, which
-- the planner inlines into the recording statements: STABLE, not IMMUTABLE,
-- because the attempt it is given holds now(), and an IMMUTABLE function
-- whose arguments are not immutable is called instead (a call per row).
CREATE OR REPLACE FUNCTION pushsync.attempt_logged(log jsonb, attempt jsonb) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE WHEN jsonb_array_length(log) >= 16 THEN log - 0 ELSE log END
       || jsonb_build_array(attempt);

INSERT INTO pushsync.schema_version (version, name) VALUES (12, 'attempt_log')
ON CONFLICT (version) DO NOTHING;
