"""``--profile``: where a listener's time goes.

1. One run of the real ``pushsync listen`` under ``python -m cProfile`` (the
   main thread only: the dedupe store's ``remember`` runs in a worker thread via
   ``asyncio.to_thread``, so its time shows up here only as waiting).
2. ``DedupeStore.remember`` alone, in a fresh store in the same state directory
   (same filesystem, WAL + ``synchronous=FULL`` as the listener opens it).
"""

from __future__ import annotations

import io
import pstats
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pushsync.listener.dedupe import DedupeStore


def report(
    variant: str,
    messages: int,
    window: int,
    parent: Path,
    run_listener: Callable[..., Any],
    *,
    top: int = 25,
) -> None:
    out = parent / "listener.pstats"
    run = run_listener(variant, messages, window, parent, profile=out)
    print(f"profile: listener/{variant} under cProfile: {run.rate:,.0f} msgs/s")
    stream = io.StringIO()
    stats = pstats.Stats(str(out), stream=stream)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    print(stream.getvalue().rstrip())
    dedupe(parent, min(messages, 5000))


def dedupe(parent: Path, n: int) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="dedupe-", dir=parent) as tmp,
        DedupeStore.in_state_dir(tmp) as store,
    ):
        ids = [uuid.uuid4() for _ in range(n)]
        expires = time.time() + 3600
        started = time.perf_counter()
        for request_id in ids:
            store.remember(request_id, expires)
        elapsed = time.perf_counter() - started
    print(
        f"profile: DedupeStore.remember alone: {n} ids in {elapsed:.2f}s = "
        f"{elapsed / n * 1e6:,.0f} us/id, at most {n / elapsed:,.0f} ids/s on one thread"
    )
