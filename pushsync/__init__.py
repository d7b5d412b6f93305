"""pushsync: server-initiated synchronization for PostgreSQL."""

__version__ = "0.1.0"
