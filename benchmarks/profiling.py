#!/usr/bin/env python3
"""Where prefork-esmtp's workers spend their CPU under the benchmark's load.

    .venv/bin/python benchmarks/profiling.py       # ~1 minute; perf and strace optional

For the connection-per-message and the persistent-session workloads (2 KB,
20 parallel sessions, Postfix's ``smtp-source``, as in ``benchmarks/run.py``)
it starts prefork-esmtp (base handler, 22 workers) and looks at its workers
three ways, each in a run of its own:

1. **cProfile** (``benchmarks/cprofile_launcher.py``): every worker's serve
   loop under cProfile, the stats of all workers merged, twice: with a CPU
   clock (``time.process_time``: blocking in epoll_wait/recv costs nothing,
   kernel CPU of a system call is charged to its caller; exact, but reading
   that clock is a system call per profiler event, so Python code with many
   small calls looks dearer than it is), and with cProfile's cheap wall clock
   (shares of the time outside the two waits, ``recv`` and ``epoll.poll``).
   Calls per message are exact either way.
2. **perf record** on the workers (when ``perf`` works): how the CPU splits
   between the interpreter, libc and the kernel, and the top native symbols.
3. **strace -c** on the workers (when ``strace`` is present): system calls
   per message.

py-spy is not used for the shares: on this 2-core machine the load keeps
more workers runnable than there are CPUs, and py-spy counts a runnable
worker waiting for a CPU as busy at the line where it last blocked, which put
``Reader._fill`` at 55-80% of "CPU" (``--gil`` mode got too few samples).

The summary replaces the profile section of ``benchmarks/RESULTS.md``
(``run.py`` keeps that section when it rewrites the file); the hand-written
analysis in ``benchmarks/profile_notes.md`` (``--notes FILE``) is appended to it.  Loopback only; every process started is
ended at exit.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Sample, Workload, drive, rate  # noqa: E402  (the benchmark's parts)
from procs import end_all, end_process, free_port, greets, log, on_signal, process_tree, spawn  # noqa: E402
from report import PROFILE_BEGIN, PROFILE_END, machine  # noqa: E402
from servers import PreforkServer, Server  # noqa: E402

HERE = Path(__file__).resolve().parent


#: with the wall clock, these calls mostly wait (for the client, for a connection)
BLOCKING = {"<method 'recv' of '_socket.socket' objects>", "<method 'poll' of 'select.epoll' objects>"}


def short(path: str) -> str:
    for marker in ("/prefork_esmtp/",):
        i = path.find(marker)
        if i >= 0:
            return path[i + 1:]
    if path.startswith("~") or path.startswith("<"):
        return path
    return os.path.basename(path)


def func_name(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name  # a builtin: "{method 'recv' of '_socket.socket' objects}"
    return f"{short(filename)}:{line}({name})"


# -- 1. cProfile ----------------------------------------------------------------------------------

def cprofile_run(args: argparse.Namespace, wl: Workload, workdir: Path, clock: str) -> dict[str, Any]:
    outdir = workdir / f"cprofile-{clock}-{wl.key}"
    outdir.mkdir()
    srv = PreforkServer(args.workers, key=f"cprofile-{wl.key}")
    srv.exe = [sys.executable, str(HERE / "cprofile_launcher.py")]
    env = dict(os.environ, PREFORK_ESMTP_CPROFILE_DIR=str(outdir), PREFORK_ESMTP_CPROFILE_CLOCK=clock)
    port = free_port()
    logf = open(workdir / f"cprofile-{wl.key}.log", "wb")
    proc = spawn(srv.command(port), stdout=logf, stderr=subprocess.STDOUT, env=env)
    srv.proc, srv.root, srv.port = proc, proc.pid, port
    try:
        wait_ready(srv, args.workers)
        sample = drive(srv, wl, wl.count, args.run_timeout)
        log(f"cProfile ({clock} clock) {wl.key}: {rate(wl, sample):.0f} msgs/s under the profiler"
            + ("" if sample.ok else f" FAILED: {sample.error}"))
    finally:
        srv.stop_signal = signal.SIGTERM  # graceful: workers leave run() and dump their stats
        srv.stop()
    files = glob.glob(str(outdir / "*.pstats"))
    if not files:
        raise RuntimeError(f"no cProfile output; see {workdir / f'cprofile-{wl.key}.log'}")
    stats = pstats.Stats(*files)
    rows = []
    blocked = 0.0
    for key, (cc, nc, tt, ct, callers) in stats.stats.items():
        name = func_name(key)
        if clock == "wall" and name in BLOCKING:
            blocked += tt  # waiting for the client or a connection, not work
            name += " (blocking: excluded)"
            tt = 0.0
        rows.append((name, nc, tt, ct))
    total = (stats.total_tt - blocked) or 1e-9
    by_self = sorted(rows, key=lambda r: r[2], reverse=True)[:args.top]
    by_incl = sorted((r for r in rows if "Worker.run" not in r[0] and "_profiled_run" not in r[0]),
                     key=lambda r: r[3], reverse=True)[:args.top]
    calls = sum(r[1] for r in rows)
    return {"clock": clock, "rate": rate(wl, sample), "messages": wl.count, "total_cpu": total,
            "self": by_self, "incl": by_incl, "calls": calls, "files": len(files)}


def wait_ready(srv: Server, workers: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if srv.proc is not None and srv.proc.poll() is not None:
            raise RuntimeError(f"server exited at start-up ({srv.proc.returncode})")
        if len(process_tree(srv.root)) - 1 >= workers and greets(srv.port):
            time.sleep(0.5)
            srv.refresh_tree()
            return
        time.sleep(0.2)
    raise RuntimeError("server did not come up")


# -- 2./3. tools attached to the workers of a plain server -----------------------------------------

def attached_run(args: argparse.Namespace, wl: Workload, workdir: Path, count: int,
                 tool: Callable[[list[int], Path], list[str]], tag: str) -> tuple[Path, Sample]:
    srv = PreforkServer(args.workers, key=f"{tag}-{wl.key}")
    out = workdir / f"{tag}-{wl.key}.out"
    try:
        srv.start(workdir)
        pids = [p.pid for p in srv.workers()]
        attached = spawn(tool(pids, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        try:
            sample = drive(srv, wl, count, args.run_timeout)
        finally:
            end_process(attached, signal.SIGINT, grace=30)
        log(f"{tag} {wl.key}: {rate(wl, sample):.0f} msgs/s with {tag} attached")
    finally:
        srv.stop()
    return out, sample


def perf_works() -> bool:
    perf = shutil.which("perf")
    if not perf:
        return False
    r = subprocess.run([perf, "record", "-o", "/dev/null", "-q", "true"], capture_output=True, text=True)
    return r.returncode == 0


def perf_run(args: argparse.Namespace, wl: Workload, workdir: Path) -> dict[str, Any]:
    perf = shutil.which("perf") or "perf"
    data, sample = attached_run(args, wl, workdir, wl.count,
                                lambda pids, out: [perf, "record", "-F", "999", "-q", "-o", str(out),
                                                   "-p", ",".join(map(str, pids))], "perf")

    def report(sort: str) -> list[tuple[float, str]]:
        r = subprocess.run([perf, "report", "-i", str(data), "--no-children", "--sort", sort, "--stdio",
                            "-g", "none"], capture_output=True, text=True, timeout=300)
        rows = []
        for line in r.stdout.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(.*\S)", line)
            if m and not line.startswith("#"):
                rows.append((float(m.group(1)), m.group(2)))
        return rows

    return {"dso": report("dso")[:8], "sym": report("sym")[:args.top]}


def strace_run(args: argparse.Namespace, wl: Workload, workdir: Path) -> dict[str, Any]:
    strace = shutil.which("strace") or "strace"
    count = args.strace_messages
    out, sample = attached_run(args, wl, workdir, count,
                               lambda pids, out: [strace, "-c", "-f", "-o", str(out)]
                               + [x for p in pids for x in ("-p", str(p))], "strace")
    rows = []
    for line in out.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[-1] not in ("syscall", "total") and re.match(r"[\d.]+$", parts[0]):
            calls = int(parts[3])
            errors = int(parts[4]) if len(parts) == 6 else 0
            rows.append((parts[-1], calls / count, errors / count))
    rows.sort(key=lambda r: r[1], reverse=True)
    return {"rows": rows, "messages": count, "total": sum(r[1] for r in rows)}


# -- report -----------------------------------------------------------------------------------------

def render(args: argparse.Namespace, workloads: dict[str, Workload], results: dict[str, dict],
           notes: str) -> str:
    m = machine()
    lines = [PROFILE_BEGIN, "## Profile: where prefork-esmtp's CPU goes", ""]
    w = lines.append
    w(f"Written by `benchmarks/profiling.py` on "
      f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, {m['cpu']}, {m['cores']} cores, "
      f"{m['python']}; prefork-esmtp, base handler, `--workers {args.workers}`, driven by "
      "`smtp-source -s 20 -l 2048` (with `-d` for persistent sessions). How it is measured: see "
      "the docstring of `benchmarks/profiling.py` (cProfile in every worker, with a CPU-time clock "
      "and with the wall clock; perf record and strace -c attached to the workers; each in a run "
      "of its own).")
    w("")
    for key, res in results.items():
        wl = workloads[key]
        w(f"### {wl.title}")
        w("")
        for clock in ("cpu", "wall"):
            cp = res.get(f"cprofile-{clock}")
            if cp:
                render_cprofile(w, cp, args.top if clock == "cpu" else min(args.top, 12))
        pf = res.get("perf")
        if pf:
            w("perf record on the workers (999 Hz): " +
              ", ".join(f"{name} {pct:.1f}%" for pct, name in pf["dso"]) + ".")
            w("")
            w("Top native symbols: " + ", ".join(f"`{name}` {pct:.1f}%" for pct, name in pf["sym"][:15]) + ".")
            w("")
        st = res.get("strace")
        if st:
            w(f"System calls per message (strace -c over {st['messages']:,} messages, all workers): "
              f"{st['total']:.1f} in all — " +
              ", ".join(f"{name} {calls:.2f}" + (f" ({err:.2f} failed)" if err else "")
                        for name, calls, err in st["rows"][:14]) + ".")
            w("")
    if notes:
        w(notes.strip())
        w("")
    w(PROFILE_END)
    return "\n".join(lines)


def render_cprofile(w: Callable[[str], None], cp: dict[str, Any], top: int) -> None:
    n = cp["messages"]
    total = cp["total_cpu"] or 1e-9
    if cp["clock"] == "cpu":
        w(f"cProfile, CPU clock (`time.process_time`), {cp['files']} workers merged: "
          f"{cp['total_cpu'] * 1e6 / n:,.0f} µs of worker CPU per message under the profiler "
          f"({cp['rate']:,.0f} msgs/s; unprofiled it is the CPU µs/msg of the table above), "
          f"{cp['calls'] / n:,.0f} Python-level calls per message. Shares of Python code are "
          f"inflated by the profiler's clock reads; calls/msg are exact.")
        w("")
        w("| own CPU % | calls/msg | function | | inclusive % | function |")
        w("|--:|--:|---|---|--:|---|")
        for i in range(top):
            a = cp["self"][i] if i < len(cp["self"]) else None
            b = cp["incl"][i] if i < len(cp["incl"]) else None
            if not a and not b:
                break
            left = f"{a[2] / total:.1%} | {a[1] / n:.2f} | `{a[0]}`" if a else " | | "
            right = f"{b[3] / total:.1%} | `{b[0]}`" if b else " | "
            w(f"| {left} | | {right} |")
    else:
        w(f"cProfile, wall clock (cheap: {cp['rate']:,.0f} msgs/s under the profiler), shares of the "
          f"workers' time outside the two waits (`recv`, `epoll.poll`), i.e. CPU plus time "
          f"preempted; top {top}:")
        w("")
        w("| own time % | calls/msg | function |")
        w("|--:|--:|---|")
        for name, calls, tt, ct in cp["self"][:top]:
            w(f"| {tt / total:.1%} | {calls / n:.2f} | `{name}` |")
    w("")


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# prefork-esmtp benchmark results\n"
    i, j = text.find(PROFILE_BEGIN), text.find(PROFILE_END)
    if i >= 0 and j > i:
        text = text[:i] + section + text[j + len(PROFILE_END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workers", type=int, default=22)
    p.add_argument("--conn-messages", type=int, default=4000)
    p.add_argument("--persist-messages", type=int, default=10000)
    p.add_argument("--strace-messages", type=int, default=1000, help="messages counted under strace")
    p.add_argument("--top", type=int, default=20, help="rows per table")
    p.add_argument("--clock", choices=("cpu", "wall", "both"), default="both",
                   help="cProfile clock: cpu (time.process_time: exact, costly) or wall (cheap; "
                        "recv and epoll.poll, which mostly wait, are left out of the shares)")
    p.add_argument("--no-perf", action="store_true")
    p.add_argument("--no-strace", action="store_true")
    p.add_argument("--run-timeout", type=float, default=300)
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--notes", type=Path, default=HERE / "profile_notes.md",
                   help="markdown file appended to the section (analysis, suggestions), if it exists")
    args = p.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    workloads = {
        "conn": Workload("conn", "Connection per message (2 KB, 20 parallel sessions)", 20, 2048,
                         False, args.conn_messages),
        "persist": Workload("persist", "Persistent sessions (2 KB, 20 sessions, `-d`)", 20, 2048,
                            True, args.persist_messages),
    }
    use_perf = not args.no_perf and perf_works()
    use_strace = not args.no_strace and shutil.which("strace") is not None
    workdir = Path(tempfile.mkdtemp(prefix="prefork-esmtp-profile-"))
    results: dict[str, dict] = {}
    try:
        for key, wl in workloads.items():
            clocks = ("cpu", "wall") if args.clock == "both" else (args.clock,)
            res: dict[str, Any] = {f"cprofile-{c}": cprofile_run(args, wl, workdir, c) for c in clocks}
            if use_perf:
                res["perf"] = perf_run(args, wl, workdir)
            if use_strace:
                res["strace"] = strace_run(args, wl, workdir)
            results[key] = res
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        end_all()
    notes = args.notes.read_text() if args.notes and args.notes.exists() else ""
    section = render(args, workloads, results, notes)
    write_section(args.output, section)
    print(section)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
