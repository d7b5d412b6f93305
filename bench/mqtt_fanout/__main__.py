"""``python -m bench.mqtt_fanout``: see ``README.md`` and ``--help``."""

from bench.mqtt_fanout.cli import main

raise SystemExit(main())
