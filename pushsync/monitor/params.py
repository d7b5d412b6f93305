"""What a request to the console may ask for: its query parameters, checked (no I/O).

Each view's parameters become a small frozen value or a :class:`BadRequest`
naming the parameter; the queries get them as bound values only.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

WINDOWS: Final = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
}
"""The periods the flow, latency and fleet views offer."""
PER_SECOND_UP_TO: Final = timedelta(minutes=15)
"""Flow buckets are seconds for windows up to this, minutes beyond (read from the
per-minute roll-ups); latency percentiles are exact up to this, estimated beyond."""
FLOW_BARS: Final = 360
"""Most buckets of one flow chart over a window longer than 15 minutes (per second
up to 15 minutes: 900); beyond 6 hours a bucket spans several minutes."""
BUCKET_MINUTES: Final = (1, 2, 5, 10, 15, 30, 60)
MAX_TIMELINE: Final = timedelta(hours=24)
"""The widest timeline one request may ask for."""
TIMELINE_LIMIT: Final = 2_000
"""Most pushes, and most synchronizations, one timeline of up to 15 minutes shows."""
LONG_TIMELINE_LIMIT: Final = 500
"""Most pushes, and most synchronizations, a longer timeline shows (the latest): bars
narrower than a pixel or two tell nothing, and the query stays a few milliseconds."""
FLEET_PAGE: Final = 200
"""Devices per page of the fleet view."""
MAX_SEARCH: Final = 64
SHOW: Final = ("all", "connected", "disconnected", "disabled")
LATENCY_BOUNDS_MS: Final = (
    0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0,
    1_000.0, 2_000.0, 5_000.0, 10_000.0, 30_000.0, 60_000.0, 300_000.0,
)  # fmt: skip
"""Lower bounds, in milliseconds, of the latency histograms' buckets."""


class BadRequest(ValueError):
    """A query parameter the console does not accept; the message names it."""


@dataclass(frozen=True, slots=True)
class FleetQuery:
    search: str
    show: str
    after: str
    limit: int
    since: datetime


@dataclass(frozen=True, slots=True)
class Window:
    since: datetime
    step: str
    """``second`` or ``minute``: the flow's buckets."""
    bucket_seconds: int = 60
    """The width of one flow bucket: 1 for ``second``; 60 or a multiple for ``minute``,
    so that a window has at most :data:`FLOW_BARS` of them."""


@dataclass(frozen=True, slots=True)
class TimelineQuery:
    since: datetime
    until: datetime
    search: str
    limit: int


def window(args: Mapping[str, str], now: datetime, default: str = "5m") -> Window:
    name = args.get("window", default)
    if name not in WINDOWS:
        raise BadRequest(f"window: expected one of {', '.join(WINDOWS)}, not {name[:20]!r}")
    span = WINDOWS[name]
    if span <= PER_SECOND_UP_TO:
        return Window(since=now - span, step="second", bucket_seconds=1)
    minutes = next(
        (m for m in BUCKET_MINUTES if span / timedelta(minutes=m) <= FLOW_BARS), BUCKET_MINUTES[-1]
    )
    return Window(since=now - span, step="minute", bucket_seconds=60 * minutes)


def search(args: Mapping[str, str]) -> str:
    text = args.get("search", "").strip()
    if len(text) > MAX_SEARCH or not text.isprintable():
        raise BadRequest(f"search: at most {MAX_SEARCH} printable characters")
    return text


def fleet(args: Mapping[str, str], now: datetime) -> FleetQuery:
    show = args.get("show", "all")
    if show not in SHOW:
        raise BadRequest(f"show: expected one of {', '.join(SHOW)}")
    after = args.get("after", "")
    if len(after) > 64:
        raise BadRequest("after: at most 64 characters (a device id)")
    return FleetQuery(
        search=search(args),
        show=show,
        after=after,
        limit=FLEET_PAGE,
        since=window(args, now, default="24h").since,
    )


def timeline(args: Mapping[str, str], now: datetime) -> TimelineQuery:
    until = _instant(args, "until") or now
    since = _instant(args, "since") or until - timedelta(minutes=5)
    if since >= until:
        raise BadRequest("since must be before until")
    if until - since > MAX_TIMELINE:
        raise BadRequest("since and until: at most 24 hours apart")
    limit = TIMELINE_LIMIT if until - since <= PER_SECOND_UP_TO else LONG_TIMELINE_LIMIT
    return TimelineQuery(since=since, until=until, search=search(args), limit=limit)


def request_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise BadRequest("request id: expected a UUID such as 6f1c2a4e-...") from None


def _instant(args: Mapping[str, str], name: str) -> datetime | None:
    text = args.get(name)
    if not text:
        return None
    try:
        if text.isdigit():  # milliseconds since the epoch, what the browser has
            return datetime.fromtimestamp(int(text) / 1000, UTC)
        value = datetime.fromisoformat(text)
    except (ValueError, OverflowError, OSError):
        raise BadRequest(f"{name}: expected milliseconds since 1970 or an ISO time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


__all__ = [
    "BUCKET_MINUTES",
    "FLEET_PAGE",
    "FLOW_BARS",
    "LATENCY_BOUNDS_MS",
    "LONG_TIMELINE_LIMIT",
    "MAX_TIMELINE",
    "SHOW",
    "TIMELINE_LIMIT",
    "WINDOWS",
    "BadRequest",
    "FleetQuery",
    "TimelineQuery",
    "Window",
    "fleet",
    "request_id",
    "search",
    "timeline",
    "window",
]
