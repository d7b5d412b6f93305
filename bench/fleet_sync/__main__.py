"""``python -m bench.fleet_sync``: see ``README.md`` and ``--help``."""

from bench.fleet_sync.cli import main

raise SystemExit(main())
