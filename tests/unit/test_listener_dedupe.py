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
    assert sizes == [55]  # callers that came in one turn of the loop share one commit


def _recording(store: DedupeStore) -> tuple[list[int], threading.Event]:
    """Make ``store.remember_many`` record each batch's size and signal when one starts."""
    sizes: list[int] = []
    started = threading.Event()
    original = store.remember_many

    def recording(entries: Sequence[tuple[uuid.UUID | str, float]]) -> list[bool]:
        sizes.append(len(entries))
        started.set()
        return original(entries)

    store.remember_many = recording  # type: ignore[method-assign]
    return sizes, started


def test_ids_that_arrive_during_a_commit_share_the_next_one(tmp_path: Path) -> None:
    """One message's commit is held on its way to disk (another connection holds the file's
    write lock); 63 more arrive meanwhile. Nobody hears back before the commit that holds
    its id, and the 63 share one commit."""

    async def scenario() -> tuple[list[bool], list[int], int]:
        with DedupeStore.in_state_dir(tmp_path) as store:
            sizes, started = _recording(store)
            group = GroupCommit(store)
            blocker = sqlite3.connect(store.path, isolation_level=None)
            try:
                blocker.execute("BEGIN IMMEDIATE")
                ids = [uuid.uuid4() for _ in range(64)]
                first = asyncio.create_task(group.remember(ids[0], 1e12))
                assert await asyncio.to_thread(started.wait, 5.0)
                rest = [asyncio.create_task(group.remember(i, 1e12)) for i in ids[1:]]
                for _ in range(20):
                    await asyncio.sleep(0)
                waiting = [task for task in (first, *rest) if not task.done()]
                assert len(waiting) == 64
                assert store.commits == 0
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            firsts = await asyncio.wait_for(asyncio.gather(first, *rest), 10.0)
            assert all(store.seen(i) for i in ids)
            return list(firsts), sizes, store.commits

    firsts, sizes, commits = asyncio.run(scenario())
    assert firsts == [True] * 64
    assert sizes == [1, 63]
    assert commits == 2


def test_a_commit_takes_at_most_max_batch_ids(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[bool], list[int]]:
        with DedupeStore.in_state_dir(tmp_path) as store:
            sizes, _ = _recording(store)
            group = GroupCommit(store, max_batch=4)
            ids = [uuid.uuid4() for _ in range(10)]
            firsts = await asyncio.gather(*(group.remember(i, 1e12) for i in ids))
            return list(firsts), sizes

    firsts, sizes = asyncio.run(scenario())
    assert firsts == [True] * 10
    assert sizes == [4, 4, 2]


def test_a_failed_commit_fails_its_callers_and_the_next_commit_still_runs(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[BaseException | bool, bool, int]:
        store = DedupeStore.in_state_dir(tmp_path)
        group = GroupCommit(store)
        store.close()
        failed = await asyncio.gather(group.remember(ID, 1e12), return_exceptions=True)
        reopened = DedupeStore.in_state_dir(tmp_path)
        try:
            group.store = reopened
            again = await group.remember(ID, 1e12)
            return failed[0], again, reopened.commits
        finally:
            reopened.close()

    failed, again, commits = asyncio.run(scenario())
    assert isinstance(failed, DedupeError)
    assert again is True  # the failed commit recorded nothing
    assert commits == 1


def test_max_batch_must_be_positive(tmp_path: Path) -> None:
    with DedupeStore.in_state_dir(tmp_path) as store, pytest.raises(ValueError, match="max_batch"):
        GroupCommit(store, max_batch=0)
