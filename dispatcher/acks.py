"""Verifying the devices' signed acks: the one check behind the UDP and MQTT gateways.

An ack names its device in clear; the device's secret comes from the cache
(``secret_for``, no I/O) or, for a device it does not hold, from the database
(``fetch_secret``), at most :data:`MAX_LOOKUPS` lookups at once. The ack is then
verified with that secret (:func:`pushsync.wire.protocol.decode_ack`). What
passes goes to the gateway's ``accept``; anything else to its ``drop``, with
the reason as a :class:`~pushsync.wire.protocol.ProtocolError`. The carrier (a
socket, a broker) is trusted with nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

from pushsync.wire import protocol

logger = logging.getLogger(__name__)

MAX_LOOKUPS: Final = 64
"""Secret lookups for acks from devices not in the cache that may run at once; acks
beyond that are dropped (the device acks the resend), so a flood of forged
acks cannot queue unbounded work for the database."""


class SecretLookup(Protocol):
    """The secret of ``device``, or None if there is no such device."""

    def __call__(self, device: str, /) -> bytes | None: ...


class SecretFetch(Protocol):
    """The secret of ``device`` from the database, or None if there is no such device."""

    def __call__(self, device: str, /) -> Awaitable[bytes | None]: ...


class AckHandler(Protocol):
    """Called with every verified ack and the ``host:port`` it came from."""

    def __call__(self, ack: protocol.Ack, peer: str, /) -> None: ...


class AckCounts(Protocol):
    """The counters a gateway keeps of what arrived: the verifier adds to these two."""

    dropped: int
    lookups: int
    """Acks whose device secret had to be fetched from the database."""


class UnknownDevice(protocol.ProtocolError):
    """The ack names a device that has no secret here."""


class LookupFailed(protocol.ProtocolError):
    """The device's secret could not be fetched from the database."""


class AckVerifier:
    """Verifies acks with their device's secret; hands on the good, drops the rest.

    ``accept(ack, where)`` gets each verified ack, ``drop(where, error)`` each
    envelope that is not one (it counts and logs it); ``where`` is what the
    gateway passed to :meth:`verify` (a peer address, a topic). Never raises.
    """

    def __init__(
        self,
        *,
        secret_for: SecretLookup,
        fetch_secret: SecretFetch | None,
        accept: Callable[[protocol.Ack, str], None],
        drop: Callable[[str, protocol.ProtocolError], None],
        stats: AckCounts,
        limit: int,
    ) -> None:
        self.limit = limit
        self._secret_for = secret_for
        self._fetch_secret = fetch_secret
        self._accept = accept
        self._drop = drop
        self._stats = stats
        self._lookups: set[asyncio.Task[None]] = set()

    def verify(self, data: bytes, where: str, *, device: str | None = None) -> None:
        """Verify ``data``; ``device``, if given, is the device the carrier says sent it,
        and an ack naming another is dropped."""
        try:
            named = protocol.peek_device(data, limit=self.limit)
            if device is not None and named != device:
                raise protocol.Malformed(f"an ack of device {named!r}")
            secret = self._secret_for(named)
        except protocol.ProtocolError as exc:
            self._drop(where, exc)
            return
        except Exception:
            self._stats.dropped += 1
            logger.exception("dropped an ack from %s: secret lookup failed", where)
            return
        if secret is not None:
            self._verified(data, secret, where)
        elif self._fetch_secret is None:
            self._drop(where, UnknownDevice("ack from an unknown device"))
        elif len(self._lookups) >= MAX_LOOKUPS:
            self._drop(where, UnknownDevice("too many acks from devices not looked up yet"))
        else:
            loop = asyncio.get_running_loop()
            task = loop.create_task(self._fetch_then_verify(data, named, where))
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)

    def close(self) -> None:
        """Cancel the lookups under way."""
        for task in self._lookups:
            task.cancel()

    async def _fetch_then_verify(self, data: bytes, device: str, where: str) -> None:
        assert self._fetch_secret is not None  # noqa: S101  type narrowing; started only when set
        self._stats.lookups += 1
        try:
            secret = await self._fetch_secret(device)
        except Exception as exc:
            self._drop(where, LookupFailed(f"cannot look up its device: {exc}"))
            return
        if secret is None:
            self._drop(where, UnknownDevice("ack from an unknown or disabled device"))
        else:
            self._verified(data, secret, where)

    def _verified(self, data: bytes, secret: bytes, where: str) -> None:
        try:
            ack = protocol.decode_ack(data, secret, limit=self.limit)
        except protocol.ProtocolError as exc:
            self._drop(where, exc)
            return
        self._accept(ack, where)


__all__ = [
    "MAX_LOOKUPS",
    "AckCounts",
    "AckHandler",
    "AckVerifier",
    "LookupFailed",
    "SecretFetch",
    "SecretLookup",
    "UnknownDevice",
]
