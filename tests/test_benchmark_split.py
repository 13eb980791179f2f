"""The benchmark's client CPU and its reference run with the client on its own core.

``measure.drive`` takes smtp-source's own CPU beside the server's, and
``split_cores`` pins a server's whole process tree to one CPU and the client
to another, then gives the server every CPU back.  Both are run here for real:
the Python floor (two forked workers on loopback, started by its adapter) and
Postfix's smtp-source.  The report's sentences and table are rendered from
made-up samples, so their arithmetic can be checked.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_tool

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # appended: the benchmark's module names never shadow others

import measure  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
import servers  # noqa: E402
import split_cores  # noqa: E402
from measure import Sample, Workload  # noqa: E402

PERSIST = Workload("persist", "Persistent sessions (2 KB, 2 sessions, `-d`)", 2, 2048, True, 200)


@pytest.fixture
def floor(tmp_path: Path) -> Iterator[servers.PythonFloorServer]:
    """The Python floor with two workers, as ``make bench`` starts it; stopped afterwards."""
    require_tool("smtp-source")
    server = servers.PythonFloorServer(2)
    server.start(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _affinities(server: servers.Server) -> list[set[int]]:
    """The CPUs each thread of the server's tree may run on."""
    out = []
    for proc in procs.process_tree(server.root):
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            out.append(os.sched_getaffinity(int(tid)))
    return out


def test_drive_takes_smtp_sources_own_cpu_beside_the_servers(floor: servers.PythonFloorServer) -> None:
    sample = measure.drive(floor, PERSIST, 200, timeout=60)
    assert sample.ok, sample.error
    assert sample.messages == 200
    # smtp-source does real work for each of its 200 messages (a few system calls each, at least)
    assert sample.client_cpu > 0
    assert sample.cpu > 0
    assert not floor.samples  # drive() measures; the repetitions record


def test_split_run_pins_server_and_client_apart_then_gives_every_cpu_back(
        floor: servers.PythonFloorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    everything = os.sched_getaffinity(0)
    where = split_cores.cpus()
    if len(everything) < 2:
        assert where is None and split_cores.run([floor], PERSIST, 1, 60) is None
        return
    server_cpus, client_cpus = where
    assert server_cpus.isdisjoint(client_cpus) and server_cpus | client_cpus <= everything
    assert split_cores.pin(floor, server_cpus) >= 3  # the master and its two workers, at least
    assert split_cores.pinned_to(floor, server_cpus)
    split_cores.pin(floor, everything)
    assert not split_cores.pinned_to(floor, server_cpus)
    seen = []  # what each smtp-source run of the phase found: the server's threads' CPUs, the client's
    real_drive = measure.drive

    def watched(server: servers.Server, wl: Workload, count: int, timeout: float,
                client_cpus: set[int] | None = None) -> Sample:
        seen.append((_affinities(server), client_cpus))
        return real_drive(server, wl, count, timeout, client_cpus)

    monkeypatch.setattr(measure, "drive", watched)  # the one interleaved() calls
    wl = split_cores.run([floor], PERSIST, 2, 60)
    assert wl is not None and wl.key == "persist-split" and wl.persistent and wl.count == PERSIST.count
    assert len(seen) == 3  # the warm-up and two repetitions, each with the server on its CPU only
    assert all(all(cpus == server_cpus for cpus in threads) and client == client_cpus for threads, client in seen)
    samples = floor.samples["persist-split"]
    assert len(samples) == 2 and all(s.ok and s.client_cpu > 0 for s in samples)
    assert "persist" not in floor.samples  # the shared-cores figures are not touched
    assert all(cpus == everything for cpus in _affinities(floor))


class _AffinityProbe(Workload):
    """A "client" that prints the CPUs it may run on and fails, so drive() hands its line back as the error."""

    def args(self, count: int) -> list[str]:
        return ["sh", "-c", "grep Cpus_allowed_list /proc/self/status >&2; exit 1", "probe"]


def test_drive_pins_the_client_where_it_is_told(floor: servers.PythonFloorServer) -> None:
    cpu = max(os.sched_getaffinity(0))
    probe = _AffinityProbe("probe", "probe", 1, 1, True, 1)
    sample = measure.drive(floor, probe, 1, timeout=30, client_cpus={cpu})
    assert not sample.ok and sample.error.split(":")[1].strip() == str(cpu)
    unpinned = measure.drive(floor, probe, 1, timeout=30)
    assert unpinned.error.split(":")[1].strip() != str(cpu) or len(os.sched_getaffinity(0)) == 1


def _sample(server_us: float, client_us: float, rate: float, messages: int = 1000) -> Sample:
    return Sample(messages / rate, messages, server_us * messages / 1e6, 0.0, 0.0, True,
                  client_cpu=client_us * messages / 1e6)


def test_report_gives_the_shared_cores_ratio_and_the_split_table() -> None:
    wls = measure.workloads(20, 4, 1000, 1000, 10)
    persist = wls[1]
    split = Workload("persist-split", persist.title + ", smtp-source on its own core", 20, 2048, True, 1000)
    ours = servers.Server("prefork-esmtp", "prefork-esmtp", version="1")
    haraka = servers.Server("haraka", "Haraka (2 nodes)", version="3")
    floor = servers.Server("python-floor", "Python floor (no SMTP engine; reference only)",
                           version="Python 3", only=frozenset({"conn", "persist"}), reference=True)
    others = [servers.Server(k, k, False, "not selected (--servers)") for k in ("aiosmtpd", "smtp-sink")]
    ours.samples = {"persist": [_sample(60, 40, 18000)], "persist-split": [_sample(70, 45, 14000)]}
    haraka.samples = {"persist": [_sample(160, 50, 9000)], "persist-split": [_sample(210, 60, 4700)]}
    floor.samples = {"persist": [_sample(50, 40, 20000)], "persist-split": [_sample(52, 44, 18000)]}
    args = argparse.Namespace(quick=True, workers=22, reps=1, herd_connections=0)
    text = report.render(args, wls, [ours, others[0], others[1], haraka, floor], [], [], [],
                         datetime.datetime.now().astimezone(), 60.0, split=split)
    tables = text.split("## Throughput and CPU")[1].split("## prefork-esmtp worker memory")[0]
    persist_text = tables.split("### ")[2]
    assert "| prefork-esmtp | 18,000 | 18,000 – 18,000 | 60 | n/a | 40 | — | — | 1/0 |" in persist_text
    # cores busy: 18,000/s x 100 us = 1.80, 9,000/s x 210 us = 1.89; (160 + 50) / (60 + 40) = 2.10x
    # where the cores are full; the servers alone 160 / 60 = 2.67x
    assert "+ smtp-source 40 µs, Haraka (2 nodes) 160 + 50 µs, keeping 1.80 and 1.89 of the " in persist_text
    assert ("cores busy. "
            "Where both fill the cores, msgs/s go as 1 ÷ (server + client): 210 ÷ 100 = **2.10×** (measured "
            "2.00×), where the servers' own CPU gives 2.67×; the Python floor reached 2.22× Haraka (2 nodes)'s "
            "msgs/s in this run.") in persist_text
    assert "shares the" not in tables.split("### ")[1]  # no server of a conn target ran
    section = tables.split("### Reference: ")[1]
    assert section.startswith(split.title)
    assert "| Haraka (2 nodes) | 4,700 | 4,700 – 4,700 | 210 | 60 | 2.98× | 1/0 |" in section
    assert "| Python floor (no SMTP engine; reference only) | 18,000 | 18,000 – 18,000 | 52 | 44 | 0.78× |" in section
    targets = text.split("## Targets")[1].split("## Throughput and CPU")[0]
    assert "split" not in targets and "own core" not in targets


def test_split_section_shows_failed_runs_and_stays_when_prefork_esmtp_failed() -> None:
    split = Workload("persist-split", "Persistent sessions, smtp-source on its own core", 20, 2048, True, 1000)
    ours = servers.Server("prefork-esmtp", "prefork-esmtp", version="1")
    haraka = servers.Server("haraka", "Haraka (2 nodes)", version="3")
    ours.samples = {"persist-split": [Sample(60.0, 1000, 0, 0, 0, False, "timed out after 60 s")]}
    haraka.samples = {"persist-split": [_sample(210, 60, 4700)]}
    stats = {(s.key, split.key): measure.summarize(s, split) for s in (ours, haraka)}
    lines = report.split_section(split, [ours, haraka], stats)
    text = "\n".join(lines)
    assert "| prefork-esmtp | n/a | n/a – n/a | n/a | n/a | — | 0/1 |" in text
    assert "| Haraka (2 nodes) | 4,700 | 4,700 – 4,700 | 210 | 60 | n/a | 1/0 |" in text
    assert "Failed runs: prefork-esmtp: timed out after 60 s" in text


def test_report_has_no_split_section_without_the_run() -> None:
    wls = measure.workloads(20, 4, 1000, 1000, 10)
    ours = servers.Server("prefork-esmtp", "prefork-esmtp", version="1")
    ours.samples = {"persist": [_sample(60, 40, 18000)]}
    others = [servers.Server(k, k, False, "not selected (--servers)") for k in ("aiosmtpd", "smtp-sink", "haraka")]
    args = argparse.Namespace(quick=True, workers=22, reps=1, herd_connections=0)
    text = report.render(args, wls, [ours, *others], [], [], [], datetime.datetime.now().astimezone(), 60.0)
    assert "### Reference:" not in text and "own core" not in text


def test_drive_reads_the_hosts_steal_and_the_header_names_noisy_runs() -> None:
    steal, total = measure.cpu_ticks()
    assert total > 0 and 0 <= steal <= total  # Linux always has /proc/stat
    ours = servers.Server("prefork-esmtp", "prefork-esmtp", version="1")
    quiet, noisy = _sample(60, 40, 18000), _sample(90, 50, 12000)
    quiet.steal, noisy.steal = 0.004, 0.21
    ours.samples = {"persist": [quiet, quiet, noisy]}
    line = report.steal_line([ours])
    assert "3 recorded smtp-source run(s) below: median 0.4%, largest 21.0%; 1 run(s) above 5%" in line
    ours.samples = {"persist": [_sample(60, 40, 18000)]}  # a quiet host is said too
    assert "1 recorded smtp-source run(s) below: median 0.0%, largest 0.0%; 0 run(s) above 5%" in report.steal_line([ours])
    ours.samples = {"persist": [Sample(60.0, 1000, 0, 0, 0, False, "timed out after 60 s")]}
    assert report.steal_line([ours]) == ""  # failed runs are not recorded figures
