"""Helpers for the metrics tests: the metrics port from the server's log, scrapes with real HTTP clients.

A scrape is parsed with prometheus_client's own text parser into
``{(sample name, frozenset(labels)): value}``; :func:`value` sums the samples
of a name whose labels include the given ones, as a PromQL selector would.
"""

from __future__ import annotations

import re
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, wait_for

__all__ = ["metrics_port", "scrape", "value", "counter_samples"]

Samples = dict[tuple[str, frozenset], float]


def metrics_port(srv: Server) -> int:
    """The port of ``--metrics-listen HOST:0``, from the master's "metrics on" line."""
    found = wait_for(lambda: re.search(r"metrics on http://[\d.]+:(\d+)/metrics", srv.log()), 10,
                     message="the metrics line in the log")
    return int(found.group(1))


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(port: int, via: str = "urllib") -> Samples:
    """GET /metrics with urllib or with curl, parsed."""
    url = f"http://127.0.0.1:{port}/metrics"
    if via == "curl":
        result = subprocess.run(["curl", "-sS", "--fail", "--max-time", "10", url], capture_output=True,
                                text=True, timeout=20)
        assert result.returncode == 0, result.stderr
        return _parse(result.stdout)
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return _parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 when there is none)."""
    want = set(labels.items())
    return sum(v for (n, l), v in samples.items() if n == name and want <= l)


def counter_samples(samples: Samples) -> Samples:
    """Samples of counters and histogram buckets/counts/sums: those that must never go down."""
    return {k: v for k, v in samples.items()
            if k[0].endswith(("_total", "_bucket", "_count", "_sum")) and "start_time" not in k[0]}
