"""``python -m pushsync``: the same as the ``pushsync`` command."""

from pushsync.cli import main

raise SystemExit(main())
