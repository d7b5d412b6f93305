"""Read a process's HTTP endpoints: ``/healthz`` and the ``/metrics`` samples."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def http_get(url: str) -> tuple[int, str]:
    """Status and body of a GET; status 0 if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  http:// of a test's own server
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    status, text = http_get(f"{url}/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
