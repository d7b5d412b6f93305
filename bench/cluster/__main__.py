"""``python -m bench.cluster``: see ``README.md`` and ``--help``."""

from bench.cluster.cli import main

raise SystemExit(main())
