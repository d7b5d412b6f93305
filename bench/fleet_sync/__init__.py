"""Fleet synchronization through joins: see ``README.md``."""
