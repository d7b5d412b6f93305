"""A three-node NATS cluster (MQTT and JetStream) loses a node in the middle of a burst.

The cluster is :mod:`tests.support.nats`: nodes n1, n2, n3 on 127.0.0.1, each
with MQTT, JetStream (MQTT streams and consumers with three replicas) and the
per-device permissions of docs/operations.md. Once NATS has made its MQTT
streams, the node leading ``$MQTT_msgs`` (where every QoS 1 message is kept)
is the one to kill; another is *home*. The real ``pushsync dispatch``
publishes through home with ``?group=none`` (NATS 2.9 delivers nothing to a
``$share/…`` subscription); four real ``pushsync listen`` processes keep
persistent sessions, two on home and two on the victim, each running an
action that appends its request id to a file. Rows are resent every 2 s.

When a fifth of the burst is confirmed, the victim is killed with SIGKILL.
The devices on home must then get all of their rows while it is down (NATS
elects new leaders meanwhile and closes some connections on the surviving
nodes, and may refuse the dispatcher's subscription to the acks once: both
must be got over). The victim is started again (same ports, same JetStream
folder) and the devices that were on it get their rows from their sessions,
which the surviving nodes kept. What must hold: every row is confirmed, each
action ran exactly once per row, and no process shows a traceback. Reported:
seconds from the kill to the home devices' last confirmation and to every
confirmation, and the disconnections, refusals and redeliveries seen.

``--reliability-scale`` multiplies the burst (200 rows at 1).
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import psycopg

from tests.reliability.harness import (
    Device,
    Knobs,
    Processes,
    Report,
    confirmed_ids,
    enqueue,
    exactly_once,
    missing_runs,
)
from tests.support.nats import DISPATCHER_PASSWORD, Node, cluster, device_password
from tests.support.waiting import until

DEVICES = ("truck-1", "truck-2", "truck-3", "truck-4")
RESEND = 2.0
"""Seconds before an unconfirmed row is published again (a publish lost with the node)."""
PATIENCE = 60.0


def mqtt_device(root: Path, name: str, node: Node, dsn: str) -> Device:
    """A registered device whose listener keeps a persistent MQTT session on ``node``."""
    device = Device.make(root, name)
    device.register(dsn, udp=False)
    device.write_config(udp=False)
    (device.home / "mqtt.pw").write_text(device_password(name), encoding="utf-8")
    text = device.config.read_text(encoding="utf-8")
    channel = f'  mqtt: {{server: "{node.server}", username: {name}, password_file: mqtt.pw}}\n'
    device.config.write_text(text.replace("channels:\n", f"channels:\n{channel}"), "utf-8")
    return device


def on_record(db: psycopg.Connection) -> int:
    """Devices whose MQTT subscription the dispatcher has on record."""
    row = db.execute(
        "SELECT count(*) FROM pushsync.device_addresses WHERE medium = 'mqtt' AND address = 'on'"
    ).fetchone()
    return int(row[0]) if row else 0


def count(logs: list[Path], text: str) -> int:
    """Lines of ``logs`` that contain ``text``."""
    return sum(log.read_text(errors="replace").count(text) for log in logs)


def test_a_node_killed_mid_burst_loses_nothing_and_each_action_runs_once(
    db: psycopg.Connection,
    dsn: str,
    tmp_path: Path,
    processes: Processes,
    knobs: Knobs,
    report: Report,
) -> None:
    started = time.monotonic()
    with cluster(tmp_path / "nats", DEVICES) as nats:
        # The node to kill leads the stream that keeps every QoS 1 message: the
        # dispatcher's publishes and the devices' acks wait for its successor.
        nats.make_mqtt_streams()
        victim = nats.stream_leader("$MQTT_msgs")
        home, idle = (node for node in nats.nodes if node is not victim)
        homes = [home, home, victim, victim]
        devices = [
            mqtt_device(tmp_path / "devices", name, node, dsn)
            for name, node in zip(DEVICES, homes, strict=True)
        ]
        password = tmp_path / "dispatcher.pw"
        password.write_text(DISPATCHER_PASSWORD, encoding="utf-8")
        dispatcher = processes.dispatcher(
            dsn, "--mqtt", home.url("group=none"), "--mqtt-password-file", str(password)
        )
        until(
            lambda: "MQTT: receiving acks through" in dispatcher.output(),
            "the dispatcher's subscription to the acks",
            PATIENCE,
            logs=[dispatcher.log, *nats.logs()],
        )
        # Started once the dispatcher reads the acks: a plain subscription gets only
        # what is published after it, and the listeners announce themselves at once.
        listeners = [processes.listener(device) for device in devices]
        logs = [dispatcher.log, *(listener.log for listener in listeners), *nats.logs()]
        for listener in listeners:
            listener.wait_started(PATIENCE)
        until(lambda: on_record(db) == len(DEVICES), "every announcement", PATIENCE, logs=logs)

        burst = enqueue(db, list(DEVICES), knobs.size(200), resend=RESEND)
        expected: set[uuid.UUID] = set().union(*burst.values())
        until(
            lambda: len(confirmed_ids(db) & expected) >= len(expected) // 5,
            "a fifth of the burst confirmed",
            PATIENCE,
            logs=logs,
        )
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        confirmed_at_kill = len(confirmed_ids(db) & expected)

        at_home = set().union(
            *(burst[d.name] for d, n in zip(devices, homes, strict=True) if n is home)
        )
        until(
            lambda: at_home <= confirmed_ids(db),
            f"the rows of the devices on {home.name}, while {victim.name} is down",
            PATIENCE,
            logs=logs,
        )
        home_done = time.monotonic() - killed_at

        victim.start()
        back = nats.wait_ready(nats.nodes, healthy=False)
        until(
            lambda: expected <= confirmed_ids(db),
            "every row confirmed",
            PATIENCE,
            logs=logs,
            explain=lambda: missing_runs(
                expected - confirmed_ids(db), [], [dispatcher.log, *nats.logs()]
            ),
        )
        all_done = time.monotonic() - killed_at
        until(
            lambda: all(len(d.ran()) >= len(burst[d.name]) for d in devices),
            "every action",
            PATIENCE,
            logs=logs,
        )
        for listener in listeners:
            listener.stop()
        dispatcher.stop()

    listener_logs = [listener.log for listener in listeners]
    report.add(
        rows=len(expected),
        nodes={"dispatcher and 2 devices": home.name, "killed, 2 devices": victim.name},
        idle=idle.name,
        confirmed_at_kill=confirmed_at_kill,
        home_devices_confirmed_after_kill_s=round(home_done, 2),
        killed_node_back_s=round(back, 2),
        all_confirmed_after_kill_s=round(all_done, 2),
        dispatcher_disconnections=count([dispatcher.log], "disconnected from the broker"),
        dispatcher_subscriptions_refused=count([dispatcher.log], "refused the subscription"),
        listener_disconnections=count(listener_logs, "lost the connection"),
        redelivered_not_run_again=count(listener_logs, "duplicate, not run again"),
        test_s=round(time.monotonic() - started, 2),
    )
    for device in devices:
        assert exactly_once(device.ran(), burst[device.name]) == {}, device.name
    assert processes.tracebacks() == []
    report.done()
