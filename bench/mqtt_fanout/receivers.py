"""The devices' side of the benchmark, in a process of its own:
``python -m bench.mqtt_fanout.receivers MODE ...``.

* ``mqtt PORT USER PASSWORD COUNT CLIENTS``: CLIENTS paho clients on the broker at
  127.0.0.1:PORT share the COUNT devices' ``in`` topics, one QoS 1 subscription
  each (persistent sessions, as devices have); print ``ready`` once every
  subscription is granted, then count messages until COUNT arrived.
* ``udp COUNT``: bind a UDP socket on 127.0.0.1, print its port, count datagrams
  until COUNT arrived.

Each prints one JSON line at the end: ``received`` and ``last`` (wall-clock time
of the last one). Messages are counted, not verified or acked: the benchmark
measures the dispatcher and the broker, not this process.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.fanout import device_id, receive_udp
from pushsync.wire import mqtt as topics

TIMEOUT = 60.0
SUBSCRIBE_AT_ONCE = 500
"""Topics per SUBSCRIBE packet."""


class Counter:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.last = 0.0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def count(self, *_args: Any) -> None:
        with self.lock:
            self.received += 1
            self.last = time.time()
            if self.received >= self.expected:
                self.done.set()


def mqtt(port: int, user: str, password: str, count: int, clients: int) -> dict[str, Any]:
    counter = Counter(count)
    granted = threading.Semaphore(0)
    packets = 0
    started = []
    for c in range(clients):
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-receiver-{c}",
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        client.username_pw_set(user, password)
        client.max_inflight_messages_set(1000)
        client.on_message = counter.count
        client.on_subscribe = lambda *_args: granted.release()
        client.connect("127.0.0.1", port)
        client.loop_start()
        mine = [topics.in_topic("pushsync", device_id(n)) for n in range(c, count, clients)]
        for at in range(0, len(mine), SUBSCRIBE_AT_ONCE):
            client.subscribe([(topic, 1) for topic in mine[at : at + SUBSCRIBE_AT_ONCE]])
            packets += 1
        started.append(client)
    for _ in range(packets):
        if not granted.acquire(timeout=TIMEOUT):
            raise RuntimeError("the broker did not grant every subscription")
    print("ready", flush=True)
    counter.done.wait(TIMEOUT)
    for client in started:
        client.disconnect()
        client.loop_stop()
    return {"received": counter.received, "last": counter.last}


def main(argv: list[str]) -> int:
    if argv[0] == "mqtt":
        port, user, password, count, clients = argv[1:6]
        result = mqtt(int(port), user, password, int(count), int(clients))
    elif argv[0] == "udp":
        result = receive_udp(int(argv[1]))
    else:
        raise SystemExit(f"unknown mode {argv[0]!r}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
