"""The listener's dedupe store: each request id is taken once, across restarts and threads."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from pushsync.errors import PushsyncError
from pushsync.listener.dedupe import FILE_NAME, DedupeError, DedupeStore, GroupCommit

NOW = 1_700_000_000.0
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_remember_is_true_only_the_first_time(tmp_path: Path) -> None:
    with DedupeStore.in_state_dir(tmp_path / "state") as store:
        assert not store.seen(ID)
        assert store.remember(ID, NOW + 60)
        assert store.seen(ID)
        assert not store.remember(ID, NOW + 60)
        assert not store.remember(str(ID).upper(), NOW + 60)  # the same id, spelt otherwise
        assert store.remember(uuid.uuid4(), NOW + 60)
        assert len(store) == 2
    assert (tmp_path / "state" / FILE_NAME).is_file()


def test_wal_mode(tmp_path: Path) -> None:
    with DedupeStore.in_state_dir(tmp_path):
        pass
    connection = sqlite3.connect(tmp_path / FILE_NAME)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        connection.close()


def test_remembers_across_a_restart(tmp_path: Path) -> None:
    store = DedupeStore.in_state_dir(tmp_path)
    assert store.remember(ID, NOW + 60)
    store.close()
    assert store.closed
    store.close()  # twice is fine

    with DedupeStore.in_state_dir(tmp_path) as reopened:
        assert reopened.seen(ID)
        assert not reopened.remember(ID, NOW + 60)


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = DedupeStore(tmp_path / FILE_NAME)
    store.close()
    with pytest.raises(DedupeError, match="closed"):
        store.remember(ID, NOW)
    with pytest.raises(DedupeError, match="closed"):
        store.seen(ID)


def test_forget_expired_keeps_the_unexpired(tmp_path: Path) -> None:
    old, recent, live = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with DedupeStore.in_state_dir(tmp_path) as store:
        store.remember(old, NOW - 301)  # expired longer ago than the grace
        store.remember(recent, NOW - 100)  # expired, but within the grace
        store.remember(live, NOW + 100)
        assert store.forget_expired(NOW) == 1
        assert not store.seen(old)
        assert store.seen(recent)
        assert store.seen(live)
        assert store.forget_expired(NOW, grace=0) == 1
        assert not store.seen(recent)
        assert store.seen(live)
        assert store.forget_expired(NOW) == 0
        assert len(store) == 1


def test_concurrent_remembers_of_one_id_give_one_true(tmp_path: Path) -> None:
    threads_count = 16
    barrier = threading.Barrier(threads_count)
    results: list[bool] = []
    results_lock = threading.Lock()

    with DedupeStore.in_state_dir(tmp_path) as store:

        def worker() -> None:
            barrier.wait()
            first = store.remember(ID, NOW + 60)
            with results_lock:
                results.append(first)

        threads = [threading.Thread(target=worker) for _ in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert sorted(results) == [False] * (threads_count - 1) + [True]


def test_two_stores_on_one_file_give_one_true(tmp_path: Path) -> None:
    with DedupeStore.in_state_dir(tmp_path) as one, DedupeStore.in_state_dir(tmp_path) as two:
        assert [one.remember(ID, NOW), two.remember(ID, NOW)] == [True, False]
        assert two.seen(ID)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(DedupeError, match=r"cannot use the dedupe store .*dedupe\.sqlite3") as err:
        DedupeStore.in_state_dir(tmp_path)
    assert isinstance(err.value, PushsyncError)
    assert err.value.__cause__ is None


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DedupeError, match="cannot open the dedupe store"):
        DedupeStore(tmp_path / "missing" / FILE_NAME)


def test_a_state_dir_that_is_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(DedupeError, match="cannot create the state directory"):
        DedupeStore.in_state_dir(tmp_path / "state")


def test_remember_many_is_one_transaction_with_per_id_answers(tmp_path: Path) -> None:
    with DedupeStore.in_state_dir(tmp_path / "state") as store:
        a, b = uuid.uuid4(), uuid.uuid4()
        assert store.remember(a, 1e12)
        assert store.remember_many([(a, 1e12), (b, 1e12), (b, 1e12)]) == [False, True, False]
        assert store.seen(b)


def test_group_commit_batches_concurrent_callers(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[bool], list[int]]:
        with DedupeStore.in_state_dir(tmp_path / "state") as store:
            sizes: list[int] = []
            original = store.remember_many

            def counting(entries: Sequence[tuple[uuid.UUID | str, float]]) -> list[bool]:
                sizes.append(len(entries))
                return original(entries)

            store.remember_many = counting  # type: ignore[method-assign]
            group = GroupCommit(store)
            ids = [uuid.uuid4() for _ in range(50)]
            firsts = await asyncio.gather(*(group.remember(i, 1e12) for i in ids + ids[:5]))
            return list(firsts), sizes

    firsts, sizes = asyncio.run(scenario())
    assert firsts == [True] * 50 + [False] * 5
    assert sum(sizes) == 55
    assert len(sizes) < 55  # callers that arrived during a commit shared the next one
