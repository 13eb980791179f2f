"""Measurement: driving each server with smtp-source and accounting for its CPU and memory.

* ``drive``: one ``smtp-source`` run against one server, timed by the wall
  clock, with the CPU of the server's whole process tree before and after
  (every thread's runtime from ``/proc/PID/task/*/schedstat``, plus reaped
  children; psutil's tick-sampled user/system split on the side) and
  smtp-source's own CPU (the client shares the machine's cores);
* ``interleaved``: the warm-up and the repetitions, every server of the
  workload's group that runs in it once per repetition and workload, the
  order rotating;
* ``relay_memory``: on a fresh relay server warmed up with 2 KB messages,
  the workers' peak RSS (``VmHWM``, reset through ``clear_refs``) and sampled
  USS during a 1 MB-message relay run, against the same workers idle just
  before it;
* ``idle_uss``: worker USS of fresh servers (default and ``--preload``) when
  idle after a number of sessions;
* ``herd``: ``--accept-mode exclusive`` against ``shared``: messages/s, and
  with ``perf stat`` on the workers the accept4() calls, failed accepts,
  epoll_wait() returns and context switches per connection;
* ``pool``: a fresh server with a large pool: seconds from ``start`` until
  every worker reports idle on the scoreboard (waiting for a connection), then
  the CPU and wake-ups of the whole idle process tree over a 10-second window.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from procs import HOST, end_process, free_port, greets, log, process_tree, release, run_cmd, spawn
from servers import PreforkRelayServer, PreforkServer, Server

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
    group: str = "sink"  # the servers it drives: Server.group

    @property
    def big(self) -> bool:
        """Whether the rate is reported in MB/s (1 MB messages) rather than messages/s."""
        return self.size >= MIB

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
    client_cpu: float = 0.0  # smtp-source's own user + system seconds
    steal: float = 0.0  # share of the machine's CPU time the hypervisor gave to other guests meanwhile



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


def relay_workloads(sessions: int, big_sessions: int, relay_messages: int,
                    relay_big_messages: int) -> list[Workload]:
    """The relay workloads: connection per 2 KB message, and 1 MB messages, both through a relay.

    Connection per message, because that is an inbound proxy's usual client
    (and both relays then open one upstream connection per message).
    """
    return [
        Workload("relay", f"Relay to smtp-sink, connection per message (2 KB, {sessions} parallel "
                 "sessions)", sessions, 2048, False, relay_messages, "relay"),
        Workload("relay-big", f"Relay to smtp-sink, 1 MB messages ({big_sessions} persistent "
                 "sessions, MB/s)", big_sessions, 1048576, True, relay_big_messages, "relay"),
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

def cpu_ticks() -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs so far, from /proc/stat; (0, 0) where there is none.

    Steal is time a virtual machine's CPUs were runnable but the hypervisor
    ran another guest: on a shared host it slows every server measured then.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal (guest time is counted in user already)
    return (fields[7] if len(fields) == 8 else 0), sum(fields)


def children_cpu() -> float:
    """User + system seconds of this process's reaped children (the kernel adds them up to the runtime)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def drive(server: Server, wl: Workload, count: int, timeout: float,
          client_cpus: set[int] | None = None) -> Sample:
    """One smtp-source run against one server: wall time, the server tree's CPU and smtp-source's,
    and the host's steal meanwhile.

    smtp-source is the only child that ends during the run, so the growth of
    the reaped children's CPU is its own.  ``client_cpus`` pins it to those
    CPUs (the reference run with the client on its own core).
    """
    server.refresh_tree()
    c0, u0, s0 = cpu_times(server.procs)
    cmd = wl.args(count) + [f"{HOST}:{server.port}"]
    pin = (lambda: os.sched_setaffinity(0, client_cpus)) if client_cpus else None
    k0 = children_cpu()
    steal0, ticks0 = cpu_ticks()
    t0 = time.perf_counter()
    proc = spawn(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pin)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_process(proc, signal.SIGKILL, grace=1)
        return Sample(timeout, count, 0, 0, 0, False, f"timed out after {timeout:.0f} s")
    elapsed = time.perf_counter() - t0
    client = max(0.0, children_cpu() - k0)
    steal1, ticks1 = cpu_ticks()
    release(proc)
    time.sleep(0.05)  # let the server finish the last QUIT/close
    server.refresh_tree()
    c1, u1, s1 = cpu_times(server.procs)
    text = (err or b"").decode(errors="replace").strip()
    ok = proc.returncode == 0 and "fatal" not in text
    return Sample(elapsed, count, max(0.0, c1 - c0), max(0.0, u1 - u0), max(0.0, s1 - s0), ok,
                  "" if ok else (text.splitlines() or [f"exit {proc.returncode}"])[-1][:200], client,
                  (steal1 - steal0) / (ticks1 - ticks0) if ticks1 > ticks0 else 0.0)


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
    client_us: float | None = None  # smtp-source's CPU µs per message (median)


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
    clients = [s.client_cpu / s.messages * 1e6 for s in good if s.client_cpu > 0]
    return Stat(median(rates), min(rates) if rates else None, max(rates) if rates else None,
                median(cpus), median(users), len(good), len(samples) - len(good),
                [s.error for s in samples if not s.ok], median(clients))



def interleaved(active: list[Server], wls: list[Workload], reps: int, timeout: float,
                client_cpus: set[int] | None = None, suffix: str = "") -> None:
    """One unrecorded warm-up run each, then ``reps`` recorded repetitions into ``server.samples``.

    For each repetition and workload every server of the workload's group runs
    once; the order of the servers rotates from one repetition to the next, so
    that no server always runs right after the same neighbour.  ``client_cpus``
    pins smtp-source (see :func:`drive`); the samples go under the workload's
    key plus ``suffix``.
    """
    log("warm-up")
    for wl in wls:
        for s in active:
            if s.group == wl.group and s.runs(wl.key):
                drive(s, wl, max(wl.sessions * 2, wl.count // 10), timeout, client_cpus)
    for rep in range(reps):
        for wl in wls:
            group = [s for s in active if s.group == wl.group and s.runs(wl.key)]
            if not group:
                continue
            k = rep % len(group)
            for s in group[k:] + group[:k]:
                sample = drive(s, wl, wl.count, timeout, client_cpus)
                s.samples.setdefault(wl.key + suffix, []).append(sample)
                unit = "MB/s" if wl.big else "msgs/s"
                log(f"rep {rep + 1}/{reps} {wl.key + suffix:9s} {s.label:30s} "
                    f"{rate(wl, sample):9.1f} {unit}  "
                    f"cpu {sample.cpu / sample.messages * 1e6:7.0f} µs/msg"
                    + ("" if sample.ok else f"  FAILED: {sample.error}"))


# -- relay worker memory -----------------------------------------------------------------------------

def worker_memory(pid: int) -> tuple[int, int, int] | None:
    """(RSS, USS, peak RSS) in bytes of one process, or None when it is gone.

    RSS and USS (Private_Clean + Private_Dirty, as psutil counts it) come from
    ``/proc/PID/smaps_rollup`` in one read; the peak is ``VmHWM`` from
    ``/proc/PID/status``, the most RSS since start or since ``reset_peak``.
    """
    try:
        rss = uss = 0
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if parts[0] == "Rss:":
                    rss = int(parts[1]) * 1024
                elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
                    uss += int(parts[1]) * 1024
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
        return rss, uss, hwm
    except (OSError, ValueError, IndexError):
        return None


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (``VmHWM``) to its current RSS (Linux ≥ 4.0): whether it worked."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_snapshot(server: Server) -> dict[int, tuple[int, int, int]]:
    """``worker_memory`` of each of the server's workers, by pid."""
    snap = {}
    for p in server.workers():
        m = worker_memory(p.pid)
        if m is not None:
            snap[p.pid] = m
    return snap


def relay_memory(args: argparse.Namespace, small: Workload, big: Workload, upstream: Server,
                 workdir: Path) -> dict[str, Any]:
    """Relay workers' memory during a run of ``big`` (1 MB messages) against the same workers idle.

    A fresh relay server (same flags and workers as the measured one, same
    upstream) is warmed up with ``small`` (2 KB, connection per message) so
    that every worker has relayed but none has seen a large message; its
    workers idle then are the baseline.  So memory that a large message leaves
    behind (a buffer kept, a heap grown) counts as growth, while what any first
    message costs (code paths, allocator arenas) does not.  Peak RSS is exact
    (the kernel's high-water mark, reset before the run); USS is sampled every
    50 ms, so its peak may miss a short spike.  Growth is per worker (its peak
    minus its own idle value); the largest over the workers is reported.
    """
    server = PreforkRelayServer(args.workers, upstream)
    server.key, server.label = "relay-memory", "prefork-esmtp relay (memory)"
    try:
        server.start(workdir)
        fresh = memory_snapshot(server)
        warm = drive(server, small, max(200, 10 * args.workers), args.run_timeout)
        if not warm.ok:
            raise RuntimeError(f"relay memory warm-up failed: {warm.error}")
        time.sleep(0.5)
        return _peak_during(server, big, args.relay_big_messages, args.run_timeout, fresh)
    finally:
        server.stop()


def _peak_during(server: Server, wl: Workload, count: int, timeout: float,
                 fresh: dict[int, tuple[int, int, int]]) -> dict[str, Any]:
    """Run ``wl`` once against ``server``, sampling its workers; the memory row for the report."""
    idle = memory_snapshot(server)
    exact = all([reset_peak(pid) for pid in idle])
    peak_uss = {pid: m[1] for pid, m in idle.items()}
    peak_rss = {pid: m[0] for pid, m in idle.items()}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            for pid in idle:
                m = worker_memory(pid)
                if m is not None:
                    peak_rss[pid] = max(peak_rss[pid], m[0], m[2] if exact else 0)
                    peak_uss[pid] = max(peak_uss[pid], m[1])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run = drive(server, wl, count, timeout)
    finally:
        stop.set()
        sampler.join(timeout=5)
    time.sleep(0.5)
    after = memory_snapshot(server)
    for pid, m in after.items():
        if pid in peak_rss:
            peak_rss[pid] = max(peak_rss[pid], m[0], m[2] if exact else 0)
            peak_uss[pid] = max(peak_uss[pid], m[1])
    pids = [pid for pid in idle if pid in after]  # a worker replaced meanwhile is left out
    row: dict[str, Any] = {
        "messages": count, "size": wl.size, "sessions": wl.sessions, "ok": run.ok, "error": run.error,
        "workers": len(pids), "exact_peak": exact,
        "idle_rss": median([idle[p][0] for p in pids]), "idle_uss": median([idle[p][1] for p in pids]),
        "fresh_rss": median([m[0] for m in fresh.values()]),
        "fresh_uss": median([m[1] for m in fresh.values()]),
        "peak_rss": max((peak_rss[p] for p in pids), default=None),
        "peak_uss": max((peak_uss[p] for p in pids), default=None),
        "rss_growth": max((peak_rss[p] - idle[p][0] for p in pids), default=None),
        "uss_growth": max((peak_uss[p] - idle[p][1] for p in pids), default=None),
        "uss_retained": max((after[p][1] - idle[p][1] for p in pids), default=None),
        "rss_growth_fresh": max((peak_rss[p] - fresh[p][0] for p in pids if p in fresh), default=None),
        "uss_growth_fresh": max((peak_uss[p] - fresh[p][1] for p in pids if p in fresh), default=None),
    }
    log(f"relay memory, {count} x {wl.size // MIB} MB: idle RSS {fmt_mib(row['idle_rss'])}, peak growth "
        f"RSS {fmt_mib(row['rss_growth'])}, USS {fmt_mib(row['uss_growth'])} (largest over "
        f"{len(pids)} workers)" + ("" if run.ok else f"  FAILED: {run.error}"))
    return row


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
                    row["accept4_per_conn"] = c.get("syscalls:sys_enter_accept4", 0) / n
                    row["failed_accept_per_conn"] = c.get("syscalls:sys_exit_accept4", 0) / n
                    row["epoll_per_conn"] = (c.get("syscalls:sys_enter_epoll_wait", 0)
                                             + c.get("syscalls:sys_enter_epoll_pwait", 0)) / n
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



# -- a large pool: start-up time and idle cost -----------------------------------------------------

def _idle_slots(board_path: str) -> tuple[int, set[int]]:
    """(workers reporting idle, pids of all workers) on a master's scoreboard file; (0, set()) if unreadable.

    The scoreboard is read through the package's own reader: ``status --json``
    would also read every worker's memory, far too slow to poll 1,000 workers.
    """
    from prefork_esmtp.scoreboard import IDLE, Scoreboard

    try:
        board = Scoreboard.open(board_path)
    except (OSError, ValueError):
        return 0, set()
    slots = [board.slot(i) for i in range(board.nslots)]  # also those whose pid the master has yet to note
    return sum(1 for s in slots if s.state == IDLE), {s.pid for s in slots if s.pid}


def _wakeups(procs: list[psutil.Process]) -> int:
    """Voluntary context switches of the processes so far: each is one sleep, so one wake-up."""
    total = 0
    for p in procs:
        try:
            total += p.num_ctx_switches().voluntary
        except psutil.Error:
            pass
    return total


def pool(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Per pool size N: seconds from spawning ``start --workers N`` to N idle workers; idle CPU over a window.

    "Accepting" is a worker that has reported idle on the scoreboard: it does
    so just before it blocks in epoll_wait on the listeners.  A 220 greeting is
    checked once all are up.  Then, after a 2-second settle, the CPU of the
    master and every worker (schedstat runtime) and their voluntary context
    switches (wake-ups) over ``args.pool_idle_seconds`` with no client at all.
    """
    rows = []
    for n in args.pool_workers:
        pid_path = workdir / f"pool-{n}.pid"
        srv = PreforkServer(n, ["--pidfile", str(pid_path)], key=f"pool-{n}", label=f"pool of {n}")
        port = free_port()
        row: dict[str, Any] = {"workers": n, "ok": False, "error": ""}
        logf = open(workdir / f"pool-{n}.log", "wb")
        t0 = time.monotonic()
        proc = spawn(srv.command(port), stdout=logf, stderr=subprocess.STDOUT, cwd=str(workdir))
        try:
            first = None
            deadline = t0 + max(60.0, n * 0.1)
            idle = 0
            while time.monotonic() < deadline and proc.poll() is None:
                idle, _ = _idle_slots(f"{pid_path}.scoreboard")
                if idle and first is None:
                    first = time.monotonic() - t0
                if idle >= n:
                    break
                time.sleep(0.05)
            if idle < n:
                row["error"] = (f"exited with {proc.returncode}" if proc.poll() is not None
                                else f"only {idle} of {n} workers idle after {deadline - t0:.0f} s")
                log(f"pool of {n}: {row['error']}")
                rows.append(row)
                continue
            row["ready_s"] = time.monotonic() - t0
            row["first_s"] = first
            row["greets"] = greets(port)
            time.sleep(2.0)
            tree = process_tree(proc.pid)
            row["procs"] = len(tree)
            cpu0, wake0, t1 = cpu_times(tree)[0], _wakeups(tree), time.monotonic()
            time.sleep(args.pool_idle_seconds)
            cpu1, wake1, t2 = cpu_times(tree)[0], _wakeups(tree), time.monotonic()
            row["idle_window_s"] = t2 - t1
            row["idle_cpu_pct"] = 100.0 * (cpu1 - cpu0) / (t2 - t1)
            row["wakeups_per_s"] = (wake1 - wake0) / (t2 - t1)
            row["idle_after"], _ = _idle_slots(f"{pid_path}.scoreboard")
            row["ok"] = row["greets"] and row["idle_after"] >= n
            log(f"pool of {n}: first worker idle after {first:.2f} s, all {n} after {row['ready_s']:.2f} s; "
                f"idle CPU {row['idle_cpu_pct']:.2f}% of a core over {row['idle_window_s']:.0f} s, "
                f"{row['wakeups_per_s']:.1f} wake-ups/s ({len(tree)} processes)")
            rows.append(row)
        finally:
            end_process(proc, signal.SIGINT, grace=10.0)
            logf.close()
    return rows
