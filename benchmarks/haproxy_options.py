#!/usr/bin/env python3
"""Which HAProxy settings to run the HAProxy figure with: variants side by side, runs interleaved.

One prefork-esmtp server direct and one with ``--proxy-protocol`` (the
counting handler, as ``production.py`` runs them), one HAProxy per variant
in front of the second, all started at once; then rounds of the
connection-per-message load (``smtp-source``, 20 sessions, 2 KB), each
round one run direct and one through each variant, the order rotating.
Per variant: msgs/s and its share of the same round's direct run,
prefork-esmtp's CPU per message and its ratio to direct, and HAProxy's own
CPU per message; medians over the rounds, with min – max.

    .venv/bin/python benchmarks/haproxy_options.py --rounds 5 --messages 6000

The variants are :data:`VARIANTS` (lines added to the benchmark's base
config, see ``servers.haproxy_config``); the one the benchmark runs with is
``servers.HAPROXY_TUNING``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from measure import Workload, median
from procs import end_all, log, on_signal
from production import counted_run
from servers import HAProxyServer, PreforkCountingServer

#: name -> lines per config section, added to the base TCP front.
VARIANTS: dict[str, dict[str, list[str]]] = {
    "defaults (threads: one per CPU)": {},
    "nbthread 1": {"global": ["nbthread 1"]},
    "nbthread 1, tcp-smart-connect": {"global": ["nbthread 1"], "backend": ["option tcp-smart-connect"]},
    "nbthread 2, tcp-smart-connect": {"global": ["nbthread 2"], "backend": ["option tcp-smart-connect"]},
}


def spread(values: list[float], unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    """median (min – max) of ``values`` times ``scale``."""
    v = [x * scale for x in values]
    return f"{median(v):.{digits}f}{unit} ({min(v):.{digits}f} – {max(v):.{digits}f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--messages", type=int, default=6000, help="messages per run")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated variant numbers (0-based) to run")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    names = list(VARIANTS)
    if args.only:
        names = [names[int(i)] for i in args.only.split(",")]
    wl = Workload("conn", "connection per message", args.sessions, 2048, False, args.messages)
    workdir = Path(tempfile.mkdtemp(prefix="prefork-esmtp-haproxy-"))
    workers = args.sessions + 2
    direct = PreforkCountingServer(workers, key="counting-direct")
    proxied = PreforkCountingServer(workers, ["--proxy-protocol"], key="counting-proxied")
    fronts = {name: HAProxyServer(proxied, VARIANTS[name], key=f"haproxy-{i}")
              for i, name in enumerate(names)}
    started = []
    rows: dict[str, list[tuple[float, float, float, float, float]]] = {n: [] for n in names}
    try:
        for server in (direct, proxied, *fronts.values()):
            server.start(workdir)
            started.append(server)
        log(f"HAProxy {next(iter(fronts.values())).version}; variants: {'; '.join(names)}")
        order = ["direct"] + names
        for mode in order:  # warm-up, unrecorded
            counted_run(mode, proxied if mode != "direct" else direct, wl, args.messages // 5, 300,
                        front=fronts.get(mode))
        for rnd in range(args.rounds):
            k = rnd % len(order)
            runs = {}
            for mode in order[k:] + order[:k]:
                r = counted_run(mode, proxied if mode != "direct" else direct, wl, args.messages, 300,
                                front=fronts.get(mode))
                if not r.ok:
                    log(f"{mode}: run failed: {r.errors}")
                runs[mode] = r
            d = runs["direct"]
            for name in names:
                r = runs[name]
                rows[name].append((r.rate, r.rate / d.rate, r.cpu / r.messages, (r.cpu / r.messages) /
                                   (d.cpu / d.messages), r.proxy_cpu / r.messages))
            log(f"round {rnd + 1}: direct {d.rate:.0f} msgs/s {d.cpu / d.messages * 1e6:.0f} µs; "
                + "; ".join(f"{n}: {rows[n][-1][0]:.0f} ({rows[n][-1][1]:.0%}) ours "
                            f"{rows[n][-1][2] * 1e6:.0f} µs, haproxy {rows[n][-1][4] * 1e6:.0f} µs"
                            for n in names))
    except KeyboardInterrupt:
        end_all()
        return 130
    finally:
        for server in reversed(started):
            server.stop()
        end_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{args.rounds} rounds of {args.messages} messages, {args.sessions} sessions; median (min – max)")
    print("| HAProxy variant | msgs/s | ÷ direct | our CPU µs/msg | ours ÷ direct | HAProxy CPU µs/msg |")
    print("|---|--:|--:|--:|--:|--:|")
    for name in names:
        cols = list(zip(*rows[name]))
        print(f"| {name} | {spread(cols[0])} | {spread(cols[1], '%', 100)} | {spread(cols[2], '', 1e6)} | "
              f"{spread(cols[3], '', 1, 2)} | {spread(cols[4], '', 1e6)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
