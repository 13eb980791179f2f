"""The benchmark's smtp-sink reference beside the HAProxy figure: its report lines, and its runs.

The report is rendered from made-up runs (``report.ops_targets`` and
``report.ops_section``, not a measurement), so every figure it prints can be
worked out by hand: the reference ratio and the CPU bound sit beside the
HAProxy target without deciding it.  The runs themselves are checked on the
real programs: smtp-sink driven by smtp-source directly and through a real
HAProxy forwarding plain TCP, as the benchmark starts them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_tool
from mailservers import free_port

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # appended: the benchmark's module names never shadow others

import production  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402
from measure import Workload  # noqa: E402
from production import Run  # noqa: E402

N = 30000


def _run(mode: str, seconds: float, server_us: float, client_us: float, proxy_us: float = 0.0) -> Run:
    """A clean run of N messages with the given wall time and CPU per message."""
    counted = mode not in production.REFERENCE_MODES
    return Run(mode, seconds, N, server_us * N / 1e6, proxy_us * N / 1e6, acknowledged=N,
               recorded=N if counted else 0, lost=0 if counted else None, client_cpu=client_us * N / 1e6,
               counted=counted)


def _ops(**runs: list[Run]) -> dict:
    return {"messages": N, "sessions": 20, "size": 2048, "hups": 5, "version": "0.1.0",
            "haproxy_version": "2.6", "cores": 2, "not_run": {"reloads": "skipped (--no-reload)"},
            "runs": {m: runs.get(m.replace("-", "_"), []) for m in production.MODES}}


def _figures() -> dict:
    # ours: 3,000 msgs/s direct, 2,000 through HAProxy (67%); smtp-sink: 10,000 and 4,000 (40%)
    return _ops(direct=[_run("direct", 10.0, 400, 100)],
                haproxy=[_run("haproxy", 15.0, 450, 110, 250)],
                sink_direct=[_run("sink-direct", 3.0, 80, 100)],
                sink_haproxy=[_run("sink-haproxy", 7.5, 90, 100, 220)])


def test_haproxy_target_row_carries_the_reference_and_the_bound_but_only_ours_decides() -> None:
    row = report.ops_targets(_figures())[-1]
    assert row.startswith("| behind HAProxy (`send-proxy-v2`, `--proxy-protocol`)")
    assert "2,000 vs 3,000 (direct) = **67%**" in row
    assert ("reference, not a target: Postfix smtp-sink through the same HAProxy (plain TCP) reaches **40%** "
            "of its direct rate (4,000 vs 10,000 msgs/s), HAProxy 220 µs/msg for it") in row
    # (400 + 100) / (400 + 100 + 250): our direct server and client CPU, HAProxy's through it
    assert ("(server + smtp-source) ÷ (server + smtp-source + HAProxy) = 67% ((400 + 100) ÷ "
            "(400 + 100 + 250) µs)") in row
    assert row.endswith("| FAIL |")  # 67% < 90%: the reference never turns the target into a pass


def test_ops_section_lists_the_reference_runs_and_both_bounds() -> None:
    text = "\n".join(report.ops_section(_figures()))
    assert ("| run | msgs/s (median) | min – max | server CPU µs/msg | HAProxy CPU µs/msg | "
            "smtp-source CPU µs/msg |") in text
    assert ("| reference: Postfix smtp-sink direct | 10,000 | 10,000 – 10,000 | 80 | — | 100 | — | — "
            "| 0 / 0 / — | 1/0 |") in text
    assert ("| reference: smtp-sink through HAProxy (plain TCP) | 4,000 | 4,000 – 4,000 | 90 | 220 | 100 | — | — "
            "| 0 / 0 / — | 1/0 |") in text
    assert ("| through HAProxy (PROXY v2) | 2,000 | 2,000 – 2,000 | 450 | 250 | 110 | — | — | 0 / 0 / 0 "
            "| 1/0 |") in text
    assert "**Reference, never a target**" in text
    assert "Through HAProxy it keeps **40%** of its direct msgs/s, with HAProxy spending 220 µs per message" in text
    # smtp-sink: (80 + 100) / (80 + 100 + 220) = 45%
    assert ("prefork-esmtp 67% ((400 + 100) ÷ (400 + 100 + 250) µs), measured 67%; smtp-sink 45% ((80 + 100) ÷ "
            "(80 + 100 + 220) µs), measured 40%.") in text
    # msgs/s x (server + HAProxy + smtp-source) µs: 3,000 x 500, 2,000 x 810, 10,000 x 180, 4,000 x 410
    assert ("these processes alone keep all 2 cores busy; they kept (msgs/s × CPU per message) prefork-esmtp "
            "direct 1.50, through HAProxy 1.62, smtp-sink direct 1.80, through HAProxy 1.64 cores busy") in text


def test_without_the_reference_runs_the_row_says_why_and_the_bound_stays() -> None:
    ops = _figures()
    ops["runs"]["sink-direct"] = ops["runs"]["sink-haproxy"] = []
    ops["not_run"]["sink-direct"] = ops["not_run"]["sink-haproxy"] = "smtp-sink not found (apt-get install postfix)"
    row = report.ops_targets(ops)[-1]
    assert "reference (smtp-sink through the same HAProxy) not run: smtp-sink not found" in row
    assert "= 67% ((400 + 100) ÷ (400 + 100 + 250) µs)" in row
    assert "Not measured in this run: smtp-sink not found" in "\n".join(report.ops_section(ops))


def test_no_bound_without_the_client_cpu() -> None:
    assert report.cpu_bound(400.0, 0.0, 250.0) is None
    assert report.cpu_bound(400.0, None, 250.0) is None
    assert report.cpu_bound(400.0, 100.0, 250.0) == pytest.approx(500 / 750)
    ops = _figures()
    for r in ops["runs"]["direct"]:
        r.client_cpu = 0.0
    assert "no CPU bound: smtp-source's CPU not measured" in report.ops_targets(ops)[-1]


def test_a_reference_run_is_ok_without_a_count_of_lost_messages() -> None:
    run = _run("sink-direct", 3.0, 80, 100)
    assert run.ok and run.lost is None
    assert production.summary([run])["counted"] is False
    assert not Run("sink-direct", 3.0, N, 0.2, cut=1, counted=False).ok


def test_plain_haproxy_config_has_no_proxy_header_and_is_valid(tmp_path: Path) -> None:
    haproxy = require_tool("haproxy")
    text = servers.haproxy_config(free_port(), free_port(), servers.HAPROXY_TUNING, send_proxy=False)
    assert "send-proxy" not in text and "    nbthread 1\n" in text
    config = tmp_path / "plain.cfg"
    config.write_text(text)
    done = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr


def test_smtp_sink_runs_direct_and_through_plain_haproxy_with_the_client_cpu(tmp_path: Path) -> None:
    """What the benchmark's reference modes run: counted_run against smtp-sink, then through HAProxy."""
    require_tool("smtp-sink")
    require_tool("smtp-source")
    require_tool("haproxy")
    sink = servers.SmtpSinkServer("test-sink", "smtp-sink")
    front = servers.HAProxyServer(sink, key="test-haproxy-plain", send_proxy=False)
    wl = Workload("conn", "connection per message", 4, 2048, False, 200)
    try:
        sink.start(tmp_path)
        front.start(tmp_path)
        assert "send-proxy" not in (tmp_path / "test-haproxy-plain.cfg").read_text()
        direct = production.counted_run("sink-direct", sink, wl, 200, 60)
        through = production.counted_run("sink-haproxy", sink, wl, 200, 60, front=front)
    finally:
        front.stop()
        sink.stop()
    for run in (direct, through):
        assert run.ok, run.errors
        assert not run.counted and run.acknowledged == 200
        assert run.client_cpu > 0  # smtp-source's own CPU, from the reaped child
    assert direct.proxy_cpu == 0 and through.proxy_cpu > 0
