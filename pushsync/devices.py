"""Register devices, grant them publications, show them: ``pushsync device ...``."""

from __future__ import annotations

import csv
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from pushsync import queries
from pushsync.errors import UsageError
from pushsync.wire import protocol
from pushsync.wire.addresses import parse_address

DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PUBLICATION = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
"""A publication's name, as the rules file allows it."""
_EMAIL = re.compile(r"[^@\s]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+\Z")


def check_device_id(device_id: str) -> str:
    if not DEVICE_ID.match(device_id):
        raise UsageError(
            f"bad device id {device_id!r}: use up to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def parse_udp_address(text: str) -> str:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6), normalised; UsageError if malformed."""
    found = parse_address(text)
    if found is None:
        raise UsageError(
            f"bad UDP address {text!r}: expected HOST:PORT (IPv6 as [::1]:5001), "
            "e.g. 192.0.2.7:5001"
        )
    return str(found)


def check_publication(name: str) -> str:
    if not PUBLICATION.match(name):
        raise UsageError(
            f"bad publication name {name!r}: use lower-case letters, digits and _, "
            "starting with a letter, at most 63 characters"
        )
    return name


def check_email(text: str) -> str:
    if not _EMAIL.match(text):
        raise UsageError(f"bad email address {text!r}")
    return text


def check_mqtt(text: str) -> str:
    """``on``: the device listens on its MQTT topic (the record's address is that word)."""
    if text.strip().lower() != "on":
        raise UsageError(f"expected on or none, not {text!r}")
    return "on"


def new_secret() -> bytes:
    return secrets.token_bytes(protocol.SECRET_SIZE)


def read_key_file(path: Path) -> bytes:
    """The secret in an existing key file (as ``pushsync init`` writes one), refused when
    other users may read or write it: a secret they could have read is not a secret."""
    try:
        mode = path.stat().st_mode & 0o777
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not a key file"
        raise UsageError(f"cannot read {path}: {reason}") from exc
    if mode & 0o077:
        raise UsageError(
            f"{path}: the key file is open to other users (mode {mode:04o}); chmod 600 {path}"
        )
    try:
        return protocol.read_secret(text)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def write_secret_file(path: Path, secret: bytes) -> None:
    """Write the secret as hex to a new file only its owner can read."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise UsageError(f"{path} exists; not overwriting a secret") from exc
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w") as handle:
        handle.write(protocol.format_secret(secret))


@contextmanager
def _committed_with_keys(
    conn: psycopg.Connection, keys: Sequence[tuple[Path, bytes]]
) -> Iterator[None]:
    """A transaction for the block that writes ``keys`` (path, secret) before it commits:
    if anything fails, in the block or writing a file, nothing is committed and no file
    remains."""
    written: list[Path] = []
    try:
        with conn.transaction():
            yield
            for path, secret in keys:
                write_secret_file(path, secret)
                written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class NewDevice:
    device_id: str
    udp: str | None = None
    email: str | None = None
    publications: tuple[str, ...] = ()
    """The publications the device may synchronize (none: it cannot synchronize)."""


def add(
    conn: psycopg.Connection,
    device: NewDevice,
    secret_file: Path | None,
    secret: bytes | None = None,
) -> bytes:
    """Register ``device`` with ``secret`` (default: a fresh one) and return the secret.

    With ``secret_file`` the secret is written there before the transaction
    commits; if anything fails, neither the row nor the file remains.
    """
    secret = new_secret() if secret is None else secret
    keys = [(secret_file, secret)] if secret_file is not None else []
    with _committed_with_keys(conn, keys):
        row = conn.execute(
            queries.get("device_insert"), {"device_id": device.device_id, "secret": secret}
        ).fetchone()
        if row is None:
            raise UsageError(f"device {device.device_id} already exists")
        for medium, address in (("udp", device.udp), ("email", device.email)):
            if address is not None:
                conn.execute(
                    queries.get("address_upsert"),
                    {"device_id": device.device_id, "medium": medium, "address": address},
                )
        if device.publications:
            conn.execute(
                queries.get("publication_grant"),
                {"device_id": device.device_id, "publications": list(device.publications)},
            )
    return secret


def add_many(
    conn: psycopg.Connection, new: Sequence[NewDevice], secret_dir: Path | None
) -> dict[str, bytes]:
    """Register every device of ``new`` in one transaction; their secrets by device id.

    With ``secret_dir`` each secret is written to ``DIR/<device id>.key`` (mode
    0600, never overwriting) before the transaction commits; if any device
    exists already or anything else fails, no device is added and no file remains.
    """
    made = {device.device_id: new_secret() for device in new}
    keys = (
        [(secret_dir / f"{device_id}.key", secret) for device_id, secret in made.items()]
        if secret_dir is not None
        else []
    )
    with _committed_with_keys(conn, keys):
        taken = conn.execute(queries.get("devices_existing"), {"devices": list(made)}).fetchall()
        if taken:
            names = ", ".join(str(device_id) for (device_id,) in taken)
            raise UsageError(f"these devices exist already, none added: {names}")
        with conn.cursor() as cur:
            cur.executemany(
                queries.get("device_insert"),
                [{"device_id": d, "secret": secret} for d, secret in made.items()],
            )
            cur.executemany(
                queries.get("address_upsert"),
                [
                    {"device_id": device.device_id, "medium": medium, "address": address}
                    for device in new
                    for medium, address in (("udp", device.udp), ("email", device.email))
                    if address is not None
                ],
            )
            cur.executemany(
                queries.get("publication_grant"),
                [
                    {"device_id": device.device_id, "publications": list(device.publications)}
                    for device in new
                    if device.publications
                ],
            )
    return made


CSV_COLUMNS = ("device_id", "udp", "email", "publications")
"""The columns of ``device add --from FILE.csv``; only ``device_id`` is required."""


def read_devices_csv(path: Path) -> list[NewDevice]:
    """The devices of a CSV file with a header row naming :data:`CSV_COLUMNS`.

    ``publications`` holds names separated by spaces. Every mistake is reported
    at once, each as ``FILE:LINE: ...``; UsageError if there is any.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {path}: {reason}") from exc
    problems: list[str] = []
    found: list[NewDevice] = []
    seen: dict[str, int] = {}
    rows = csv.DictReader(text.splitlines(), restkey=_EXTRA)
    header = rows.fieldnames or []
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if "device_id" not in header or unknown:
        raise UsageError(
            f"{path}:1: the header must name device_id and may name "
            f"{', '.join(CSV_COLUMNS[1:])}; found {', '.join(header) or 'nothing'}"
        )
    for row in rows:
        line = rows.line_num
        try:
            device = _csv_device(row)
        except UsageError as exc:
            problems.append(f"{path}:{line}: {exc}")
            continue
        if device.device_id in seen:
            first = seen[device.device_id]
            problems.append(f"{path}:{line}: device {device.device_id} is also on line {first}")
            continue
        seen[device.device_id] = line
        found.append(device)
    if problems:
        raise UsageError("\n".join(problems))
    if not found:
        raise UsageError(f"{path}: no devices in the file")
    return found


_EXTRA = "\0extra"


def _csv_device(row: dict[str, Any]) -> NewDevice:
    if _EXTRA in row:
        raise UsageError(f"more fields than the header names ({len(row) - 1})")
    udp, email = (str(row.get(name) or "").strip() for name in ("udp", "email"))
    names = str(row.get("publications") or "").split()
    return NewDevice(
        device_id=check_device_id(str(row.get("device_id") or "").strip()),
        udp=_labelled("udp", udp, parse_udp_address) if udp else None,
        email=_labelled("email", email, check_email) if email else None,
        publications=tuple(
            dict.fromkeys(_labelled("publications", name, check_publication) for name in names)
        ),
    )


def _labelled(column: str, value: str, check: Callable[[str], str]) -> str:
    try:
        return check(value)
    except UsageError as exc:
        raise UsageError(f"{column}: {exc}") from exc


def rotate_secret(conn: psycopg.Connection, device_id: str, secret_file: Path | None) -> bytes:
    """Give ``device_id`` a fresh secret and return it.

    The old secret is refused from the commit on: every dispatcher closes the
    device's SYNC connections (trigger ``device_access_revoked``). With
    ``secret_file`` the new secret is written there before the commit; if
    anything fails, the old secret stays and no file remains.
    """
    secret = new_secret()
    keys = [(secret_file, secret)] if secret_file is not None else []
    with _committed_with_keys(conn, keys):
        params = {"device_id": device_id, "secret": secret}
        if conn.execute(queries.get("device_set_secret"), params).fetchone() is None:
            raise UsageError(f"there is no device {device_id}")
    return secret


def set_address(conn: psycopg.Connection, device_id: str, medium: str, address: str | None) -> None:
    """Set (or with None, drop) the manual ``medium`` address of ``device_id``.

    Addresses a device reports itself (tracked) are not touched: a manual one
    is what an operator says, a tracked one what the device last said.
    UsageError if there is no such device.
    """
    params = {"device_id": device_id, "medium": medium, "address": address}
    with conn.transaction():
        if conn.execute(queries.get("device_lock"), params).fetchone() is None:
            raise UsageError(f"there is no device {device_id}")
        conn.execute(
            queries.get("address_upsert" if address is not None else "address_drop"), params
        )


def grant(conn: psycopg.Connection, device_id: str, publications: Sequence[str]) -> list[str]:
    """Let ``device_id`` also synchronize ``publications``; the publications it now may
    synchronize. UsageError if there is no such device."""
    return _change_grants(conn, "publication_grant", device_id, publications)


def revoke(conn: psycopg.Connection, device_id: str, publications: Sequence[str]) -> list[str]:
    """Stop ``device_id`` from synchronizing ``publications`` (its next SYNC_BEGIN for one
    is refused); the publications it still may synchronize. UsageError if unknown."""
    return _change_grants(conn, "publication_revoke", device_id, publications)


def granted(conn: psycopg.Connection, device_id: str) -> list[str]:
    """The publications ``device_id`` may synchronize, by name."""
    rows = conn.execute(queries.get("publications_granted"), {"device_id": device_id})
    return [str(name) for (name,) in rows]


def undefined(conn: psycopg.Connection, publications: Sequence[str]) -> list[str]:
    """Those of ``publications`` that no applied rules file defines (yet)."""
    rows = conn.execute(queries.get("publications_defined"), {"publications": list(publications)})
    defined = {str(name) for (name,) in rows}
    return [name for name in publications if name not in defined]


def _change_grants(
    conn: psycopg.Connection, query: str, device_id: str, publications: Sequence[str]
) -> list[str]:
    params = {"device_id": device_id, "publications": list(publications)}
    with conn.transaction():
        if conn.execute(queries.get("device_lock"), params).fetchone() is None:
            raise UsageError(f"there is no device {device_id}")
        conn.execute(queries.get(query), params)
        return granted(conn, device_id)


def listing(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every device with its addresses and the dispatcher holding its SYNC connection (or
    None); never the secret."""
    out = []
    rows = conn.execute(queries.get("device_list"))
    for device_id, enabled, created, seen, addresses, connected_to in rows:
        out.append(
            {
                "device_id": device_id,
                "enabled": enabled,
                "created_at": _iso(created),
                "last_seen_at": _iso(seen),
                "addresses": addresses,
                "connected_to": connected_to,
            }
        )
    return out


def set_enabled(conn: psycopg.Connection, device_id: str, *, enabled: bool) -> None:
    """Enable or disable a device. Disabling closes its SYNC connections within a
    second (every dispatcher is notified on commit) and refuses it from then on.
    UsageError if there is no such device."""
    params = {"device_id": device_id, "enabled": enabled}
    if conn.execute(queries.get("device_set_enabled"), params).fetchone() is None:
        raise UsageError(f"there is no device {device_id}")


def remove(conn: psycopg.Connection, device_id: str) -> None:
    """Forget a device, its secret, addresses and pending notifications; its
    connections are closed as for :func:`set_enabled`. UsageError if unknown."""
    if conn.execute(queries.get("device_remove"), {"device_id": device_id}).fetchone() is None:
        raise UsageError(f"there is no device {device_id}")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
