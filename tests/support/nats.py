"""A real NATS cluster (three nodes by default) with MQTT, JetStream and pushsync permissions.

:class:`Cluster` writes one configuration per node (``server_name``, a client
port, an HTTP monitoring port, ``cluster { name, listen, routes }`` naming the
other nodes, ``jetstream { store_dir }`` of its own and ``mqtt { listen }``),
and ``stream_replicas``/``consumer_replicas`` for MQTT equal to the number of
nodes, all on free ports of 127.0.0.1 (``size=1``: one server, no cluster),
with the same users: the dispatcher publishes
to every device's ``in`` subject and reads every ``ack`` subject; each device
reads only its own ``in`` and writes only its own ``ack``. MQTT topics are NATS
subjects with ``/`` as ``.``; a QoS 1 subscription is delivered through a
JetStream consumer to a ``$MQTT.sub.…`` subject, which every MQTT user must be
allowed to subscribe to. :meth:`Cluster.start` returns once the nodes are
routed to each other (``/routez``), say JetStream is ready (``/healthz``) and
agree on a meta leader (``/jsz``). :meth:`Cluster.grant` changes the users'
permissions and reloads them (a test of a refused subscription).
``scripts/ensure-nats`` installs the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.processes import end

DISPATCHER_USER = "dispatcher"
DISPATCHER_PASSWORD = "dispatcher-secret"
CLUSTER_NAME = "pushsync"
START_TIMEOUT = 60.0
"""Seconds the cluster may take to elect its JetStream meta leader (a slow CI machine)."""
MQTT_INTERNAL = "$MQTT.sub.>"
"""Where NATS delivers an MQTT client's QoS 1 subscription (a JetStream consumer)."""


def binary() -> str:
    """The path of nats-server; fails the test with how to install it if missing."""
    bindir = os.environ.get("PUSHSYNC_NATS_BINDIR")
    for folder in (bindir, "/usr/sbin", "/usr/bin", "/usr/local/bin"):
        if folder and (Path(folder) / "nats-server").is_file():
            return str(Path(folder) / "nats-server")
    found = shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server is not installed: run scripts/ensure-nats (make test does)")
    return found


def device_password(device: str) -> str:
    return f"pw-{device}"


def subject(topic: str) -> str:
    """The NATS subject of an MQTT topic (without the rare ``.`` in a level)."""
    return topic.replace("/", ".").replace("+", "*").replace("#", ">")


def free_tcp_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports of 127.0.0.1 that nothing was bound to just now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _user(name: str, password: str, publish: list[str], subscribe: list[str]) -> str:
    return json.dumps(
        {
            "user": name,
            "password": password,
            "permissions": {"publish": publish, "subscribe": [*subscribe, MQTT_INTERNAL]},
        }
    )


def users(
    devices: Iterable[str], prefix: str = "pushsync", *, acks: bool = True, inboxes: bool = True
) -> list[str]:
    """The ``authorization { users }`` entries: the dispatcher's, then one per device.
    ``acks=False``: the dispatcher may not read the acks; ``inboxes=False``: the devices
    may not read their messages."""
    entries = [
        _user(
            DISPATCHER_USER,
            DISPATCHER_PASSWORD,
            [subject(f"{prefix}/+/in")],
            [subject(f"{prefix}/+/ack")] if acks else [],
        )
    ]
    for device in devices:
        entries.append(
            _user(
                device,
                device_password(device),
                [subject(f"{prefix}/{device}/ack")],
                [subject(f"{prefix}/{device}/in")] if inboxes else [],
            )
        )
    return entries


@dataclass
class Node:
    """One nats-server of the cluster: its name, ports, folder and process."""

    name: str
    folder: Path
    client_port: int
    route_port: int
    mqtt_port: int
    http_port: int
    process: subprocess.Popen[bytes] | None = None
    _logged_before: int = 0
    _routes: tuple[int, ...] = ()

    @property
    def log(self) -> Path:
        return self.folder / "nats.log"

    @property
    def config(self) -> Path:
        return self.folder / "nats.conf"

    @property
    def server(self) -> str:
        """``host:port`` of its MQTT listener (a listener config's ``server``)."""
        return f"127.0.0.1:{self.mqtt_port}"

    def url(self, *options: str) -> str:
        """``--mqtt`` for a dispatcher connected to this node (its password in a file)."""
        query = "?" + "&".join(options) if options else ""
        return f"mqtt://{DISPATCHER_USER}@{self.server}{query}"

    def write_config(self, routes: list[int], users: list[str]) -> None:
        """This node's configuration; with no ``routes`` a server on its own."""
        self._routes = tuple(routes)
        replicas = len(routes) + 1
        store = self.folder / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        others = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
        cluster = (
            f"""\
cluster {{
  name: {CLUSTER_NAME}
  listen: "127.0.0.1:{self.route_port}"
  routes: [{others}]
}}
"""
            if routes
            else ""
        )
        self.config.write_text(
            f"""\
server_name: {self.name}
listen: "127.0.0.1:{self.client_port}"
http: "127.0.0.1:{self.http_port}"
jetstream {{ store_dir: "{store}" }}
{cluster}mqtt {{
  listen: "127.0.0.1:{self.mqtt_port}"
  stream_replicas: {replicas}
  consumer_replicas: {replicas}
}}
authorization {{
  users: [
    {(chr(10) + "    ").join(users)}
  ]
}}
""",
            encoding="utf-8",
        )

    def start(self) -> None:
        self._logged_before = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [binary(), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def bound(self) -> bool:
        """Whether this start's log says every port is listening (routes are the last)."""
        with self.log.open("rb") as log:
            log.seek(self._logged_before)
            text = log.read()
        routed = b"Listening for route connections" in text or not self._routes
        return b"Server is ready" in text and routed

    def reload(self) -> None:
        """Read the configuration again (SIGHUP), as ``nats-server --signal reload`` does."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the node (SIGKILL: a crash, nothing flushed or handed over) and reap it."""
        process, self.process = self.process, None
        end(process, sig, 30)

    def monitor(self, path: str) -> tuple[int, Any]:
        """(HTTP status, decoded JSON) of the monitoring endpoint ``path``; (0, None) if
        the node does not answer."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (OSError, ValueError):
            return 0, None

    def ready(self, routes: int, *, healthy: bool) -> bool:
        """Routed to ``routes`` other nodes, and (``healthy``) every JetStream asset of
        this node current (``/healthz``)."""
        _, routez = self.monitor("/routez")
        if not routez or routez.get("num_routes", 0) < routes:
            return False
        return not healthy or self.monitor("/healthz")[0] == 200

    def meta_leader(self) -> str | None:
        """The JetStream meta leader this node knows of (a lone server: itself)."""
        _, jsz = self.monitor("/jsz")
        if not jsz:
            return None
        if "meta_cluster" not in jsz:
            return self.name
        return (jsz.get("meta_cluster") or {}).get("leader")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Cluster:
    """Three nats-server nodes (``n1``, ``n2``, ``n3``) routed to each other on 127.0.0.1."""

    def __init__(
        self,
        folder: Path,
        devices: Iterable[str],
        *,
        size: int = 3,
        acks: bool = True,
        inboxes: bool = True,
    ) -> None:
        self.folder = folder
        self.devices = list(devices)
        self.users = users(self.devices, acks=acks, inboxes=inboxes)
        self.size = size
        self.nodes = self._new_nodes()

    def _new_nodes(self) -> list[Node]:
        ports = iter(free_tcp_ports(4 * self.size))
        return [
            Node(
                name=f"n{i}",
                folder=self.folder / f"n{i}",
                client_port=next(ports),
                route_port=next(ports),
                mqtt_port=next(ports),
                http_port=next(ports),
            )
            for i in range(1, self.size + 1)
        ]

    def start(self) -> None:
        """Start every node and wait until the cluster has a JetStream meta leader. A node
        that exits at once (another process took one of its free ports first) makes the
        cluster start again on other ports, up to three times."""
        for _ in range(3):
            self._write_configs()
            for node in self.nodes:
                node.start()
            if self._all_running():
                break
            self.stop()
            self.nodes = self._new_nodes()
        self.wait_ready(self.nodes)

    def _all_running(self) -> bool:
        """Until every node has bound its ports (its log says so) or one has exited:
        whether all did."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if not all(node.running() for node in self.nodes):
                return False
            if all(node.bound() for node in self.nodes):
                return True
            time.sleep(0.02)
        return False

    def _write_configs(self) -> None:
        for node in self.nodes:
            routes = [other.route_port for other in self.nodes if other is not node]
            node.write_config(routes, self.users)

    def grant(self) -> None:
        """Give every user the permissions of docs/operations.md (the dispatcher reads the
        acks, each device its messages) in every node's configuration, and reload."""
        self.users = users(self.devices)
        self._write_configs()
        for node in self.nodes:
            node.reload()

    def wait_ready(
        self, nodes: list[Node], *, healthy: bool = True, timeout: float = START_TIMEOUT
    ) -> float:
        """Until each of ``nodes`` is routed to the others and they name one meta leader
        (and, ``healthy``, says JetStream is current); the seconds it took.

        A node started again after a crash may report a consumer "not current" on
        ``/healthz`` for a long while (nats-server 2.9.10) though it serves MQTT
        clients: ``healthy=False`` does not wait for that."""
        started = time.monotonic()
        while True:
            dead = [node.name for node in nodes if not node.running()]
            if dead:
                pytest.fail(f"nats-server {dead} exited:\n{self.tails()}")
            if all(node.ready(len(self.nodes) - 1, healthy=healthy) for node in nodes):
                leaders = {node.meta_leader() for node in nodes}
                if len(leaders) == 1 and None not in leaders:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                pytest.fail(f"the NATS cluster was not ready in {timeout:g}s:\n{self.tails()}")
            time.sleep(0.1)

    def make_mqtt_streams(self, timeout: float = START_TIMEOUT) -> None:
        """Have NATS make its MQTT streams (it does at the first MQTT connection): the
        dispatcher logs in to the first node, with a clean session, until accepted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _mqtt_login(self.nodes[0].mqtt_port, deadline - time.monotonic()):
                return
        pytest.fail(f"NATS did not accept an MQTT login in {timeout:g}s:\n{self.tails()}")

    def stream_leader(self, stream: str) -> Node:
        """The node leading JetStream stream ``stream`` (e.g. ``$MQTT_msgs``)."""
        for node in self.nodes:
            _, jsz = node.monitor("/jsz?accounts=true&streams=true")
            for account in (jsz or {}).get("account_details") or []:
                for found in account.get("stream_detail") or []:
                    leader = (found.get("cluster") or {}).get("leader")
                    if found.get("name") == stream and leader:
                        return next(n for n in self.nodes if n.name == leader)
        pytest.fail(f"no node leads the stream {stream}:\n{self.tails()}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def logs(self) -> list[Path]:
        return [node.log for node in self.nodes]

    def tails(self, chars: int = 2000) -> str:
        return "".join(f"\n--- {node.name} ---\n{node.tail(chars)}" for node in self.nodes)


def _mqtt_login(port: int, timeout: float) -> bool:
    """Whether the dispatcher's MQTT login to ``port`` is accepted (then it logs out)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id="pushsync-test-login",
        clean_session=True,
        protocol=paho.MQTTv311,
    )
    client.username_pw_set(DISPATCHER_USER, DISPATCHER_PASSWORD)
    answers: list[Any] = []
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    client.on_disconnect = lambda _c, _u, _f, reason, _p: answers.append(reason)
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except OSError:
        time.sleep(0.1)
        return False
    deadline = time.monotonic() + timeout
    while not answers and time.monotonic() < deadline:
        client.loop(0.1)
    accepted = bool(answers) and not answers[0].is_failure
    if accepted:
        client.disconnect()
        client.loop(0.1)
    sock = client.socket()
    if sock is not None:  # refused, or no answer: paho leaves the socket to its owner
        sock.close()
    return accepted


def mqtt_publish(node: Node, user: str, password: str, topic: str, data: bytes) -> None:
    """Publish ``data`` at QoS 1 as ``user`` through ``node``, and wait for its PUBACK."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{user}-test",
        clean_session=True,
        protocol=paho.MQTTv311,
    )
    client.username_pw_set(user, password)
    client.connect("127.0.0.1", node.mqtt_port, keepalive=30)
    client.loop_start()
    try:
        info = client.publish(topic, data, qos=1)
        info.wait_for_publish(START_TIMEOUT)
        assert info.is_published(), f"no PUBACK from {node.name} for {topic}"
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.contextmanager
def cluster(folder: Path, devices: Iterable[str], **options: Any) -> Iterator[Cluster]:
    """A started :class:`Cluster` (``options`` as it takes them) for the block."""
    running = Cluster(folder, devices, **options)
    try:
        running.start()
        yield running
    finally:
        running.stop()
