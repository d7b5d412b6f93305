-- The trucking example's fleet: five drivers, each with a device and a route.
-- Apply it after `pushsync migrate` and `pushsync device add`, before the first
-- sync: psql "$PUSHSYNC_DSN" -f examples/trucking/seed.sql
-- (The same fleet as `pushsync demo`; location 100 is on four of the routes.)
BEGIN;

INSERT INTO public.drivers (driver_id, name, device_id) VALUES
    (1, 'Ann', 'truck-ann'),
    (2, 'Bo',  'truck-bo'),
    (3, 'Cy',  'truck-cy'),
    (4, 'Di',  'truck-di'),
    (5, 'Ed',  'truck-ed')
ON CONFLICT DO NOTHING;

INSERT INTO public.routes (route_id, route_name, driver_id) VALUES
    (10, 'north',  1),
    (20, 'south',  2),
    (30, 'east',   3),
    (40, 'west',   4),
    (50, 'harbor', 5)
ON CONFLICT DO NOTHING;

INSERT INTO public.route_stops (route_id, seq, location_id) VALUES
    (10, 1, 100), (10, 2, 101),
    (20, 1, 102), (20, 2, 100),
    (30, 1, 200), (30, 2, 100),
    (40, 1, 100),
    (50, 1, 300), (50, 2, 301)
ON CONFLICT DO NOTHING;

COMMIT;
