"""Dispatcher throughput: notifications/s from a full outbox to a UDP receiver.

See README.md. ``python -m bench.dispatch_throughput --help``.
"""
