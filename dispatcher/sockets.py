"""Listening TCP sockets for the dispatcher's servers (the SYNC gateway, ``/metrics``)."""

from __future__ import annotations

import asyncio
import socket


async def listening(host: str, port: int, backlog: int = 100) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address ``host`` resolves to, bound as
    :meth:`asyncio.loop.create_server` binds them (``SO_REUSEADDR``, IPv6 only on IPv6).
    Port 0: the system picks one. OSError, naming the address, if one cannot be bound."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: {exc.strerror}",
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
