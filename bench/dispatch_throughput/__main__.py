"""``python -m bench.dispatch_throughput``: see the package docstring and ``--help``."""

from bench.dispatch_throughput.cli import main

raise SystemExit(main())
