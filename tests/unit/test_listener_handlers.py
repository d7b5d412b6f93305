"""Handler matching (MobiLink dblsn semantics) and variable substitution into argv."""

from __future__ import annotations

import re
import textwrap
import uuid
from datetime import datetime

import pytest

from pushsync.errors import RulesError
from pushsync.listener.config import (
    Handler,
    RunAction,
    SocketAction,
    StartAction,
    TemplateError,
    loads_config,
)
from pushsync.listener.handlers import argv_for, expand, match, message_text, socket_text
from pushsync.wire.protocol import Message, Priority

REQUEST_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
NOW = datetime(2024, 3, 7, 8, 5, 9)


def message(
    subject: str = "sync",
    content: str = "disruption 42",
    sender: str = "pushsync",
    priority: Priority = "normal",
) -> Message:
    return Message(
        request_id=REQUEST_ID,
        device="truck-17",
        subject=subject,
        content=content,
        sender=sender,
        priority=priority,
        created=1_700_000_000.0,
        expires=1_700_003_600.0,
    )


def handlers(body: str) -> tuple[Handler, ...]:
    """Handlers from YAML list items; without any ``action:``, each gets ``action: sync``."""
    if "action:" not in body:
        body = re.sub(r"(- name: .*)\n", r"\1\n  action: sync\n", body)
    text = "device: truck-17\nsecret_file: k\nchannels: {udp: {bind: 'h:1'}}\nhandlers:\n"
    text += textwrap.indent(textwrap.dedent(body), "  ")
    return loads_config(text, "listener.yaml").handlers


def one(filters: str) -> tuple[Handler, ...]:
    return handlers(f"- name: h\n  action: sync\n{textwrap.indent(filters, '  ')}")


# --------------------------------------------------------------------------- matching

# (case id, filters of the one handler as YAML lines, message, matches?)
FILTER_CASES: list[tuple[str, str, Message, bool]] = [
    ("no filters match anything", "", message(), True),
    ("no filters match empty text", "", message(subject="", content=""), True),
    ("subject equal", "subject: sync\n", message(), True),
    ("subject differs", "subject: sync\n", message(subject="sync2"), False),
    ("subject is case-sensitive", "subject: Sync\n", message(), False),
    ("subject is not a prefix", "subject: syn\n", message(), False),
    ("empty subject filter", "subject: ''\n", message(subject=""), True),
    ("empty subject filter, other subject", "subject: ''\n", message(), False),
    ("content equal", "content: disruption 42\n", message(), True),
    ("content differs", "content: disruption\n", message(), False),
    ("message equal", "message: '[sync]disruption 42'\n", message(), True),
    ("message without brackets", "message: 'syncdisruption 42'\n", message(), False),
    ("message of empty parts", "message: '[]'\n", message(subject="", content=""), True),
    ("message_start prefix", "message_start: '[sync]dis'\n", message(), True),
    ("message_start whole", "message_start: '[sync]disruption 42'\n", message(), True),
    ("message_start not a prefix", "message_start: 'disruption'\n", message(), False),
    ("message_start empty", "message_start: ''\n", message(), True),
    ("sender equal", "sender: pushsync\n", message(), True),
    ("sender differs", "sender: other\n", message(), False),
    ("priority equal", "priority: high\n", message(priority="high"), True),
    ("priority differs", "priority: high\n", message(), False),
    ("subject regex", "subject_matches: '^sy'\n", message(), True),
    ("regex searches anywhere", "subject_matches: 'nc'\n", message(), True),
    ("regex anchored end", "subject_matches: 'sy$'\n", message(), False),
    ("regex full anchors", "content_matches: '^disruption \\d+$'\n", message(), True),
    ("regex is case-sensitive", "subject_matches: '^SYNC'\n", message(), False),
    ("regex inline flag", "subject_matches: '(?i)^SYNC'\n", message(), True),
    ("regex special characters", "message_matches: '^\\[sync\\]'\n", message(), True),
    ("brackets are a class", "message_matches: '^[sync]d'\n", message(), False),
    ("regex dot", "content_matches: 'disruption.42'\n", message(), True),
    ("regex on empty content", "content_matches: '^$'\n", message(content=""), True),
    ("regex needs content", "content_matches: '.'\n", message(content=""), False),
    ("sender regex", "sender_matches: 'push'\n", message(), True),
    ("sender regex misses", "sender_matches: '^sync'\n", message(), False),
    ("unicode exact", "content: 'Straße gesperrt'\n", message(content="Straße gesperrt"), True),
    ("unicode regex", "content_matches: '^Stra\\w+e'\n", message(content="Straße"), True),
    ("unicode not folded", "content: 'Strasse'\n", message(content="Straße"), False),
    ("emoji", "subject_matches: '🚚'\n", message(subject="x🚚y"), True),
    ("all filters match", "subject: sync\nsender: pushsync\npriority: normal\n", message(), True),
    ("one filter of many misses", "subject: sync\nsender: other\n", message(), False),
    (
        "exact and regex together",
        "subject: sync\ncontent_matches: '42$'\n",
        message(),
        True,
    ),
    (
        "regex misses, exact matches",
        "subject: sync\ncontent_matches: '43$'\n",
        message(),
        False,
    ),
]


@pytest.mark.parametrize(
    ("filters", "msg", "expected"),
    [c[1:] for c in FILTER_CASES],
    ids=[c[0] for c in FILTER_CASES],
)
def test_filter(filters: str, msg: Message, expected: bool) -> None:
    assert bool(match(one(filters), msg)) is expected


ORDERED = """\
- name: first
  subject: sync
- name: second
  subject: sync
- name: catch-all
"""

CONTINUING = """\
- name: log
  continue: true
- name: first
  subject: sync
  continue: true
- name: second
  subject_matches: '^s'
- name: never
  subject: sync
- name: catch-all
"""

# (case id, handlers, message, names chosen)
ORDER_CASES = [
    ("first match wins", ORDERED, message(), ["first"]),
    ("later handler when earlier miss", ORDERED, message(subject="other"), ["catch-all"]),
    ("continue goes on", CONTINUING, message(), ["log", "first", "second"]),
    ("continue skips misses", CONTINUING, message(subject="status"), ["log", "second"]),
    ("continue to catch-all", CONTINUING, message(subject="x"), ["log", "catch-all"]),
    (
        "nothing matches",
        "- name: only\n  subject: sync\n",
        message(subject="other"),
        [],
    ),
    (
        "continue on the last handler",
        "- name: a\n  continue: true\n- name: b\n  continue: true\n",
        message(),
        ["a", "b"],
    ),
]


@pytest.mark.parametrize(
    ("body", "msg", "names"), [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES]
)
def test_order_and_continue(body: str, msg: Message, names: list[str]) -> None:
    assert [h.name for h in match(handlers(body), msg)] == names


def test_message_text_is_the_mobilink_layout() -> None:
    assert message_text(message()) == "[sync]disruption 42"
    assert message_text(message(subject="", content="")) == "[]"


# --------------------------------------------------------------------------- substitution

EVIL = "$(rm -rf /); `id` $subject ${content} $$ '\" \\ \n*"

# (case id, template, message, expected text)
EXPAND_CASES = [
    ("plain text", "hello", message(), "hello"),
    ("subject", "$subject", message(), "sync"),
    ("braces", "${subject}x", message(), "syncx"),
    ("adjacent variables", "$subject$content", message(), "syncdisruption 42"),
    ("dollar", "$$", message(), "$"),
    ("dollar then name", "$$subject", message(), "$subject"),
    ("three dollars", "$$$subject", message(), "$sync"),
    ("message", "$message", message(), "[sync]disruption 42"),
    ("sender and priority", "$sender/$priority", message(priority="low"), "pushsync/low"),
    ("request id", "$request_id", message(), str(REQUEST_ID)),
    ("device", "$device", message(), "truck-17"),
    ("time", "$year-$month-$day $hour:$minute:$second", message(), "2024-03-07 08:05:09"),
    (
        "content with variables",
        "$content",
        message(content="$subject ${device}"),
        "$subject ${device}",
    ),
    ("content with injection", "<$content>", message(content=EVIL), f"<{EVIL}>"),
    ("empty content", "[$content]", message(content=""), "[]"),
]


@pytest.mark.parametrize(
    ("template", "msg", "expected"), [c[1:] for c in EXPAND_CASES], ids=[c[0] for c in EXPAND_CASES]
)
def test_expand(template: str, msg: Message, expected: str) -> None:
    assert expand(template, msg, NOW, "truck-17") == expected


def test_expand_of_an_unknown_variable_raises() -> None:
    with pytest.raises(TemplateError, match=r"unknown variable \$nope"):
        expand("$nope", message(), NOW, "truck-17")


def test_year_is_four_digits() -> None:
    assert expand("$year", message(), datetime(987, 1, 2, 3, 4, 5), "d") == "0987"


def run_action(body: str) -> RunAction:
    action = handlers(body)[0].action
    assert isinstance(action, RunAction)
    return action


def test_injection_stays_one_literal_argv_element() -> None:
    action = run_action("- name: h\n  action: {run: [notify-send, '--', '$content', x$subject]}\n")
    argv = argv_for(action, message(content=EVIL), now=NOW, device="truck-17")
    assert argv == ["notify-send", "--", EVIL, "xsync"]


def test_content_holding_a_variable_is_not_expanded_again() -> None:
    action = run_action("- name: h\n  action: {run: [echo, '$content', '$subject']}\n")
    msg = message(subject="$content", content="$subject $$ ${request_id}")
    argv = argv_for(action, msg, now=NOW, device="truck-17")
    assert argv == ["echo", "$subject $$ ${request_id}", "$content"]


def test_whitespace_in_a_value_does_not_split_arguments() -> None:
    action = run_action("- name: h\n  action: {run: [prog, 'a $content b']}\n")
    argv = argv_for(action, message(content="one two\tthree"), now=NOW, device="truck-17")
    assert argv == ["prog", "a one two\tthree b"]


def test_start_action_argv() -> None:
    action = handlers("- name: h\n  action: {start: [./beacon.sh, $content]}\n")[0].action
    assert isinstance(action, StartAction)
    assert argv_for(action, message(), now=NOW, device="d") == ["./beacon.sh", "disruption 42"]


def test_socket_text() -> None:
    action = handlers(
        '- name: h\n  action: {socket: {port: 7000, send: "NOTIFY $request_id $$5\\n"}}\n'
    )[0].action
    assert isinstance(action, SocketAction)
    text = socket_text(action, message(), now=NOW, device="d")
    assert text == f"NOTIFY {REQUEST_ID} $5\n"


def test_message_start_and_message_end() -> None:
    (handler,) = handlers(
        "- name: h\n  message_start: '[sync]disruption '\n"
        "  action: {run: [prog, $message_start, $message_end]}\n"
    )
    assert isinstance(handler.action, RunAction)
    argv = argv_for(
        handler.action, message(), now=NOW, device="d", message_start=handler.message_start
    )
    assert argv == ["prog", "[sync]disruption ", "42"]


def test_unknown_variable_is_refused_when_loading() -> None:
    with pytest.raises(RulesError) as caught:
        handlers("- name: h\n  action: {run: [prog, $contents]}\n")
    assert str(caught.value) == (
        "listener.yaml:6:26: handler h: action.run: unknown variable $contents: "
        "write ${content}s for text right after $content"
    )
