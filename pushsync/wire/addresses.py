"""Network addresses as both sides write and read them: ``host:port``, ``[v6]:port``."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class Address:
    """A ``host:port``; IPv6 hosts are written ``[::1]:2439`` and kept without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?\Z")


def valid_host(host: str) -> bool:
    """A host name, an IPv4 address or an IPv6 address (without brackets)."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return False
        return True
    return bool(_HOSTNAME.match(host))


def parse_address(text: str, *, lowest_port: int = 1) -> Address | None:
    """``host:port`` or ``[ipv6]:port``, port ``lowest_port``..65535; ``None`` if not one.

    A local address to bind may use port 0: the system picks a free one.
    """
    host, colon, port = text.rpartition(":")
    if not colon or not port.isascii() or not port.isdigit():
        return None
    if not lowest_port <= int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            return None
    elif ":" in host:
        return None  # an IPv6 address needs brackets
    return Address(host=host, port=int(port)) if valid_host(host) else None


def require_address(text: str, *, option: str, lowest_port: int = 1) -> Address:
    """:func:`parse_address`, or ValueError naming ``option`` (a flag or a config key).

    ``--sync-listen: bad address 'localhost': expected HOST:PORT (IPv6 as [::1]:2439)``
    """
    found = parse_address(text, lowest_port=lowest_port)
    if found is None:
        raise ValueError(
            f"{option}: bad address {text!r}: expected HOST:PORT (IPv6 as [::1]:2439), "
            f"port {lowest_port} to 65535"
        )
    return found


def format_peer(addr: Any) -> str:
    """A socket address as ``host:port`` (``[v6]:port``)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)
