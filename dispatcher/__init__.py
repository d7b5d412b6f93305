"""The server runtime of pushsync: outbox relay, gateways, device tracker, polls."""
