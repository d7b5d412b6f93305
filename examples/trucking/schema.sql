-- The consolidated database of the trucking example: drivers, their routes,
-- the stops on each route, and the disruption reports drivers file.

CREATE TABLE IF NOT EXISTS public.drivers (
    driver_id integer PRIMARY KEY,
    name      text NOT NULL,
    device_id text UNIQUE          -- the pushsync device the driver carries
);

CREATE TABLE IF NOT EXISTS public.routes (
    route_id   integer PRIMARY KEY,
    route_name text NOT NULL,
    driver_id  integer REFERENCES public.drivers
);

CREATE TABLE IF NOT EXISTS public.route_stops (
    route_id    integer NOT NULL REFERENCES public.routes,
    seq         integer NOT NULL,
    location_id integer NOT NULL,
    PRIMARY KEY (route_id, seq)
);
CREATE INDEX IF NOT EXISTS route_stops_location ON public.route_stops (location_id);

CREATE TABLE IF NOT EXISTS public.disruption_reports (
    report_id   uuid PRIMARY KEY DEFAULT gen_random_uuid(),  -- devices make their own offline
    location_id integer NOT NULL,
    reported_by integer NOT NULL REFERENCES public.drivers,
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'cleared')),
    note        text NOT NULL DEFAULT ''
);

-- The dispatch office's own logic (not pushsync's): a disruption makes every
-- route through that location take a detour. Devices see it when they sync.
ALTER TABLE public.routes ADD COLUMN IF NOT EXISTS detour text;

CREATE OR REPLACE FUNCTION public.plan_detours() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE public.routes AS r
    SET detour = format('avoid location %s (%s)', NEW.location_id,
                        coalesce(nullif(NEW.note, ''), 'reported disruption'))
    WHERE r.route_id IN (SELECT s.route_id FROM public.route_stops AS s
                         WHERE s.location_id = NEW.location_id);
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER plan_detours
    AFTER INSERT ON public.disruption_reports
    FOR EACH ROW WHEN (NEW.status = 'open')
    EXECUTE FUNCTION public.plan_detours();
