"""``python -m bench.sync_fanout``: see ``README.md`` and ``--help``."""

from bench.sync_fanout.cli import main

raise SystemExit(main())
