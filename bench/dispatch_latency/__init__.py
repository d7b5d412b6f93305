"""Dispatch latency: commit returned -> datagram received, at a steady rate.

See README.md. ``python -m bench.dispatch_latency --help``.
"""
