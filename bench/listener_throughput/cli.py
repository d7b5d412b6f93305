"""Command line: start the peers, send, measure, report."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.listener_throughput import fsyncs, machine, profiling, sender
from bench.machine import cpu_seconds
from pushsync.wire import protocol

DEVICE = "bench-1"
SECRET = bytes(range(32))
PEERS = Path(__file__).with_name("peers.py")

TARGET_RATE = 5000.0
TARGET_RATIO = 0.3
"""msgs/s of the listener over the bare receiver's, in the same run."""
TARGET_COMMITS = 0.05
"""Dedupe commits (each one fsync) per message, at the default window."""
TARGET_RSS_MB = 40.0
DEFAULT_WINDOW = 64

DEFAULTS = {"rounds": 3, "messages": 20_000, "run_messages": 2_000}
QUICK = {"rounds": 1, "messages": 3_000, "run_messages": 300}

VARIANTS = ("sync", "socket", "run")
"""Listener handler kinds; see README.md for what each costs."""

LISTENING = re.compile(r"listening as \S+ on .*udp (\S+):(\d+)")
COMMITS = re.compile(r"stopped: .*, dedupe commits (\d+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.listener_throughput",
        description=(
            "Messages/s one `pushsync listen` handles over UDP (verification, dedupe, "
            "matching, one cheap action, log line, ack) and its idle RSS, as ratios "
            "against a bare asyncio UDP receiver measured in the same run."
        ),
    )
    parser.add_argument(
        "--messages", type=int, help=f"messages per timed run (default {DEFAULTS['messages']})"
    )
    parser.add_argument(
        "--run-messages",
        type=int,
        help=f"messages for the `run: [true]` variant (default {DEFAULTS['run_messages']})",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        help=f"unacknowledged messages in flight (default {DEFAULT_WINDOW})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds, median taken (default {DEFAULTS['rounds']})",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="listener handler kinds, comma-separated, of: " + ", ".join(VARIANTS),
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="parent directory for the listeners' state (dedupe store); default a temp dir",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=(
            "a smoke run: --rounds {rounds} --messages {messages} "
            "--run-messages {run_messages}".format(**QUICK)
        ),
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards: one run of the first variant under cProfile, and the dedupe store alone",
    )
    parser.add_argument(
        "--fsyncs",
        action="store_true",
        help="afterwards: one run of the first variant with strace counting the listener's fsyncs",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if args.messages < 1 or args.run_messages < 1 or args.window < 1 or args.rounds < 1:
        parser.error("--messages, --run-messages, --window and --rounds must be positive")
    return args


# --------------------------------------------------------------------------- processes


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}


def _stop(process: subprocess.Popen[str], what: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"{what} did not stop on SIGTERM") from None


class Peer:
    """A ``peers.py`` helper process; its port."""

    def __init__(self, mode: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(PEERS), mode, *args],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("port "):
            self.process.kill()
            raise RuntimeError(f"peers.py {mode} did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> str:
        _stop(self.process, "peers.py")
        assert self.process.stdout is not None
        return self.process.stdout.read()


def write_config(directory: Path, variant: str, sink_port: int | None) -> Path:
    (directory / "bench.key").write_text(protocol.format_secret(SECRET))
    (directory / "bench.key").chmod(0o600)  # the listener refuses a key others can read
    if variant == "sync":
        action = "sync"
    elif variant == "socket":
        action = f'{{socket: {{host: 127.0.0.1, port: {sink_port}, send: "$request_id"}}}}'
    else:
        action = "{run: [true]}"
    config = directory / "listener.yaml"
    config.write_text(
        f"""\
device: {DEVICE}
secret_file: bench.key
state_dir: state
channels:
  udp: {{bind: "127.0.0.1:0"}}
handlers:
  - name: bench
    subject: sync
    action: {action}
"""
    )
    return config


class ListenerProcess:
    """``pushsync listen CONFIG`` (the console script next to ``sys.executable``)."""

    def __init__(self, config: Path, *, profile: Path | None = None) -> None:
        self.log = config.with_name("listener.log")
        script = Path(sys.executable).with_name("pushsync")
        argv = [str(script), "listen", str(config)]
        if profile is not None:  # the same script, in-process under cProfile (main thread only)
            argv = [sys.executable, "-m", "cProfile", "-o", str(profile), *argv]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=config.parent,
                env=_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                text=True,
            )
        deadline = time.monotonic() + 30
        while True:
            found = LISTENING.search(self.log.read_text())
            if found:
                self.port = int(found.group(2))
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"the listener did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> dict[str, int]:
        """SIGTERM, wait; counts from its log (``commits``: -1 if it did not log them)."""
        _stop(self.process, "pushsync listen")
        text = self.log.read_text()
        commits = COMMITS.search(text)
        return {
            "exit_status": self.process.returncode,
            "duplicates_logged": text.count(": duplicate, not run again"),
            "dropped_logged": text.count("dropped message via"),
            "tracebacks": text.count("Traceback"),
            "commits": int(commits.group(1)) if commits else -1,
        }


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    target: str
    messages: int
    seconds: float
    rate: float
    acked: int
    lost: int
    resent: int
    extra_acks: int
    bad_acks: int
    idle_rss_mb: float
    after_rss_mb: float
    cpu_us: float
    """CPU time (user + system, all threads) of the receiving process per message sent."""
    notes: dict[str, int] = field(default_factory=dict)


def _ack_size() -> int:
    ack = protocol.Ack(request_id=uuid.uuid4(), device=DEVICE, confirmed=time.time())
    return len(protocol.encode_ack(ack, SECRET))


def run_baseline(messages: int, window: int) -> Run:
    peer = Peer("udp-baseline", str(_ack_size()))
    try:
        time.sleep(1.0)
        idle = rss_mb(peer.process.pid)
        datagrams = sender.make_datagrams(messages, device=DEVICE, secret=SECRET)
        cpu = cpu_seconds(peer.process.pid)
        result = asyncio.run(sender.send_all(datagrams, peer.port, window=window))
        cpu = cpu_seconds(peer.process.pid) - cpu
        after = rss_mb(peer.process.pid)
    finally:
        out = peer.stop()
    received = re.search(r"received (\d+)", out)
    return _run(
        "baseline",
        result,
        0,
        idle,
        after,
        cpu,
        {"received": int(received.group(1)) if received else -1},
    )


def run_listener(
    variant: str,
    messages: int,
    window: int,
    parent: Path,
    *,
    profile: Path | None = None,
    count_fsyncs: bool = False,
) -> Run:
    with tempfile.TemporaryDirectory(prefix=f"listener-{variant}-", dir=parent) as tmp:
        sink = Peer("tcp-sink") if variant == "socket" else None
        try:
            config = write_config(Path(tmp), variant, sink.port if sink else None)
            listener = ListenerProcess(config, profile=profile)
            counter: fsyncs.FsyncCounter | None = None
            synced: int | None = None
            try:
                time.sleep(1.0)
                idle = rss_mb(listener.pid)
                datagrams = sender.make_datagrams(messages, device=DEVICE, secret=SECRET)
                if count_fsyncs:
                    counter = fsyncs.FsyncCounter(listener.pid, Path(tmp) / "strace.txt")
                cpu = cpu_seconds(listener.pid)
                result = asyncio.run(sender.send_all(datagrams, listener.port, window=window))
                cpu = cpu_seconds(listener.pid) - cpu
                if counter is not None:
                    synced = counter.stop()
                after = rss_mb(listener.pid)
            finally:
                if counter is not None:
                    counter.close()
                notes = listener.stop()
            if synced is not None:
                notes["fsyncs"] = synced
        finally:
            if sink is not None:
                sink.stop()
    bad = sender.bad_acks(result.acks, SECRET)
    return _run(f"listener/{variant}", result, bad, idle, after, cpu, notes)


def _run(
    target: str,
    result: sender.SendResult,
    bad: int,
    idle: float,
    after: float,
    cpu: float,
    notes: dict[str, int],
) -> Run:
    return Run(
        target=target,
        messages=result.messages,
        seconds=result.seconds,
        rate=result.rate,
        acked=result.acked,
        lost=result.lost,
        resent=result.resent,
        extra_acks=result.extra_acks,
        bad_acks=bad,
        idle_rss_mb=idle,
        after_rss_mb=after,
        cpu_us=cpu / result.messages * 1e6,
        notes=notes,
    )


# --------------------------------------------------------------------------- report


def summarise(runs: list[Run], variants: list[str]) -> list[dict[str, object]]:
    by_target: dict[str, list[Run]] = {}
    for run in runs:
        by_target.setdefault(run.target, []).append(run)
    base = statistics.median(r.rate for r in by_target["baseline"])
    rows: list[dict[str, object]] = []
    for target in ["baseline", *(f"listener/{v}" for v in variants)]:
        group = by_target[target]
        rate = statistics.median(r.rate for r in group)
        rows.append(
            {
                "target": target,
                "messages": group[0].messages,
                "rounds": len(group),
                "rate": rate,
                "rates": [r.rate for r in group],
                "ratio": rate / base if base else 0.0,
                "lost": sum(r.lost for r in group),
                "resent": sum(r.resent for r in group),
                "bad_acks": sum(r.bad_acks for r in group),
                "idle_rss_mb": max(r.idle_rss_mb for r in group),
                "after_rss_mb": max(r.after_rss_mb for r in group),
                "cpu_us": statistics.median(r.cpu_us for r in group),
                "commits_per_message": _commits_per_message(group),
            }
        )
    return rows


def _commits_per_message(group: list[Run]) -> float | None:
    """Dedupe commits per message over the rounds; ``None`` for the baseline (or no count)."""
    commits = [r.notes.get("commits", -1) for r in group]
    if any(c < 0 for c in commits):
        return None
    return sum(commits) / sum(r.messages for r in group)


def print_table(rows: list[dict[str, object]]) -> None:
    header = (
        f"{'target':<18} {'msgs':>6} {'rounds':>6} {'msgs/s':>9} {'ratio':>7} "
        f"{'commits/msg':>11} {'cpu us/msg':>10} "
        f"{'lost':>5} {'resent':>6} {'badack':>6} {'idle MB':>8} {'after MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        commits = row["commits_per_message"]
        shown = "-" if commits is None else f"{commits:.4f}"
        print(
            f"{row['target']!s:<18} {row['messages']!s:>6} {row['rounds']!s:>6} "
            f"{row['rate']:>9,.0f} {row['ratio']:>7.3f} {shown:>11} {row['cpu_us']:>10.0f} "
            f"{row['lost']!s:>5} "
            f"{row['resent']!s:>6} {row['bad_acks']!s:>6} {row['idle_rss_mb']:>8.1f} "
            f"{row['after_rss_mb']:>8.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent_cm = (
        tempfile.TemporaryDirectory(prefix="listener-throughput-")
        if args.state_dir is None
        else None
    )
    parent = Path(parent_cm.name) if parent_cm is not None else args.state_dir
    parent.mkdir(parents=True, exist_ok=True)
    facts = machine.measure(parent)
    print(facts.describe())
    print(
        f"state dir {parent}; window {args.window}, rounds {args.rounds}, "
        f"messages {args.messages} (run variant {args.run_messages})"
    )
    runs: list[Run] = []
    try:
        for round_no in range(1, args.rounds + 1):
            for target in ["baseline", *args.variants]:
                if target == "baseline":
                    run = run_baseline(args.messages, args.window)
                else:
                    n = args.run_messages if target == "run" else args.messages
                    run = run_listener(target, n, args.window, parent)
                runs.append(run)
                print(
                    f"  round {round_no} {run.target:<16} {run.rate:>9,.0f} msgs/s "
                    f"({run.acked}/{run.messages} acked in {run.seconds:.2f}s, "
                    f"resent {run.resent}, cpu {run.cpu_us:.0f} us/msg, "
                    f"idle RSS {run.idle_rss_mb:.1f} MB) {run.notes}",
                    flush=True,
                )
        rows = summarise(runs, args.variants)
        verdicts = report(rows, args.window)
        if args.fsyncs and args.variants:
            print()
            report_fsyncs(args.variants[0], args.messages, args.window, parent)
        if args.profile and args.variants:
            print()
            profiling.report(args.variants[0], args.messages, args.window, parent, run_listener)
    finally:
        if parent_cm is not None:
            parent_cm.cleanup()
    if args.json is not None:
        write_json(args, facts, rows, verdicts, runs)
    return 0


def report(rows: list[dict[str, object]], window: int) -> dict[str, bool]:
    """The table and the verdicts; throughput and commits judged on the first variant."""
    print()
    print_table(rows)
    print()
    listener_rows = [r for r in rows if r["target"] != "baseline"]
    verdicts: dict[str, bool] = {}
    if not listener_rows:
        return verdicts
    best = listener_rows[0]  # the first variant listed: the cheapest action by default
    rate = float(best["rate"])  # type: ignore[arg-type]
    ratio = float(best["ratio"])  # type: ignore[arg-type]
    idle = max(float(r["idle_rss_mb"]) for r in listener_rows)  # type: ignore[arg-type]
    verdicts["throughput"] = rate >= TARGET_RATE
    verdicts["ratio"] = ratio >= TARGET_RATIO
    verdicts["idle_rss"] = idle <= TARGET_RSS_MB
    _verdict(
        f"throughput ({best['target']}): {rate:,.0f} msgs/s, target >= {TARGET_RATE:,.0f}",
        verdicts["throughput"],
    )
    _verdict(
        f"ratio to the bare receiver ({best['target']}): {ratio:.3f}, target >= {TARGET_RATIO}",
        verdicts["ratio"],
    )
    commits = best["commits_per_message"]
    if commits is None:
        print(f"dedupe commits per message ({best['target']}): not logged by the listener")
        verdicts["commits"] = False
    elif window == DEFAULT_WINDOW:
        verdicts["commits"] = float(commits) <= TARGET_COMMITS  # type: ignore[arg-type]
        _verdict(
            f"dedupe commits (fsyncs) per message ({best['target']}): {commits:.4f}, "
            f"target <= {TARGET_COMMITS} at window {DEFAULT_WINDOW}",
            verdicts["commits"],
        )
    else:
        print(
            f"dedupe commits (fsyncs) per message ({best['target']}): {commits:.4f} "
            f"(judged only at window {DEFAULT_WINDOW})"
        )
    _verdict(
        f"idle RSS (largest listener): {idle:.1f} MB, target <= {TARGET_RSS_MB:.0f} MB",
        verdicts["idle_rss"],
    )
    return verdicts


def report_fsyncs(variant: str, messages: int, window: int, parent: Path) -> None:
    if fsyncs.strace() is None:
        print("fsyncs: strace is not installed; skipped")
        return
    run = run_listener(variant, messages, window, parent, count_fsyncs=True)
    synced, commits = run.notes["fsyncs"], run.notes["commits"]
    print(
        f"fsyncs (listener/{variant} under strace, {run.rate:,.0f} msgs/s): {synced} fsync and "
        f"fdatasync calls for {messages} messages = {synced / messages:.4f} per message; "
        f"the listener counted {commits} dedupe commits"
    )


def _verdict(text: str, passed: bool) -> None:
    print(f"{text}: {'PASS' if passed else 'FAIL'}")


def write_json(
    args: argparse.Namespace,
    facts: machine.Machine,
    rows: list[dict[str, object]],
    verdicts: dict[str, bool],
    runs: list[Run],
) -> None:
    args.json.write_text(
        json.dumps(
            {
                "settings": {
                    "messages": args.messages,
                    "run_messages": args.run_messages,
                    "window": args.window,
                    "rounds": args.rounds,
                    "variants": args.variants,
                },
                "machine": asdict(facts),
                "targets": {
                    "rate": TARGET_RATE,
                    "ratio": TARGET_RATIO,
                    "commits_per_message": TARGET_COMMITS,
                    "idle_rss_mb": TARGET_RSS_MB,
                },
                "summary": rows,
                "verdicts": verdicts,
                "runs": [asdict(r) for r in runs],
            },
            indent=2,
        )
        + "\n"
    )
