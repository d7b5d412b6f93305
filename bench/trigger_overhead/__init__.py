"""What the generated triggers cost an application's INSERTs.

Run from the repository root::

    .venv/bin/python -m bench.trigger_overhead            # full run, a few minutes
    .venv/bin/python -m bench.trigger_overhead --quick    # about 30 seconds

One throwaway PostgreSQL server, one table per variant (identical columns):

    none      no trigger -- the baseline every ratio is taken against
    nomatch   generated trigger, one rule whose ``when`` is false for every row
    nobody    generated trigger, one rule whose ``when`` holds but whose
              recipients query finds nobody
    match4    generated trigger, one rule; every row goes to 4 devices (coalescing)
    rowlevel  hand-written FOR EACH ROW trigger writing to_jsonb(NEW) to an event
              table (rowlevel.sql), the design of event-log systems
    rules20   generated trigger, 20 rules on the table, none true

Two workloads, each run round-robin over the variants for several rounds
(medians reported): single-row INSERTs with pgbench, and one bulk
``INSERT ... SELECT generate_series`` timed from the client. The rules are in
``rules.yaml`` and compiled by the real generator; ``--diagnose`` shows where
the time goes instead of benchmarking, and ``--override-sql FILE``
measures hand-edited trigger functions (see README.md in this directory).
"""
