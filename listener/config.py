"""The listener config: YAML → frozen, validated model, with every mistake located.

``pushsync listen CONFIG.yaml`` reads this file (see ``docs/listener.md``). The
whole file is read before anything is reported, so one run shows every mistake
as ``file:line:col: handler NAME: message``. Nothing here opens sockets or runs
commands; :func:`read_secret_file` is the one function that reads another file.

Only the standard library and PyYAML are imported: devices install pushsync
without the server extras. The located YAML reader is :mod:`pushsync.source`,
shared with the rules file.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final, TypeAlias, TypeVar, cast

from pushsync.errors import Location, Problems, PushsyncError, RulesError, UsageError
from pushsync.source import Node, closest, load, parse_duration, suggestion
from pushsync.wire.addresses import Address, parse_address, valid_host
from pushsync.wire.mqtt import DEFAULT_PREFIX, check_prefix
from pushsync.wire.protocol import PRIORITIES, Priority, read_secret

T = TypeVar("T")


# --------------------------------------------------------------------------- templates

VARIABLES: Final = (
    "subject",
    "content",
    "message",
    "sender",
    "priority",
    "request_id",
    "device",
    "year",
    "month",
    "day",
    "hour",
    "minute",
    "second",
)
"""Variables every action may use."""

PREFIX_VARIABLES: Final = ("message_start", "message_end")
"""Variables only a handler with a ``message_start`` filter may use."""

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class Variable:
    """A ``$name`` in a template."""

    name: str


@dataclass(frozen=True, slots=True)
class Template:
    """Text with ``$variables``, checked when the config is read.

    ``parts`` are literal text and variables in order; expanding it
    (:func:`pushsync.listener.handlers.expand`) cannot fail.
    """

    text: str
    parts: tuple[str | Variable, ...]

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(part.name for part in self.parts if isinstance(part, Variable))


class TemplateError(ValueError):
    """A template that names an unknown variable or has a stray ``$``."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


def parse_template(text: str, known: Iterable[str] = VARIABLES) -> Template:
    """Split ``text`` into literal text and ``$name`` / ``${name}`` variables.

    ``$$`` is one dollar sign. Raises :class:`TemplateError` for a name not in
    ``known`` or a ``$`` followed by neither a name, ``$`` nor ``{``.
    """
    names = frozenset(known)
    parts: list[str | Variable] = []
    literal: list[str] = []
    at = 0
    while (dollar := text.find("$", at)) >= 0:
        literal.append(text[at:dollar])
        if text.startswith("$$", dollar):
            literal.append("$")
            at = dollar + 2
            continue
        name, at = _variable_at(text, dollar)
        if name not in names:
            raise TemplateError(_unknown_variable(name, names, text, at), dollar)
        if "".join(literal):
            parts.append("".join(literal))
        literal = []
        parts.append(Variable(name))
    literal.append(text[at:])
    if any(literal):
        parts.append("".join(literal))
    return Template(text=text, parts=tuple(parts))


def _variable_at(text: str, dollar: int) -> tuple[str, int]:
    """The name of the variable at ``text[dollar]`` and where the text after it starts."""
    if text.startswith("${", dollar):
        close = text.find("}", dollar + 2)
        if close < 0:
            raise TemplateError("unclosed ${: write ${name}, or $$ for a dollar sign", dollar)
        return text[dollar + 2 : close], close + 1
    found = _VARIABLE_NAME.match(text, dollar + 1)
    if found is None:
        raise TemplateError("a $ must start a variable: write $$ for a dollar sign", dollar)
    return found.group(), found.end()


def _unknown_variable(name: str, names: frozenset[str], text: str, after: int) -> str:
    if name in PREFIX_VARIABLES:
        return f"${name} needs a message_start filter on this handler"
    shown = f"${{{name}}}" if text[after - 1 : after] == "}" else f"${name}"
    longest = max((n for n in names if name.startswith(n)), key=len, default=None)
    if longest is not None:
        rest = name[len(longest) :]
        return (
            f"unknown variable {shown}: write ${{{longest}}}{rest} for text right after ${longest}"
        )
    return f"unknown variable {shown}{closest(name, names, '$')}"


# --------------------------------------------------------------------------- the model

DEVICE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
HANDLER_NAME: Final = DEVICE_ID
DEFAULT_TIMEOUT: Final = timedelta(seconds=60)


DEFAULT_HEARTBEAT: Final = timedelta(seconds=30)


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncChannel:
    server: Address
    tls: bool = False
    ca_file: Path | None = None
    heartbeat: timedelta = DEFAULT_HEARTBEAT


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpChannel:
    bind: Address


@dataclass(frozen=True, slots=True, kw_only=True)
class MaildirChannel:
    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class ImapChannel:
    host: str
    port: int = 993
    user: str
    password_file: Path
    folder: str = "INBOX"
    every: timedelta = timedelta(seconds=30)


@dataclass(frozen=True, slots=True, kw_only=True)
class PollChannel:
    server: Address
    every: timedelta = timedelta(seconds=60)
    tls: bool = False
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttChannel:
    server: Address
    topic_prefix: str = DEFAULT_PREFIX
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    client_id: str | None = None
    """None: the device id (one persistent session per device)."""


MQTT_EXTRA: Final = "pip install 'pushsync[mqtt]'"


@dataclass(frozen=True, slots=True, kw_only=True)
class Channels:
    """The ways messages reach this device; at least one is set."""

    sync: SyncChannel | None = None
    udp: UdpChannel | None = None
    maildir: MaildirChannel | None = None
    imap: ImapChannel | None = None
    poll: PollChannel | None = None
    mqtt: MqttChannel | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncAction:
    """The built-in sync client: one synchronization of the local database."""

    timeout: timedelta = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownAction:
    """Stop the listener."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunAction:
    """Run a program and wait for it; a non-zero exit or the timeout is a failure."""

    argv: tuple[Template, ...]
    timeout: timedelta = DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True, kw_only=True)
class StartAction:
    """Start a program in the background; failing to start it is a failure."""

    argv: tuple[Template, ...]
    timeout: timedelta | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketAction:
    """Send text to a TCP port, and with ``reply`` wait for an answer."""

    host: str = "localhost"
    port: int
    send: Template
    reply: bool = False
    timeout: timedelta = DEFAULT_TIMEOUT


Action: TypeAlias = SyncAction | ShutdownAction | RunAction | StartAction | SocketAction


@dataclass(frozen=True, slots=True, kw_only=True)
class Handler:
    """Filters (all must match; none matches everything) and what to do then."""

    name: str
    location: Location
    subject: str | None = None
    content: str | None = None
    message: str | None = None
    message_start: str | None = None
    sender: str | None = None
    priority: Priority | None = None
    subject_matches: re.Pattern[str] | None = None
    content_matches: re.Pattern[str] | None = None
    message_matches: re.Pattern[str] | None = None
    sender_matches: re.Pattern[str] | None = None
    action: Action
    altaction: Action | None = None
    continue_: bool = False
    confirm: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    path: Path
    device: str
    secret_file: Path
    state_dir: Path
    channels: Channels
    handlers: tuple[Handler, ...]
    publication: str | None = None
    """The publication ``sync`` synchronizes (the rules file's ``publications:``); None:
    the server's only publication."""

    @property
    def sync_server(self) -> tuple[Address, bool, Path | None] | None:
        """Where synchronization goes: the sync channel's server, else the poll channel's."""
        for channel in (self.channels.sync, self.channels.poll):
            if channel is not None:
                return channel.server, channel.tls, channel.ca_file
        return None


TOP_KEYS: Final = ("device", "secret_file", "state_dir", "publication", "channels", "handlers")
PUBLICATION_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
CHANNEL_KEYS: Final = ("sync", "udp", "maildir", "imap", "poll", "mqtt")
TEXT_FILTERS: Final = ("subject", "content", "message", "message_start", "sender")
REGEX_FILTERS: Final = ("subject_matches", "content_matches", "message_matches", "sender_matches")
HANDLER_KEYS: Final = (
    "name",
    *TEXT_FILTERS,
    "priority",
    *REGEX_FILTERS,
    "action",
    "altaction",
    "continue",
    "confirm",
)
ACTION_KEYS: Final = ("sync", "run", "start", "socket", "timeout")
ACTION_KINDS: Final = ("sync", "run", "start", "socket")
SOCKET_KEYS: Final = ("host", "port", "send", "reply")

# --------------------------------------------------------------------------- validation


class _Checker:
    """Validation state for one file: where problems go, and for which part."""

    def __init__(self, problems: Problems, base: Path) -> None:
        self.problems = problems
        self.base = base
        self.context: str | None = None
        self.suggested: set[tuple[Location, str]] = set()

    def fail(self, where: Location, message: str) -> None:
        self.problems.add(where, message, self.context)

    def mapping(self, node: Node, allowed: tuple[str, ...], what: str) -> dict[str, Node] | None:
        if not isinstance(node.value, dict):
            self.fail(node.location, f"{what} must be a mapping")
            return None
        for key, where in node.key_locations.items():
            if key not in allowed:
                self.fail(where, f"unknown key {key!r}{closest(key, allowed)}")
                if (meant := suggestion(key, allowed)) is not None:
                    self.suggested.add((node.location, meant))
        return cast(dict[str, Node], node.value)

    def require(self, fields: dict[str, Node], node: Node, key: str, what: str = "") -> Node | None:
        """``fields[key]``; ``what`` (e.g. ``"action.socket."``) prefixes the message."""
        found = fields.get(key)
        # A misspelt key was already reported with this key as its suggestion.
        if found is None and (node.location, key) not in self.suggested:
            where = f"{what[:-1]}: " if what else ""
            self.fail(node.location, f"{where}missing required key {key!r}")
        return found

    def text(self, node: Node, key: str) -> str | None:
        """A scalar's text; numbers and booleans as written (``subject: yes`` is the word)."""
        if isinstance(node.value, str):
            return node.value
        if isinstance(node.value, int | float) and node.raw is not None:
            return node.raw
        if node.value is None:
            self.fail(node.location, f"{key} needs a value (write '' for empty text)")
        else:
            self.fail(node.location, f"{key} must be text")
        return None

    def flag(self, node: Node, key: str) -> bool | None:
        if isinstance(node.value, bool):
            return node.value
        self.fail(node.location, f"{key} must be true or false, not {node.raw!r}")
        return None

    def duration(self, node: Node, key: str) -> timedelta | None:
        value = parse_duration(node.value)
        if value is None or value <= timedelta(0):
            shown = node.raw if node.raw is not None else node.value
            self.fail(
                node.location,
                f"bad duration {shown!r} for {key}: expected a number and a unit, "
                "e.g. 250ms, 30s, 5m, 1h30m",
            )
            return None
        return value

    def address(self, node: Node, key: str, *, lowest_port: int = 1) -> Address | None:
        text = self.text(node, key)
        if text is None:
            return None
        found = parse_address(text, lowest_port=lowest_port)
        if found is None:
            self.fail(
                node.location,
                f"bad address {text!r} for {key}: expected host:port with a port from "
                f"{lowest_port} to 65535 (IPv6 as [::1]:2439)",
            )
        return found

    def bind_address(self, node: Node, key: str) -> Address | None:
        """A local address to listen on; port 0 lets the system choose."""
        return self.address(node, key, lowest_port=0)

    def port(self, node: Node, key: str) -> int | None:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            self.fail(node.location, f"{key} must be a port number from 1 to 65535")
            return None
        return value

    def host(self, node: Node, key: str) -> str | None:
        text = self.text(node, key)
        if text is not None and not valid_host(text):
            self.fail(node.location, f"bad host {text!r} for {key}")
            return None
        return text

    def path(self, node: Node, key: str) -> Path | None:
        text = self.text(node, key)
        if text is None:
            return None
        if not text:
            self.fail(node.location, f"{key} must not be empty")
            return None
        return self.base / text

    def template(self, node: Node, key: str, known: tuple[str, ...]) -> Template | None:
        text = self.text(node, key)
        if text is None:
            return None
        try:
            return parse_template(text, known)
        except TemplateError as exc:
            self.fail(node.at(exc.offset), f"{key}: {exc.message}")
            return None


def loads_config(text: str, path: str | Path) -> ListenerConfig:
    """Validate listener config ``text`` read from ``path``.

    Relative paths in it are taken from ``path``'s directory. Raises
    :class:`~pushsync.errors.RulesError` listing every problem, located.
    """
    name = str(path)
    root = load(text, name)
    problems = Problems()
    checker = _Checker(problems, Path(path).parent)
    if not isinstance(root.value, dict):
        problems.add(root.location, "the listener config must be a mapping")
        problems.raise_if_any()
    config = _config(checker, root, Path(path))
    problems.raise_if_any()
    assert config is not None  # noqa: S101  type narrowing; no problems means a config
    return config


def load_config(path: str | Path) -> ListenerConfig:
    """Read and validate the listener config at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the listener config: {exc}") from exc
    return loads_config(text, path)


def read_secret_file(config: ListenerConfig) -> bytes:
    """The device secret from the config's ``secret_file``.

    Refused, as ssh refuses a private key, when the file is open to anyone but
    its owner (group or other permission bits) or owned by another user than
    the one running the listener (or root): whoever can read it can act as
    the device.
    """
    where = config.secret_file
    try:
        with where.open("rb") as handle:
            _check_key_file(os.fstat(handle.fileno()), where, config.path)
            text = handle.read(4096).decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: cannot read the key file: {exc}") from exc
    try:
        return read_secret(text)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _check_key_file(status: os.stat_result, where: Path, config: Path) -> None:
    named = f"(secret_file of {config})"
    if status.st_mode & 0o077:
        mode = stat.S_IMODE(status.st_mode)
        raise UsageError(
            f"{where}: the key file is open to other users (mode {mode:04o}) {named}; "
            f"it must be readable by its owner only: chmod 600 {where}"
        )
    if status.st_uid not in (os.getuid(), 0):
        raise UsageError(
            f"{where}: the key file belongs to another user (uid {status.st_uid}) {named}; "
            "it must belong to the user running pushsync (or root)"
        )


def _config(checker: _Checker, root: Node, path: Path) -> ListenerConfig | None:
    fields = checker.mapping(root, TOP_KEYS, "the listener config")
    assert fields is not None  # noqa: S101  type narrowing; load_config() refused a non-mapping
    device = None
    if (device_node := checker.require(fields, root, "device")) is not None:
        device = _device(checker, device_node)
    secret_file = None
    if (secret_node := checker.require(fields, root, "secret_file")) is not None:
        secret_file = checker.path(secret_node, "secret_file")
    state_dir: Path | None = checker.base / "state"
    if (state_node := fields.get("state_dir")) is not None:
        state_dir = checker.path(state_node, "state_dir")
    channels = None
    if (channels_node := checker.require(fields, root, "channels")) is not None:
        channels = _channels(checker, channels_node)
    handlers = None
    if (handlers_node := checker.require(fields, root, "handlers")) is not None:
        handlers = _handlers(checker, handlers_node)
    publication = None
    if (publication_node := fields.get("publication")) is not None:
        publication = checker.text(publication_node, "publication")
        if publication is not None and not PUBLICATION_NAME.match(publication):
            checker.fail(
                publication_node.location,
                f"bad publication name {publication!r}: lower-case letters, digits and _, "
                "starting with a letter",
            )
            publication = None
    if device is None or secret_file is None or state_dir is None:
        return None
    if channels is None or handlers is None:
        return None
    return ListenerConfig(
        path=path,
        device=device,
        secret_file=secret_file,
        state_dir=state_dir,
        channels=channels,
        handlers=handlers,
        publication=publication,
    )


def load_for_command(path: str | Path) -> tuple[ListenerConfig, bytes] | int:
    """The config and the device secret for a command (``listen``, ``sync``), or exit status 2
    after printing every problem, located, to stderr."""
    import sys

    try:
        config = load_config(path)
        return config, read_secret_file(config)
    except RulesError as exc:
        for problem in exc:
            print(problem, file=sys.stderr)
    except PushsyncError as exc:
        print(exc, file=sys.stderr)
    return 2


def _device(checker: _Checker, node: Node) -> str | None:
    device = checker.text(node, "device")
    if device is not None and not DEVICE_ID.match(device):
        checker.fail(
            node.location,
            f"bad device id {device!r}: use letters, digits, '.', '_' and '-', starting with "
            "a letter or digit, at most 64 characters",
        )
        return None
    return device


# --------------------------------------------------------------------------- channels


def _channels(checker: _Checker, node: Node) -> Channels | None:
    fields = checker.mapping(node, CHANNEL_KEYS, "channels")
    if fields is None:
        return None
    if not fields:
        checker.fail(node.location, f"channels must name at least one of {', '.join(CHANNEL_KEYS)}")
        return None
    before = len(checker.problems)
    found: dict[str, Any] = {}
    readers = {
        "sync": _sync_channel,
        "udp": _udp_channel,
        "maildir": _maildir_channel,
        "imap": _imap_channel,
        "poll": _poll_channel,
        "mqtt": _mqtt_channel,
    }
    for key, read in readers.items():
        if (channel_node := fields.get(key)) is None:
            continue
        checker.context = f"channels.{key}"
        channel_fields = checker.mapping(channel_node, _CHANNEL_FIELDS[key], f"channels.{key}")
        if channel_fields is not None:
            found[key] = read(checker, channel_node, channel_fields)
    checker.context = None
    if len(checker.problems) > before:
        return None
    return Channels(**found)


_CHANNEL_FIELDS: Final = {
    "sync": ("server", "tls", "ca_file", "heartbeat"),
    "udp": ("bind",),
    "maildir": ("path",),
    "imap": ("host", "port", "user", "password_file", "folder", "every"),
    "poll": ("server", "every", "tls", "ca_file"),
    "mqtt": ("server", "topic_prefix", "username", "password_file", "tls", "ca_file", "client_id"),
}


def _sync_channel(checker: _Checker, node: Node, fields: dict[str, Node]) -> SyncChannel | None:
    server = _required(checker, fields, node, "server", checker.address)
    tls, ca_file = _tls(checker, fields)
    heartbeat: timedelta | None = DEFAULT_HEARTBEAT
    if (heartbeat_node := fields.get("heartbeat")) is not None:
        heartbeat = checker.duration(heartbeat_node, "heartbeat")
    if server is None or tls is None or heartbeat is None:
        return None
    return SyncChannel(server=server, tls=tls, ca_file=ca_file, heartbeat=heartbeat)


def _tls(checker: _Checker, fields: dict[str, Node]) -> tuple[bool | None, Path | None]:
    """``tls`` and ``ca_file`` of a channel that talks to the SYNC port."""
    tls: bool | None = False
    if (tls_node := fields.get("tls")) is not None:
        tls = checker.flag(tls_node, "tls")
    ca_file = None
    if (ca_node := fields.get("ca_file")) is not None:
        ca_file = checker.path(ca_node, "ca_file")
        if tls is False:
            checker.fail(ca_node.location, "ca_file is used only with tls: true")
    return tls, ca_file


def _udp_channel(checker: _Checker, node: Node, fields: dict[str, Node]) -> UdpChannel | None:
    bind = _required(checker, fields, node, "bind", checker.bind_address)
    return UdpChannel(bind=bind) if bind is not None else None


def _maildir_channel(
    checker: _Checker, node: Node, fields: dict[str, Node]
) -> MaildirChannel | None:
    path = _required(checker, fields, node, "path", checker.path)
    return MaildirChannel(path=path) if path is not None else None


def _imap_channel(checker: _Checker, node: Node, fields: dict[str, Node]) -> ImapChannel | None:
    host = _required(checker, fields, node, "host", checker.host)
    user = _required(checker, fields, node, "user", checker.text)
    password_file = _required(checker, fields, node, "password_file", checker.path)
    values: dict[str, Any] = {}
    if (port_node := fields.get("port")) is not None:
        values["port"] = checker.port(port_node, "port")
    if (folder_node := fields.get("folder")) is not None:
        values["folder"] = checker.text(folder_node, "folder")
    if (every_node := fields.get("every")) is not None:
        values["every"] = checker.duration(every_node, "every")
    if host is None or user is None or password_file is None or None in values.values():
        return None
    return ImapChannel(host=host, user=user, password_file=password_file, **values)


def _poll_channel(checker: _Checker, node: Node, fields: dict[str, Node]) -> PollChannel | None:
    server = _required(checker, fields, node, "server", checker.address)
    tls, ca_file = _tls(checker, fields)
    every = None
    if (every_node := fields.get("every")) is not None:
        every = checker.duration(every_node, "every")
        if every is None:
            return None
    if server is None or tls is None:
        return None
    extra = {"every": every} if every else {}
    return PollChannel(server=server, tls=tls, ca_file=ca_file, **extra)


def _mqtt_channel(checker: _Checker, node: Node, fields: dict[str, Node]) -> MqttChannel | None:
    """``channels.mqtt``; a located error naming the extra when paho-mqtt is not installed."""
    if not _paho_installed():
        checker.fail(node.location, f"the mqtt channel needs paho-mqtt: {MQTT_EXTRA}")
        return None
    server = _required(checker, fields, node, "server", checker.address)
    tls, ca_file = _tls(checker, fields)
    values: dict[str, Any] = {}
    if (prefix_node := fields.get("topic_prefix")) is not None:
        prefix = checker.text(prefix_node, "topic_prefix")
        try:
            values["topic_prefix"] = None if prefix is None else check_prefix(prefix)
        except ValueError as exc:
            checker.fail(prefix_node.location, str(exc))
            values["topic_prefix"] = None
    for key in ("username", "client_id"):
        if (text_node := fields.get(key)) is not None:
            values[key] = checker.text(text_node, key)
            if values[key] == "":
                checker.fail(text_node.location, f"{key} must not be empty")
                values[key] = None
    if (password_node := fields.get("password_file")) is not None:
        values["password_file"] = checker.path(password_node, "password_file")
        if "username" not in fields:
            checker.fail(password_node.location, "password_file needs a username")
    if server is None or tls is None or None in values.values():
        return None
    return MqttChannel(server=server, tls=tls, ca_file=ca_file, **values)


def _paho_installed() -> bool:
    """Whether paho-mqtt can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("paho") is not None
    except (ImportError, ValueError):
        return False


def _required(
    checker: _Checker,
    fields: dict[str, Node],
    node: Node,
    key: str,
    read: Callable[[Node, str], T | None],
    what: str = "",
) -> T | None:
    found = checker.require(fields, node, key, what)
    return read(found, f"{what}{key}") if found is not None else None


# --------------------------------------------------------------------------- handlers


def _handlers(checker: _Checker, node: Node) -> tuple[Handler, ...] | None:
    if not isinstance(node.value, list):
        checker.fail(node.location, "handlers must be a list")
        return None
    if not node.value:
        checker.fail(node.location, "handlers must list at least one handler")
        return None
    before = len(checker.problems)
    seen: dict[str, Location] = {}
    handlers: list[Handler] = []
    for number, item in enumerate(node.value, start=1):
        checker.context = f"handler #{number}"
        handler = _handler(checker, item, seen)
        if handler is not None:
            handlers.append(handler)
    checker.context = None
    return tuple(handlers) if len(checker.problems) == before else None


def _handler(checker: _Checker, node: Node, seen: dict[str, Location]) -> Handler | None:
    if not isinstance(node.value, dict):
        checker.fail(node.location, "a handler must be a mapping")
        return None
    before = len(checker.problems)
    name = _handler_name(checker, node.value, node, seen)
    fields = checker.mapping(node, HANDLER_KEYS, "a handler")
    assert fields is not None  # noqa: S101  type narrowing; a mapping, checked above
    values: dict[str, Any] = {}
    for key in TEXT_FILTERS:
        if (found := fields.get(key)) is not None:
            values[key] = checker.text(found, key)
    if (priority := fields.get("priority")) is not None:
        values["priority"] = _priority(checker, priority)
    for key in REGEX_FILTERS:
        if (found := fields.get(key)) is not None:
            values[key] = _regex(checker, found, key)
    known = VARIABLES + (PREFIX_VARIABLES if "message_start" in fields else ())
    action = None
    if (action_node := checker.require(fields, node, "action")) is not None:
        action = _action(checker, action_node, "action", known)
    if (alt_node := fields.get("altaction")) is not None:
        values["altaction"] = _action(checker, alt_node, "altaction", known)
    for key, attribute in (("continue", "continue_"), ("confirm", "confirm")):
        if (found := fields.get(key)) is not None:
            values[attribute] = checker.flag(found, key)
    if len(checker.problems) > before or name is None or action is None:
        return None
    return Handler(name=name, location=node.location, action=action, **values)


def _handler_name(
    checker: _Checker, fields: dict[str, Node], node: Node, seen: dict[str, Location]
) -> str | None:
    found = checker.require(fields, node, "name")
    if found is None:
        return None
    name = checker.text(found, "name")
    if name is None:
        return None
    if not HANDLER_NAME.match(name):
        checker.fail(
            found.location,
            f"bad name {name!r}: use letters, digits, '.', '_' and '-', starting with a "
            "letter or digit, at most 64 characters",
        )
        return None
    checker.context = f"handler {name}"
    if name in seen:
        checker.fail(
            found.location, f"duplicate name {name!r} (first used at line {seen[name].line})"
        )
        return None
    seen[name] = found.location
    return name


def _priority(checker: _Checker, node: Node) -> Priority | None:
    if node.value in PRIORITIES:
        return cast(Priority, node.value)
    hint = closest(str(node.value), PRIORITIES)
    checker.fail(
        node.location, f"priority must be one of low, normal, high, not {node.raw!r}{hint}"
    )
    return None


def _regex(checker: _Checker, node: Node, key: str) -> re.Pattern[str] | None:
    text = checker.text(node, key)
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        where = node.at(exc.pos) if exc.pos is not None else node.location
        checker.fail(where, f"{key}: bad regular expression {text!r}: {exc.msg}")
    except (OverflowError, RecursionError):
        checker.fail(node.location, f"{key}: regular expression {text!r} is too large")
    return None


# --------------------------------------------------------------------------- actions


def _action(checker: _Checker, node: Node, key: str, known: tuple[str, ...]) -> Action | None:
    if isinstance(node.value, str):
        return _named_action(checker, node, key)
    fields = checker.mapping(node, ACTION_KEYS, key)
    if fields is None:
        return None
    kinds = [kind for kind in ACTION_KINDS if kind in fields]
    if len(kinds) != 1:
        given = f"; found {', '.join(kinds)}" if kinds else ""
        checker.fail(
            node.location, f"{key} must name exactly one of sync, run, start, socket{given}"
        )
        return None
    kind = kinds[0]
    timeout = None
    if (timeout_node := fields.get("timeout")) is not None:
        timeout = checker.duration(timeout_node, f"{key}.timeout")
    action = _action_of_kind(checker, fields[kind], kind, f"{key}.{kind}", known, timeout)
    return None if timeout_node is not None and timeout is None else action


def _action_of_kind(
    checker: _Checker,
    node: Node,
    kind: str,
    key: str,
    known: tuple[str, ...],
    timeout: timedelta | None,
) -> Action | None:
    if kind == "sync":
        flag = checker.flag(node, key)
        if flag is False:
            checker.fail(node.location, f"{key} must be true: it names the action")
        if flag is not True:
            return None
        return SyncAction(timeout=timeout or DEFAULT_TIMEOUT)
    if kind == "socket":
        return _socket(checker, node, key, known, timeout or DEFAULT_TIMEOUT)
    argv = _argv(checker, node, key, known)
    if argv is None:
        return None
    if kind == "run":
        return RunAction(argv=argv, timeout=timeout or DEFAULT_TIMEOUT)
    return StartAction(argv=argv, timeout=timeout)


def _named_action(checker: _Checker, node: Node, key: str) -> Action | None:
    if node.value == "sync":
        return SyncAction()
    if node.value == "shutdown":
        return ShutdownAction()
    hint = closest(node.value, ("sync", "shutdown", "run", "start", "socket"))
    if " " in node.value.strip():
        hint = f" (to run a command write {key}: {{run: [program, argument, ...]}})"
    checker.fail(
        node.location,
        f"{key} must be sync, shutdown or a mapping with run, start or socket, "
        f"not {node.value!r}{hint}",
    )
    return None


def _argv(
    checker: _Checker, node: Node, key: str, known: tuple[str, ...]
) -> tuple[Template, ...] | None:
    if not isinstance(node.value, list):
        checker.fail(
            node.location,
            f'{key} must be a list of arguments, e.g. [program, "$content"]: no shell is '
            "used, so a command line in one string cannot be split",
        )
        return None
    if not node.value:
        checker.fail(node.location, f"{key} must name at least the program to run")
        return None
    program, *arguments = node.value
    argv: list[Template | None] = [_program(checker, program, key)]
    argv += [checker.template(item, key, known) for item in arguments]
    if any(item is None for item in argv):
        return None
    return tuple(cast(list[Template], argv))


def _program(checker: _Checker, node: Node, key: str) -> Template | None:
    text = checker.text(node, key)
    if text is None:
        return None
    if not text:
        checker.fail(node.location, f"{key}: the program must not be empty")
        return None
    if "$" in text.replace("$$", ""):
        checker.fail(
            node.location,
            f"{key}: the program is written literally, without variables: a message must "
            "not choose what runs",
        )
        return None
    return Template(text=text, parts=(text.replace("$$", "$"),))


def _socket(
    checker: _Checker, node: Node, key: str, known: tuple[str, ...], timeout: timedelta
) -> SocketAction | None:
    fields = checker.mapping(node, SOCKET_KEYS, key)
    if fields is None:
        return None
    before = len(checker.problems)
    values: dict[str, Any] = {}
    if (host_node := fields.get("host")) is not None:
        values["host"] = checker.host(host_node, f"{key}.host")
    port = _required(checker, fields, node, "port", checker.port, f"{key}.")
    send_node = checker.require(fields, node, "send", f"{key}.")
    send = checker.template(send_node, f"{key}.send", known) if send_node else None
    if (reply_node := fields.get("reply")) is not None:
        values["reply"] = checker.flag(reply_node, f"{key}.reply")
    if len(checker.problems) > before or port is None or send is None:
        return None
    return SocketAction(port=port, send=send, timeout=timeout, **values)
