"""Synchronization benchmark: initial download, incremental sync, full re-download."""
