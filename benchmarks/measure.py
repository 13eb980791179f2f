"""Measurement: driving each server with smtp-source and accounting for its CPU and memory.

* ``drive``: one ``smtp-source`` run against one server, timed by the wall
  clock, with the CPU of the server's whole process tree before and after
  (every thread's runtime from ``/proc/PID/task/*/schedstat``, plus reaped
  children; psutil's tick-sampled user/system split on the side);
* ``interleaved``: the warm-up and the repetitions, every server once per
  repetition and workload, the order rotating;
* ``idle_uss``: worker USS of fresh servers (default and ``--preload``) when
  idle after a number of sessions;
* ``herd``: ``--accept-mode exclusive`` against ``shared``: messages/s, and
  with ``perf stat`` on the workers the accept4() calls, failed accepts,
  epoll_wait() returns and context switches per connection.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from procs import HOST, end_process, log, release, run_cmd, spawn
from servers import PreforkServer, Server

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
MIB = 1024 * 1024
HAVE_SCHEDSTAT = os.path.exists("/proc/self/task") and os.path.exists("/proc/self/schedstat")


def median(values: list[float]) -> float | None:
    """The median, or None for no values."""
    return statistics.median(values) if values else None


def fmt_mib(v: float | None) -> str:
    """Bytes as MiB with two decimals, as the log and the report show memory."""
    return "n/a" if v is None else f"{v / MIB:.2f} MiB"


# -- workloads -----------------------------------------------------------------------------

@dataclass
class Workload:
    """One smtp-source load: parallel sessions, message size, persistent or not, messages per run."""

    key: str
    title: str
    sessions: int
    size: int
    persistent: bool
    count: int

    @property
    def big(self) -> bool:
        return self.key == "big"

    def args(self, count: int) -> list[str]:
        """smtp-source's command line for ``count`` messages, without the server address."""
        cmd = [SMTP_SOURCE, "-s", str(self.sessions), "-m", str(count), "-l", str(self.size),
               "-M", "bench.example", "-f", "bench@bench.example", "-t", "sink@bench.example"]
        if self.persistent:
            cmd.append("-d")
        return cmd


@dataclass
class Sample:
    """One run: wall seconds, messages sent, server CPU seconds (total, user, system), success."""

    seconds: float
    messages: int
    cpu: float
    cpu_user: float
    cpu_sys: float
    ok: bool
    error: str = ""



def workloads(sessions: int, big_sessions: int, conn_messages: int, persist_messages: int,
              big_messages: int) -> list[Workload]:
    """The three workloads: connection per message, persistent sessions (2 KB), 1 MB messages."""
    return [
        Workload("conn", f"Connection per message (2 KB, {sessions} parallel sessions)", sessions, 2048,
                 False, conn_messages),
        Workload("persist", f"Persistent sessions (2 KB, {sessions} sessions, `-d`)", sessions, 2048,
                 True, persist_messages),
        Workload("big", f"1 MB messages ({big_sessions} persistent sessions, MB/s)", big_sessions,
                 1048576, True, big_messages),
    ]


# -- CPU of a process tree -------------------------------------------------------------------

def _task_runtime(pid: int) -> float:
    """Seconds on CPU of every thread of a process (/proc/PID/task/*/schedstat, ns precision)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def cpu_times(procs: list[psutil.Process]) -> tuple[float, float, float]:
    """(total, user, system) CPU seconds of the processes, with their reaped children.

    ``total`` is exact: the scheduler's runtime of every thread, plus the
    user+system times of reaped children.  psutil's user/system split comes
    from tick sampling scaled by the kernel, so it is only used for the split
    (and as the total where schedstat is missing).
    """
    total = user = system = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        user += t.user + t.children_user
        system += t.system + t.children_system
        runtime = _task_runtime(p.pid) if HAVE_SCHEDSTAT else 0.0
        total += (runtime or t.user + t.system) + t.children_user + t.children_system
    return total, user, system


# -- driving ----------------------------------------------------------------------------------

def drive(server: Server, wl: Workload, count: int, timeout: float) -> Sample:
    """One smtp-source run against one server: wall time and the server tree's CPU."""
    server.refresh_tree()
    c0, u0, s0 = cpu_times(server.procs)
    cmd = wl.args(count) + [f"{HOST}:{server.port}"]
    t0 = time.perf_counter()
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process(proc, signal.SIGKILL, grace=1)
        return Sample(timeout, count, 0, 0, 0, False, f"timed out after {timeout:.0f} s")
    elapsed = time.perf_counter() - t0
    release(proc)
    time.sleep(0.05)  # let the server finish the last QUIT/close
    server.refresh_tree()
    c1, u1, s1 = cpu_times(server.procs)
    text = (err or b"").decode(errors="replace").strip()
    ok = proc.returncode == 0 and "fatal" not in text
    return Sample(elapsed, count, max(0.0, c1 - c0), max(0.0, u1 - u0), max(0.0, s1 - s0), ok,
                  "" if ok else (text.splitlines() or [f"exit {proc.returncode}"])[-1][:200])


def rate(wl: Workload, s: Sample) -> float:
    """Messages/s of a run, or MB/s of message payload for the 1 MB workload."""
    if wl.big:
        return s.messages * wl.size / 1e6 / s.seconds
    return s.messages / s.seconds


@dataclass
class Stat:
    """A server's repetitions of one workload, summarized for the report."""

    rate: float | None
    lo: float | None
    hi: float | None
    cpu_us: float | None
    user_share: float | None
    n_ok: int
    n_fail: int
    errors: list[str]


def summarize(server: Server, wl: Workload) -> Stat:
    """Median rate, its range and median CPU µs/msg over the successful runs; failures counted."""
    samples = server.samples.get(wl.key, [])
    good = [s for s in samples if s.ok]
    rates = [rate(wl, s) for s in good]
    cpus = [s.cpu / s.messages * 1e6 for s in good]
    # psutil's times are truncated to clock ticks per process, so the split is taken over all
    # repetitions together, and only when there is enough of it to mean something
    u, k = sum(s.cpu_user for s in good), sum(s.cpu_sys for s in good)
    users = [u / (u + k)] if u + k > 0.2 else []
    return Stat(median(rates), min(rates) if rates else None, max(rates) if rates else None,
                median(cpus), median(users), len(good), len(samples) - len(good),
                [s.error for s in samples if not s.ok])



def interleaved(active: list[Server], wls: list[Workload], reps: int, timeout: float) -> None:
    """One unrecorded warm-up run each, then ``reps`` recorded repetitions into ``server.samples``.

    For each repetition and workload every server runs once; the order of the
    servers rotates from one repetition to the next, so that no server always
    runs right after the same neighbour.
    """
    log("warm-up")
    for wl in wls:
        for s in active:
            drive(s, wl, max(wl.sessions * 2, wl.count // 10), timeout)
    for rep in range(reps):
        for wl in wls:
            k = rep % len(active)
            for s in active[k:] + active[:k]:
                sample = drive(s, wl, wl.count, timeout)
                s.samples.setdefault(wl.key, []).append(sample)
                unit = "MB/s" if wl.big else "msgs/s"
                log(f"rep {rep + 1}/{reps} {wl.key:7s} {s.label:20s} "
                    f"{rate(wl, sample):9.1f} {unit}  "
                    f"cpu {sample.cpu / sample.messages * 1e6:7.0f} µs/msg"
                    + ("" if sample.ok else f"  FAILED: {sample.error}"))


# -- idle memory -------------------------------------------------------------------------------------

def idle_uss(args: argparse.Namespace, conn: Workload, workdir: Path) -> list[dict[str, Any]]:
    """Fresh servers (default, and --preload): median worker USS when idle after N sessions."""
    rows = []
    for label, extra in (("default", []), ("--preload", ["--preload"])):
        srv = PreforkServer(args.workers, extra, key=f"idle-{label.strip('-')}", label=label)
        try:
            srv.start(workdir)
            fresh = srv.worker_uss()
            done = 0
            while done < args.idle_sessions:
                n = min(args.idle_sessions - done, 2000)
                s = drive(srv, conn, n, args.run_timeout)
                if not s.ok:
                    raise RuntimeError(f"idle-USS load failed: {s.error}")
                done += n
            time.sleep(1.5)
            after = srv.worker_uss()
            rows.append({"label": label, "fresh": median(fresh), "after": median(after),
                         "max": max(after) if after else None, "sessions": done,
                         "workers": len(after)})
            log(f"idle USS ({label}): fresh {fmt_mib(median(fresh))}, after {done} sessions "
                f"{fmt_mib(median(after))}")
        finally:
            srv.stop()
    return rows



# -- accept herd ---------------------------------------------------------------------------------

PERF_EVENTS = ["syscalls:sys_enter_accept4", "syscalls:sys_enter_epoll_wait",
               "syscalls:sys_enter_epoll_pwait", "context-switches"]


def perf_available() -> bool:
    """Whether ``perf stat`` can count the syscall tracepoints here (perf present, permitted)."""
    perf = shutil.which("perf")
    if not perf:
        return False
    try:
        r = run_cmd([perf, "stat", "-x,", "-e", ",".join(PERF_EVENTS), "true"], timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "not supported" not in r.stderr and "<not" not in r.stderr


def perf_count(pids: list[int], run: Any, workdir: Path) -> dict[str, float]:
    """Count syscall events of the given pids while ``run()`` executes (perf stat -p).

    One perf run counts accept4() entries, failed accept4() exits (``ret < 0``:
    EAGAIN when another worker won the race), epoll_wait() entries and
    context switches.
    """
    out = workdir / f"perf-{time.monotonic_ns()}.csv"
    events = ["-e", "syscalls:sys_enter_accept4",
              "-e", "syscalls:sys_exit_accept4", "--filter", "ret < 0",
              "-e", "syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,context-switches"]
    cmd = [shutil.which("perf") or "perf", "stat", "-x,", "-o", str(out)] + events + \
        ["-p", ",".join(map(str, pids))]
    perf = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    t0 = time.monotonic()
    try:
        run()
    finally:
        window = time.monotonic() - t0
        time.sleep(0.1)
        end_process(perf, signal.SIGINT, grace=5)
    counts: dict[str, float] = {"window": window}
    try:
        for line in out.read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 3 and not line.startswith("#"):
                try:
                    counts[parts[2]] = float(parts[0])
                except ValueError:
                    pass
    except OSError:
        pass
    return counts


def herd(args: argparse.Namespace, conn: Workload, workdir: Path) -> list[dict[str, Any]]:
    """exclusive vs shared accept: msgs/s (interleaved reps) and per-connection syscalls."""
    results = []
    use_perf = perf_available()
    if not use_perf:
        log("perf with syscall tracepoints unavailable: herd counts from context switches only")
    for n_workers in args.herd_workers:
        servers = {mode: PreforkServer(n_workers, ["--accept-mode", mode], key=f"herd-{mode}-{n_workers}",
                                       label=f"{mode} ({n_workers} workers)")
                   for mode in ("exclusive", "shared")}
        try:
            for srv in servers.values():
                srv.start(workdir)
            for srv in servers.values():
                drive(srv, conn, max(100, conn.count // 10), args.run_timeout)  # warm-up
            for rep in range(args.reps):
                order = list(servers.values())
                if rep % 2:
                    order.reverse()
                for srv in order:
                    s = drive(srv, conn, conn.count, args.run_timeout)
                    srv.samples.setdefault("conn", []).append(s)
                    log(f"herd {srv.label} rep {rep + 1}: {rate(conn, s):.0f} msgs/s"
                        + ("" if s.ok else f" FAILED: {s.error}"))
            for mode, srv in servers.items():
                st = summarize(srv, conn)
                row: dict[str, Any] = {"mode": mode, "workers": n_workers, "rate": st.rate,
                                       "lo": st.lo, "hi": st.hi, "cpu_us": st.cpu_us,
                                       "fails": st.n_fail}
                pids = [p.pid for p in srv.workers()]
                n = args.herd_connections
                # context switches of the workers (psutil; no tracer attached)
                before = sum(_ctx(p) for p in srv.workers())
                drive(srv, conn, n, args.run_timeout)
                after = sum(_ctx(p) for p in srv.workers())
                row["ctx_per_conn_psutil"] = (after - before) / n
                if use_perf:
                    c = perf_count(pids, lambda: drive(srv, conn, n, args.run_timeout), workdir)
                    # idle workers also return from epoll_wait once per TICK (1 s) with nothing
                    row["accept4_per_conn"] = c.get("syscalls:sys_enter_accept4", 0) / n
                    row["failed_accept_per_conn"] = c.get("syscalls:sys_exit_accept4", 0) / n
                    row["epoll_per_conn"] = (c.get("syscalls:sys_enter_epoll_wait", 0)
                                             + c.get("syscalls:sys_enter_epoll_pwait", 0)) / n
                    row["epoll_idle_ticks_per_conn"] = n_workers * c["window"] / n
                    row["cs_per_conn"] = c.get("context-switches", 0) / n
                results.append(row)
        finally:
            for srv in servers.values():
                srv.stop()
    return results


def _ctx(p: psutil.Process) -> int:
    """Voluntary plus involuntary context switches of a process so far (0 when it is gone)."""
    try:
        c = p.num_ctx_switches()
        return c.voluntary + c.involuntary
    except psutil.Error:
        return 0

