"""Who may use the console: decisions only, no I/O (the middleware in :mod:`.app` asks).

On a loopback address without a token, anyone on the machine may look, but
only through a loopback ``Host`` (so a web page elsewhere cannot reach the
console through DNS rebinding). Anywhere else a token is required (or TLS
client certificates, checked by the TLS layer before any request is read).

The token travels as ``Authorization: Bearer TOKEN`` (scripts), or in the
cookie :data:`COOKIE` that ``GET /?token=TOKEN`` sets once and answers with a
redirect to ``/``: the browser's ``EventSource`` cannot send a header and
sends the cookie by itself. The query parameter is accepted on that one
route only, so the token is not repeated in every URL (logs, history); the
cookie is ``HttpOnly`` (no script reads it) and ``SameSite=Strict`` (no other
site's page sends it).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from enum import Enum
from http.cookies import SimpleCookie

COOKIE = "pushsync_monitor"
"""The cookie holding the token in the browser."""
MIN_TOKEN = 16
"""Fewest characters a token may have."""
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


class Verdict(Enum):
    ALLOW = "allow"
    LOGIN = "login"
    """A valid token in the query of ``GET /``: set the cookie, redirect to ``/``."""
    DENY = "deny"
    WRONG_HOST = "wrong host"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is loopback."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(header: str) -> str:
    """The host part of a ``Host`` header (``[::1]:8439`` -> ``[::1]``)."""
    header = header.strip()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def check_token(text: str) -> str:
    """The token read from a token file, stripped; ValueError if it is too weak."""
    token = text.strip()
    if len(token) < MIN_TOKEN:
        raise ValueError(f"the token must be at least {MIN_TOKEN} characters")
    if any(c.isspace() or not c.isprintable() or c in ';,"\\' for c in token):
        raise ValueError('the token must be one word of printable characters without ;,"\\')
    return token


def same_token(given: str, expected: str) -> bool:
    """Constant time in the contents and the lengths: both sides are hashed first."""
    a = hashlib.sha256(given.encode("utf-8", "surrogateescape")).digest()
    b = hashlib.sha256(expected.encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(a, b)


@dataclass(frozen=True, slots=True)
class Policy:
    """``token`` None: no token, so either ``client_certs`` (the TLS layer let only
    holders of a trusted certificate in) or loopback, where the Host is checked."""

    token: str | None
    client_certs: bool = False

    def decide(
        self,
        *,
        method: str,
        path: str,
        host: str,
        authorization: str | None,
        cookie: str | None,
        query_token: str | None,
    ) -> Verdict:
        if self.token is None:
            if self.client_certs:
                return Verdict.ALLOW
            return Verdict.ALLOW if is_loopback(host_of(host)) else Verdict.WRONG_HOST
        bearer = _bearer(authorization)
        if bearer is not None:
            return Verdict.ALLOW if same_token(bearer, self.token) else Verdict.DENY
        from_cookie = _cookie(cookie)
        if from_cookie is not None and same_token(from_cookie, self.token):
            return Verdict.ALLOW
        if query_token is not None and method == "GET" and path == "/":
            return Verdict.LOGIN if same_token(query_token, self.token) else Verdict.DENY
        return Verdict.DENY

    def cookie_header(self, *, secure: bool) -> str:
        """The ``Set-Cookie`` value that logs the browser in."""
        if self.token is None:
            raise RuntimeError("no token to set")
        flags = "; Path=/; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
        return f"{COOKIE}={self.token}{flags}"


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""  # another scheme: a wrong credential, never a fall-through
    return value.strip()


def _cookie(header: str | None) -> str | None:
    if not header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except Exception:  # http.cookies raises CookieError and others on malformed input
        return None
    morsel = jar.get(COOKIE)
    return None if morsel is None else morsel.value


__all__ = [
    "COOKIE",
    "MIN_TOKEN",
    "Policy",
    "Verdict",
    "check_token",
    "host_of",
    "is_loopback",
    "same_token",
]
