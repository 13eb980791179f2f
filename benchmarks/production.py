"""Operating figures: throughput through reloads, and behind HAProxy with the PROXY protocol.

Three ways of serving the same connection-per-message load, each run with
``smtp-source`` and every session accounted for:

* ``direct``: prefork-esmtp with the counting handler, no reload;
* ``reloads``: the same server, sent ``RELOAD_HUPS`` HUPs during the run,
  evenly spaced by the messages ``smtp-source`` has sent (its ``-c``
  counter): the k-th HUP once k/(HUPS+1) of the messages are out, each only
  after the previous reload is over (a HUP during a reload is ignored by
  the master), so every HUP is a whole reload;
* ``haproxy``: a second such server with ``--proxy-protocol``, behind a real
  HAProxy with ``send-proxy-v2``;
* ``sink-direct`` and ``sink-haproxy``: a reference, never a target: Postfix's
  ``smtp-sink`` (C, the least CPU an SMTP server spends on a session) direct
  and through a second HAProxy with the same settings but plain TCP
  (smtp-sink cannot read a PROXY header).  On a machine whose cores HAProxy
  shares with the server and the client, its ratio shows what the machine
  allows: the less CPU a server spends per message, the larger HAProxy's
  share, so the lower the ratio.

The runs are interleaved (order rotating each repetition).  ``smtp-source``
runs with ``-A`` (a 4xx/5xx reply is a warning and the run goes on; 421
ends that session) and ``-C 100`` (a refused connection is a warning and
is tried again), and its warnings are counted:

* refused: a connection refused, a non-2xx greeting, or a connection lost
  before the greeting;
* cut: a session ended mid-way, by ``421`` to a command or by a lost
  connection (``smtp-source`` stops at the first lost connection, so then
  the counts are lower bounds and the run failed);
* lost: acknowledged with 250 but not recorded by the handler
  (``counting_handler.py`` writes its record before the 250 goes out);
  not counted for smtp-sink, which keeps no record.

Each run also takes smtp-source's own CPU (the benchmark's reaped children,
``RUSAGE_CHILDREN``, before and after: smtp-source is the only child that
ends during a run), for the bound the report works out:
(server + client CPU) / (server + client + HAProxy CPU) per message.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from measure import Workload, children_cpu, cpu_times, median
from procs import HOST, end_process, log, release, spawn
from servers import HAProxyServer, PreforkCountingServer, Server, SmtpSinkServer

#: HUPs sent during each run of the reload figure.
RELOAD_HUPS = 5
#: Connection attempts per smtp-source session before a refused connection is fatal.
CONNECT_TRIES = 100
#: Seconds to wait for a reload to be over (the master's READY=1) once its HUP was sent.
RELOAD_WAIT = 60.0
MODES = ("direct", "reloads", "haproxy", "sink-direct", "sink-haproxy")
#: The modes that are a reference (smtp-sink), never part of a target.
REFERENCE_MODES = ("sink-direct", "sink-haproxy")
#: The modes that run through an HAProxy (its CPU is measured apart).
PROXIED_MODES = ("haproxy", "sink-haproxy")


@dataclass
class Run:
    """One counted smtp-source run: rate, CPU, the sessions refused and cut, the messages lost."""

    mode: str
    seconds: float
    messages: int
    cpu: float  # the server's process tree (prefork-esmtp's; smtp-sink's in the reference modes)
    proxy_cpu: float = 0.0  # HAProxy's, in the modes through it
    refused: int = 0
    cut: int = 0
    rejected: int = 0  # other 4xx/5xx replies (none expected from the counting handler)
    acknowledged: int | None = None  # None when smtp-source stopped early
    recorded: int = 0
    lost: int | None = None
    planned_hups: int = 0
    hups: int = 0  # HUPs sent before smtp-source ended
    reloads: int = 0  # reloads over by READY=1 (within RELOAD_WAIT of the run's end)
    reload_failures: int = 0
    reload_seconds: list[float] = field(default_factory=list)  # each reload, HUP to READY=1
    finished: bool = True  # smtp-source ran to its end (no fatal error, no timeout)
    errors: list[str] = field(default_factory=list)
    client_cpu: float = 0.0  # smtp-source's own (user + system)
    counted: bool = True  # the server records what it takes, so lost messages are counted

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> bool:
        """Every session served: nothing refused, cut, rejected or lost (where counted); every HUP a reload."""
        return (self.finished and self.refused == 0 and self.cut == 0 and self.rejected == 0
                and (self.lost == 0 or not self.counted) and self.hups == self.planned_hups
                and self.reloads == self.hups and self.reload_failures == 0)


# -- smtp-source's diagnostics ---------------------------------------------------------------

_DIAGNOSTIC = re.compile(r"\S*: (warning|fatal): (.*)")
_REJECT = re.compile(r"(?:HELO|LHLO|sender|recipient|data|end of data|rset) rejected: (\d{3})")


def classify(stderr: str) -> dict[str, Any]:
    """Count smtp-source's warnings and fatal errors (``-A -C N``) as refused, cut and rejected.

    ``failed_attempts`` are the messages that got no 250 while the run went on
    (a 421 or other rejection of one of its commands): with smtp-source
    finished, acknowledged = messages − failed_attempts.
    """
    refused = cut = rejected = failed = 0
    notes: list[str] = []  # the distinct diagnostics, for the report
    after_banner_reject = False
    for line in stderr.splitlines():
        found = _DIAGNOSTIC.match(line)  # "PROGRAM: warning: TEXT", PROGRAM as it was started
        if found is None:
            continue
        _kind, text = found.groups()
        if text not in notes:
            notes.append(text)
        banner_before, after_banner_reject = after_banner_reject, False
        if text.startswith("connect: "):
            refused += 1
        elif text.startswith("rejected at server banner"):
            refused += 1
            after_banner_reject = True
        elif text.startswith(("lost connection", "timeout")):
            if "server greeting" in text:
                refused += 1
            elif not (banner_before and "sending HELO" in text):  # else the refused session's own end
                cut += 1
        elif (m := _REJECT.search(text)) is not None:
            if "rset rejected" not in text:  # follows another rejection of the same message
                failed += 1
            if m.group(1) in ("421", "521"):
                cut += 1
            else:
                rejected += 1
    return {"refused": refused, "cut": cut, "rejected": rejected, "failed_attempts": failed,
            "errors": notes[:4]}


# -- one counted run -------------------------------------------------------------------------

def source_command(wl: Workload, count: int, port: int) -> list[str]:
    """smtp-source for a counted run: the workload's flags plus ``-A -C CONNECT_TRIES -c``."""
    base = wl.args(count)
    return base[:1] + ["-A", "-C", str(CONNECT_TRIES), "-c"] + base[1:] + [f"{HOST}:{port}"]


def counted_run(mode: str, server: Server, wl: Workload, count: int, timeout: float,
                hups: int = 0, front: Server | None = None) -> Run:
    """One smtp-source run of ``count`` messages against ``server`` (through ``front`` when given).

    With ``hups``, the k-th HUP goes to the master once k/(hups+1) of the
    messages were sent and the previous reload is over.  The wall time is
    smtp-source's; the CPU is the server tree's (and the front's, apart), and
    smtp-source's own.  Messages lost are counted for a
    :class:`PreforkCountingServer` only (another server keeps no record; no HUPs then).
    """
    counting = isinstance(server, PreforkCountingServer)
    notices = server.notices if counting else None
    assert (notices is not None) == counting and (counting or hups == 0)
    cmd = source_command(wl, count, front.port if front is not None else server.port)
    server.refresh_tree()
    c0 = cpu_times(server.procs)[0]
    if front is not None:
        front.refresh_tree()
    p0 = cpu_times(front.procs)[0] if front is not None else 0.0
    recorded0 = server.recorded() if notices is not None else 0
    if notices is not None:
        notices.drain()
        reloads0, failures0, durations0 = notices.reloads, notices.failed, len(notices.durations)

    err_chunks: list[bytes] = []
    k0 = children_cpu()  # smtp-source is the only child that ends during the run
    t0 = time.perf_counter()
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    sent = hups_sent = 0
    thresholds = [count * k // (hups + 1) for k in range(1, hups + 1)]
    out_fd = proc.stdout.fileno()
    waited = [out_fd] + ([notices] if notices is not None else [])
    tail = b""
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:  # bounded by smtp-source's end of output and the deadline
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        ready, _, _ = select.select(waited, [], [], min(left, 0.5))
        if notices is not None and notices in ready:
            notices.drain()
        if out_fd in ready:
            chunk = os.read(out_fd, 65536)
            if not chunk:
                break
            tail = (tail + chunk)[-64:]
            numbers = re.findall(rb"(\d+)\r", tail)
            if numbers:
                sent = int(numbers[-1])
        if notices is not None and hups_sent < hups and sent >= thresholds[hups_sent] and not notices.reloading:
            notices.hup(server.root)
            hups_sent += 1
    if timed_out:
        end_process(proc, signal.SIGKILL, grace=1)
    else:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            end_process(proc, signal.SIGKILL, grace=1)
    elapsed = time.perf_counter() - t0
    client = max(0.0, children_cpu() - k0)
    release(proc)
    reader.join(timeout=5)
    if notices is not None:
        notices.wait_reloaded(RELOAD_WAIT)  # the last reload's end counts, outside the timed part
    time.sleep(0.05)  # let the server finish the last QUIT/close
    server.refresh_tree()
    c1 = cpu_times(server.procs)[0]
    p1 = 0.0
    if front is not None:
        front.refresh_tree()
        p1 = cpu_times(front.procs)[0]

    found = classify(b"".join(err_chunks).decode(errors="replace"))
    finished = not timed_out and proc.returncode == 0
    acknowledged = count - found["failed_attempts"] if finished else None
    errors = found["errors"] + ([f"timed out after {timeout:.0f} s"] if timed_out else [])
    if not finished and not errors:
        errors.append(f"smtp-source exit {proc.returncode}")
    if notices is None:  # nothing recorded, no reloads
        return Run(mode, elapsed, count, max(0.0, c1 - c0), max(0.0, p1 - p0), found["refused"],
                   found["cut"], found["rejected"], acknowledged, finished=finished, errors=errors,
                   client_cpu=client, counted=False)
    recorded = server.recorded() - recorded0
    return Run(mode, elapsed, count, max(0.0, c1 - c0), max(0.0, p1 - p0), found["refused"],
               found["cut"], found["rejected"], acknowledged, recorded,
               max(0, acknowledged - recorded) if acknowledged is not None else None,
               hups, hups_sent, notices.reloads - reloads0, notices.failed - failures0,
               notices.durations[durations0:], finished, errors, client_cpu=client)


# -- the measurement ---------------------------------------------------------------------------

def measure(args: argparse.Namespace, conn: Workload, workdir: Path) -> dict[str, Any]:
    """The interleaved runs of every mode; the rows for the report (``runs`` by mode, labels, reasons)."""
    count = args.reload_messages
    result: dict[str, Any] = {"messages": count, "sessions": conn.sessions, "size": conn.size,
                              "hups": RELOAD_HUPS, "runs": {m: [] for m in MODES}, "not_run": {},
                              "haproxy_version": "", "cores": len(os.sched_getaffinity(0))}
    direct = PreforkCountingServer(args.workers, key="counting-direct")
    proxied = PreforkCountingServer(args.workers, ["--proxy-protocol"], key="counting-proxied",
                                    label="prefork-esmtp --proxy-protocol (counting handler)")
    haproxy = HAProxyServer(proxied) if not args.no_haproxy else None
    sink = SmtpSinkServer("production-smtp-sink", "Postfix smtp-sink (reference)")
    sink_front = HAProxyServer(sink, key="haproxy-plain", send_proxy=False)
    modes = ["direct"] + ([] if args.no_reload else ["reloads"])
    started: list[Server] = []
    try:
        direct.start(workdir)
        started.append(direct)
        result["version"] = direct.version
        if haproxy is None:
            result["not_run"]["haproxy"] = "skipped (--no-haproxy)"
        elif not haproxy.available:
            result["not_run"]["haproxy"] = haproxy.reason
        else:
            failed = _start_all([proxied, haproxy], started, workdir)
            if failed is None:
                modes.append("haproxy")
                result["haproxy_version"] = haproxy.version
            else:
                result["not_run"]["haproxy"] = failed
                log(f"HAProxy: not run ({failed})")
        if "haproxy" not in modes:  # the reference is there for the HAProxy figure only
            for mode in REFERENCE_MODES:
                result["not_run"][mode] = f"no HAProxy figure ({result['not_run']['haproxy']})"
        elif not sink.available:
            for mode in REFERENCE_MODES:
                result["not_run"][mode] = sink.reason
        else:
            failed = _start_all([sink, sink_front], started, workdir)
            if failed is None:
                modes += list(REFERENCE_MODES)
            else:
                for mode in REFERENCE_MODES:
                    result["not_run"][mode] = failed
                log(f"smtp-sink reference: not run ({failed})")
        if args.no_reload:
            result["not_run"]["reloads"] = "skipped (--no-reload)"
        log(f"reload/HAProxy figures: {', '.join(modes)}; {count} messages per run, "
            f"{RELOAD_HUPS} HUPs in each reload run")

        def once(mode: str, n: int, hups: int = RELOAD_HUPS) -> Run:
            if mode == "haproxy":
                return counted_run(mode, proxied, conn, n, args.run_timeout, front=haproxy)
            if mode == "sink-direct":
                return counted_run(mode, sink, conn, n, args.run_timeout)
            if mode == "sink-haproxy":
                return counted_run(mode, sink, conn, n, args.run_timeout, front=sink_front)
            return counted_run(mode, direct, conn, n, args.run_timeout,
                               hups=hups if mode == "reloads" else 0)

        for mode in modes:  # warm-up, unrecorded; one reload in it (the first costs the most)
            once(mode, max(conn.sessions * 2, count // 10), hups=1)
        for rep in range(args.reps):
            k = rep % len(modes)
            for mode in modes[k:] + modes[:k]:
                r = once(mode, count)
                result["runs"][mode].append(r)
                log(f"rep {rep + 1}/{args.reps} {mode:12s} {r.rate:8.0f} msgs/s  "
                    f"cpu {r.cpu / r.messages * 1e6:5.0f} µs/msg"
                    + (f" + haproxy {r.proxy_cpu / r.messages * 1e6:4.0f}" if mode in PROXIED_MODES else "")
                    + f" client {r.client_cpu / r.messages * 1e6:4.0f}"
                    + (f"  HUPs {r.hups}, reloads {r.reloads} (longest "
                       f"{max(r.reload_seconds, default=0):.2f} s)" if mode == "reloads" else "")
                    + f"  refused/cut/lost {r.refused}/{r.cut}/"
                    + ("—" if not r.counted else "?" if r.lost is None else str(r.lost))
                    + ("" if r.ok else f"  FAILED: {'; '.join(r.errors) or 'see counts'}"))
    finally:
        for s in reversed(started):
            s.stop()
    return result


def _start_all(servers: list[Server], started: list[Server], workdir: Path) -> str | None:
    """Start ``servers`` in order, each added to ``started`` (stopped at the end); why not, or None."""
    try:
        for server in servers:
            server.start(workdir)
            started.append(server)
    except RuntimeError as exc:
        return str(exc)
    return None


def summary(runs: list[Run]) -> dict[str, Any]:
    """Median rate and CPU per message over the runs, their range, and the counts summed over all runs."""
    rates = [r.rate for r in runs]
    unknown = any(r.lost is None for r in runs)
    return {
        "rate": median(rates), "lo": min(rates, default=None), "hi": max(rates, default=None),
        "cpu_us": median([r.cpu / r.messages * 1e6 for r in runs]),
        "proxy_cpu_us": median([r.proxy_cpu / r.messages * 1e6 for r in runs]),
        "client_cpu_us": median([r.client_cpu / r.messages * 1e6 for r in runs]),
        "counted": all(r.counted for r in runs),
        "refused": sum(r.refused for r in runs), "cut": sum(r.cut for r in runs),
        "rejected": sum(r.rejected for r in runs),
        "lost": None if unknown else sum(r.lost or 0 for r in runs),
        "planned_hups": sum(r.planned_hups for r in runs),
        "hups": sum(r.hups for r in runs), "reloads": sum(r.reloads for r in runs),
        "reload_failures": sum(r.reload_failures for r in runs),
        "reload_seconds": median([d for r in runs for d in r.reload_seconds]),
        "reload_seconds_max": max((d for r in runs for d in r.reload_seconds), default=None),
        "messages": sum(r.messages for r in runs), "recorded": sum(r.recorded for r in runs),
        "n_ok": sum(1 for r in runs if r.ok), "n_fail": sum(1 for r in runs if not r.ok),
        "errors": sorted({e for r in runs for e in r.errors})[:4],
    }


def as_json(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The measurement with its runs as plain dicts (for ``--json``)."""
    if result is None:
        return None
    out = dict(result)
    out["runs"] = {m: [dict(vars(r), rate=r.rate, ok=r.ok) for r in runs] for m, runs in result["runs"].items()}
    return out
