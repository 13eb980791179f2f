#!/usr/bin/env python3
"""Side-by-side benchmark of prefork-esmtp against aiosmtpd, Postfix's smtp-sink and Haraka.

    .venv/bin/python benchmarks/run.py            # full run (make bench), ~9 minutes
    .venv/bin/python benchmarks/run.py --quick    # smoke run, about a minute

One run starts every server side by side on loopback, each accepting and
discarding mail, then drives each one with Postfix's ``smtp-source`` in three
workloads, with the repetitions interleaved across servers (the order of the
servers rotates from one repetition to the next):

* ``conn``: one connection per 2 KB message, 20 parallel sessions;
* ``persist``: 20 persistent sessions of 2 KB messages (``smtp-source -d``);
* ``big``: 1 MB messages over 4 persistent sessions.

Beside them, in the two 2 KB workloads only, the Python floor
(``python_floor.py``): a reference, never part of a target, for how much of a
message's CPU any Python prefork server spends with no SMTP engine at all.

And, through a relay, prefork-esmtp's relay handler against Haraka's
smtp_forward, both forwarding to one shared ``smtp-sink`` upstream:

* ``relay``: one connection per 2 KB message, 20 parallel sessions;
* ``relay-big``: 1 MB messages over 4 persistent sessions.

Right after the repetitions, a reference and never a target, the ``persist``
workload once more on the same running servers with every thread of each
pinned to one CPU and ``smtp-source`` to another (``split_cores.py``): what
one core of its own gives each server, since on two shared cores the client's
CPU pulls every msgs/s ratio towards 1 (``--no-split`` skips it; about 40 s).
Then one ``relay-big`` run on a fresh relay server, warmed up with 2 KB
messages, measures the relay workers' peak memory against the same workers
idle before it.

Then, with a handler that records every message it accepts
(``production.py``), the connection-per-message load three ways, every
session accounted for (refused, cut, lost): direct, with 5 HUPs during the
run, and through a real HAProxy sending the PROXY protocol v2 header; beside
them, a reference and never a target, Postfix's smtp-sink direct and through
a second HAProxy forwarding plain TCP (what the machine allows through it).

For each run it records the wall time of ``smtp-source``, the user+system
CPU time of the server's whole process tree (psutil, before and after; the
times of reaped children are included) and smtp-source's own CPU.  It reports median messages/s (MB/s
for ``big``), CPU microseconds per message, the median USS of prefork-esmtp's
workers, the median idle worker USS of a fresh server after 2,000 sessions,
ratios of prefork-esmtp to each peer and pass/fail against the targets
(``RATIO_TARGETS`` in ``report.py``).  It then measures the accept herd
(``--accept-mode exclusive`` against ``shared``): messages/s, and with
``perf stat`` on the workers the accept4() calls, failed accepts,
epoll_wait() returns and context switches per connection.  Last, a fresh
server with a large pool (``--pool-workers``, 1,000): seconds from ``start``
until every worker reports idle on the scoreboard, and the CPU and wake-ups
of the idle master and workers over 10 seconds.  Everything goes into ``benchmarks/RESULTS.md``; the section that
``benchmarks/profiling.py`` writes there is kept.

Only loopback addresses are used, and every process started here is ended
when the run ends, also on Ctrl-C or SIGTERM.
Standard library and psutil only (aiosmtpd is pip-installed into this Python
when absent; Haraka is npm-installed into a cache directory outside the repo).

This file is the command line and the order of the phases; the parts live
beside it: ``servers.py`` (how each server is installed, started and stopped),
``measure.py`` (smtp-source runs, CPU and memory accounting, the accept herd),
``split_cores.py`` (the run with the client on its own core),
``production.py`` (reload under load, behind HAProxy), ``report.py``
(targets and RESULTS.md) and ``procs.py`` (the processes started and their
clean-up).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import measure
import production
import report
import servers as peers
import split_cores
from procs import end_all, log, on_signal

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` shrinks every count to a smoke run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repetition, small counts, short herd/idle phases")
    p.add_argument("--reps", type=int, default=5, help="repetitions per server and workload")
    p.add_argument("--conn-messages", type=int, default=3000,
                   help="messages per run, connection per message (20 sessions, 2 KB)")
    p.add_argument("--persist-messages", type=int, default=10000,
                   help="messages per run, 20 persistent sessions (2 KB)")
    p.add_argument("--big-messages", type=int, default=500, help="1 MB messages per run (4 sessions)")
    p.add_argument("--sessions", type=int, default=20, help="parallel sessions for the 2 KB workloads")
    p.add_argument("--big-sessions", type=int, default=4, help="parallel sessions for 1 MB messages")
    p.add_argument("--relay-messages", type=int, default=3000,
                   help="messages per run through the relays, connection per message (2 KB)")
    p.add_argument("--relay-big-messages", type=int, default=200,
                   help="1 MB messages per run through the relays (and for the relay memory run)")
    p.add_argument("--no-relay", action="store_true", help="skip the relay workloads")
    p.add_argument("--workers", type=int, default=0,
                   help="prefork-esmtp workers (default: sessions + 2, so workers >= client sessions)")
    p.add_argument("--servers", default="prefork-esmtp,aiosmtpd,smtp-sink,haraka,python-floor",
                   help="comma-separated servers to run (prefork-esmtp is always run)")
    p.add_argument("--no-haraka", action="store_true", help="do not install or run Haraka")
    p.add_argument("--idle-sessions", type=int, default=2000,
                   help="sessions before measuring idle worker USS on a fresh server")
    p.add_argument("--no-herd", action="store_true", help="skip the accept-herd measurement")
    p.add_argument("--herd-workers", default="22,64",
                   help="comma-separated pool sizes for the herd measurement")
    p.add_argument("--herd-connections", type=int, default=2000,
                   help="connections counted with perf per herd mode")
    p.add_argument("--only", default="",
                   help="comma-separated phases to run, of: side-by-side (the workloads, their worker "
                        "memory and the relay memory run), production (reload under load, HAProxy), "
                        "idle-uss, herd, pool; default: all")
    p.add_argument("--no-pool", action="store_true", help="skip the large-pool start-up and idle-CPU phase")
    p.add_argument("--no-split", action="store_true",
                   help="skip the reference run of persistent sessions with smtp-source on its own core")
    p.add_argument("--pool-workers", default="1000",
                   help="comma-separated pool sizes: time to all workers idle, then their idle CPU")
    p.add_argument("--pool-idle-seconds", type=float, default=10.0,
                   help="window over which the idle pool's CPU and wake-ups are measured")
    p.add_argument("--reload-messages", type=int, default=30000,
                   help="messages per run of the reload and HAProxy figures (connection per message, 2 KB)")
    p.add_argument("--no-reload", action="store_true", help="skip the reload-under-load figure")
    p.add_argument("--no-haproxy", action="store_true",
                   help="skip the figure behind HAProxy (and its smtp-sink reference)")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds before a run is failed")
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="markdown report")
    p.add_argument("--json", type=Path, default=None, help="also write raw samples as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 1)
        args.conn_messages = min(args.conn_messages, 300)
        args.persist_messages = min(args.persist_messages, 1000)
        args.big_messages = min(args.big_messages, 20)
        args.relay_messages = min(args.relay_messages, 300)
        args.relay_big_messages = min(args.relay_big_messages, 20)
        args.idle_sessions = min(args.idle_sessions, 300)
        args.herd_connections = min(args.herd_connections, 300)
        args.reload_messages = min(args.reload_messages, 6000)
        args.herd_workers = args.herd_workers.split(",")[0]
        args.pool_workers = "50"
        args.pool_idle_seconds = min(args.pool_idle_seconds, 5.0)
    if not args.workers:
        args.workers = max(args.sessions, args.big_sessions) + 2
    args.herd_workers = [int(x) for x in str(args.herd_workers).split(",") if x.strip()]
    phases = {"side-by-side", "production", "idle-uss", "herd", "pool"}
    args.phases = {x.strip() for x in args.only.split(",") if x.strip()} or phases
    if args.phases - phases:
        p.error(f"--only: unknown phase(s) {', '.join(sorted(args.phases - phases))}")
    if args.no_herd:
        args.phases.discard("herd")
    if args.no_pool:
        args.phases.discard("pool")
    args.pool_workers = [int(x) for x in str(args.pool_workers).split(",") if x.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every phase, write RESULTS.md (and the raw samples with --json); 130 when interrupted."""
    args = parse_args(argv)
    for tool in (measure.SMTP_SOURCE,):
        if not os.path.exists(tool):
            print(f"bench: {tool} not found (apt-get install postfix)", file=sys.stderr)
            return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)  # SIGINT too: a shell may have started us with it ignored
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    workloads = measure.workloads(args.sessions, args.big_sessions, args.conn_messages,
                                  args.persist_messages, args.big_messages)
    conn = workloads[0]  # the load of the idle-USS and herd phases
    if "side-by-side" not in args.phases:
        workloads = []
    elif not args.no_relay:
        workloads += measure.relay_workloads(args.sessions, args.big_sessions, args.relay_messages,
                                             args.relay_big_messages)
    workdir = Path(tempfile.mkdtemp(prefix="prefork-esmtp-bench-"))
    servers: list[peers.Server] = []
    upstream: peers.Server | None = None
    bench_uss: list[int] = []
    relay_mem: dict[str, Any] | None = None
    idle_rows: list[dict[str, Any]] = []
    herd_rows: list[dict[str, Any]] = []
    pool_rows: list[dict[str, Any]] = []
    ops: dict[str, Any] | None = None
    split: measure.Workload | None = None
    try:
        log(f"work dir {workdir}; phases: {', '.join(sorted(args.phases))}")
        if "side-by-side" in args.phases:
            servers = peers.side_by_side(args.workers, set(args.servers), haraka=not args.no_haraka)
            active = peers.start_all(servers, workdir)
            if not args.no_relay:
                upstream = peers.SmtpSinkServer("relay-upstream", "Postfix smtp-sink (relay upstream)")
                relays = peers.relay_pair(args.workers, not args.no_haraka and "haraka" in args.servers,
                                          upstream)
                servers += relays
                active += peers.start_relays(upstream, relays, workdir)
            measure.interleaved(active, workloads, args.reps, args.run_timeout)
            persist = next((wl for wl in workloads if wl.key == "persist"), None)
            if persist is not None and not args.no_split:
                try:
                    split = split_cores.run(active, persist, args.reps, args.run_timeout)
                except Exception as exc:  # noqa: BLE001 - a reference phase: report without it
                    log(f"split cores: not reported: {exc}")
                    for s in active:
                        s.samples.pop(persist.key + split_cores.SUFFIX, None)
            bench_uss = servers[0].worker_uss()
            for s in servers:
                s.stop()
            if upstream is not None and upstream.available:
                small, big = (next(wl for wl in workloads if wl.key == k) for k in ("relay", "relay-big"))
                relay_mem = measure.relay_memory(args, small, big, upstream, workdir)
                upstream.stop()
        if "production" in args.phases and not (args.no_reload and args.no_haproxy):
            ops = production.measure(args, conn, workdir)
        if "idle-uss" in args.phases:
            idle_rows = measure.idle_uss(args, conn, workdir)
        if "herd" in args.phases:
            herd_rows = measure.herd(args, conn, workdir)
        if "pool" in args.phases:
            pool_rows = measure.pool(args, workdir)
    except KeyboardInterrupt:
        log("interrupted: stopping every process started here")
        end_all()
        return 130
    finally:
        for s in servers + ([upstream] if upstream else []):
            s.stop()
        end_all()

    body = report.render(args, workloads, servers, bench_uss, idle_rows, herd_rows, started,
                         time.monotonic() - t_start, relay_mem, ops, pool_rows, split)
    report.write_results(args.output, body)
    if args.json:
        raw = {s.key: {k: [vars(x) for x in v] for k, v in s.samples.items()} for s in servers}
        args.json.write_text(json.dumps({"samples": raw, "idle": idle_rows, "herd": herd_rows,
                                         "pool": pool_rows,
                                         "bench_uss": bench_uss, "relay_memory": relay_mem,
                                         "reload_haproxy": production.as_json(ops)},
                                        indent=1))
    print()
    print(body)
    log(f"wrote {args.output}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
