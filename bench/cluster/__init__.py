"""Benchmark: many dispatchers on one database, many SYNC devices, one killed."""
