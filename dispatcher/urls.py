"""The servers a gateway logs in to, given as URLs (``--smtp``, ``--mqtt``): one parser.

``SCHEME://[USER[:PASSWORD]@]HOST[:PORT][?OPTION=VALUE&…]``, no path. Each
gateway says which schemes and options it knows and what its defaults are;
what is wrong comes out as a :class:`~pushsync.errors.UsageError` that never
repeats the password.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass, field

from pushsync.errors import UsageError


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerUrl:
    scheme: str
    """Lower case, one of the schemes the gateway knows."""
    host: str
    port: int | None
    """None: the scheme's default."""
    options: dict[str, str]
    """The last value given of each option in the query."""
    username: str | None
    password: str | None = field(repr=False)


def parse_server_url(
    url: str,
    *,
    schemes: Collection[str],
    options: Collection[str],
    form: str,
    password: str | None = None,
) -> ServerUrl:
    """``url`` taken apart; ``form`` is its shape for the messages (``smtp://HOST…``).

    ``password``, if given (from a password file), wins over one in the URL,
    which other users may see on the command line.
    """
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    if scheme not in schemes:
        expected = " or ".join(f"{known}://…" for known in schemes)
        raise UsageError(f"expected {expected}, not {scheme!r}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        raise UsageError("bad port") from None
    if not host:
        raise UsageError(f"a host is needed: {form}")
    if parsed.path not in ("", "/") or parsed.fragment:
        raise UsageError(f"no path: {form}")
    query = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(options))
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} (known: {', '.join(options)})")
    username = urllib.parse.unquote(parsed.username) if parsed.username else None
    if password is None and parsed.password is not None:
        password = urllib.parse.unquote(parsed.password)
    if password is not None and username is None:
        raise UsageError(f"a password needs a user: {scheme}://USER@HOST")
    return ServerUrl(
        scheme=scheme,
        host=host,
        port=port,
        options={key: query[key][-1] for key in options if key in query},
        username=username,
        password=password,
    )


__all__ = ["ServerUrl", "parse_server_url"]
