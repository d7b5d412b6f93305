"""The ``pushsync`` command.

Every option can also be set with an environment variable named after it
(``--dsn`` <-> ``PUSHSYNC_DSN``); the flag wins. Exit status: 0 on success,
2 for input the user can fix (reported as ``file:line:col: ...``), 1 when the
database or the system fails. Server-side modules are imported inside the
commands that need them, so the device-side commands stay light.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pushsync import __version__, logs
from pushsync.errors import DatabaseError, PushsyncError, RulesError, UsageError

log = logging.getLogger("pushsync")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def env_name(flag: str) -> str:
    """``--sync-listen`` -> ``PUSHSYNC_SYNC_LISTEN``."""
    return "PUSHSYNC_" + flag.lstrip("-").replace("-", "_").upper()


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


ENVIRONMENT_ERRORS: list[str] = []
"""Values of ``PUSHSYNC_...`` variables that their option does not accept."""


def option(parser: argparse.ArgumentParser, flag: str, *aliases: str, **kwargs: Any) -> None:
    """Add ``flag`` with its ``PUSHSYNC_...`` variable as the default."""
    variable = env_name(flag)
    value = os.environ.get(variable)
    if kwargs.get("action") == "store_true":
        kwargs["default"] = _truthy(value) if value is not None else False
    elif value is not None:
        choices = kwargs.get("choices")
        if choices is not None and value not in choices:
            # argparse checks choices only of values given on the command line.
            ENVIRONMENT_ERRORS.append(
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


# --- commands ----------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from pushsync import generator

    rules = generator.load(args.rules)
    if args.dsn is not None:
        from pushsync import db
        from pushsync.generator import dbcheck

        with db.connect(args.dsn) as conn:
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
    from pushsync import db, generator, schema
    from pushsync.generator import dbcheck

    rules = generator.load(args.rules) if args.rules is not None else None
    with db.connect(args.dsn) as conn:
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


def cmd_device_add(args: argparse.Namespace) -> int:
    from pushsync import db, devices
    from pushsync.wire.protocol import format_secret

    device = devices.NewDevice(
        device_id=devices.check_device_id(args.id),
        udp=devices.parse_udp_address(args.udp) if args.udp else None,
        email=devices.check_email(args.email) if args.email else None,
        publications=_publications(args.publication),
    )
    secret_file = Path(args.secret_file) if args.secret_file else None
    with db.connect(args.dsn) as conn:
        secret = devices.add(conn, device, secret_file)
        _warn_undefined(conn, device.publications)
    if secret_file is not None:
        print(f"device {device.device_id} added; secret written to {secret_file}", file=sys.stderr)
    else:
        print(f"device {device.device_id} added; its secret (shown once):", file=sys.stderr)
        sys.stdout.write(format_secret(secret))
    return EXIT_OK


def cmd_device_grant(args: argparse.Namespace) -> int:
    """``device grant ID NAME...`` and ``device revoke ID NAME...``."""
    from pushsync import db, devices

    device_id = devices.check_device_id(args.id)
    names = [devices.check_publication(name) for name in args.publications]
    change = devices.grant if args.device_command == "grant" else devices.revoke
    with db.connect(args.dsn) as conn:
        now = change(conn, device_id, names)
        if args.device_command == "grant":
            _warn_undefined(conn, names)
    print(f"device {device_id} may synchronize: {', '.join(now) or 'nothing'}")
    return EXIT_OK


def _publications(flags: list[str] | None) -> tuple[str, ...]:
    """``--publication`` (repeatable), else ``PUSHSYNC_PUBLICATION`` (comma-separated)."""
    from pushsync import devices

    if flags is None:
        flags = [n for n in os.environ.get(env_name("--publication"), "").split(",") if n.strip()]
    names = [devices.check_publication(name.strip()) for name in flags]
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
    from pushsync import db, devices

    with db.connect(args.dsn) as conn:
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
    from pushsync import db, devices

    enabled = args.device_command == "enable"
    with db.connect(args.dsn) as conn:
        devices.set_enabled(conn, devices.check_device_id(args.id), enabled=enabled)
    print(f"device {args.id} {'enabled' if enabled else 'disabled'}", file=sys.stderr)
    return EXIT_OK


def cmd_device_remove(args: argparse.Namespace) -> int:
    from pushsync import db, devices

    with db.connect(args.dsn) as conn:
        devices.remove(conn, devices.check_device_id(args.id))
    print(f"device {args.id} removed", file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from pushsync import db, status

    with db.connect(args.dsn) as conn:
        figures = status.collect(conn)
    print(json.dumps(figures, indent=2) if args.json else status.render(figures))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pushsync.demo import run_demo

    return run_demo(keep=args.keep, verbose=args.verbose)


def cmd_sync(args: argparse.Namespace) -> int:
    from pushsync.listener.sync import run_sync

    return run_sync(args.config)


def cmd_dispatch(args: argparse.Namespace) -> int:
    from pushsync import db
    from pushsync.dispatcher.daemon import run_dispatcher
    from pushsync.dispatcher.settings import DispatcherSettings

    if args.smtp_password_file and not args.smtp:
        raise UsageError("--smtp-password-file needs --smtp")
    given: dict[str, Any] = {"sync": _sync_settings(args)}
    if args.smtp:
        given["smtp"] = args.smtp
    if args.smtp_password_file:
        password = _read_text(args.smtp_password_file, "--smtp-password-file").strip()
        given["smtp_password"] = password
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pushsync",
        description="Server-initiated synchronization for PostgreSQL.",
    )
    parser.add_argument("--version", action="version", version=f"pushsync {__version__}")
    option(
        parser,
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="how much to log on stderr",
    )
    option(
        parser,
        "--log-format",
        choices=logs.FORMATS,
        default="text",
        help="text lines, or one JSON object per line for log collectors",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    migrate.set_defaults(handler=cmd_migrate)

    device = commands.add_parser("device", help="register and list devices")
    device_commands = device.add_subparsers(dest="device_command", required=True, metavar="ACTION")
    add = device_commands.add_parser("add", help="register a device and issue its secret")
    add.add_argument("id", metavar="ID")
    _dsn(add)
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
    remove = device_commands.add_parser(
        "remove", help="forget a device, its secret and pending notifications"
    )
    remove.add_argument("id", metavar="ID")
    _dsn(remove)
    remove.set_defaults(handler=cmd_device_remove)

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
    option(dispatch, "--metrics", metavar="HOST:PORT", help="serve /metrics and /healthz over HTTP")
    option(dispatch, "--batch", metavar="N", help="rows claimed at a time (default 500)")
    dispatch.set_defaults(handler=cmd_dispatch)

    demo = commands.add_parser(
        "demo", help="the trucking story end to end on an embedded PostgreSQL, no set-up"
    )
    option(demo, "--keep", action="store_true", help="leave everything running until Ctrl-C")
    option(demo, "--verbose", action="store_true", help="show the components' own logs too")
    demo.set_defaults(handler=cmd_demo)

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
    listen.set_defaults(handler=cmd_listen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ENVIRONMENT_ERRORS.clear()
    parser = build_parser()
    args = parser.parse_args(argv)
    if ENVIRONMENT_ERRORS:
        for error in ENVIRONMENT_ERRORS:
            print(f"pushsync: {error}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_level, args.log_format)
    handler: Handler = args.handler
    try:
        return handler(args)
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
