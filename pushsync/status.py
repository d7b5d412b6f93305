"""``pushsync status``: what the outbox holds and how delivery is going."""

from __future__ import annotations

from typing import Any

import psycopg

from pushsync import queries

STATES = ("pending", "sending", "sent", "confirmed", "expired", "failed")
GATEWAY_STATES = ("sent", "confirmed", "expired", "failed")
"""What became of the messages a gateway sent: still awaiting confirmation, confirmed,
expired without a confirmation, failed."""


def collect(conn: psycopg.Connection) -> dict[str, Any]:
    """The figures ``status`` shows, as a dict with stable keys (the ``--json`` output).

    ``gateways`` counts, per gateway, messages sent (awaiting confirmation),
    confirmed, expired (sent, never confirmed) and failed: those still in the
    outbox and those finished in the last 24 hours.
    """
    outbox = dict.fromkeys(STATES, 0)
    outbox.update({state: n for state, n in conn.execute(queries.get("status_states"))})
    history = dict.fromkeys(("confirmed", "expired", "failed"), 0)
    history.update({state: n for state, n in conn.execute(queries.get("status_history"))})
    gateways: dict[str, dict[str, int]] = {}
    for gateway, state, n in conn.execute(queries.get("status_gateways")):
        counts = gateways.setdefault(gateway, dict.fromkeys(GATEWAY_STATES, 0))
        counts[state] = counts.get(state, 0) + n
    oldest = conn.execute(queries.get("status_oldest_unsent")).fetchone()
    dispatchers = [
        {
            "owner": owner,
            "host": host,
            "pid": pid,
            "sync_address": sync_address,
            "udp_address": udp_address,
            "started_at": started.isoformat(),
            "heartbeat_seconds_ago": round(age, 1),
            "alive": alive,
            "connected_devices": devices,
        }
        for owner, host, pid, sync_address, udp_address, started, age, alive, devices in (
            conn.execute(queries.get("status_dispatchers"))
        )
    ]
    connected = conn.execute(queries.get("status_connected")).fetchone()
    return {
        "outbox": outbox,
        "oldest_unsent_seconds": oldest[0] if oldest else None,
        "history_24h": history,
        "gateways": gateways,
        "connected_devices": connected[0] if connected else 0,
        "dispatchers": dispatchers,
    }


def render(figures: dict[str, Any]) -> str:
    """The human-readable form."""
    lines = ["outbox:"]
    lines += [f"  {state:<10} {n}" for state, n in figures["outbox"].items()]
    oldest = figures["oldest_unsent_seconds"]
    lines.append("oldest unsent: " + ("none" if oldest is None else f"{oldest:.1f} s ago"))
    lines.append("finished in the last 24 h:")
    lines += [f"  {state:<10} {n}" for state, n in figures["history_24h"].items()]
    lines.append("per gateway (sent / confirmed / expired / failed):")
    for gateway, counts in sorted(figures["gateways"].items()):
        shown = " / ".join(str(counts[state]) for state in GATEWAY_STATES)
        lines.append(f"  {gateway:<10} {shown}")
    if not figures["gateways"]:
        lines.append("  none yet")
    alive = [d for d in figures["dispatchers"] if d["alive"]]
    lines.append(
        f"dispatchers alive: {len(alive)}; devices connected over SYNC: "
        f"{figures['connected_devices']}"
    )
    for node in figures["dispatchers"]:
        where = ", ".join(
            f"{kind} {node[key]}"
            for kind, key in (("sync", "sync_address"), ("udp", "udp_address"))
            if node[key]
        )
        lines.append(
            f"  {node['owner']}: {'alive' if node['alive'] else 'not responding'}, "
            f"heartbeat {node['heartbeat_seconds_ago']:.0f} s ago, "
            f"{node['connected_devices']} devices connected{'; ' + where if where else ''}"
        )
    return "\n".join(lines)
