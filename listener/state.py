"""A device's state folder (``state_dir``) belongs to one device and one listener at a time.

Two lock files in it, each held with ``flock`` (released by the kernel when the
holder exits, however it exits) and holding the holder's pid for the message:
``listener.lock`` for the whole life of ``pushsync listen``, so a second
listener on the folder is refused, and ``sync.lock`` for each synchronization,
so ``pushsync sync`` run beside a listener waits for the listener's
synchronization instead of racing it. ``docs/listener.md`` has the rules.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from pushsync.errors import PushsyncError

LISTENER_LOCK: Final = "listener.lock"
SYNC_LOCK: Final = "sync.lock"
SYNC_WAIT: Final = 60.0
"""Seconds ``pushsync sync`` waits for a synchronization under way in the same folder."""


class StateInUse(PushsyncError):
    """Another process holds the state folder's lock; a usage problem (exit status 2)."""


class FolderLock:
    """An exclusive ``flock`` on ``state_dir/NAME``, held until :meth:`release`."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.path = state_dir / name
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (and write this pid into the file); False if not."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        pid = f"{os.getpid()}\n".encode()
        if os.pread(fd, len(pid) + 1, 0) != pid:  # a listener takes sync.lock for each sync
            os.ftruncate(fd, 0)
            os.write(fd, pid)
        self._fd = fd
        return True

    def holder(self) -> str:
        """The pid written by whoever holds the lock ("another process" if unreadable)."""
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        return f"pid {text}" if text.isdigit() else "another process"

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def hold_for_listener(state_dir: Path, config: Path) -> FolderLock:
    """The listener's lock on ``state_dir``; StateInUse if another process holds it."""
    lock = FolderLock(state_dir, LISTENER_LOCK)
    if not lock.try_acquire():
        raise StateInUse(
            f"{config}: state_dir {state_dir} is in use by {lock.holder()} (pushsync listen): "
            "give each device its own state_dir, and run one listener per device"
        )
    return lock


async def hold_for_sync(
    state_dir: Path,
    config: Path,
    wait: float = SYNC_WAIT,
    on_wait: Callable[[str], None] | None = None,
) -> FolderLock:
    """The synchronization lock on ``state_dir``, waiting up to ``wait`` seconds for one
    under way (the listener's, or another ``pushsync sync``); StateInUse after that.
    ``on_wait`` hears, once, who it waits for."""
    lock = FolderLock(state_dir, SYNC_LOCK)
    deadline = time.monotonic() + wait
    told = False
    while not lock.try_acquire():
        if on_wait is not None and not told:
            on_wait(f"waiting for the synchronization of {lock.holder()} in {state_dir}")
            told = True
        if time.monotonic() >= deadline:
            raise StateInUse(
                f"{config}: state_dir {state_dir} is in use by {lock.holder()}, which has been "
                f"synchronizing for over {wait:.0f}s"
            )
        await asyncio.sleep(0.05)
    return lock
