"""``pushsync status``: what the outbox holds and how delivery is going."""

from __future__ import annotations

from typing import Any

import psycopg

from pushsync import queries

STATES = ("pending", "sending", "sent", "confirmed", "expired", "failed")


def collect(conn: psycopg.Connection) -> dict[str, Any]:
    """The figures ``status`` shows, as a dict with stable keys (the ``--json`` output).

    ``gateways`` counts, per gateway, messages sent (awaiting confirmation),
    confirmed and failed: those still in the outbox and those finished in the
    last 24 hours.
    """
    outbox = dict.fromkeys(STATES, 0)
    outbox.update({state: n for state, n in conn.execute(queries.get("status_states"))})
    history = dict.fromkeys(("confirmed", "expired", "failed"), 0)
    history.update({state: n for state, n in conn.execute(queries.get("status_history"))})
    gateways: dict[str, dict[str, int]] = {}
    for gateway, state, n in conn.execute(queries.get("status_gateways")):
        gateways.setdefault(gateway, {"sent": 0, "confirmed": 0, "failed": 0})[state] += n
    oldest = conn.execute(queries.get("status_oldest_unsent")).fetchone()
    return {
        "outbox": outbox,
        "oldest_unsent_seconds": oldest[0] if oldest else None,
        "history_24h": history,
        "gateways": gateways,
    }


def render(figures: dict[str, Any]) -> str:
    """The human-readable form."""
    lines = ["outbox:"]
    lines += [f"  {state:<10} {n}" for state, n in figures["outbox"].items()]
    oldest = figures["oldest_unsent_seconds"]
    lines.append("oldest unsent: " + ("none" if oldest is None else f"{oldest:.1f} s ago"))
    lines.append("finished in the last 24 h:")
    lines += [f"  {state:<10} {n}" for state, n in figures["history_24h"].items()]
    lines.append("per gateway (sent / confirmed / failed):")
    for gateway, counts in sorted(figures["gateways"].items()):
        lines.append(
            f"  {gateway:<10} {counts['sent']} / {counts['confirmed']} / {counts['failed']}"
        )
    if not figures["gateways"]:
        lines.append("  none yet")
    return "\n".join(lines)
