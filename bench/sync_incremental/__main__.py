"""``python -m bench.sync_incremental``: see ``README.md`` and ``--help``."""

from bench.sync_incremental.cli import main

raise SystemExit(main())
