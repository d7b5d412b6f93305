"""What becomes of one uploaded change, decided without a database: every branch."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from pushsync.dispatcher.conflicts import (
    Action,
    Facts,
    Found,
    Need,
    Refusal,
    admissible,
    decide,
)
from pushsync.dispatcher.sync_tables import Policy, ServerTable
from pushsync.wire.sync import Change, Op

ROUTES = ServerTable(
    name="public.routes",
    columns=(("route_id", "integer"), ("name", "text"), ("eta", "timestamptz")),
    key=("route_id",),
    upload=("insert", "update", "delete"),
    conflict="server_wins",
    newest=None,
    function="pub__driver__public__routes",
    depends_on=(),
)
ROW = {"route_id": 20, "name": "south", "eta": None}
ALL = frozenset({"route_id", "name", "eta"})


def table(policy: Policy) -> ServerTable:
    return replace(ROUTES, conflict=policy, newest="eta" if policy == "newest" else None)


def change(op: Op, **images: Any) -> Change:
    fields: dict[str, Any] = {
        "key": {"route_id": 20},
        "old": None if op == "insert" else ROW,
        "new": None if op == "delete" else {**ROW, "name": "north"},
    }
    fields.update(images)
    return Change(seq=1, table="public.routes", op=op, **fields)


# --------------------------------------------------------------------------- admissible


def test_a_well_formed_change_is_admissible() -> None:
    for op in ("insert", "update", "delete"):
        assert admissible(ROUTES, change(op), ALL) is None


REFUSED = [
    (
        replace(ROUTES, upload=("update",)),
        change("delete"),
        "uploading deletes to public.routes is not allowed",
    ),
    (
        ROUTES,
        change("update", new={**ROW, "colour": "red"}),
        "column colour of public.routes does not exist on the server "
        "(its shape changed; the next download brings the new one)",
    ),
    (ROUTES, change("update", key={"name": "south"}), "the key of public.routes is route_id"),
    (ROUTES, change("update", new=None), "an update needs the new row"),
    (ROUTES, change("insert", new=None), "an insert needs the new row"),
    (
        ROUTES,
        change("insert", key={"route_id": 21}),
        "the key of an insert must be the key of its new row in public.routes",
    ),
    (
        ROUTES,
        change("insert", new={"name": "x"}),
        "the key of an insert must be the key of its new row in public.routes",
    ),
    (
        ROUTES,
        change("delete", old=None),
        "a delete of public.routes must carry the row as the device last had it (old); "
        "only a client_wins table takes one without",
    ),
    (
        ROUTES,
        change("update", old={"route_id": 20, "name": "south"}),
        "the old row of this update lacks column eta of public.routes",
    ),
]


@pytest.mark.parametrize(("server", "uploaded", "reason"), REFUSED)
def test_an_inadmissible_change_is_refused_with_its_reason(
    server: ServerTable, uploaded: Change, reason: str
) -> None:
    assert admissible(server, uploaded, ALL) == reason


def test_old_needs_only_the_columns_the_device_has_and_the_key() -> None:
    old = {"route_id": 20, "name": "south"}
    assert admissible(ROUTES, change("update", old=old), frozenset({"name"})) is None
    lacks_key = change("update", old={"name": "south"})
    assert admissible(ROUTES, lacks_key, frozenset({"name"})) == (
        "the old row of this update lacks column route_id of public.routes"
    )


def test_a_client_wins_table_takes_updates_and_deletes_without_old() -> None:
    lenient = table("client_wins")
    assert admissible(lenient, change("update", old=None), ALL) is None
    assert admissible(lenient, change("delete", old=None), ALL) is None


# --------------------------------------------------------------------------- decide

NOT_THEIRS = "the row is not (or no longer) one of this device's rows of public.routes"
POLICIES: list[Policy] = ["server_wins", "client_wins", "newest"]


@pytest.mark.parametrize("policy", POLICIES)
def test_no_row_under_the_key(policy: Policy) -> None:
    gone = Facts(found=Found.NONE)
    assert decide(table(policy), change("insert"), gone) is Action.INSERT
    assert decide(table(policy), change("delete"), gone) is Action.NOTHING
    assert decide(table(policy), change("update"), gone) == Refusal(NOT_THEIRS)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("op", ["insert", "update", "delete"])
def test_a_row_that_is_not_the_devices_is_refused_whatever_the_policy(
    policy: Policy, op: Op
) -> None:
    assert decide(table(policy), change(op), Facts(found=Found.NOT_THEIRS)) == Refusal(NOT_THEIRS)


def test_an_insert_on_an_existing_key() -> None:
    theirs = Facts(found=Found.THEIRS)
    assert decide(table("server_wins"), change("insert"), theirs) == Refusal(
        "a row with this key already exists in public.routes"
    )
    assert decide(table("client_wins"), change("insert"), theirs) is Action.UPDATE
    assert decide(table("newest"), change("insert"), theirs) is Action.UPDATE


@pytest.mark.parametrize("policy", POLICIES)
def test_without_old_nothing_is_compared(policy: Policy) -> None:
    theirs = Facts(found=Found.THEIRS)
    assert decide(table(policy), change("update", old=None), theirs) is Action.UPDATE
    assert decide(table(policy), change("delete", old=None), theirs) is Action.DELETE


@pytest.mark.parametrize("policy", POLICIES)
def test_old_is_compared_first_and_an_unchanged_row_is_written(policy: Policy) -> None:
    theirs = Facts(found=Found.THEIRS)
    assert decide(table(policy), change("update"), theirs) is Need.SAME
    unchanged = theirs.learnt(Need.SAME, True)
    assert decide(table(policy), change("update"), unchanged) is Action.UPDATE
    assert decide(table(policy), change("delete"), unchanged) is Action.DELETE


def test_a_changed_row_under_server_wins_is_refused() -> None:
    changed = Facts(found=Found.THEIRS, same=False)
    refusal = Refusal("the row changed in public.routes since the device last had it; server wins")
    assert decide(table("server_wins"), change("update"), changed) == refusal
    assert decide(table("server_wins"), change("delete"), changed) == refusal


def test_a_changed_row_under_client_wins_is_written() -> None:
    changed = Facts(found=Found.THEIRS, same=False)
    assert decide(table("client_wins"), change("update"), changed) is Action.UPDATE
    assert decide(table("client_wins"), change("delete"), changed) is Action.DELETE
    with_old = change("insert", old=ROW)
    assert decide(table("client_wins"), with_old, changed) is Action.UPDATE


def test_a_changed_row_under_newest_goes_to_the_newer() -> None:
    newest = table("newest")
    changed = Facts(found=Found.THEIRS, same=False)
    refusal = Refusal("the row changed in public.routes since the device last had it")
    assert decide(newest, change("delete"), changed) == refusal
    assert decide(newest, change("insert", old=ROW), changed) == refusal
    assert decide(newest, change("update"), changed) is Need.NEWER
    newer = changed.learnt(Need.NEWER, True)
    assert decide(newest, change("update"), newer) is Action.UPDATE
    older = changed.learnt(Need.NEWER, False)
    assert decide(newest, change("update"), older) == Refusal(
        "the server's row of public.routes is newer (eta)"
    )


def test_facts_learn_one_answer_at_a_time() -> None:
    facts = Facts(found=Found.THEIRS).learnt(Need.SAME, False).learnt(Need.NEWER, True)
    assert facts == Facts(found=Found.THEIRS, same=False, newer=True)
