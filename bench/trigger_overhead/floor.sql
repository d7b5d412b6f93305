-- The floor for the `nobody` rule: what a careful hand-written statement-level
-- trigger doing the same work costs. It captures the inserted rows in a
-- transition table, as the generated trigger does, joins them to the same
-- recipients (bench.watchers, account_id = -new.account_id: nobody), and writes
-- what it finds to the outbox, one coalesced message per device. Nothing more:
-- no SECURITY DEFINER, no pinned settings, no plan per statement size, no
-- check of the device being enabled. JIT is off, as in the generated functions,
-- so that neither side pays for compiling. Applied after schema.sql.

CREATE TABLE bench.orders_floor (LIKE bench.orders_none INCLUDING ALL);

CREATE FUNCTION bench.floor_nobody() RETURNS trigger
LANGUAGE plpgsql
SET jit = off
AS $$
BEGIN
    INSERT INTO pushsync.outbox AS o
        (rule, device_id, subject, content, expires_at, resend_every)
    SELECT DISTINCT ON (w.device_id)
           'nobody_watching', w.device_id, 'sync',
           concat('order ', n.id, ' closed for account ', n.account_id),
           now() + interval '1 hour', interval '5 minutes'
    FROM pushsync_new AS n
    JOIN bench.watchers AS w ON w.account_id = -n.account_id
    ON CONFLICT (rule, device_id) WHERE coalescing AND state = 'pending'
    DO UPDATE SET content = excluded.content, coalesced = o.coalesced + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER floor_nobody
    AFTER INSERT ON bench.orders_floor
    REFERENCING NEW TABLE AS pushsync_new
    FOR EACH STATEMENT EXECUTE FUNCTION bench.floor_nobody();
