-- Extra tables for `--diagnose`: statement-level triggers that do part of what
-- the generated function does, so the per-statement cost can be split up.
-- Applied after schema.sql, rowlevel.sql and the generated migration. Not used
-- by the benchmark itself.

-- d_empty: a PL/pgSQL AFTER ... FOR EACH STATEMENT trigger that does nothing.
CREATE TABLE bench.orders_d_empty (LIKE bench.orders_none INCLUDING ALL);
CREATE FUNCTION bench.d_empty() RETURNS trigger LANGUAGE plpgsql
AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER d_empty AFTER INSERT ON bench.orders_d_empty
    FOR EACH STATEMENT EXECUTE FUNCTION bench.d_empty();

-- d_tt: the same with a transition table, as the generated triggers have.
CREATE TABLE bench.orders_d_tt (LIKE bench.orders_none INCLUDING ALL);
CREATE TRIGGER d_tt AFTER INSERT ON bench.orders_d_tt
    REFERENCING NEW TABLE AS pushsync_new
    FOR EACH STATEMENT EXECUTE FUNCTION bench.d_empty();

-- d_secdef: plus SECURITY DEFINER and SET search_path, as the generated functions have.
CREATE TABLE bench.orders_d_secdef (LIKE bench.orders_none INCLUDING ALL);
CREATE FUNCTION bench.d_secdef() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ BEGIN RETURN NULL; END $$;
CREATE TRIGGER d_secdef AFTER INSERT ON bench.orders_d_secdef
    REFERENCING NEW TABLE AS pushsync_new
    FOR EACH STATEMENT EXECUTE FUNCTION bench.d_secdef();

-- d_guard: d_secdef plus the one-scan early exit of the generated functions: the
-- OR of the rules' `when` conditions checked first; nothing else runs when
-- no row satisfies any of them.
CREATE TABLE bench.orders_d_guard (LIKE bench.orders_none INCLUDING ALL);
CREATE FUNCTION bench.d_guard() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (SELECT FROM pushsync_new AS "new" WHERE ("new"."status" = 'open')) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'not reached in the benchmark';
END
$$;
CREATE TRIGGER d_guard AFTER INSERT ON bench.orders_d_guard
    REFERENCING NEW TABLE AS pushsync_new
    FOR EACH STATEMENT EXECUTE FUNCTION bench.d_guard();

-- d_guard20: the same early exit for the twenty conditions of rules20.
CREATE TABLE bench.orders_d_guard20 (LIKE bench.orders_none INCLUDING ALL);
CREATE FUNCTION bench.d_guard20() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF NOT EXISTS (
        SELECT FROM pushsync_new AS "new"
        WHERE ("new"."status" = 'open')
           OR ("new"."status" = 'disputed')
           OR ("new"."status" IN ('refunded', 'chargeback'))
           OR ("new"."amount" > 100000)
           OR ("new"."amount" < 0)
           OR ("new"."account_id" > 1000000)
           OR ("new"."account_id" <= 0)
           OR ("new"."note" = 'urgent')
           OR ("new"."note" LIKE 'fraud%')
           OR ("new"."status" = 'open' AND "new"."amount" > 500)
           OR ("new"."status" = 'held' OR "new"."note" = 'hold')
           OR ("new"."created_at" < '2000-01-01')
           OR ("new"."amount" BETWEEN 5000 AND 6000)
           OR ("new"."status" = 'shipped')
           OR ("new"."status" = 'delivered')
           OR ("new"."status" = 'cancelled')
           OR ("new"."note" = '')
           OR (length("new"."note") > 200)
           OR ("new"."amount" = 999999)
           OR ("new"."status" = 'returned' AND "new"."account_id" = 42)
    ) THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'not reached in the benchmark';
END
$$;
CREATE TRIGGER d_guard20 AFTER INSERT ON bench.orders_d_guard20
    REFERENCING NEW TABLE AS pushsync_new
    FOR EACH STATEMENT EXECUTE FUNCTION bench.d_guard20();
