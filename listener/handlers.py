"""Which handlers a message matches, and the text its action gets.

Pure functions, as MobiLink's ``dblsn`` defines them: handlers are tried in
order; one matches when all its filters do; the first match wins unless it
says ``continue: true``. Variables are substituted into each argv element on
its own and their values are inserted literally, never expanded again, so
no message can add, split or re-interpret arguments. Running the actions is
the listener runtime's business; this module only decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pushsync.listener.config import (
    Handler,
    RunAction,
    SocketAction,
    StartAction,
    Template,
    Variable,
    parse_template,
)
from pushsync.wire.protocol import Message


def message_text(msg: Message) -> str:
    """The MobiLink message layout the ``message`` filters see: ``[subject]content``."""
    return f"[{msg.subject}]{msg.content}"


def matches(handler: Handler, msg: Message) -> bool:
    """Whether every filter of ``handler`` matches ``msg`` (no filters: always)."""
    return _exact_filters_match(handler, msg) and _regex_filters_match(handler, msg)


def match(handlers: Iterable[Handler], msg: Message) -> list[Handler]:
    """The handlers to run for ``msg``, in order.

    The first matching handler ends the search unless it has ``continue: true``.
    """
    chosen: list[Handler] = []
    for handler in handlers:
        if matches(handler, msg):
            chosen.append(handler)
            if not handler.continue_:
                break
    return chosen


def _exact_filters_match(handler: Handler, msg: Message) -> bool:
    exact = (
        (handler.subject, msg.subject),
        (handler.content, msg.content),
        (handler.sender, msg.sender),
        (handler.priority, msg.priority),
    )
    if any(wanted is not None and wanted != value for wanted, value in exact):
        return False
    if handler.message is not None and handler.message != message_text(msg):
        return False
    start = handler.message_start
    return start is None or message_text(msg).startswith(start)


def _regex_filters_match(handler: Handler, msg: Message) -> bool:
    searches = (
        (handler.subject_matches, msg.subject),
        (handler.content_matches, msg.content),
        (handler.sender_matches, msg.sender),
    )
    if any(pattern is not None and not pattern.search(value) for pattern, value in searches):
        return False
    pattern = handler.message_matches
    return pattern is None or pattern.search(message_text(msg)) is not None


def variables(
    msg: Message, *, now: datetime, device: str, message_start: str | None = None
) -> dict[str, str]:
    """The value of every variable for ``msg``; times from ``now``.

    With ``message_start`` (the handler's filter of that name),
    ``$message_start`` is that prefix and ``$message_end`` the rest of the
    message after it.
    """
    text = message_text(msg)
    values = {
        "subject": msg.subject,
        "content": msg.content,
        "message": text,
        "sender": msg.sender,
        "priority": msg.priority,
        "request_id": str(msg.request_id),
        "device": device,
        "year": f"{now.year:04d}",
        "month": f"{now.month:02d}",
        "day": f"{now.day:02d}",
        "hour": f"{now.hour:02d}",
        "minute": f"{now.minute:02d}",
        "second": f"{now.second:02d}",
    }
    if message_start is not None:
        values["message_start"] = message_start
        values["message_end"] = text[len(message_start) :] if text.startswith(message_start) else ""
    return values


def substitute(template: Template, values: dict[str, str]) -> str:
    """``template`` with each variable replaced by its value, inserted literally."""
    return "".join(
        values.get(part.name, "") if isinstance(part, Variable) else part for part in template.parts
    )


def expand(
    template: str | Template,
    msg: Message,
    now: datetime,
    device: str,
    *,
    message_start: str | None = None,
) -> str:
    """``template`` with the variables of ``msg`` substituted.

    A :class:`Template` from a loaded config always expands. A ``str`` is
    parsed first and raises :class:`~pushsync.listener.config.TemplateError`
    if it names an unknown variable.
    """
    if isinstance(template, str):
        known = variables(msg, now=now, device=device, message_start=message_start)
        template = parse_template(template, known)
    values = variables(msg, now=now, device=device, message_start=message_start)
    return substitute(template, values)


def argv_for(
    action: RunAction | StartAction,
    msg: Message,
    *,
    now: datetime,
    device: str,
    message_start: str | None = None,
) -> list[str]:
    """The argument vector of a ``run`` or ``start`` action: one element per template."""
    values = variables(msg, now=now, device=device, message_start=message_start)
    return [substitute(template, values) for template in action.argv]


def socket_text(
    action: SocketAction,
    msg: Message,
    *,
    now: datetime,
    device: str,
    message_start: str | None = None,
) -> str:
    """The text a ``socket`` action sends."""
    values = variables(msg, now=now, device=device, message_start=message_start)
    return substitute(action.send, values)
