"""Log output for the commands: readable lines, or one JSON object per line.

``--log-format json`` (``PUSHSYNC_LOG_FORMAT=json``) writes each record as
``{"ts", "level", "logger", "message"}`` (plus ``"exception"`` with the
traceback, when there is one), for log collectors. Either way the records are
the same: pushsync never logs secrets — device secrets, SMTP passwords and DSN
passwords are kept out of every message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(name)s: %(message)s"


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
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # sqlglot warns about SQL it parses as a plain command; the generator refuses
    # such SQL with a located error of its own, so the warning only adds noise.
    logging.getLogger("sqlglot").setLevel(logging.ERROR)


__all__ = ["FORMATS", "JsonFormatter", "configure"]
