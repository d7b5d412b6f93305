"""Generated triggers on real tables: who gets a notification, and when not."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from tests.integration import trucking
from tests.integration.trucking import devices_of, outbox, report


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    return db


def test_insert_notifies_each_affected_device_exactly_once(fleet: psycopg.Connection) -> None:
    report(fleet, location=100, by=3)
    rows = outbox(fleet)
    # north, south and west pass 100 (west twice); driver 3 reported it; driver 5's
    # device is not registered, so it is skipped without failing the insert.
    assert [(r["rule"], r["device_id"], r["content"]) for r in rows] == [
        ("route_disruption", "truck-1", "disruption 100 on north"),
        ("route_disruption", "truck-2", "disruption 100 on south"),
        ("route_disruption", "truck-4", "disruption 100 on west"),
    ]
    first = rows[0]
    assert first["subject"] == "sync"
    assert first["state"] == "pending"
    assert first["priority"] == "normal"
    assert first["gateway"] == "auto"
    assert first["ttl"] == timedelta(hours=1)
    assert first["resend_every"] == timedelta(minutes=5)


def test_reporter_is_not_notified_and_other_locations_are_quiet(fleet: psycopg.Connection) -> None:
    report(fleet, location=300, by=3)  # only east passes 300, and its driver reported it
    report(fleet, location=999, by=1)  # nobody passes 999
    assert outbox(fleet) == []


def test_rollback_leaves_no_notification(fleet: psycopg.Connection) -> None:
    def report_then_abort() -> None:
        with fleet.transaction():
            report(fleet, location=100, by=3)
            assert len(outbox(fleet)) == 3  # visible inside the transaction
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        report_then_abort()
    assert outbox(fleet) == []


def test_disabled_device_gets_nothing(fleet: psycopg.Connection) -> None:
    fleet.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = 'truck-2'")
    report(fleet, location=100, by=3)
    assert devices_of(fleet) == ["truck-1", "truck-4"]


def test_update_fires_only_when_listed_columns_change(fleet: psycopg.Connection) -> None:
    report(fleet, location=300, by=1)  # east (truck-3) passes 300
    trucking.clear_outbox(fleet)
    fleet.execute("UPDATE public.disruption_reports SET note = 'two lanes closed'")
    fleet.execute("UPDATE public.disruption_reports SET reported_by = 2")
    assert outbox(fleet) == []
    fleet.execute("UPDATE public.disruption_reports SET location_id = 101")
    assert devices_of(fleet, "route_disruption") == ["truck-1"]


def test_when_compares_old_and_new(fleet: psycopg.Connection) -> None:
    report(fleet, location=101, by=2)
    trucking.clear_outbox(fleet)
    fleet.execute("UPDATE public.disruption_reports SET status = 'cleared'")
    assert [(r["rule"], r["device_id"], r["content"]) for r in outbox(fleet)] == [
        ("disruption_cleared", "truck-1", "cleared 101"),
    ]
    trucking.clear_outbox(fleet)
    # cleared -> cleared is no change of status; cleared -> open is not "cleared"
    fleet.execute("UPDATE public.disruption_reports SET status = 'cleared'")
    assert outbox(fleet) == []
    fleet.execute("UPDATE public.disruption_reports SET status = 'open'")
    assert devices_of(fleet) == ["truck-1"]
    assert outbox(fleet)[0]["rule"] == "route_disruption"


def test_update_pairs_rows_by_key_in_multi_row_statements(fleet: psycopg.Connection) -> None:
    # Reassign two routes in one statement: old and new drivers of each are told.
    fleet.execute(
        "UPDATE public.routes SET driver_id = CASE route_id WHEN 10 THEN 2 ELSE 1 END "
        "WHERE route_id IN (10, 20)"
    )
    assert [(r["device_id"], r["content"]) for r in outbox(fleet, "route_reassigned")] == [
        ("truck-1", "route north"),
        ("truck-2", "route north"),
    ]
    # route_reassigned coalesces: one message per device, whichever route it names.
    trucking.clear_outbox(fleet)
    fleet.execute("UPDATE public.routes SET route_name = upper(route_name)")
    assert outbox(fleet) == []


def test_delete_rule_sees_the_old_row(fleet: psycopg.Connection) -> None:
    fleet.execute("DELETE FROM public.route_stops WHERE route_id = 30")
    fleet.execute("DELETE FROM public.routes WHERE route_id = 30")
    rows = outbox(fleet)
    assert [(r["device_id"], r["content"], r["priority"]) for r in rows] == [
        ("truck-3", "route east removed", "high"),
    ]


def test_recipients_all_reaches_every_enabled_device_once(fleet: psycopg.Connection) -> None:
    trucking.add_devices(fleet, "depot-1")
    fleet.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = 'truck-4'")
    fleet.execute(
        "INSERT INTO public.drivers (driver_id, name) VALUES (6, 'Fay'), (7, 'Gus'), (8, 'Hal')"
    )
    rows = outbox(fleet, "fleet_notice")
    assert [r["device_id"] for r in rows] == ["depot-1", "truck-1", "truck-2", "truck-3"]
    assert {r["subject"] for r in rows} == {"roster"}
    assert all(r["content"].startswith("new driver ") for r in rows)


def test_coalescing_folds_changes_into_the_unsent_message(fleet: psycopg.Connection) -> None:
    report(fleet, location=100, by=3)
    report(fleet, location=101, by=3)
    rows = outbox(fleet)
    assert [(r["device_id"], r["coalesced"]) for r in rows] == [
        ("truck-1", 1),
        ("truck-2", 0),
        ("truck-4", 0),
    ]
    assert rows[0]["content"] == "disruption 101 on north"  # the latest change wins
    # Once claimed for sending, a message no longer absorbs changes: the next
    # change gets a message of its own, so it cannot be lost in flight.
    fleet.execute("UPDATE pushsync.outbox SET state = 'sending' WHERE device_id = 'truck-1'")
    report(fleet, location=101, by=3)
    assert [(r["device_id"], r["state"]) for r in outbox(fleet)] == [
        ("truck-1", "pending"),
        ("truck-1", "sending"),
        ("truck-2", "pending"),
        ("truck-4", "pending"),
    ]


NO_COALESCE = """\
version: 1
rules:
  - name: every_report
    table: public.disruption_reports
    on: insert
    coalesce: false
    recipients: |
      SELECT d.device_id FROM public.drivers d WHERE d.driver_id = 1
    content: "report {new.location_id}"
"""


def test_without_coalescing_every_distinct_message_is_kept(db: psycopg.Connection) -> None:
    trucking.setup(db)
    trucking.apply_rules(db, NO_COALESCE)
    report(db, location=5, by=2)
    report(db, location=6, by=2)
    db.execute(
        "INSERT INTO public.disruption_reports (location_id, reported_by) "
        "VALUES (7, 2), (7, 2), (8, 2)"
    )
    assert [r["content"] for r in outbox(db)] == [
        "report 5",
        "report 6",
        "report 7",  # the same text twice in one statement is one message
        "report 8",
    ]


def test_statement_notifies_once_and_only_when_it_wrote(
    fleet: psycopg.Connection, dsn: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN pushsync")
        report(fleet, location=999, by=1)  # writes no notification
        assert list(listener.notifies(timeout=0.3)) == []
        fleet.execute(
            "INSERT INTO public.disruption_reports (location_id, reported_by) "
            "VALUES (100, 3), (101, 3), (300, 1)"
        )
        received = list(listener.notifies(timeout=0.5))
        assert [(n.channel, n.payload) for n in received] == [("pushsync", "")]
    assert len(outbox(fleet)) == 4


def test_application_role_needs_no_rights_on_pushsync(fleet: psycopg.Connection, dsn: str) -> None:
    fleet.execute("CREATE ROLE trucking_app LOGIN")
    fleet.execute("GRANT USAGE ON SCHEMA public TO trucking_app")
    fleet.execute("GRANT SELECT, INSERT ON public.disruption_reports TO trucking_app")
    with psycopg.connect(dsn + " user=trucking_app", autocommit=True) as app:
        app.execute(
            "INSERT INTO public.disruption_reports (location_id, reported_by) VALUES (100, 3)"
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT count(*) FROM pushsync.outbox")
    assert devices_of(fleet) == ["truck-1", "truck-2", "truck-4"]
    fleet.execute("DROP OWNED BY trucking_app")
    fleet.execute("DROP ROLE trucking_app")


def test_table_without_primary_key_needs_a_key(db: psycopg.Connection) -> None:
    db.execute("CREATE TABLE public.readings (sensor text, value int)")
    trucking.add_devices(db, "s-1")
    rules = """\
version: 1
rules:
  - name: jump
    table: public.readings
    on: update
    key: [sensor]
    when: new.value - old.value > 10
    recipients: SELECT 's-1' AS device_id
    content: "{new.sensor} jumped to {new.value}"
"""
    trucking.apply_rules(db, rules)
    db.execute("INSERT INTO public.readings VALUES ('a', 1), ('b', 1)")
    db.execute("UPDATE public.readings SET value = value + CASE sensor WHEN 'a' THEN 5 ELSE 50 END")
    assert [r["content"] for r in outbox(db)] == ["b jumped to 51"]
    with pytest.raises(psycopg.errors.RaiseException, match="has no primary key"):
        trucking.apply_rules(db, rules.replace("    key: [sensor]\n", ""))


def test_large_statements_decide_like_small_ones(fleet: psycopg.Connection) -> None:
    # 64 rows or more take the re-planned, hash-grouped path of the trigger.
    fleet.execute(
        "INSERT INTO public.disruption_reports (location_id, reported_by) "
        "SELECT (ARRAY[100, 101, 300, 999])[1 + i % 4], 3 FROM generate_series(1, 200) AS i"
    )
    assert [(r["device_id"], r["content"], r["coalesced"]) for r in outbox(fleet)] == [
        ("truck-1", "disruption 100 on north", 0),  # of its two texts, the smaller
        ("truck-2", "disruption 100 on south", 0),
        ("truck-4", "disruption 100 on west", 0),
    ]
    trucking.clear_outbox(fleet)
    fleet.execute("UPDATE public.disruption_reports SET status = 'cleared'")  # pairs 200 rows
    assert [(r["rule"], r["device_id"]) for r in outbox(fleet)] == [
        ("disruption_cleared", "truck-1"),
        ("disruption_cleared", "truck-2"),
        ("disruption_cleared", "truck-3"),
        ("disruption_cleared", "truck-4"),
    ]
    trucking.clear_outbox(fleet)
    fleet.execute("UPDATE public.disruption_reports SET note = 'seen'")  # no listed column
    assert outbox(fleet) == []


def test_large_statements_without_coalescing(db: psycopg.Connection) -> None:
    trucking.setup(db)
    trucking.apply_rules(db, NO_COALESCE)
    db.execute(
        "INSERT INTO public.disruption_reports (location_id, reported_by) "
        "SELECT i % 10, 2 FROM generate_series(1, 100) AS i"
    )
    assert [r["content"] for r in outbox(db)] == [f"report {i}" for i in range(10)]


def test_changes_within_one_transaction_fold_into_its_first_message(
    fleet: psycopg.Connection,
) -> None:
    with fleet.transaction():
        for location in (100, 101, 100):
            report(fleet, location=location, by=3)
    rows = outbox(fleet)
    assert [(r["device_id"], r["content"], r["coalesced"]) for r in rows] == [
        ("truck-1", "disruption 100 on north", 0),
        ("truck-2", "disruption 100 on south", 0),
        ("truck-4", "disruption 100 on west", 0),
    ]
