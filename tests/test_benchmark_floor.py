"""The benchmark's Python floor: a real server that answers SMTP, run and reported only as a reference.

The floor (``benchmarks/python_floor.py``) is started the way ``make bench``
starts it (its server adapter, real forked workers on loopback) and spoken to
with smtplib and a raw socket; the report is rendered from made-up samples to
show where the floor appears and where it never does (targets, 1 MB table).
"""

from __future__ import annotations

import argparse
import datetime
import smtplib
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import psutil
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # appended: the benchmark's module names never shadow others

import measure  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402
from measure import Sample  # noqa: E402


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[servers.PythonFloorServer]:
    """The floor with two workers, started by its adapter; stopped (and checked gone) afterwards."""
    server = servers.PythonFloorServer(2)
    server.start(tmp_path)
    tree = [p.pid for p in server.procs]
    try:
        yield server
    finally:
        server.stop()
    assert not [pid for pid in tree if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def _reply(replies: BinaryIO) -> bytes:
    """Read one whole (possibly multi-line) reply, within the socket's timeout."""
    data = b""
    for _ in range(100):  # bounded: a reply is a few lines
        line = replies.readline(4096)
        assert line.endswith(b"\r\n"), f"connection closed after {data + line!r}"
        data += line
        if line[3:4] == b" ":
            return data
    raise AssertionError(f"no whole reply: {data!r}")


def test_floor_starts_its_workers_and_accepts_a_message_from_smtplib(floor: servers.PythonFloorServer) -> None:
    assert len(floor.workers()) == 2
    with smtplib.SMTP("127.0.0.1", floor.port, timeout=10) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250 and client.has_extn("pipelining")
        assert client.mail("a@example.org")[0] == 250
        assert client.rcpt("b@example.org")[0] == 250
        code, text = client.data(b"Subject: floor\r\n\r\n" + b"x" * 5000 + b"\r\n..dot-stuffed\r\n")
        assert code == 250, text
        assert client.noop()[0] == 250  # the session goes on after the message


def test_floor_finds_the_end_of_data_split_across_reads_and_an_empty_message(
        floor: servers.PythonFloorServer) -> None:
    with socket.create_connection(("127.0.0.1", floor.port), timeout=10) as s, s.makefile("rb") as r:
        assert _reply(r).startswith(b"220 ")
        for part in (b"HELO c\r\n", b"MAIL FROM:<a@x>\r\n", b"RCPT TO:<b@x>\r\n"):
            s.sendall(part)
            assert _reply(r).startswith(b"250 ")
        s.sendall(b"DATA\r\n")
        assert _reply(r).startswith(b"354 ")
        for piece in (b"body line\r", b"\n.", b"\r", b"\n"):  # CRLF.CRLF over four reads at most
            s.sendall(piece)
        assert _reply(r).startswith(b"250 ")
        s.sendall(b"DATA\r\n")
        assert _reply(r).startswith(b"354 ")
        s.sendall(b".\r\nBOGUS\r\nQUIT\r\n")  # an empty message, then two commands in one write
        assert _reply(r).startswith(b"250 ")
        assert _reply(r).startswith(b"500 ")
        assert _reply(r).startswith(b"221 ")


def _sample(cpu_us: float, messages: int = 1000) -> Sample:
    return Sample(1.0, messages, cpu_us * messages / 1e6, 0.0, 0.0, True)


def test_floor_runs_in_the_two_2kb_workloads_only_and_is_never_in_a_target() -> None:
    wls = measure.workloads(20, 4, 1000, 1000, 10)
    floor = servers.PythonFloorServer(22)
    assert [wl.key for wl in wls if floor.runs(wl.key)] == ["conn", "persist"]
    assert floor.reference and floor.group == "sink"
    assert "python-floor" not in {peer for _, peer, _ in report.RATIO_TARGETS}
    chosen = servers.side_by_side(22, {"prefork-esmtp"}, haraka=False)
    assert chosen[-1].key == "python-floor" and not chosen[-1].available and chosen[-1].reference


def test_report_adds_the_floor_sentence_after_each_2kb_table_only() -> None:
    wls = measure.workloads(20, 4, 1000, 1000, 10)
    ours = servers.Server("prefork-esmtp", "prefork-esmtp", version="1")
    sink = servers.Server("smtp-sink", "Postfix smtp-sink", version="3")
    floor = servers.Server("python-floor", "Python floor (no SMTP engine; reference only)",
                           version="Python 3", only=frozenset({"conn", "persist"}), reference=True)
    others = [servers.Server(k, k, False, "not selected (--servers)") for k in ("aiosmtpd", "haraka")]
    cpu = {"prefork-esmtp": (300.0, 150.0, 2000.0), "smtp-sink": (100.0, 50.0, 1000.0),
           "python-floor": (160.0, 80.0, None)}
    for s in (ours, sink, floor):
        for wl, us in zip(wls, cpu[s.key]):
            if us is not None:
                s.samples[wl.key] = [_sample(us, 10 if wl.big else 1000)]
    args = argparse.Namespace(quick=True, workers=22, reps=1, herd_connections=0)
    text = report.render(args, wls, [ours, others[0], sink, others[1], floor], [], [], [],
                         datetime.datetime.now().astimezone(), 60.0)
    targets = text.split("## Targets")[1].split("## Throughput and CPU")[0]
    assert "floor" not in targets.lower()
    # the CPU targets against smtp-sink: 300/100 = 3.00x > 2.5x fails, 150/50 = 3.00x <= 3x passes
    assert ("| connection per message: prefork-esmtp CPU per message ≤ 2.5× smtp-sink's | 300 vs 100 µs = "
            "**3.00×** | FAIL |") in targets
    assert ("| persistent sessions: prefork-esmtp CPU per message ≤ 3× smtp-sink's | 150 vs 50 µs = "
            "**3.00×** | PASS |") in targets
    tables = text.split("## Throughput and CPU")[1].split("## prefork-esmtp worker memory")[0]
    conn, persist, big = tables.split("### ")[1:4]
    assert "**1.88×** the floor's (300 vs 160 µs)" in conn and "**1.60×** smtp-sink's" in conn
    assert "**1.88×** the floor's (150 vs 80 µs)" in persist and "**1.60×** smtp-sink's" in persist
    assert "floor" not in big.lower()
    assert "reference and not a peer" in text.split("## Targets")[0]
