"""Test doubles for code that uses pushsync: fakes of its narrow interfaces.

Production code never imports this module.
"""

from __future__ import annotations

from pushsync.dispatcher.gateways import SendResult, failed, sent
from pushsync.dispatcher.outbox import Claimed

__all__ = ["RecordingGateway"]


class RecordingGateway:
    """A :class:`~pushsync.dispatcher.gateways.Gateway` that records every item it is
    asked to send; fails if told to (``final``: as a gateway that retrying cannot help)."""

    def __init__(self, name: str, fail_with: str | None = None, *, final: bool = False) -> None:
        self.name = name
        self.fail_with = fail_with
        self.final = final
        self.items: list[Claimed] = []

    async def send(self, item: Claimed) -> SendResult:
        self.items.append(item)
        if self.fail_with is not None:
            return failed(self.name, self.fail_with, final=self.final)
        return sent(self.name)
