-- Runtime queries of the dispatcher's outbox relay, one named block each.
-- Not a migration: `pushsync migrate` does not run this file.
-- Run by pushsync.dispatcher.outbox.OutboxStore (the polls' blocks by
-- pushsync.dispatcher.polls), on the dispatcher's connection or its pool.
-- Every block is one statement; %(owner)s is the dispatcher's lease owner.

-- claim --
-- Due rows, high priority first, then oldest due. A row leaves 'pending' here,
-- in the claiming statement, so a change committed later gets its own row
-- instead of being folded into one already on its way (docs/schema.md).
-- A 'sending' row is due again only once its lease has run out: the claim sets
-- next_attempt_at to the lease's end, so a claimed row leaves the range of due
-- rows that every later claim reads from the start of outbox_claim (before,
-- each claim of a burst walked past every row claimed before it).
-- A row that may go over SYNC to a device whose connection another live
-- dispatcher holds is left to that dispatcher (it wakes on the same NOTIFY).
-- A disabled device's rows are not sent; they expire. Both tests stay EXISTS,
-- which the planner may hash: written as a lookup per row, they made a claim
-- planned on an outbox without statistics (a burst before any ANALYZE) read
-- and sort every unfinished row, with two lookups each, for each batch (150
-- ms a claim of 500 at 20,000 rows).
-- The claimed rows are updated by primary key (`= ANY` of the batch's ids):
-- joined with `due`, the update was planned as a hash join over the whole
-- outbox, each claim reading every row (16 of 31 ms a claim at 40,000 rows).
-- The batch comes back high priority first, then oldest first.
WITH due AS MATERIALIZED (
    SELECT request_id
    FROM pushsync.outbox
    WHERE state IN ('pending', 'sending', 'sent')
      AND next_attempt_at <= now()
      AND expires_at > now()
      AND (state <> 'sending' OR lease_expires_at < now())
      AND EXISTS (SELECT 1 FROM pushsync.devices AS d
                  WHERE d.device_id = outbox.device_id AND d.enabled)
      AND NOT (gateway IN ('auto', 'sync') AND EXISTS (
          SELECT 1
          FROM pushsync.sync_connections AS c
          JOIN pushsync.dispatchers AS n ON n.owner = c.owner
          WHERE c.device_id = outbox.device_id
            AND c.owner <> %(owner)s
            AND n.alive_until > now()))
    ORDER BY CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END,
             next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pushsync.outbox AS o
    SET state = 'sending',
        lease_owner = %(owner)s,
        lease_expires_at = now() + %(lease)s::interval,
        next_attempt_at = now() + %(lease)s::interval,
        attempts = o.attempts + 1
    WHERE o.request_id = ANY(ARRAY(SELECT request_id FROM due))
    RETURNING o.request_id, o.rule, o.device_id, o.subject, o.content, o.priority,
              o.gateway, o.created_at, o.expires_at, o.attempts
)
SELECT c.request_id, c.rule, c.device_id, c.subject, c.content, c.priority, c.gateway,
       c.created_at, c.expires_at, c.attempts, d.secret,
       udp.address AS udp_address, email.address AS email_address,
       mqtt.address AS mqtt_address
FROM claimed AS c
JOIN pushsync.devices AS d ON d.device_id = c.device_id
-- As pushsync.effective_addresses (manual wins, then only if active), but as
-- primary-key lookups: the view would read all of device_addresses per claim.
LEFT JOIN LATERAL (
    SELECT a.address, a.active FROM pushsync.device_addresses AS a
    WHERE a.device_id = c.device_id AND a.medium = 'udp'
    ORDER BY a.source = 'manual' DESC
    LIMIT 1
) AS udp ON udp.active
LEFT JOIN LATERAL (
    SELECT a.address, a.active FROM pushsync.device_addresses AS a
    WHERE a.device_id = c.device_id AND a.medium = 'email'
    ORDER BY a.source = 'manual' DESC
    LIMIT 1
) AS email ON email.active
LEFT JOIN LATERAL (
    SELECT a.address, a.active FROM pushsync.device_addresses AS a
    WHERE a.device_id = c.device_id AND a.medium = 'mqtt'
    ORDER BY a.source = 'manual' DESC
    LIMIT 1
) AS mqtt ON mqtt.active
ORDER BY CASE c.priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END,
         c.created_at

-- sent --
-- Only while this owner still holds the row (a lease that ran out but was not
-- taken over by another dispatcher still counts: nobody else is sending it).
-- A row the device confirmed before the send was recorded (its ack beat this
-- statement) stays confirmed and gets its send time and gateway.
-- The attempt joins attempt_log (sql/0012_attempt_log.sql) in this statement,
-- with its gateway. Not which of the device's addresses (manual or tracked)
-- it went to: looking that up per row took half again the statement's time.
UPDATE pushsync.outbox AS o
SET state = CASE WHEN o.state = 'confirmed' THEN 'confirmed' ELSE 'sent' END,
    sent_at = CASE WHEN o.state = 'confirmed' THEN coalesce(o.sent_at, now()) ELSE now() END,
    gateway_used = CASE WHEN o.state = 'confirmed' THEN coalesce(o.gateway_used, %(gateway)s)
                        ELSE %(gateway)s END,
    next_attempt_at = CASE WHEN o.state = 'confirmed' THEN o.next_attempt_at
                           ELSE now() + o.resend_every END,
    attempt_log = pushsync.attempt_logged(o.attempt_log, jsonb_build_object(
        'at', now(), 'gateway', %(gateway)s::text, 'outcome', 'sent')),
    lease_owner = NULL,
    lease_expires_at = NULL
WHERE o.request_id = %(request_id)s
  AND ((o.state = 'sending' AND o.lease_owner = %(owner)s) OR o.state = 'confirmed')

-- sent_many --
-- `sent` for a batch: request_ids[i] went out through gateways[i]. Returns the
-- rows recorded: those this owner still held, and those already confirmed.
-- Each row's attempt joins its attempt_log, as in `sent`.
-- Rows are locked in request_id order, as confirm_many locks them: two
-- statements that lock many rows each never wait for each other in a circle.
-- No join with the batch: its rows are found by primary key (`= ANY`), and
-- each row's gateway is looked up in one JSON object made of the two arrays,
-- once per statement (MATERIALIZED: inlined, a prepared plan made the object
-- again for every row). Joined with the unnest, a plan made on statistics that
-- misjudge the batch (a burst into an outbox analyzed while empty, or while
-- every row was still pending) hashed the whole outbox for each batch, or
-- compared every row of the batch with every other (250,000 comparisons,
-- three quarters of the statement's time, for a batch of 500). The states are
-- tested in a CASE, which no partial index on state matches: on such
-- statistics the planner took a state's index, as if it were more selective
-- than the batch's keys, and read every unfinished row of the outbox.
WITH mine AS (
    SELECT o.request_id
    FROM pushsync.outbox AS o
    WHERE o.request_id = ANY(%(request_ids)s::uuid[])
      AND CASE o.state WHEN 'sending' THEN o.lease_owner = %(owner)s
                       WHEN 'confirmed' THEN true ELSE false END
    ORDER BY o.request_id
    FOR UPDATE OF o
), batch AS MATERIALIZED (
    SELECT jsonb_object(%(request_ids)s::uuid[]::text[], %(gateways)s::text[]) AS gateway_of
)
UPDATE pushsync.outbox AS o
SET state = CASE WHEN o.state = 'confirmed' THEN 'confirmed' ELSE 'sent' END,
    sent_at = CASE WHEN o.state = 'confirmed' THEN coalesce(o.sent_at, now()) ELSE now() END,
    gateway_used = CASE WHEN o.state = 'confirmed'
                        THEN coalesce(o.gateway_used, b.gateway_of ->> o.request_id::text)
                        ELSE b.gateway_of ->> o.request_id::text END,
    next_attempt_at = CASE WHEN o.state = 'confirmed' THEN o.next_attempt_at
                           ELSE now() + o.resend_every END,
    attempt_log = pushsync.attempt_logged(o.attempt_log, jsonb_build_object(
        'at', now(), 'gateway', b.gateway_of ->> o.request_id::text, 'outcome', 'sent')),
    lease_owner = NULL,
    lease_expires_at = NULL
FROM batch AS b
WHERE o.request_id = ANY(ARRAY(SELECT request_id FROM mine))
RETURNING o.request_id

-- mine --
-- Rows leased to this owner: after a reconnect, rows whose claim committed but
-- whose result never arrived are among them.
SELECT request_id FROM pushsync.outbox WHERE state = 'sending' AND lease_owner = %(owner)s

-- release --
-- Give rows back unsent, as if never claimed: attempts - 1, lease cleared, due
-- now (the claim set next_attempt_at to the lease's end).
-- A row sent before goes back to 'sent' (it stays due). A row never sent goes
-- back to 'pending'; it keeps coalescing only if no other coalescing row of
-- its (rule, device) is pending and it is the newest such row released, so
-- the unique index outbox_coalesce holds. Otherwise it stays 'pending' with
-- coalescing = false: it is still sent, but later changes fold into the
-- other row.
WITH mine AS (
    SELECT request_id, rule, device_id, coalescing, attempts, created_at
    FROM pushsync.outbox
    WHERE request_id = ANY(%(request_ids)s::uuid[])
      AND state = 'sending'
      AND lease_owner = %(owner)s
    FOR UPDATE
), decided AS (
    SELECT m.request_id,
           m.attempts > 1 AS was_sent,
           m.coalescing
           AND m.attempts <= 1
           AND row_number() OVER (
                   PARTITION BY m.rule, m.device_id, m.coalescing AND m.attempts <= 1
                   ORDER BY m.created_at DESC, m.request_id) = 1
           AND NOT EXISTS (
                   SELECT 1 FROM pushsync.outbox AS p
                   WHERE p.rule = m.rule AND p.device_id = m.device_id
                     AND p.coalescing AND p.state = 'pending') AS keeps_coalescing
    FROM mine AS m
)
UPDATE pushsync.outbox AS o
SET state = CASE WHEN d.was_sent THEN 'sent' ELSE 'pending' END,
    coalescing = CASE WHEN d.was_sent THEN o.coalescing ELSE d.keeps_coalescing END,
    attempts = greatest(o.attempts - 1, 0),
    next_attempt_at = least(o.next_attempt_at, now()),
    lease_owner = NULL,
    lease_expires_at = NULL
FROM decided AS d
WHERE o.request_id = d.request_id

-- failed_many --
-- Sends that failed: request_ids[i] could not go out (errors[i], which names
-- each gateway tried). finals[i]: cannot be delivered, ever (the row becomes
-- 'failed'); otherwise retried at the next resend, as a sent row is (sent_at
-- stays NULL if it never went out). Only while this owner still holds the row;
-- returns the rows recorded. Each attempt joins attempt_log with its error.
-- Rows are locked in request_id order, as sent_many and confirm_many lock them.
-- As in sent_many, no join with the batch: each row's error and finality are
-- looked up in one JSON object made once per statement ([error, final]).
-- A row whose device meanwhile connected to another live dispatcher is due at
-- once, for that one to claim: its connection record may have been written
-- while this dispatcher held the row, and then `due_now`, run with the record,
-- did not see it (a device re-homing while a notification arrived waited for
-- its next resend).
WITH mine AS (
    SELECT o.request_id
    FROM pushsync.outbox AS o
    WHERE o.request_id = ANY(%(request_ids)s::uuid[])
      AND CASE o.state WHEN 'sending' THEN o.lease_owner = %(owner)s ELSE false END
    ORDER BY o.request_id
    FOR UPDATE OF o
), batch AS MATERIALIZED (
    SELECT jsonb_object_agg(f.request_id::text, jsonb_build_array(f.error, f.final))
           AS failure_of
    FROM unnest(%(request_ids)s::uuid[], %(errors)s::text[], %(finals)s::boolean[])
         AS f(request_id, error, final)
)
UPDATE pushsync.outbox AS o
SET state = CASE WHEN (b.failure_of #>> ARRAY[o.request_id::text, '1'])::boolean
                 THEN 'failed' ELSE 'sent' END,
    next_attempt_at = CASE
        WHEN (b.failure_of #>> ARRAY[o.request_id::text, '1'])::boolean THEN o.next_attempt_at
        WHEN EXISTS (SELECT 1
                     FROM pushsync.sync_connections AS c
                     JOIN pushsync.dispatchers AS n ON n.owner = c.owner
                     WHERE c.device_id = o.device_id
                       AND c.owner <> %(owner)s
                       AND n.alive_until > now()) THEN now()
        ELSE now() + o.resend_every END,
    last_error = b.failure_of #>> ARRAY[o.request_id::text, '0'],
    attempt_log = pushsync.attempt_logged(o.attempt_log, jsonb_build_object(
        'at', now(),
        'outcome', CASE WHEN (b.failure_of #>> ARRAY[o.request_id::text, '1'])::boolean
                        THEN 'failed' ELSE 'retry' END,
        'error', b.failure_of #>> ARRAY[o.request_id::text, '0'])),
    lease_owner = NULL,
    lease_expires_at = NULL
FROM batch AS b
WHERE o.request_id = ANY(ARRAY(SELECT request_id FROM mine))
RETURNING o.request_id

-- due_now --
-- The rows of device_ids that wait for a resend are due now: each device has
-- just subscribed here, so they go down its new connection. Run after a batch
-- of connection records (connections.sql's `connected`, in its transaction),
-- and for the devices that subscribed while a failed attempt to reach them was
-- being recorded (pushsync.dispatcher.daemon). By the batch's array, not by a
-- join with the recorded devices: a join of the outbox with a CTE was planned
-- as a nested loop that read the CTE once per outbox row (24.6 s for 5,000
-- devices). A device whose record stays elsewhere gets its rows resent a
-- little early by the dispatcher holding it; the device drops the copies by
-- request id. Rows are locked in request_id order, as the other batch
-- statements lock theirs: two statements never wait for each other in a circle.
UPDATE pushsync.outbox
SET next_attempt_at = now()
WHERE request_id IN (
    SELECT request_id FROM pushsync.outbox
    WHERE device_id = ANY(%(device_ids)s::text[])
      AND state = 'sent'
      AND next_attempt_at > now()
    ORDER BY request_id
    FOR UPDATE)

-- confirm --
-- The device has it. Only the recipient may confirm; a repeated confirmation
-- (still in the outbox or already archived) is true again and changes nothing.
-- A row confirmed before its send was recorded (the ack beat sent_many) keeps
-- its lease until then, so that it is not archived without its send time.
WITH confirmed AS (
    UPDATE pushsync.outbox
    SET state = 'confirmed',
        confirmed_at = now(),
        lease_owner = CASE WHEN state = 'sending' THEN lease_owner END,
        lease_expires_at = CASE WHEN state = 'sending' THEN lease_expires_at END
    WHERE request_id = %(request_id)s
      AND device_id = %(device_id)s
      AND state IN ('sending', 'sent')
    RETURNING request_id
)
SELECT EXISTS (SELECT 1 FROM confirmed)
    OR EXISTS (SELECT 1 FROM pushsync.outbox
               WHERE request_id = %(request_id)s AND device_id = %(device_id)s
                 AND state = 'confirmed')
    OR EXISTS (SELECT 1 FROM pushsync.outbox_history
               WHERE request_id = %(request_id)s AND device_id = %(device_id)s
                 AND state = 'confirmed')

-- confirm_many --
-- `confirm` for the acks that arrived together, in one statement: the device
-- devices[i] has request_ids[i]. Returns the request ids confirmed, now or
-- before (still in the outbox or archived); an ack naming another device's
-- row, or a row never sent, is not among them and changes nothing. Rows are
-- locked in request_id order, as sent_many locks them. As in sent_many, no
-- join with the batch: a row is found by primary key, and its (request id,
-- device) pair looked up among the acks' pairs, one JSON object made once per
-- statement.
WITH acks AS MATERIALIZED (
    SELECT jsonb_object_agg(a.request_id::text || ' ' || a.device_id, true) AS pairs
    FROM unnest(%(request_ids)s::uuid[], %(device_ids)s::text[]) AS a(request_id, device_id)
), sent AS (
    SELECT o.request_id
    FROM pushsync.outbox AS o, acks AS a
    WHERE o.request_id = ANY(%(request_ids)s::uuid[])
      AND CASE o.state WHEN 'sending' THEN true WHEN 'sent' THEN true ELSE false END
      AND a.pairs ? (o.request_id::text || ' ' || o.device_id)
    ORDER BY o.request_id
    FOR UPDATE OF o
), confirmed AS (
    UPDATE pushsync.outbox AS o
    SET state = 'confirmed',
        confirmed_at = now(),
        lease_owner = CASE WHEN o.state = 'sending' THEN o.lease_owner END,
        lease_expires_at = CASE WHEN o.state = 'sending' THEN o.lease_expires_at END
    WHERE o.request_id = ANY(ARRAY(SELECT request_id FROM sent))
    RETURNING o.request_id
)
SELECT request_id FROM confirmed
UNION
SELECT o.request_id
FROM pushsync.outbox AS o, acks AS a
WHERE o.request_id = ANY(%(request_ids)s::uuid[])
  AND CASE o.state WHEN 'confirmed' THEN true ELSE false END
  AND a.pairs ? (o.request_id::text || ' ' || o.device_id)
UNION
SELECT h.request_id
FROM pushsync.outbox_history AS h, acks AS a
WHERE h.request_id = ANY(%(request_ids)s::uuid[])
  AND CASE h.state WHEN 'confirmed' THEN true ELSE false END
  AND a.pairs ? (h.request_id::text || ' ' || h.device_id)

-- expire --
-- Past expires_at and not confirmed: never sent again. A row being sent is
-- left to its dispatcher until its lease runs out.
UPDATE pushsync.outbox
SET state = 'expired',
    lease_owner = NULL,
    lease_expires_at = NULL
WHERE state IN ('pending', 'sending', 'sent')
  AND expires_at <= now()
  AND (state <> 'sending' OR lease_expires_at < now())

-- archive --
-- Move up to `batch` finished rows to outbox_history, in one statement. A row
-- confirmed while its send was being recorded waits for that (its lease). The
-- console's per-minute roll-ups (flow_minutes, latency_minutes) take the
-- batch's counts in this same statement, by the history's statement trigger
-- (sql/0011_flow_minutes.sql). Each row keeps its attempt_log.
WITH moved AS (
    DELETE FROM pushsync.outbox
    WHERE request_id IN (
        SELECT request_id FROM pushsync.outbox
        WHERE state IN ('confirmed', 'expired', 'failed')
          AND (lease_expires_at IS NULL OR lease_expires_at < now())
        LIMIT %(batch)s
        FOR UPDATE SKIP LOCKED)
    RETURNING request_id, rule, device_id, subject, content, priority, gateway, coalesced,
              created_at, expires_at, attempts, state, sent_at, gateway_used,
              confirmed_at, last_error, attempt_log
)
INSERT INTO pushsync.outbox_history (
    request_id, rule, device_id, subject, content, priority, gateway, coalesced,
    created_at, expires_at, attempts, state, sent_at, gateway_used, confirmed_at, last_error,
    attempt_log)
SELECT request_id, rule, device_id, subject, content, priority, gateway, coalesced,
       created_at, expires_at, attempts, state, sent_at, gateway_used, confirmed_at, last_error,
       attempt_log
FROM moved

-- list_polls --
-- The polls of the applied rules file (`pushsync migrate` registers them).
SELECT name, every, function_name
FROM pushsync.rules
WHERE kind = 'poll'
ORDER BY name

-- lock_poll --
-- Taken at the start of a poll's transaction, released at its end. False:
-- another dispatcher is running this poll now.
SELECT pg_try_advisory_xact_lock(hashtextextended('pushsync.poll:' || %(name)s, 0))

-- run_poll --
-- Run under lock_poll, in the same transaction. The placeholder is the poll's
-- function_name, filled in as a quoted identifier (psycopg.sql.Identifier),
-- never as text; the function returns how many outbox rows the poll wrote.
SELECT pushsync.{function}()

-- claim_device --
-- Light-weight polling: everything the device has not confirmed and that has
-- not expired, due or not (it asked), except rows another dispatcher is
-- sending under a live lease. Same columns as `claim`; a claimed row's
-- next_attempt_at is its lease's end, as in `claim`.
WITH due AS MATERIALIZED (
    SELECT request_id
    FROM pushsync.outbox
    WHERE device_id = %(device_id)s
      AND state IN ('pending', 'sending', 'sent')
      AND expires_at > now()
      AND (state <> 'sending' OR lease_expires_at < now())
    ORDER BY CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END,
             created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pushsync.outbox AS o
    SET state = 'sending',
        lease_owner = %(owner)s,
        lease_expires_at = now() + %(lease)s::interval,
        next_attempt_at = now() + %(lease)s::interval,
        attempts = o.attempts + 1
    FROM due
    WHERE o.request_id = due.request_id
    RETURNING o.request_id, o.rule, o.device_id, o.subject, o.content, o.priority,
              o.gateway, o.created_at, o.expires_at, o.attempts
)
SELECT c.request_id, c.rule, c.device_id, c.subject, c.content, c.priority, c.gateway,
       c.created_at, c.expires_at, c.attempts, d.secret,
       NULL::text AS udp_address, NULL::text AS email_address
FROM claimed AS c
JOIN pushsync.devices AS d ON d.device_id = c.device_id
ORDER BY CASE c.priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END,
         c.created_at

-- device_secret --
-- The secret of an enabled device: SYNC authentication and ack verification.
SELECT secret FROM pushsync.devices WHERE device_id = %(device_id)s AND enabled

-- devices_revoked --
-- Of the connections held here (a device, and the secret it authenticated with,
-- NULL while in its handshake), the devices disabled, removed or given a new
-- secret since: after a reconnect of the LISTEN connection, whose
-- notifications (pushsync_devices) may have been lost.
SELECT DISTINCT c.device_id
FROM unnest(%(device_ids)s::text[], %(secrets)s::bytea[]) AS c(device_id, secret)
WHERE NOT EXISTS (
    SELECT FROM pushsync.devices AS d
    WHERE d.device_id = c.device_id AND d.enabled
      AND (c.secret IS NULL OR d.secret = c.secret)
)

-- heartbeat --
-- This dispatcher is alive for alive_for from now; also sweeps
-- dispatchers dead for a minute, and their connection records.
WITH me AS (
    INSERT INTO pushsync.dispatchers (owner, host, pid, sync_address, udp_address, alive_until)
    VALUES (%(owner)s, %(host)s, %(pid)s, %(sync_address)s, %(udp_address)s,
            now() + %(alive_for)s::interval)
    ON CONFLICT (owner) DO UPDATE
    SET heartbeat_at = now(),
        alive_until = excluded.alive_until,
        sync_address = excluded.sync_address,
        udp_address = excluded.udp_address
    RETURNING owner
), dead AS (
    DELETE FROM pushsync.dispatchers
    WHERE alive_until < now() - interval '1 minute'
      AND owner NOT IN (SELECT owner FROM me)
    RETURNING owner
)
DELETE FROM pushsync.sync_connections
WHERE owner IN (SELECT owner FROM dead)

-- dispatcher_gone --
-- A clean stop: this dispatcher and its connection records.
WITH gone AS (
    DELETE FROM pushsync.dispatchers WHERE owner = %(owner)s
)
DELETE FROM pushsync.sync_connections WHERE owner = %(owner)s

-- sync_connected --
-- A device authenticated on this dispatcher's SYNC port: record the
-- connection (replacing one held elsewhere), note the device was seen, and
-- make what it has not confirmed due now, to go down the new connection.
-- Registers this dispatcher too if its first heartbeat has not run yet, so
-- that the others leave the device's rows to it from this moment.
WITH node AS (
    INSERT INTO pushsync.dispatchers (owner, host, pid, alive_until)
    VALUES (%(owner)s, %(host)s, %(pid)s, now() + %(alive_for)s::interval)
    ON CONFLICT (owner) DO NOTHING
), conn AS (
    INSERT INTO pushsync.sync_connections (device_id, owner, peer)
    VALUES (%(device_id)s, %(owner)s, %(peer)s)
    ON CONFLICT (device_id) DO UPDATE
    SET owner = excluded.owner, peer = excluded.peer, connected_at = now()
    RETURNING device_id
), seen AS (
    UPDATE pushsync.devices SET last_seen_at = now()
    WHERE device_id = %(device_id)s
    RETURNING device_id
)
UPDATE pushsync.outbox
SET next_attempt_at = now()
WHERE device_id = %(device_id)s
  AND state = 'sent'
  AND next_attempt_at > now()
  AND EXISTS (SELECT 1 FROM conn)
  AND EXISTS (SELECT 1 FROM seen)

-- sync_disconnected --
-- Only this dispatcher's record: the device may have connected elsewhere since.
DELETE FROM pushsync.sync_connections
WHERE device_id = %(device_id)s AND owner = %(owner)s AND peer = %(peer)s

-- track --
-- The UDP endpoint a device reported over SYNC, as its 'tracking' address
-- (a 'manual' one still wins: pushsync.effective_addresses).
WITH seen AS (
    UPDATE pushsync.devices SET last_seen_at = now()
    WHERE device_id = %(device_id)s
    RETURNING device_id
)
INSERT INTO pushsync.device_addresses (device_id, medium, source, address)
SELECT device_id, 'udp', 'tracking', %(address)s FROM seen
ON CONFLICT (device_id, medium, source) DO UPDATE
SET address = excluded.address, active = true, modified_at = now()
WHERE pushsync.device_addresses.address IS DISTINCT FROM excluded.address
   OR NOT pushsync.device_addresses.active

-- prune_changes --
-- Forget changes (and answered upload batches) older than %(keep)s. The
-- horizon moves past the newest transaction forgotten: a device whose
-- watermark is older gets full downloads.
WITH gone AS (
    DELETE FROM pushsync.changes WHERE changed_at < now() - %(keep)s::interval
    RETURNING xid
), uploads AS (
    DELETE FROM pushsync.sync_uploads WHERE applied_at < now() - %(keep)s::interval
)
UPDATE pushsync.changes_horizon
SET pruned_below = greatest(
    pruned_below, ((SELECT max(xid)::text::numeric FROM gone) + 1)::text::xid8)
WHERE EXISTS (SELECT 1 FROM gone)
