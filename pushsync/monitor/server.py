"""Serving the console: settings in, a listening :class:`Console` out (uvicorn on this loop).

:func:`run_monitor` is ``pushsync monitor``; ``pushsync demo --monitor`` and the
tests start a :class:`Console` on their own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from dataclasses import dataclass

import uvicorn

from pushsync.dispatcher.http import HttpServer
from pushsync.dispatcher.sockets import listening
from pushsync.errors import UsageError
from pushsync.monitor import data
from pushsync.monitor.access import Policy, is_loopback
from pushsync.monitor.app import Guard, build_app
from pushsync.wire.addresses import require_address

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8439"


@dataclass(frozen=True, kw_only=True, slots=True)
class MonitorSettings:
    dsn: str
    listen: str = DEFAULT_LISTEN
    token: str | None = None
    """The bearer token (see :mod:`.access`); None: none."""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """CA file of the client certificates to require (needs ``tls_cert`` and ``tls_key``)."""
    pulse_every: float = 0.5

    @property
    def secure(self) -> bool:
        return self.tls_cert is not None


def exposure_problem(settings: MonitorSettings) -> str | None:
    """Why these settings may not serve (None: they may); the message names the options."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        return "--tls-cert and --tls-key go together"
    if settings.tls_client_ca and not settings.tls_cert:
        return "--tls-client-ca needs --tls-cert and --tls-key"
    try:
        host = require_address(settings.listen, option="--listen", lowest_port=0).host
    except ValueError as exc:
        return str(exc)
    if is_loopback(host) or settings.token is not None or settings.tls_client_ca:
        return None
    return (
        f"--listen {settings.listen}: {host} is not a loopback address; "
        "anyone who can reach it would see the fleet: give --token-file "
        "(or --tls-client-ca with --tls-cert and --tls-key)"
    )


class Console:
    """The console serving on its address; :meth:`start`, then :meth:`close`."""

    def __init__(self, settings: MonitorSettings) -> None:
        problem = exposure_problem(settings)
        if problem is not None:
            raise UsageError(problem)
        self.settings = settings
        self.pool = data.open_pool(settings.dsn)
        policy = Policy(token=settings.token, client_certs=bool(settings.tls_client_ca))
        self.app: Guard = build_app(
            self.pool, policy, secure=settings.secure, pulse_every=settings.pulse_every
        )
        self._server: HttpServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []

    async def start(self) -> None:
        """Open the pool and listen; OSError if the address cannot be bound."""
        address = require_address(self.settings.listen, option="--listen", lowest_port=0)
        await self.pool.open()
        try:
            self._sockets = await listening(address.host, address.port)
            self._server = HttpServer(self._config())
            self._serving = await self._server.start(self._sockets, name="pushsync monitor http")
        except BaseException:
            await self.close()
            raise

    def _config(self) -> uvicorn.Config:
        s = self.settings
        tls: dict[str, object] = {}
        if s.tls_cert:
            tls = {"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key}
            if s.tls_client_ca:
                tls |= {"ssl_ca_certs": s.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        return uvicorn.Config(
            self.app,
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=1,
            h11_max_incomplete_event_size=8192,
            **tls,  # type: ignore[arg-type]
        )

    @property
    def address(self) -> tuple[str, int]:
        if not self._sockets:
            raise RuntimeError("the console is not listening")
        host, port = self._sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.settings.secure else 'http'}://{shown}:{port}/"

    async def close(self) -> None:
        if self.app.pulse is not None:
            await self.app.pulse.close()
        server, self._server = self._server, None
        if server is not None and self._serving is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await self._serving
        for sock in self._sockets:
            sock.close()
        await self.pool.close()


async def _serve_until_signalled(settings: MonitorSettings) -> int:
    console = Console(settings)
    try:
        await console.start()
    except OSError as exc:
        raise UsageError(
            f"--listen {settings.listen}: cannot listen: {exc.strerror or exc}"
        ) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    print(f"pushsync monitor on {console.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await console.close()
    return 0


def run_monitor(settings: MonitorSettings) -> int:
    """``pushsync monitor``: serve until SIGINT or SIGTERM; the exit status."""
    return asyncio.run(_serve_until_signalled(settings))


__all__ = ["DEFAULT_LISTEN", "Console", "MonitorSettings", "exposure_problem", "run_monitor"]
