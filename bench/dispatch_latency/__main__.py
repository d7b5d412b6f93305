"""``python -m bench.dispatch_latency``: see the package docstring and ``--help``."""

from bench.dispatch_latency.cli import main

raise SystemExit(main())
