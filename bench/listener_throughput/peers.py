"""Stdlib-only helper processes: the baseline UDP receiver and the TCP sink.

Run as a script (``python peers.py udp-baseline ACK_SIZE`` or ``python peers.py
tcp-sink``): it binds 127.0.0.1 port 0, prints ``port N`` on stdout and runs
until SIGTERM. Deliberately imports nothing from pushsync.

* ``udp-baseline`` counts datagrams and answers each with one fixed-size
  datagram of ``ACK_SIZE`` bytes that carries the message's request id at the
  offset where an ack carries it, so the sender treats it like an ack. No
  verification, no dedupe, no matching, no logging.
* ``tcp-sink`` accepts connections and reads each to its end (the ``socket``
  action's peer).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

HEADER = b"PS\x01A"


class Baseline(asyncio.DatagramProtocol):
    def __init__(self, ack_size: int) -> None:
        self.padding = bytes(ack_size - len(HEADER) - 16)
        self.count = 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.count += 1
        assert self.transport is not None
        self.transport.sendto(HEADER + data[4:20] + self.padding, addr)


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(65536):
            pass
    finally:
        writer.close()


async def main(mode: str, args: list[str]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if mode == "udp-baseline":
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: Baseline(int(args[0])), local_addr=("127.0.0.1", 0)
        )
        port = transport.get_extra_info("sockname")[1]
        print(f"port {port}", flush=True)
        await stop.wait()
        print(f"received {protocol.count}", flush=True)
        transport.close()
    elif mode == "tcp-sink":
        server = await asyncio.start_server(_sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"port {port}", flush=True)
        await stop.wait()
        server.close()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
