"""Report: the targets, and RESULTS.md written from the measured samples.

``render`` turns one run (servers with their samples, worker memory, relay
worker memory, accept herd rows) into the markdown report: the run's date and
machine, pass/fail per target, a throughput and CPU table per workload with
ratios of prefork-esmtp (the relay handler in the relay workloads) to each
peer (after each 2 KB table, one sentence on the Python floor, a reference
that is never part of a target), worker memory and the accept herd.  ``write_results`` writes it,
keeping the profile section that ``benchmarks/profiling.py`` writes there.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path
from typing import Any

import psutil

from measure import MIB, Workload, fmt_mib, median, summarize
from production import MODES, PROXIED_MODES, summary
from servers import HAPROXY_TUNING, Server

PROFILE_BEGIN = "<!-- profile:begin -->"
PROFILE_END = "<!-- profile:end -->"

#: The throughput targets: (workload, peer, minimum ratio prefork-esmtp / peer); in the relay
#: workloads prefork-esmtp is its relay handler (the first server of the workload's group).
RATIO_TARGETS = [
    ("conn", "aiosmtpd", 3.0),
    ("conn", "haraka", 1.5),
    ("persist", "haraka", 2.0),
    ("big", "smtp-sink", 0.8),
    ("relay", "haraka-forward", 1.5),
]
#: The CPU targets: (workload, peer, maximum ratio of prefork-esmtp's CPU per message to the peer's).
CPU_TARGETS = [
    ("conn", "smtp-sink", 2.5),
    ("persist", "smtp-sink", 3.0),
]
#: The memory target: median idle worker USS after the idle-memory sessions.
IDLE_USS_TARGET = 2 * MIB
#: The relay's memory target: the largest growth of a worker's peak RSS during a run of 1 MB
#: messages over its own RSS idle just before (warmed up with 2 KB messages only).  Less than
#: one message: a worker that held a 1 MB message whole would grow by at least that much (a
#: looser bound, say 10 MiB, would pass a relay that buffers every message); streaming grew by
#: 0.2-0.6 MiB when tried (allocator arenas and fragmentation, flat from 1 MB to 10 MB messages).
RELAY_GROWTH_TARGET = 1 * MIB
#: A large pool (``--pool-workers``): seconds from ``start`` to every worker idle, and the
#: idle master and workers' CPU in percent of one core.
POOL_READY_TARGET = 3.0
POOL_IDLE_CPU_TARGET = 1.0
#: Reload under load: msgs/s of a run with RELOAD_HUPS HUPs at least this share of one without,
#: and no session refused or cut, no message lost.
RELOAD_RATE_TARGET = 0.9
#: Behind HAProxy with the PROXY protocol: msgs/s at least this share of direct (at most 10% below).
HAPROXY_RATE_TARGET = 0.9
WORKLOAD_NAMES = {"conn": "connection per message", "persist": "persistent sessions",
                  "big": "1 MB messages", "relay": "relay, connection per message",
                  "relay-big": "relay, 1 MB messages"}


def _cpu_target_row(wl: Any, wl_key: str, peer: str, most: float, ours: dict, by_key: dict,
                    stats: dict) -> str:
    """One CPU target's row: prefork-esmtp's CPU per message ÷ the peer's, at most ``most``."""
    label = f"{WORKLOAD_NAMES[wl_key]}: prefork-esmtp CPU per message ≤ {most:g}× {peer}'s"
    if wl is None:
        return f"| {label} | workload not run (`--only`) | n/a |"
    subject = ours[wl.group]
    if not subject.available or not by_key[peer].available:
        return f"| {label} | not run | n/a |"
    a, b = stats[(subject.key, wl_key)].cpu_us, stats[(peer, wl_key)].cpu_us
    if not a or not b:
        return f"| {label} | no CPU figure | FAIL |"
    ratio = a / b
    return f"| {label} | {fmt(a)} vs {fmt(b)} µs = **{ratio:.2f}×** | {'PASS' if ratio <= most else 'FAIL'} |"


def fmt(v: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or n/a."""
    return "n/a" if v is None else f"{v:,.{digits}f}"


def pct(v: float | None) -> str:
    """A fraction as a whole percentage, or n/a."""
    return "n/a" if v is None else f"{v * 100:.0f}%"


def times(v: float | None) -> str:
    """A ratio as "1.23×", or n/a."""
    return "n/a" if v is None else f"{v:.2f}×"


def machine() -> dict[str, str]:
    """CPU model, cores, memory, OS and Python of this machine, for the report's header."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": f"{psutil.cpu_count()} logical / {psutil.cpu_count(logical=False) or '?'} physical",
        "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def render(args: argparse.Namespace, workloads: list[Workload], servers: list[Server],
           bench_uss: list[int], idle_rows: list[dict[str, Any]], herd_rows: list[dict[str, Any]],
           started: datetime.datetime, elapsed: float, relay_mem: dict[str, Any] | None = None,
           ops: dict[str, Any] | None = None, pool_rows: list[dict[str, Any]] | None = None,
           split: Workload | None = None) -> str:
    """The whole report except the profile section, as markdown (``split``: the workload of the
    reference run with the client on its own core, when it ran)."""
    m = machine()
    by_key = {s.key: s for s in servers}
    wl_by_key = {wl.key: wl for wl in workloads}
    ours = {}  # group -> prefork-esmtp's server in it (the first), the reference of its ratios
    for s in servers:
        ours.setdefault(s.group, s)
    stats = {(s.key, wl.key): summarize(s, wl) for s in servers
             for wl in workloads + ([split] if split else []) if s.available}
    lines = []
    w = lines.append
    w("# prefork-esmtp benchmark results")
    w("")
    w(f"Written by `make bench` (`benchmarks/run.py{' --quick' if args.quick else ''}`) on "
      f"{started.strftime('%Y-%m-%d %H:%M %Z').strip()}; the run took {elapsed / 60:.1f} minutes."
      + (" **Quick (smoke) run: small counts, numbers are indicative only.**" if args.quick else ""))
    w("")
    w(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['os']}, {m['python']}")
    w("- Servers, side by side in one run on 127.0.0.1; for the first three workloads accepting and "
      "discarding every message:")
    for s in servers:
        if s.group == "relay" and s is ours["relay"]:
            w("- For the relay workloads, forwarding every message to one shared Postfix `smtp-sink` "
              "upstream (its CPU is not counted for either relay):")
        desc = {
            "prefork-esmtp": f"prefork-esmtp {s.version}: base handler (`ESMTPHandler`), "
                             f"`--workers {args.workers}`, `--log-level warning`, default accept mode",
            "aiosmtpd": f"aiosmtpd {s.version} `Sink` handler, one asyncio process "
                        f"(`benchmarks/aiosmtpd_sink.py`)",
            "smtp-sink": f"Postfix {s.version} `smtp-sink`, one event-driven C process",
            "haraka": f"Haraka {s.version}, cluster `nodes=2`, accept-all rcpt + discarding queue plugin",
            "python-floor": f"Python floor ({s.version}, `benchmarks/python_floor.py`), a reference and not a "
                            f"peer: `--workers {args.workers}` forked processes blocking in `accept()`, a fixed "
                            f"reply per command line by its first four octets, no parsing, handler, limits or "
                            f"timeouts; the least a Python prefork SMTP server can do per session. Run in the "
                            f"two 2 KB workloads only, never part of a target",
            "prefork-relay": f"prefork-esmtp {s.version}: relay handler (`prefork_esmtp.handlers.relay:Relay`"
                             f", `--handler-option upstream=127.0.0.1:PORT`), `--workers {args.workers}`, "
                             f"otherwise as above; streams each message upstream while it arrives",
            "haraka-forward": f"Haraka {s.version}, cluster `nodes=2`, stock `rcpt_to.in_host_list` + "
                              f"`queue/smtp_forward` (forwards at queue time, after the whole message)",
        }[s.key]
        w(f"  - {desc}" + ("" if s.available else f" — **not run: {s.reason}**"))
    w(f"- Client: Postfix `smtp-source` over loopback; {args.reps} repetitions per server and workload, "
      "interleaved (server order rotates each repetition), after one unrecorded warm-up run each.")
    w("- Rate: median over repetitions of messages / wall time of `smtp-source` "
      "(MB/s = 10^6 bytes of message payload per second). CPU: time on CPU of the "
      "server's whole process tree, every thread, before/after each run (psutil finds the tree; "
      "`/proc/PID/task/*/schedstat` gives the runtime in ns, since psutil's tick-sampled "
      "user/system times are too coarse for a 1-second run; reaped children's user+system "
      "included), median per message. \"User share\" is psutil's user/(user+system) summed over "
      "the repetitions (tick-sampled, so approximate). smtp-source's CPU: its user+system time from "
      "`RUSAGE_CHILDREN` around each run (the kernel's runtime; it is the only child ending in a run).")
    steal = steal_line(servers)
    if steal:
        w(steal)
    w("")

    # targets
    w("## Targets")
    w("")
    w("| target | measured | result |")
    w("|---|---|---|")
    for wl_key, peer, need in RATIO_TARGETS:
        wl = wl_by_key.get(wl_key)
        if wl is None:
            w(f"| {WORKLOAD_NAMES[wl_key]}: ≥ {need:g}× {peer} | workload not run (`--no-relay` or "
              f"`--only`) | n/a |")
            continue
        subject = ours[wl.group]
        unit = "MB/s" if wl.big else "msgs/s"
        label = f"{WORKLOAD_NAMES[wl_key]}: {subject.label} ≥ {need:g}× {by_key[peer].label} ({unit})"
        if not subject.available:
            w(f"| {label} | not run ({subject.reason}) | n/a |")
            continue
        if not by_key[peer].available:
            w(f"| {label} | peer not run ({by_key[peer].reason}) | n/a |")
            continue
        a, b = stats[(subject.key, wl_key)].rate, stats[(peer, wl_key)].rate
        if a is None or b is None:
            w(f"| {label} | no successful run | FAIL |")
            continue
        ratio = a / b
        w(f"| {label} | {fmt(a, 1 if wl.big else 0)} vs {fmt(b, 1 if wl.big else 0)}"
          f" = **{ratio:.2f}×** | {'PASS' if ratio >= need else 'FAIL'} |")
    for wl_key, peer, most in CPU_TARGETS:
        w(_cpu_target_row(wl_by_key.get(wl_key), wl_key, peer, most, ours, by_key, stats))
    idle = idle_rows[0] if idle_rows else None
    if idle and idle["after"] is not None:
        w(f"| median idle worker USS after {idle['sessions']:,} sessions ≤ {fmt_mib(IDLE_USS_TARGET)} | "
          f"**{fmt_mib(idle['after'])}** | {'PASS' if idle['after'] <= IDLE_USS_TARGET else 'FAIL'} |")
    else:
        w(f"| median idle worker USS after 2,000 sessions ≤ {fmt_mib(IDLE_USS_TARGET)} | not measured | n/a |")
    relay_label = (f"relay, 1 MB messages: largest growth of a relay worker's peak RSS over its idle RSS "
                   f"≤ {fmt_mib(RELAY_GROWTH_TARGET)}")
    if relay_mem and relay_mem["rss_growth"] is not None and relay_mem["ok"]:
        w(f"| {relay_label} | **{fmt_mib(relay_mem['rss_growth'])}** (USS "
          f"{fmt_mib(relay_mem['uss_growth'])}) | "
          f"{'PASS' if relay_mem['rss_growth'] <= RELAY_GROWTH_TARGET else 'FAIL'} |")
    elif relay_mem:
        w(f"| {relay_label} | run failed: {relay_mem['error'] or 'no worker measured'} | FAIL |")
    else:
        w(f"| {relay_label} | not measured | n/a |")
    lines += ops_targets(ops)
    for r in pool_rows or []:
        n = f"{r['workers']:,}"
        if not r["ok"] and "idle_cpu_pct" not in r:
            w(f"| `start --workers {n}` to all {n} workers accepting < {POOL_READY_TARGET:g} s | "
              f"failed: {r['error']} | FAIL |")
            continue
        w(f"| `start --workers {n}` to all {n} workers accepting < {POOL_READY_TARGET:g} s | "
          f"**{r['ready_s']:.2f} s** | {'PASS' if r['ok'] and r['ready_s'] < POOL_READY_TARGET else 'FAIL'} |")
        w(f"| CPU of {n} idle workers and their master over {r['idle_window_s']:.0f} s "
          f"< {POOL_IDLE_CPU_TARGET:g}% of a core | **{r['idle_cpu_pct']:.2f}%** | "
          f"{'PASS' if r['idle_cpu_pct'] < POOL_IDLE_CPU_TARGET else 'FAIL'} |")
    w("")

    # main table
    w("## Throughput and CPU")
    w("")
    for wl in workloads:
        unit = "MB/s" if wl.big else "msgs/s"
        w(f"### {wl.title}")
        w("")
        w(f"`smtp-source -s {wl.sessions} -m {wl.count} -l {wl.size}{' -d' if wl.persistent else ''}`"
          f" per repetition")
        w("")
        w(f"| server | {unit} (median) | min – max | CPU µs/msg | user share of CPU | "
          f"smtp-source CPU µs/msg | prefork-esmtp ÷ this ({unit}) | this CPU ÷ prefork-esmtp CPU | "
          f"runs ok/failed |")
        w("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        prefork = ours[wl.group]
        ref = stats.get((prefork.key, wl.key))
        group = [s for s in servers if s.group == wl.group and s.runs(wl.key)]
        for s in group:
            if not s.available:
                w(f"| {s.label} | not run: {s.reason} | | | | | | | |")
                continue
            st = stats[(s.key, wl.key)]
            d = 1 if wl.big else 0
            ratio = (ref.rate / st.rate) if ref and ref.rate and st.rate else None
            cpu_ratio = (st.cpu_us / ref.cpu_us) if ref and ref.cpu_us and st.cpu_us else None
            w(f"| {s.label} | {fmt(st.rate, d)} | {fmt(st.lo, d)} – {fmt(st.hi, d)} | "
              f"{fmt(st.cpu_us)} | {pct(st.user_share)} | {fmt(st.client_us)} | "
              f"{'—' if s is prefork else times(ratio)} | "
              f"{'—' if s is prefork else times(cpu_ratio)} | {st.n_ok}/{st.n_fail} |")
        errors = [f"{s.label}: {e}" for s in group if s.available
                  for e in stats[(s.key, wl.key)].errors]
        if errors:
            w("")
            w("Failed runs: " + "; ".join(sorted(set(errors))[:6]))
        w("")
        floor = floor_sentence(wl, group, stats)
        if floor:
            w(floor)
            w("")
        for sentence in shared_cores_sentences(wl, group, stats):
            w(sentence)
            w("")
    if split is not None:
        lines += split_section(split, servers, stats)

    # memory
    w("## prefork-esmtp worker memory (USS)")
    w("")
    if bench_uss:
        w(f"- After the whole benchmark above ({len(bench_uss)} workers): median worker USS "
          f"**{fmt_mib(median(bench_uss))}** (min {fmt_mib(min(bench_uss))}, "
          f"max {fmt_mib(max(bench_uss))}).")
    for row in idle_rows:
        w(f"- Fresh server, {row['label']}: median idle worker USS {fmt_mib(row['fresh'])} after start, "
          f"**{fmt_mib(row['after'])}** after {row['sessions']:,} connection-per-message sessions "
          f"(max {fmt_mib(row['max'])}, {row['workers']} workers).")
    w("")
    w("USS is `psutil.Process.memory_full_info().uss`: the pages only this worker maps "
      "(what killing it would free).")
    w("")

    # relay memory
    w("## Relay worker memory with 1 MB messages")
    w("")
    if not relay_mem:
        w("Not measured in this run (relay workloads skipped or the relay did not start).")
    else:
        how = ("the kernel's high-water mark `VmHWM`, reset through `/proc/PID/clear_refs` just before "
               "the run, so exact" if relay_mem["exact_peak"] else
               "sampled every 50 ms (`clear_refs` unavailable here, so a short spike may be missed)")
        w(f"A fresh prefork-esmtp relay (same flags, {relay_mem['workers']} workers, same upstream), "
          f"warmed up with {max(200, 10 * args.workers):,} 2 KB messages (connection per message), then "
          f"one run of {relay_mem['messages']:,} messages of {relay_mem['size']:,} bytes over "
          f"{relay_mem['sessions']} persistent sessions"
          + ("" if relay_mem["ok"] else f" — **the run failed: {relay_mem['error']}**") + ".")
        w("")
        w(f"- Idle just before the run (after the 2 KB warm-up): median worker RSS "
          f"{fmt_mib(relay_mem['idle_rss'])}, USS {fmt_mib(relay_mem['idle_uss'])} "
          f"(right after start: RSS {fmt_mib(relay_mem['fresh_rss'])}, "
          f"USS {fmt_mib(relay_mem['fresh_uss'])}).")
        w(f"- During the run, largest over the workers: peak RSS {fmt_mib(relay_mem['peak_rss'])}, "
          f"peak USS {fmt_mib(relay_mem['peak_uss'])}.")
        w(f"- Growth of a worker over its own idle value, largest over the workers: RSS "
          f"**{fmt_mib(relay_mem['rss_growth'])}**, USS {fmt_mib(relay_mem['uss_growth'])}; "
          f"still held after the run (USS): {fmt_mib(relay_mem['uss_retained'])}; over the values right "
          f"after start: RSS {fmt_mib(relay_mem['rss_growth_fresh'])}, "
          f"USS {fmt_mib(relay_mem['uss_growth_fresh'])} (includes what any first message costs: "
          f"code paths and allocator arenas touched).")
        w("")
        w(f"Peak RSS is {how}; USS (Private_Clean + Private_Dirty from `/proc/PID/smaps_rollup`) is "
          f"sampled every 50 ms. The target ({fmt_mib(RELAY_GROWTH_TARGET)}) is less than one message: "
          f"a worker that held a 1 MB message whole would grow by at least that much. The baseline is "
          f"after 2 KB messages only, so a buffer or heap a large message leaves behind counts as growth.")
    w("")

    lines += ops_section(ops)

    # herd
    w("## Accept herd: `--accept-mode exclusive` vs `shared`")
    w("")
    if not herd_rows:
        w("Not measured in this run (`--no-herd`).")
    else:
        w(f"Connection-per-message load (`smtp-source -s {workloads[0].sessions} -l {workloads[0].size}`) "
          f"against two fresh servers, one per mode, reps interleaved. Per-connection counts come from "
          f"one `perf stat -p <workers> -e syscalls:sys_enter_accept4 -e syscalls:sys_exit_accept4 "
          f"--filter 'ret < 0' -e syscalls:sys_enter_epoll_wait,context-switches` over "
          f"{args.herd_connections:,} connections per mode (a separate, untimed run); the psutil column "
          f"is the workers' voluntary+involuntary context switches over another such run, with no tracer "
          f"attached. A failed accept4() is a worker woken for a connection another worker took. Idle "
          f"workers have no timer: each epoll_wait() return is a connection, a signal or a session "
          f"that ended.")
        w("")
        w("| workers | mode | msgs/s (median) | min – max | CPU µs/msg | accept4() per conn | "
          "failed accept4() per conn | epoll_wait() per conn | "
          "context switches per conn (perf) | (psutil) |")
        w("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in herd_rows:
            w(f"| {r['workers']} | {r['mode']} | {fmt(r['rate'])} | {fmt(r['lo'])} – {fmt(r['hi'])} | "
              f"{fmt(r['cpu_us'])} | {fmt(r.get('accept4_per_conn'), 2)} | "
              f"{fmt(r.get('failed_accept_per_conn'), 2)} | {fmt(r.get('epoll_per_conn'), 2)} | "
              f"{fmt(r.get('cs_per_conn'), 1)} | "
              f"{fmt(r.get('ctx_per_conn_psutil'), 1)} |")
        w("")
        for n_workers in sorted({r["workers"] for r in herd_rows}):
            ex = next((r for r in herd_rows if r["workers"] == n_workers and r["mode"] == "exclusive"), None)
            sh = next((r for r in herd_rows if r["workers"] == n_workers and r["mode"] == "shared"), None)
            if not ex or not sh or not ex["rate"] or not sh["rate"] or not ex["cpu_us"] or not sh["cpu_us"]:
                continue
            extra = ""
            if ex.get("cs_per_conn") is not None and sh.get("cs_per_conn") is not None:
                extra = (f", {sh['cs_per_conn']:.1f} vs {ex['cs_per_conn']:.1f} context switches and "
                         f"{sh['failed_accept_per_conn']:.2f} vs {ex['failed_accept_per_conn']:.2f} failed "
                         f"accepts per connection")
            w(f"- {n_workers} workers: shared gives {sh['rate'] / ex['rate']:.2f}× the msgs/s of exclusive "
              f"at {sh['cpu_us'] / ex['cpu_us']:.2f}× the CPU per message{extra}.")
        w("")
        w("With 20 clients and 22 workers only about two workers are idle at any moment, so the herd is "
          "small and its size varies from run to run; with 64 workers every idle worker wakes for each "
          "connection in shared mode (in the kernel: epoll re-checks the listener and most go back to "
          "sleep without returning, which shows as context switches rather than accept calls). "
          "EPOLLEXCLUSIVE (the default) wakes one.")
    w("")

    # large pool
    w("## A large pool: start-up time and idle cost")
    w("")
    if not pool_rows:
        w("Not measured in this run (`--no-pool`).")
    else:
        w("A fresh server per pool size (same flags as above plus `--pidfile`), no client at all. "
          "Ready: seconds from spawning `prefork-esmtp start --workers N` until N workers report idle "
          "on the scoreboard (a worker does so just before it blocks in `epoll_wait` on the listeners; "
          "read from the `--pidfile`'s scoreboard file every 50 ms), then one 220 greeting is checked. "
          "Idle: after a 2-second settle, the CPU of the master and every worker (schedstat runtime) "
          "and their voluntary context switches (each one a sleep, so a wake-up) over the window.")
        w("")
        w("| workers | first worker idle | all idle | idle CPU (% of a core) | wake-ups/s (all processes) |"
          " window | ok |")
        w("|--:|--:|--:|--:|--:|--:|---|")
        for r in pool_rows:
            if "ready_s" not in r:
                w(f"| {r['workers']:,} | | | | | | failed: {r['error']} |")
                continue
            w(f"| {r['workers']:,} | {r['first_s']:.2f} s | {r['ready_s']:.2f} s | "
              f"{fmt(r.get('idle_cpu_pct'), 2)} | {fmt(r.get('wakeups_per_s'), 1)} | "
              f"{fmt(r.get('idle_window_s'))} s | {'yes' if r['ok'] else 'no'} |")
    w("")
    return "\n".join(lines)


def shared_cores_sentences(wl: Workload, group: list[Server], stats: dict[tuple[str, str], Any],
                           cores: int | None = None) -> list[str]:
    """After a 2 KB table, for each msgs/s target of that workload: how the client's share of the cores
    enters the ratio.

    Where a server and smtp-source keep the machine's cores busy, msgs/s go
    as one over the CPU a message costs the machine: the server's and
    smtp-source's together.  The client's part is about the same for every
    server, so it pulls such a ratio towards 1.  The sentence gives the cores
    each kept busy (msgs/s × those µs, so a reader sees whether the model
    holds: a single process, or a server waiting on its upstream, fills
    less), the ratio of the sums beside the measured one, the servers' own
    CPU ratio, and what the Python floor reached against the same peer.
    """
    if wl.big or wl.group != "sink" or not group or not group[0].available:
        return []  # (a relay's upstream smtp-sink shares the cores too: the model leaves it out)
    cores = cores or len(os.sched_getaffinity(0))
    ours = stats.get((group[0].key, wl.key))
    floor = next((s for s in group if s.reference and s.available), None)
    low = stats.get((floor.key, wl.key)) if floor else None
    out = []
    for wl_key, peer_key, need in RATIO_TARGETS:
        peer = next((s for s in group if s.key == peer_key and s.available), None)
        theirs = stats.get((peer_key, wl.key)) if peer else None
        if wl_key != wl.key or not ours or not theirs or not all((ours.cpu_us, ours.client_us, theirs.cpu_us,
                                                                     theirs.client_us, ours.rate, theirs.rate)):
            continue
        mine, its = ours.cpu_us + ours.client_us, theirs.cpu_us + theirs.client_us
        text = (f"smtp-source shares the {cores} cores (a reference for the ≥ {need:g}× target against "
                f"{peer.label}): per message {group[0].label} {fmt(ours.cpu_us)} µs + smtp-source "
                f"{fmt(ours.client_us)} µs, {peer.label} {fmt(theirs.cpu_us)} + {fmt(theirs.client_us)} µs, "
                f"keeping {ours.rate * mine / 1e6:.2f} and {theirs.rate * its / 1e6:.2f} of the {cores} cores "
                f"busy. Where both fill the cores, msgs/s go as 1 ÷ (server + client): {fmt(its)} ÷ {fmt(mine)} "
                f"= **{its / mine:.2f}×** (measured {ours.rate / theirs.rate:.2f}×), where the servers' own "
                f"CPU gives {theirs.cpu_us / ours.cpu_us:.2f}×")
        if low and low.rate:
            text += f"; the Python floor reached {low.rate / theirs.rate:.2f}× {peer.label}'s msgs/s in this run"
        out.append(text + ".")
    return out


def split_section(split: Workload, servers: list[Server], stats: dict[tuple[str, str], Any]) -> list[str]:
    """The reference run with each server on one core and smtp-source on another: its table (every
    server that ran in it, failed runs included) and the msgs/s ratio of prefork-esmtp to each."""
    group = [s for s in servers if s.available and s.samples.get(split.key)]
    if not group:
        return []
    ours = servers[0]  # prefork-esmtp: the reference of the ratios
    ref = stats.get((ours.key, split.key)) if ours in group else None
    out = [f"### Reference: {split.title}", "",
           "Not a target: the same servers (still running, same flags) with every thread of each pinned to one "
           "CPU and `smtp-source` pinned to another (`sched_setaffinity`), so a server's msgs/s is what one "
           "core of its own gives it, as with clients on other machines; "
           f"`smtp-source -s {split.sessions} -m {split.count} -l {split.size} -d`, same repetitions.", "",
           "| server | msgs/s (median) | min – max | CPU µs/msg | smtp-source CPU µs/msg | "
           "prefork-esmtp ÷ this (msgs/s) | runs ok/failed |",
           "|---|--:|--:|--:|--:|--:|--:|"]
    for s in group:
        st = stats[(s.key, split.key)]
        ratio = ref.rate / st.rate if ref and ref.rate and st.rate else None
        out.append(f"| {s.label} | {fmt(st.rate)} | {fmt(st.lo)} – {fmt(st.hi)} | {fmt(st.cpu_us)} | "
                   f"{fmt(st.client_us)} | {'—' if s is ours else times(ratio)} | {st.n_ok}/{st.n_fail} |")
    errors = [f"{s.label}: {e}" for s in group for e in stats[(s.key, split.key)].errors]
    if errors:
        out += ["", "Failed runs: " + "; ".join(sorted(set(errors))[:6])]
    out.append("")
    return out


#: A run with more steal than this is named in the header's steal line.
STEAL_NOTED = 0.05


def steal_line(servers: list[Server]) -> str:
    """The header's line on the host's steal during the measured runs ("" without a successful run).

    On a virtual machine sharing its host, steal (CPU time the hypervisor gave
    to other guests) slows whichever server runs then; the ratios of a run with
    much of it say less.  Median and largest over every recorded run, and how
    many had more than :data:`STEAL_NOTED`.
    """
    values = [x.steal for s in servers for samples in s.samples.values() for x in samples if x.ok]
    if not values:
        return ""
    noted = sum(1 for v in values if v > STEAL_NOTED)
    return (f"- Host steal (CPU time the hypervisor gave to other guests, from `/proc/stat`) during the "
            f"{len(values)} recorded smtp-source run(s) below: median {median(values):.1%}, largest "
            f"{max(values):.1%}; {noted} run(s) above {STEAL_NOTED:.0%}, whose figures the host slowed, "
            f"not the server.")


def floor_sentence(wl: Workload, group: list[Server], stats: dict[tuple[str, str], Any]) -> str:
    """After a 2 KB table: prefork-esmtp's CPU per message ÷ the Python floor's, and the floor's ÷ smtp-sink's.

    The floor is a reference, not a target: the sentence says how much of the
    CPU gap to smtp-sink a Python prefork server pays with no SMTP engine at
    all.  Empty when the floor did not run in this workload or has no CPU figure.
    """
    by_key = {s.key: s for s in group if s.available}
    floor = next((s for s in group if s.reference and s.available), None)
    if wl.big or floor is None or not group or not group[0].available:
        return ""
    ours = stats.get((group[0].key, wl.key))
    low = stats.get((floor.key, wl.key))
    if not ours or not low or not ours.cpu_us or not low.cpu_us:
        return ""
    text = (f"Against the Python floor (a reference, never a target): {group[0].label}'s CPU per message is "
            f"**{ours.cpu_us / low.cpu_us:.2f}×** the floor's ({fmt(ours.cpu_us)} vs {fmt(low.cpu_us)} µs)")
    sink = stats.get(("smtp-sink", wl.key)) if "smtp-sink" in by_key else None
    if sink and sink.cpu_us:
        text += (f", and the floor's is **{low.cpu_us / sink.cpu_us:.2f}×** smtp-sink's ({fmt(low.cpu_us)} vs "
                 f"{fmt(sink.cpu_us)} µs): of the {ours.cpu_us / sink.cpu_us:.2f}× between "
                 f"{group[0].label} and smtp-sink, that second factor is Python itself (a prefork server "
                 f"with no SMTP engine), the first is the engine")
    return text + "."


def _counts(st: dict[str, Any]) -> str:
    """Sessions refused / cut / messages lost, summed over runs ("?" when a run stopped early,
    "—" for a server that keeps no record)."""
    lost = "—" if not st.get("counted", True) else "?" if st["lost"] is None else st["lost"]
    return f"{st['refused']} / {st['cut']} / {lost}"


def _seconds(st: dict[str, Any]) -> str:
    """Median and longest time from a HUP to the master's READY=1."""
    if st["reload_seconds"] is None:
        return "n/a"
    return f"{st['reload_seconds']:.2f} / {st['reload_seconds_max']:.2f} s"


def _clean(st: dict[str, Any]) -> bool:
    """Every run served every session: nothing refused, cut, rejected or lost, every HUP a reload."""
    return st["n_fail"] == 0 and st["n_ok"] > 0


def ops_targets(ops: dict[str, Any] | None) -> list[str]:
    """The target rows of the reload and HAProxy figures."""
    hups = ops["hups"] if ops else 5
    names = {
        "counts": f"reload under load, {hups} HUPs per run: sessions refused / cut / messages lost = "
                  f"0 / 0 / 0, every HUP a finished reload",
        "reload": f"reload under load: msgs/s with {hups} HUPs ≥ {RELOAD_RATE_TARGET:.0%} of without",
        "haproxy": f"behind HAProxy (`send-proxy-v2`, `--proxy-protocol`): msgs/s ≥ "
                   f"{HAPROXY_RATE_TARGET:.0%} of direct, 0 / 0 / 0 refused / cut / lost",
    }
    if not ops:
        return [f"| {names[k]} | not measured (`--no-reload --no-haproxy`) | n/a |" for k in names]
    st = {m: summary(runs) for m, runs in ops["runs"].items() if runs}
    rows = []
    direct = st.get("direct")
    rel = st.get("reloads")
    if rel is None:
        why = ops["not_run"].get("reloads", "no run")
        rows += [f"| {names['counts']} | not run ({why}) | n/a |", f"| {names['reload']} | not run ({why}) | n/a |"]
    else:
        rows.append(f"| {names['counts']} | **{_counts(rel)}** over {rel['n_ok'] + rel['n_fail']} runs "
                    f"({rel['messages']:,} messages); {rel['hups']}/{rel['planned_hups']} HUPs sent, "
                    f"{rel['reloads']} reloads over ({rel['reload_failures']} failed)"
                    + (f", {rel['rejected']} other rejections" if rel["rejected"] else "")
                    + f" | {'PASS' if _clean(rel) else 'FAIL'} |")
        rows.append(_rate_row(names["reload"], rel, direct, RELOAD_RATE_TARGET, "without"))
    hap = st.get("haproxy")
    if hap is None:
        rows.append(f"| {names['haproxy']} | not run ({ops['not_run'].get('haproxy', 'no run')}) | n/a |")
    else:
        rows.append(_rate_row(names["haproxy"], hap, direct, HAPROXY_RATE_TARGET, "direct",
                              _cpu_note(hap, direct) + reference_note(st, ops["not_run"])))
    return rows


def cpu_bound(server_us: float | None, client_us: float | None, proxy_us: float | None) -> float | None:
    """The share of its direct msgs/s a server can keep through HAProxy when the machine is CPU-bound.

    With every core busy, msgs/s is cores ÷ CPU per message: direct the
    server's and the client's, through HAProxy also HAProxy's, so the ratio is
    at most (server + client) ÷ (server + client + HAProxy), even with no
    extra work for the PROXY header.  None when a figure is missing.
    """
    if not server_us or not client_us or proxy_us is None:
        return None
    return (server_us + client_us) / (server_us + client_us + proxy_us)


def _bound_text(direct: dict[str, Any], through: dict[str, Any]) -> str:
    """"NN% ((S + C) ÷ (S + C + H) µs)" from a direct and a through-HAProxy summary, or ""."""
    bound = cpu_bound(direct["cpu_us"], direct["client_cpu_us"], through["proxy_cpu_us"])
    if bound is None:
        return ""
    s, c, h = direct["cpu_us"], direct["client_cpu_us"], through["proxy_cpu_us"]
    return f"{bound:.0%} (({fmt(s)} + {fmt(c)}) ÷ ({fmt(s)} + {fmt(c)} + {fmt(h)}) µs)"


def reference_note(st: dict[str, dict[str, Any]], not_run: dict[str, str]) -> str:
    """After the HAProxy ratio, never part of its target: what the machine allows.

    smtp-sink's msgs/s through the same HAProxy (plain TCP) ÷ its direct,
    and the bound :func:`cpu_bound` puts on prefork-esmtp's ratio from this
    run's CPU figures (server, smtp-source and HAProxy per message).
    """
    hap, direct = st.get("haproxy"), st.get("direct")
    sink, sink_hap = st.get("sink-direct"), st.get("sink-haproxy")
    if sink is None or sink_hap is None:
        why = not_run.get("sink-haproxy") or not_run.get("sink-direct") or "no run"
        text = f"; reference (smtp-sink through the same HAProxy) not run: {why}"
    elif not sink["rate"] or not sink_hap["rate"]:
        text = "; reference (smtp-sink through the same HAProxy): no successful run"
    else:
        text = (f"; reference, not a target: Postfix smtp-sink through the same HAProxy (plain TCP) reaches "
                f"**{sink_hap['rate'] / sink['rate']:.0%}** of its direct rate "
                f"({fmt(sink_hap['rate'])} vs {fmt(sink['rate'])} msgs/s), HAProxy "
                f"{fmt(sink_hap['proxy_cpu_us'])} µs/msg for it")
    bound = _bound_text(direct, hap) if hap and direct else ""
    if bound:
        text += (f"; from this run's CPU per message, prefork-esmtp's ratio is bounded near "
                 f"(server + smtp-source) ÷ (server + smtp-source + HAProxy) = {bound}")
    elif hap and direct:
        text += "; no CPU bound: smtp-source's CPU not measured"
    return text


def _cpu_note(hap: dict[str, Any], direct: dict[str, Any] | None) -> str:
    """Beside the HAProxy ratio (not part of its target): our CPU per message through PROXY ÷ direct,
    and HAProxy's own, which shares the machine's cores with the server and the client."""
    if direct is None or not direct["cpu_us"] or not hap["cpu_us"]:
        return ""
    return (f"; prefork-esmtp CPU/msg {fmt(hap['cpu_us'])} vs {fmt(direct['cpu_us'])} µs = "
            f"{hap['cpu_us'] / direct['cpu_us']:.2f}× direct, HAProxy's own {fmt(hap['proxy_cpu_us'])} µs/msg")


def _rate_row(name: str, st: dict[str, Any], direct: dict[str, Any] | None, need: float, ref: str,
              extra: str = "") -> str:
    """A ratio row: median msgs/s against the direct runs', failing also when a run of either failed.

    ``extra``: figures shown after the ratio that do not count for PASS/FAIL.
    """
    if direct is None or not direct["rate"] or not st["rate"]:
        return f"| {name} | no successful run | FAIL |"
    ratio = st["rate"] / direct["rate"]
    clean = _clean(st) and _clean(direct)
    note = "" if clean else (f"; failed runs: this {st['n_fail']}, {ref} {direct['n_fail']} "
                             f"(refused / cut / lost {_counts(st)}, {ref} {_counts(direct)})")
    return (f"| {name} | {fmt(st['rate'])} vs {fmt(direct['rate'])} ({ref}) = **{ratio:.0%}**{note}{extra} | "
            f"{'PASS' if ratio >= need and clean else 'FAIL'} |")


def ops_section(ops: dict[str, Any] | None) -> list[str]:
    """The section of the reload and HAProxy figures: how they were run and a row per way of serving."""
    out = ["## Reload under load and behind HAProxy", ""]
    if not ops:
        out += ["Not measured in this run (`--no-reload --no-haproxy`).", ""]
        return out
    out.append(
        f"The connection-per-message load (`smtp-source -A -C 100 -c -s {ops['sessions']} -m "
        f"{ops['messages']} -l {ops['size']}`) against prefork-esmtp {ops.get('version', '')} with a "
        f"benchmark handler that records each message it accepts before its 250 "
        f"(`benchmarks/counting_handler.py`), same flags as above otherwise; runs interleaved, after "
        f"one unrecorded warm-up run each. **direct**: no reload. **{ops['hups']} HUPs**: the same "
        f"server, the k-th HUP sent once k/{ops['hups'] + 1} of the messages are out (smtp-source's "
        f"`-c` counter) and the previous reload is over (the master's `READY=1` on a `NOTIFY_SOCKET` "
        f"the benchmark listens on). **HAProxy**: a second such server with `--proxy-protocol` behind "
        f"HAProxy {ops.get('haproxy_version', '')} (TCP mode, `server ... send-proxy-v2`, "
        f"{_haproxy_tuning()}; no logging, no health checks; why: benchmarks/README.md), on the same "
        f"machine: its CPU competes for the same cores.")
    out.append("")
    out.append("Refused: a connection refused, a non-2xx greeting or a connection lost before it. Cut: a "
               "421 to a command or a connection lost mid-session (smtp-source stops at the first lost "
               "connection: the counts are then lower bounds). Lost: acknowledged with 250 but not "
               "recorded by the handler (\"?\" when smtp-source stopped early).")
    out.append("")
    out.append("| run | msgs/s (median) | min – max | server CPU µs/msg | HAProxy CPU µs/msg | "
               "smtp-source CPU µs/msg | HUPs sent / reloads over | HUP to READY, median / max | "
               "refused / cut / lost | runs ok/failed |")
    out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    labels = {"direct": "direct", "reloads": f"{ops['hups']} HUPs during the run",
              "haproxy": "through HAProxy (PROXY v2)",
              "sink-direct": "reference: Postfix smtp-sink direct",
              "sink-haproxy": "reference: smtp-sink through HAProxy (plain TCP)"}
    errors = []
    for mode in MODES:
        runs = ops["runs"].get(mode) or []
        if not runs:
            why = ops["not_run"].get(mode)
            if why:
                out.append(f"| {labels[mode]} | not run: {why} | | | | | | | | |")
            continue
        st = summary(runs)
        out.append(f"| {labels[mode]} | {fmt(st['rate'])} | {fmt(st['lo'])} – {fmt(st['hi'])} | "
                   f"{fmt(st['cpu_us'])} | {fmt(st['proxy_cpu_us']) if mode in PROXIED_MODES else '—'} | "
                   f"{fmt(st['client_cpu_us'])} | "
                   f"{str(st['hups']) + ' / ' + str(st['reloads']) if mode == 'reloads' else '—'} | "
                   f"{_seconds(st) if mode == 'reloads' else '—'} | "
                   f"{_counts(st)} | {st['n_ok']}/{st['n_fail']} |")
        errors += [f"{labels[mode]}: {e}" for e in st["errors"]]
    hap, direct = (summary(ops["runs"][m]) if ops["runs"].get(m) else None for m in ("haproxy", "direct"))
    if hap is not None and direct is not None and direct["cpu_us"] and hap["cpu_us"]:
        def cpu(mode: str, attr: str = "cpu") -> str:  # median (min – max) µs per message over the runs
            v = [getattr(r, attr) / r.messages * 1e6 for r in ops["runs"][mode]]
            return f"{fmt(median(v))} ({fmt(min(v))} – {fmt(max(v))})"
        out += ["", f"Through HAProxy, prefork-esmtp's own CPU per message is "
                    f"**{hap['cpu_us'] / direct['cpu_us']:.2f}× direct** ({cpu('haproxy')} vs "
                    f"{cpu('direct')} µs: what reading the PROXY header adds, plus running beside "
                    f"HAProxy on the same cores), and HAProxy's own is {cpu('haproxy', 'proxy_cpu')} µs per "
                    f"message. The target stays the msgs/s ratio; these say where the difference goes."]
    out += reference_section(ops)
    if errors:
        out += ["", "smtp-source said: " + "; ".join(errors[:6])]
    out.append("")
    return out


def reference_section(ops: dict[str, Any]) -> list[str]:
    """The paragraph on the smtp-sink reference (never a target): what it is, its ratio, both CPU bounds."""
    st = {m: summary(runs) for m, runs in ops["runs"].items() if runs}
    sink, sink_hap = st.get("sink-direct"), st.get("sink-haproxy")
    head = ("**Reference, never a target**: Postfix `smtp-sink` (one C process, about the least CPU an "
            "SMTP server spends on a session), the same load direct and through a second HAProxy with the "
            "same settings but plain TCP (smtp-sink cannot read a PROXY header), interleaved with the runs "
            "above. Its CPU is in the server column; lost is not counted (it keeps no record).")
    if sink is None or sink_hap is None or not sink["rate"] or not sink_hap["rate"]:
        why = ops["not_run"].get("sink-haproxy") or ops["not_run"].get("sink-direct") or "no successful run"
        return ["", f"{head} Not measured in this run: {why}."]
    text = (f"{head} Through HAProxy it keeps **{sink_hap['rate'] / sink['rate']:.0%}** of its direct "
            f"msgs/s, with HAProxy spending {fmt(sink_hap['proxy_cpu_us'])} µs per message. When the "
            f"server, smtp-source and HAProxy share the cores, msgs/s through HAProxy ÷ direct is bounded "
            f"near (server + smtp-source CPU) ÷ (server + smtp-source + HAProxy CPU) per message: the less "
            f"CPU a server needs, the more HAProxy's share weighs, so a faster server gets a lower ratio.")
    hap, direct = st.get("haproxy"), st.get("direct")
    ours = _bound_text(direct, hap) if hap and direct else ""
    theirs = _bound_text(sink, sink_hap)
    if ours:
        text += f" From this run's figures: prefork-esmtp {ours}, measured {_ratio(hap, direct)}"
        text += f"; smtp-sink {theirs}, measured {_ratio(sink_hap, sink)}." if theirs else "."
        busy = ", ".join(f"{label} {_busy(st[mode])}" for mode, label in
                         (("direct", "prefork-esmtp direct"), ("haproxy", "through HAProxy"),
                          ("sink-direct", "smtp-sink direct"), ("sink-haproxy", "through HAProxy")))
        text += (f" The bound assumes these processes alone keep all {ops.get('cores', '?')} cores busy; "
                 f"they kept (msgs/s × CPU per message) {busy} cores busy: where that is well below the "
                 f"machine's, other work or waiting set the rate, and the bound says little.")
    else:
        text += " No bound worked out: smtp-source's CPU was not measured."
    return ["", text]


def _busy(st: dict[str, Any]) -> str:
    """Cores kept busy by server, HAProxy and smtp-source in a mode: msgs/s × their CPU per message."""
    if not st["rate"] or st["cpu_us"] is None or st["client_cpu_us"] is None:
        return "n/a"
    return f"{st['rate'] * (st['cpu_us'] + st['proxy_cpu_us'] + st['client_cpu_us']) / 1e6:.2f}"


def _ratio(through: dict[str, Any], direct: dict[str, Any]) -> str:
    """msgs/s through HAProxy ÷ direct as a whole percentage, or n/a."""
    return pct(through["rate"] / direct["rate"]) if through["rate"] and direct["rate"] else "n/a"


def _haproxy_tuning() -> str:
    """What the benchmark's HAProxy adds to a plain TCP front, as config lines in backquotes."""
    lines = [line for section in HAPROXY_TUNING.values() for line in section]
    return ", ".join(f"`{line}`" for line in lines) if lines else "HAProxy's defaults"


def write_results(path: Path, body: str) -> None:
    """Write the report, keeping the profile section written by benchmarks/profiling.py."""
    kept = ""
    if path.exists():
        old = path.read_text()
        i, j = old.find(PROFILE_BEGIN), old.find(PROFILE_END)
        if i >= 0 and j > i:
            kept = old[i:j + len(PROFILE_END)]
    if not kept:
        kept = (f"{PROFILE_BEGIN}\n## Profile\n\nNot recorded yet: run `.venv/bin/python "
                f"benchmarks/profiling.py` (cProfile; perf and strace when present).\n{PROFILE_END}")
    path.write_text(body.rstrip() + "\n\n" + kept + "\n")

