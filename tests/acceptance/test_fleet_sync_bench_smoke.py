"""The fleet synchronization benchmark runs end to end at a tiny size.

Timings are not asserted (they belong to the benchmark's report); what the
exact incremental downloads promise is: the two devices a reassigned route
concerns get its rows, no other device gets any, a renamed depot reaches
exactly its devices, and nothing changed sends nothing; and the push of the
rule reaches the listeners of the pushed depot, whose sync actions bring the
new name to each of them (the benchmark fails if one lacks it).
"""

from __future__ import annotations

import pytest

from tests.support.bench import figures, run_bench


@pytest.mark.slow
def test_fleet_sync_benchmark_smoke_run() -> None:
    result = run_bench(
        "fleet_sync", "--devices", 6, "--depots", 3, "--sample", 2, "--json", timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = figures(result)
    assert found["initial"]["rows_per_device"] == 100
    route = found["route_reassigned"]
    assert route["concerned_rows"] == 2 * (1 + 10)  # the route and its 10 stops, each way
    assert (route["others_synced"], route["others_rows"]) == (2, 0)
    depot = found["depot_renamed"]
    assert (depot["concerned"], depot["rows"]) == (2, 2)
    assert found["nothing_changed"]["rows"] == 0
    assert found["storage"]["held_rows"] == 6 * 100
    assert found["many_at_once"]["devices"] == 2
    push = found["push_synced"]
    assert (push["devices"], push["listener_processes"]) == (2, 2)
    assert 0 < push["median_seconds"] <= push["seconds"]
    assert any(line.startswith("depot renamed") for line in result.stdout.splitlines())
