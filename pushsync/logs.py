"""Log output for the commands: readable lines, or one JSON object per line.

``--log-format json`` (``PUSHSYNC_LOG_FORMAT=json``) writes each record as
``{"ts", "level", "logger", "message"}`` (plus ``"exception"`` with the
traceback, when there is one), for log collectors. Either way the records are
the same: pushsync never logs secrets — device secrets, SMTP passwords and DSN
passwords are kept out of every message.

:class:`Throttle` keeps a flood (bad datagrams, connection attempts) from
flooding the log: one line per kind of event and interval, and a count of
the lines it held back.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Any, Final

FORMATS: Final = ("text", "json")
THROTTLE_INTERVAL: Final = 10.0
"""Seconds between two lines of one kind that :class:`Throttle` lets through."""
TEXT_FORMAT: Final = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
JOURNAL_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"
"""Under systemd (``JOURNAL_STREAM`` set), whose journal stamps each line itself."""

_PLAIN: Final[dict[type[BaseException], str]] = {
    ConnectionRefusedError: "connection refused",
    ConnectionResetError: "connection reset by the other side",
    ConnectionAbortedError: "connection aborted",
    BrokenPipeError: "the other side closed the connection",
    TimeoutError: "timed out",
    EOFError: "the other side closed the connection",
}


def short(request_id: object) -> str:
    """A request id as log lines show it: its first 8 hex digits, like a short commit hash
    (search the outbox with ``request_id::text LIKE 'abcd1234%'``)."""
    return str(request_id)[:8]


def plain(exc: BaseException) -> str:
    """What went wrong, in words: the exception's own text, or for the usual network
    failures a phrase; never a bare class name where words exist."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip()
    for kind, words in _PLAIN.items():
        if isinstance(exc, kind):
            return words if not text or isinstance(exc, TimeoutError) else text.lower()
    return text.splitlines()[0] if text else type(exc).__name__


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        data = {
            "ts": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def configure(level: str, log_format: str = "text") -> None:
    """Send log records at ``level`` and above to stderr in ``log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(logging.Formatter(JOURNAL_FORMAT))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, TIME_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # sqlglot warns about SQL it parses as a plain command; the generator refuses
    # such SQL with a located error of its own, so the warning only adds noise.
    logging.getLogger("sqlglot").setLevel(logging.ERROR)
    # uvicorn (the dispatcher's /metrics) announces its start and stop; the dispatcher
    # says where it serves metrics itself.
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


class Throttle:
    """Logs each kind of line at most once per ``interval`` seconds, counting the rest.

    The kind is the format string (or ``key``, when given), not the formatted
    line: a flood from changing peers is still one kind. The lines held back
    go to DEBUG (``--log-level debug`` shows every one); the next line of a
    kind that gets through ends with "(N more suppressed)".
    """

    MAX_KINDS: Final = 1024

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = THROTTLE_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._kinds: dict[Hashable, list[Any]] = {}  # kind -> [last logged at, suppressed]

    def log(self, level: int, msg: str, *args: Any, key: Hashable = None) -> bool:
        """Log ``msg % args`` unless its kind was logged less than ``interval`` ago."""
        if not self.logger.isEnabledFor(level):
            return False
        kind = msg if key is None else key
        now = self.clock()
        seen = self._kinds.get(kind)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            self.logger.debug(msg, *args)
            return False
        suppressed = seen[1] if seen is not None else 0
        if len(self._kinds) >= self.MAX_KINDS and seen is None:
            self._kinds.clear()
        self._kinds[kind] = [now, 0]
        if suppressed:
            msg, args = f"{msg} (%d more suppressed)", (*args, suppressed)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, msg: str, *args: Any, key: Hashable = None) -> bool:
        return self.log(logging.WARNING, msg, *args, key=key)

    def info(self, msg: str, *args: Any, key: Hashable = None) -> bool:
        return self.log(logging.INFO, msg, *args, key=key)


__all__ = ["FORMATS", "JsonFormatter", "Throttle", "configure", "plain", "short"]
