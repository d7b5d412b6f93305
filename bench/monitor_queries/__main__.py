"""``python -m bench.monitor_queries``: see ``README.md`` and ``--help``."""

from bench.monitor_queries.cli import main

raise SystemExit(main())
