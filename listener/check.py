"""``pushsync listen CONFIG --check``: try what the listener needs, say what is wrong, exit.

Each check prints one line, ``ok`` or ``FAILED`` with a hint; then the handler
table, in matching order. Exit status 0 when every check passed, 1 when one
failed, 2 when the config or the key file cannot be used (as ``listen``).
"""

from __future__ import annotations

import asyncio
import errno
import imaplib
import os
import shutil
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TextIO

from pushsync.errors import PushsyncError
from pushsync.listener.config import (
    Action,
    Handler,
    ListenerConfig,
    RunAction,
    SocketAction,
    StartAction,
    SyncAction,
    load_for_command,
)
from pushsync.listener.config import ImapChannel as ImapConfig
from pushsync.listener.config import MqttChannel as MqttConfig
from pushsync.listener.connection import KeyRefused, Refused, open_session
from pushsync.listener.state import LISTENER_LOCK, FolderLock
from pushsync.wire import protocol
from pushsync.wire.addresses import Address

CHECK_TIMEOUT = 10.0
"""Seconds each network check may take."""


@dataclass(frozen=True, slots=True)
class Result:
    what: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAILED'}  {self.what}" + (
            f": {self.detail}" if self.detail else ""
        )


def run_check(config_path: str, out: TextIO = sys.stdout) -> int:
    """``pushsync listen CONFIG --check``; the exit status."""
    loaded = load_for_command(config_path)
    if isinstance(loaded, int):
        return loaded
    config, secret = loaded
    results = [Result(f"config {config.path} and key file {config.secret_file}", True)]
    results.append(_state_dir(config))
    results.extend(asyncio.run(_channels(config, secret)))
    results.extend(_actions(config))
    for result in results:
        print(result.line(), file=out)
    print(file=out)
    for line in handler_table(config.handlers):
        print(line, file=out)
    return 0 if all(result.ok for result in results) else 1


def _state_dir(config: ListenerConfig) -> Result:
    what = f"state_dir {config.state_dir}"
    try:
        config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = FolderLock(config.state_dir, LISTENER_LOCK)
        if not lock.try_acquire():
            return Result(what, False, f"in use by {lock.holder()}: a listener runs on it already")
        lock.release()
    except OSError as exc:
        return Result(what, False, f"{exc.strerror or exc}: the listener must be able to write it")
    return Result(what, True)


async def _channels(config: ListenerConfig, secret: bytes) -> list[Result]:
    channels = config.channels
    found: list[Result] = []
    for name, channel in ((n, getattr(channels, n)) for n in ("sync", "poll")):
        if channel is not None:
            found.append(await _handshake(name, channel.server, config, secret))
    if channels.udp is not None:
        found.append(_bind_udp(channels.udp.bind))
    if channels.maildir is not None:
        path = channels.maildir.path
        missing = [d for d in ("new", "cur") if not (path / d).is_dir()]
        found.append(
            Result(
                f"maildir {path}",
                not missing,
                f"no {' or '.join(missing)}/ in it: is this where your mail is delivered?"
                if missing
                else "",
            )
        )
    if channels.imap is not None:
        found.append(await asyncio.to_thread(_imap_login, channels.imap))
    if channels.mqtt is not None:
        found.append(await asyncio.to_thread(_mqtt_login, channels.mqtt, config.device))
    return found


def _mqtt_login(mqtt: MqttConfig, device: str) -> Result:
    from pushsync.listener.mqtt import check_broker  # paho-mqtt: only when configured

    who = f" as {mqtt.username}" if mqtt.username else ""
    what = f"mqtt channel: {mqtt.server}{who}, subscribing to {mqtt.topic_prefix}/{device}/in"
    try:
        failure = check_broker(mqtt, device, CHECK_TIMEOUT)
    except PushsyncError as exc:
        return Result(what, False, str(exc))
    return Result(what, failure is None, failure or "")


async def _handshake(name: str, server: Address, config: ListenerConfig, secret: bytes) -> Result:
    what = f"{name} channel: handshake with {server} as {config.device}"
    tls = getattr(getattr(config.channels, name), "tls", False)
    ca_file = getattr(getattr(config.channels, name), "ca_file", None)
    try:
        session = await open_session(
            server,
            device=config.device,
            secret=secret,
            tls=tls,
            ca_file=ca_file,
            timeout=CHECK_TIMEOUT,
        )
    except KeyRefused as exc:
        return Result(what, False, str(exc))
    except ConnectionRefusedError:
        return Result(
            what,
            False,
            f"nothing listens there: is `pushsync dispatch --sync-listen {server}` running?",
        )
    except TimeoutError:
        return Result(
            what, False, f"no answer in {CHECK_TIMEOUT:.0f}s: a firewall, or a wrong host?"
        )
    except ssl.SSLError as exc:
        return Result(what, False, f"TLS: {exc.reason or exc}: check tls and ca_file")
    except protocol.BadSignature:
        return Result(what, False, "the server could not prove it knows this device's secret")
    except Refused as exc:
        return Result(what, False, f"the server said: {exc}")
    except (OSError, protocol.ProtocolError) as exc:
        return Result(what, False, str(exc) or type(exc).__name__)
    await session.close("check done")
    return Result(what, True)


def _bind_udp(bind: Address) -> Result:
    what = f"udp channel: bind {bind}"
    family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((bind.host, bind.port))
    except OSError as exc:
        hint = (
            "another program (a listener?) has it"
            if exc.errno == errno.EADDRINUSE
            else "a wrong address?"
        )
        return Result(what, False, f"{exc.strerror or exc}: {hint}")
    return Result(what, True)


def _imap_login(imap: ImapConfig) -> Result:
    what = f"imap channel: log in to {imap.host}:{imap.port} as {imap.user}"
    password = ""
    try:
        password = imap.password_file.read_text(encoding="ascii").rstrip("\n")
        with imaplib.IMAP4_SSL(imap.host, imap.port, timeout=CHECK_TIMEOUT) as client:
            client.login(imap.user, password)
    except (OSError, UnicodeDecodeError, imaplib.IMAP4.error) as exc:
        text = str(exc) or type(exc).__name__
        return Result(what, False, text.replace(password, "***") if password else text)
    return Result(what, True)


def _actions(config: ListenerConfig) -> Iterator[Result]:
    """Programs the handlers run must be found; a sync action needs a server to sync with."""
    seen: set[str] = set()
    for handler in config.handlers:
        for action in (handler.action, handler.altaction):
            if isinstance(action, RunAction | StartAction):
                program = action.argv[0].text
                if program in seen or action.argv[0].variables:
                    continue
                seen.add(program)
                found = shutil.which(program, path=os.environ.get("PATH"))
                yield Result(
                    f"handler {handler.name}: program {program}",
                    found is not None,
                    "" if found else "not found on PATH (or not executable)",
                )
            elif isinstance(action, SyncAction) and config.sync_server is None:
                yield Result(
                    f"handler {handler.name}: sync",
                    False,
                    "no sync or poll channel to synchronize through",
                )


_FILTERS: tuple[str, ...] = tuple(
    f.name
    for f in fields(Handler)
    if f.name not in {"name", "location", "action", "altaction", "continue_", "confirm"}
)


def handler_table(handlers: tuple[Handler, ...]) -> Iterator[str]:
    """The handlers as the listener tries them, one line each, and what is not confirmed."""
    yield "handlers, in the order they are tried (first match wins unless it continues):"
    catch_all = False
    for number, handler in enumerate(handlers, 1):
        filters = [_filter(handler, name) for name in _FILTERS if getattr(handler, name)]
        when = " and ".join(filters) if filters else "every message"
        catch_all = catch_all or not filters
        flags = ("continues" if handler.continue_ else "", "" if handler.confirm else "no confirm")
        extra = ", ".join(flag for flag in flags if flag)
        yield (
            f"  {number}. {handler.name}: {when} -> {_describe(handler.action)}"
            + (f" ({extra})" if extra else "")
        )
    if not catch_all:
        yield (
            "  a message no handler matches is not confirmed (the server resends it until "
            "its ttl): add a handler without filters last to take every other message"
        )


def _filter(handler: Handler, name: str) -> str:
    value = getattr(handler, name)
    shown = value.pattern if hasattr(value, "pattern") else value
    return f"{name} {shown!r}"


def _describe(action: Action) -> str:
    if isinstance(action, RunAction | StartAction):
        verb = "run" if isinstance(action, RunAction) else "start"
        return f"{verb} {' '.join(part.text for part in action.argv)}"
    if isinstance(action, SocketAction):
        return f"socket {action.host}:{action.port}"
    return "sync" if isinstance(action, SyncAction) else "shutdown"
