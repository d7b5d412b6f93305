-- The design event-log systems use, hand-written for comparison: a FOR EACH ROW
-- AFTER trigger in PL/pgSQL that writes every changed row as JSON into an
-- event table (consumers then read the table). Applied after schema.sql.

CREATE TABLE bench.events (
    event_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name text NOT NULL,
    operation  text NOT NULL,
    row_data   jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION bench.log_row_event() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    INSERT INTO bench.events (table_name, operation, row_data)
    VALUES (TG_TABLE_NAME, TG_OP, to_jsonb(NEW));
    RETURN NULL;
END
$$;

CREATE TRIGGER log_row_event
    AFTER INSERT ON bench.orders_rowlevel
    FOR EACH ROW EXECUTE FUNCTION bench.log_row_event();
