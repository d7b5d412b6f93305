"""Register devices, grant them publications, show them: ``pushsync device ...``."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Sequence
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


def new_secret() -> bytes:
    return secrets.token_bytes(protocol.SECRET_SIZE)


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


@dataclass(frozen=True, slots=True)
class NewDevice:
    device_id: str
    udp: str | None = None
    email: str | None = None
    publications: tuple[str, ...] = ()
    """The publications the device may synchronize (none: it cannot synchronize)."""


def add(conn: psycopg.Connection, device: NewDevice, secret_file: Path | None) -> bytes:
    """Register ``device`` with a fresh secret and return it.

    With ``secret_file`` the secret is written there before the transaction
    commits; if anything fails, neither the row nor the file remains.
    """
    secret = new_secret()
    written = False
    try:
        with conn.transaction():
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
            if secret_file is not None:
                write_secret_file(secret_file, secret)
                written = True
    except BaseException:
        if written and secret_file is not None:
            secret_file.unlink(missing_ok=True)
        raise
    return secret


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
