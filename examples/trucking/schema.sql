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
