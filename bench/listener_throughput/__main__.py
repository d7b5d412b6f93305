"""``python -m bench.listener_throughput``: see the package docstring and ``--help``."""

from bench.listener_throughput.cli import main

raise SystemExit(main())
