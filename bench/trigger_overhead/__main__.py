"""``python -m bench.trigger_overhead``: see the package docstring and ``--help``."""

from bench.trigger_overhead.cli import main

raise SystemExit(main())
