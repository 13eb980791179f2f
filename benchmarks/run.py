#!/usr/bin/env python3
"""Side-by-side benchmark of prefork-esmtp against aiosmtpd, Postfix's smtp-sink and Haraka.

    .venv/bin/python benchmarks/run.py            # full run (make bench), ~5 minutes
    .venv/bin/python benchmarks/run.py --quick    # smoke run, well under a minute

One run starts every server side by side on loopback, each accepting and
discarding mail, then drives each one with Postfix's ``smtp-source`` in three
workloads, with the repetitions interleaved across servers (the order of the
servers rotates from one repetition to the next):

* ``conn``: one connection per 2 KB message, 20 parallel sessions;
* ``persist``: 20 persistent sessions of 2 KB messages (``smtp-source -d``);
* ``big``: 1 MB messages over 4 persistent sessions.

For each run it records the wall time of ``smtp-source`` and the user+system
CPU time of the server's whole process tree (psutil, before and after; the
times of reaped children are included).  It reports median messages/s (MB/s
for ``big``), CPU microseconds per message, the median USS of prefork-esmtp's
workers, the median idle worker USS of a fresh server after 2,000 sessions,
ratios of prefork-esmtp to each peer and pass/fail against the targets
(``RATIO_TARGETS``).  It then measures the accept herd (``--accept-mode exclusive`` against
``shared``): messages/s, and with ``perf stat`` on the workers the accept4()
calls, failed accepts, epoll_wait() returns and context switches per
connection.  Everything goes into ``benchmarks/RESULTS.md``; the section that
``benchmarks/profiling.py`` writes there is kept.

Only loopback addresses are used, and every process started here is ended
when the run ends, also on Ctrl-C or SIGTERM.
Standard library and psutil only (aiosmtpd is pip-installed into this Python
when absent; Haraka is npm-installed into a cache directory outside the repo).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
CACHE = Path(os.environ.get("PREFORK_ESMTP_BENCH_CACHE",
                            Path.home() / ".cache" / "prefork-esmtp-bench"))
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
MIB = 1024 * 1024
PROFILE_BEGIN = "<!-- profile:begin -->"
PROFILE_END = "<!-- profile:end -->"

#: The throughput targets: (workload, peer, minimum ratio prefork/peer).
RATIO_TARGETS = [
    ("conn", "aiosmtpd", 2.0),
    ("conn", "haraka", 1.5),
    ("persist", "haraka", 1.0),
    ("big", "smtp-sink", 0.8),
]
IDLE_USS_TARGET = 3 * MIB


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- processes we start: all of them are registered and ended at exit ---------------------

STARTED: list[subprocess.Popen] = []


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen:
    """Start a process in its own session (so Ctrl-C reaches only us) and register it."""
    kw.setdefault("stdin", subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    STARTED.append(proc)
    return proc


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def end_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
    """Signal a process we started, wait, then SIGKILL it and every descendant left, by pid."""
    tree = process_tree(proc.pid)
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass
    gone, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    if proc in STARTED:
        STARTED.remove(proc)


def end_all() -> None:
    for proc in list(reversed(STARTED)):
        end_process(proc, grace=3.0)


def _on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- helpers -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def greets(port: int, timeout: float = 2.0) -> bool:
    """Whether a connection to the port gets a 220 greeting (then QUIT politely)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(512)
                if not chunk:
                    return False
                data += chunk
            ok = data.startswith(b"220")
            s.sendall(b"QUIT\r\n")
            try:
                s.recv(512)
            except OSError:
                pass
            return ok
    except OSError:
        return False


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


HAVE_SCHEDSTAT = os.path.exists("/proc/self/task") and os.path.exists("/proc/self/schedstat")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_cmd(cmd: list[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# -- workloads -----------------------------------------------------------------------------

@dataclass
class Workload:
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
        cmd = [SMTP_SOURCE, "-s", str(self.sessions), "-m", str(count), "-l", str(self.size),
               "-M", "bench.example", "-f", "bench@bench.example", "-t", "sink@bench.example"]
        if self.persistent:
            cmd.append("-d")
        return cmd


@dataclass
class Sample:
    seconds: float
    messages: int
    cpu: float
    cpu_user: float
    cpu_sys: float
    ok: bool
    error: str = ""


# -- servers -----------------------------------------------------------------------------

@dataclass
class Server:
    key: str
    label: str
    available: bool = True
    reason: str = ""
    version: str = ""
    proc: subprocess.Popen | None = None
    port: int = 0
    root: int = 0  # pid of the server's top process (its tree is measured)
    procs: list[psutil.Process] = field(default_factory=list)
    expected_children: int = 0
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def command(self, port: int) -> list[str]:
        raise NotImplementedError

    def start(self, workdir: Path) -> None:
        self.port = free_port()
        cmd = self.command(self.port)
        logf = open(workdir / f"{self.key}.log", "wb")
        self.proc = spawn(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(workdir))
        self.root = self.proc.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start-up (status {self.proc.returncode}); "
                                   f"see {workdir / (self.key + '.log')}")
            tree = process_tree(self.proc.pid)
            if len(tree) - 1 >= self.expected_children and greets(self.port):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{self.label} did not answer on {HOST}:{self.port} within 60 s")
        time.sleep(0.5)
        self.refresh_tree()

    def refresh_tree(self) -> None:
        self.procs = process_tree(self.root)

    def stop(self) -> None:
        if self.proc is not None:
            end_process(self.proc, self.stop_signal)
            self.proc = None
            self.root = 0

    stop_signal = signal.SIGTERM

    def workers(self) -> list[psutil.Process]:
        if not self.root:
            return []
        try:
            return psutil.Process(self.root).children()
        except psutil.Error:
            return []


class PreforkServer(Server):
    stop_signal = signal.SIGINT  # fast stop: nothing is in flight between runs

    def __init__(self, workers: int, extra: list[str] | None = None, key: str = "prefork-esmtp",
                 label: str = "prefork-esmtp") -> None:
        super().__init__(key, label)
        self.n_workers = workers
        self.extra = extra or []
        self.expected_children = workers
        exe = Path(sys.executable).parent / "prefork-esmtp"
        self.exe = [str(exe)] if exe.exists() else [sys.executable, "-m", "prefork_esmtp"]
        try:
            out = run_cmd(self.exe + ["--version"], timeout=30).stdout.strip()
            self.version = out.split()[-1] if out else ""
        except Exception:  # noqa: BLE001 - version is only a label
            self.version = ""

    def command(self, port: int) -> list[str]:
        return self.exe + ["start", "--listen", f"{HOST}:{port}", "--workers", str(self.n_workers),
                           "--log-level", "warning", "--max-message-size", "2M",
                           "--hostname", "prefork-esmtp.bench"] + self.extra

    def worker_uss(self) -> list[int]:
        values = []
        for p in self.workers():
            try:
                values.append(p.memory_full_info().uss)
            except psutil.Error:
                pass
        return values


class AiosmtpdServer(Server):
    def __init__(self) -> None:
        super().__init__("aiosmtpd", "aiosmtpd Sink")
        ok, why = ensure_aiosmtpd()
        self.available, self.reason = ok, why
        if ok:
            self.version = run_cmd([sys.executable, "-c",
                                    "import aiosmtpd; print(aiosmtpd.__version__)"]).stdout.strip()

    def command(self, port: int) -> list[str]:
        return [sys.executable, str(HERE / "aiosmtpd_sink.py"), HOST, str(port)]


class SmtpSinkServer(Server):
    def __init__(self) -> None:
        super().__init__("smtp-sink", "Postfix smtp-sink")
        if not os.path.exists(SMTP_SINK):
            self.available, self.reason = False, "smtp-sink not found (apt-get install postfix)"
        try:
            self.version = run_cmd(["postconf", "-d", "-h", "mail_version"]).stdout.strip()
        except Exception:  # noqa: BLE001
            self.version = ""

    def command(self, port: int) -> list[str]:
        cmd = [SMTP_SINK]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # required as root; it drops privileges after binding
        return cmd + ["-h", "smtp-sink.bench", f"{HOST}:{port}", "256"]


class HarakaServer(Server):
    NODES = 2

    def __init__(self, enabled: bool) -> None:
        super().__init__("haraka", f"Haraka ({self.NODES} nodes)")
        self.expected_children = self.NODES
        self.home = CACHE / "haraka"
        self.config = self.home / "bench-config"
        if not enabled:
            self.available, self.reason = False, "skipped (--no-haraka)"
            return
        self.available, self.reason = self.install()

    def install(self) -> tuple[bool, str]:
        node, npm = shutil.which("node"), shutil.which("npm")
        if not node or not npm:
            return False, "Node.js/npm not found"
        self.node = node
        self.script = self.home / "node_modules" / "Haraka" / "bin" / "haraka"
        try:
            if not self.script.exists():
                log(f"installing Haraka with npm into {self.home} (once)")
                self.home.mkdir(parents=True, exist_ok=True)
                if not (self.home / "package.json").exists():
                    (self.home / "package.json").write_text('{"name": "haraka-bench", "private": true}\n')
                r = run_cmd([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "Haraka"],
                            timeout=900, cwd=str(self.home))
                if r.returncode != 0 or not self.script.exists():
                    return False, "npm install Haraka failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
            if not (self.config / "config").is_dir():
                r = run_cmd([node, str(self.script), "-i", str(self.config)], timeout=120)
                if r.returncode != 0:
                    return False, "haraka -i failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
            pkg = json.loads((self.home / "node_modules" / "Haraka" / "package.json").read_text())
            self.version = f"{pkg.get('version', '?')} (Node.js {run_cmd([node, '--version']).stdout.strip()})"
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            return False, f"Haraka set-up failed: {exc}"
        return True, ""

    def write_config(self, port: int) -> None:
        cfg = self.config / "config"
        plugins = self.config / "plugins"
        plugins.mkdir(exist_ok=True)
        # accept every recipient, "queue" by throwing the message away
        (plugins / "bench_accept.js").write_text(
            "// benchmark: accept every recipient, discard every message\n"
            "exports.register = function () {\n"
            "    this.register_hook('rcpt', 'accept_rcpt')\n"
            "    this.register_hook('queue', 'discard')\n"
            "}\n"
            "exports.accept_rcpt = (next) => next(OK)\n"
            "exports.discard = (next) => next(OK)\n")
        (cfg / "plugins").write_text("bench_accept\n")
        (cfg / "smtp.ini").write_text(f"[main]\nlisten={HOST}:{port}\nnodes={self.NODES}\n")
        (cfg / "log.ini").write_text("[main]\nlevel=warn\ntimestamps=false\nformat=default\n")
        (cfg / "me").write_text("haraka.bench\n")

    def command(self, port: int) -> list[str]:
        self.write_config(port)
        return [self.node, str(self.script), "-c", str(self.config)]


def ensure_aiosmtpd() -> tuple[bool, str]:
    probe = [sys.executable, "-c", "import aiosmtpd"]
    if run_cmd(probe).returncode == 0:
        return True, ""
    log("aiosmtpd missing: pip install aiosmtpd")
    r = run_cmd([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd"], timeout=600)
    if r.returncode != 0 or run_cmd(probe).returncode != 0:
        return False, "aiosmtpd not installable: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return True, ""


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
    if proc in STARTED:
        STARTED.remove(proc)
    time.sleep(0.05)  # let the server finish the last QUIT/close
    server.refresh_tree()
    c1, u1, s1 = cpu_times(server.procs)
    text = (err or b"").decode(errors="replace").strip()
    ok = proc.returncode == 0 and "fatal" not in text
    return Sample(elapsed, count, max(0.0, c1 - c0), max(0.0, u1 - u0), max(0.0, s1 - s0), ok,
                  "" if ok else (text.splitlines() or [f"exit {proc.returncode}"])[-1][:200])


def rate(wl: Workload, s: Sample) -> float:
    if wl.big:
        return s.messages * wl.size / 1e6 / s.seconds
    return s.messages / s.seconds


@dataclass
class Stat:
    rate: float | None
    lo: float | None
    hi: float | None
    cpu_us: float | None
    user_share: float | None
    n_ok: int
    n_fail: int
    errors: list[str]


def summarize(server: Server, wl: Workload) -> Stat:
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


# -- accept herd ---------------------------------------------------------------------------------

PERF_EVENTS = ["syscalls:sys_enter_accept4", "syscalls:sys_enter_epoll_wait",
               "syscalls:sys_enter_epoll_pwait", "context-switches"]


def perf_available() -> bool:
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
    try:
        c = p.num_ctx_switches()
        return c.voluntary + c.involuntary
    except psutil.Error:
        return 0


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


# -- report --------------------------------------------------------------------------------------------

def fmt_mib(v: float | None) -> str:
    return "n/a" if v is None else f"{v / MIB:.2f} MiB"


def fmt(v: float | None, digits: int = 0) -> str:
    return "n/a" if v is None else f"{v:,.{digits}f}"


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.0f}%"


def times(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def machine() -> dict[str, str]:
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
           started: datetime.datetime, elapsed: float) -> str:
    m = machine()
    prefork = servers[0]
    by_key = {s.key: s for s in servers}
    stats = {(s.key, wl.key): summarize(s, wl) for s in servers for wl in workloads if s.available}
    lines = []
    w = lines.append
    w("# prefork-esmtp benchmark results")
    w("")
    w(f"Written by `make bench` (`benchmarks/run.py{' --quick' if args.quick else ''}`) on "
      f"{started.strftime('%Y-%m-%d %H:%M %Z').strip()}; the run took {elapsed / 60:.1f} minutes."
      + (" **Quick (smoke) run: small counts, numbers are indicative only.**" if args.quick else ""))
    w("")
    w(f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory']} RAM, {m['os']}, {m['python']}")
    w("- Servers, side by side in one run, all accepting and discarding every message on 127.0.0.1:")
    for s in servers:
        desc = {
            "prefork-esmtp": f"prefork-esmtp {s.version}: base handler (`ESMTPHandler`), "
                             f"`--workers {args.workers}`, `--log-level warning`, default accept mode",
            "aiosmtpd": f"aiosmtpd {s.version} `Sink` handler, one asyncio process "
                        f"(`benchmarks/aiosmtpd_sink.py`)",
            "smtp-sink": f"Postfix {s.version} `smtp-sink`, one event-driven C process",
            "haraka": f"Haraka {s.version}, cluster `nodes=2`, accept-all rcpt + discarding queue plugin",
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
      "the repetitions (tick-sampled, so approximate).")
    w("")

    # targets
    w("## Targets")
    w("")
    w("| target | measured | result |")
    w("|---|---|---|")
    names = {"conn": "connection per message", "persist": "persistent sessions", "big": "1 MB messages"}
    for wl_key, peer, need in RATIO_TARGETS:
        unit = "MB/s" if wl_key == "big" else "msgs/s"
        label = f"{names[wl_key]}: prefork-esmtp ≥ {need:g}× {by_key[peer].label} ({unit})"
        if not by_key[peer].available:
            w(f"| {label} | peer not run ({by_key[peer].reason}) | n/a |")
            continue
        a, b = stats[("prefork-esmtp", wl_key)].rate, stats[(peer, wl_key)].rate
        if a is None or b is None:
            w(f"| {label} | no successful run | FAIL |")
            continue
        ratio = a / b
        w(f"| {label} | {fmt(a, 1 if wl_key == 'big' else 0)} vs {fmt(b, 1 if wl_key == 'big' else 0)}"
          f" = **{ratio:.2f}×** | {'PASS' if ratio >= need else 'FAIL'} |")
    idle = idle_rows[0] if idle_rows else None
    if idle and idle["after"] is not None:
        w(f"| median idle worker USS after {idle['sessions']:,} sessions ≤ 3 MiB | "
          f"**{fmt_mib(idle['after'])}** | {'PASS' if idle['after'] <= IDLE_USS_TARGET else 'FAIL'} |")
    else:
        w("| median idle worker USS after 2,000 sessions ≤ 3 MiB | not measured | n/a |")
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
          f"prefork-esmtp ÷ this ({unit}) | this CPU ÷ prefork-esmtp CPU | runs ok/failed |")
        w("|---|--:|--:|--:|--:|--:|--:|--:|")
        ref = stats.get(("prefork-esmtp", wl.key))
        for s in servers:
            if not s.available:
                w(f"| {s.label} | not run: {s.reason} | | | | | | |")
                continue
            st = stats[(s.key, wl.key)]
            d = 1 if wl.big else 0
            ratio = (ref.rate / st.rate) if ref and ref.rate and st.rate else None
            cpu_ratio = (st.cpu_us / ref.cpu_us) if ref and ref.cpu_us and st.cpu_us else None
            w(f"| {s.label} | {fmt(st.rate, d)} | {fmt(st.lo, d)} – {fmt(st.hi, d)} | "
              f"{fmt(st.cpu_us)} | {pct(st.user_share)} | "
              f"{'—' if s is prefork else times(ratio)} | "
              f"{'—' if s is prefork else times(cpu_ratio)} | {st.n_ok}/{st.n_fail} |")
        errors = [f"{s.label}: {e}" for s in servers if s.available
                  for e in stats[(s.key, wl.key)].errors]
        if errors:
            w("")
            w("Failed runs: " + "; ".join(sorted(set(errors))[:6]))
        w("")

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
          f"workers also return from epoll_wait once per 1 s heartbeat tick; the upper bound of that "
          f"share is in parentheses.")
        w("")
        w("| workers | mode | msgs/s (median) | min – max | CPU µs/msg | accept4() per conn | "
          "failed accept4() per conn | epoll_wait() per conn (of which idle ticks ≤) | "
          "context switches per conn (perf) | (psutil) |")
        w("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for r in herd_rows:
            w(f"| {r['workers']} | {r['mode']} | {fmt(r['rate'])} | {fmt(r['lo'])} – {fmt(r['hi'])} | "
              f"{fmt(r['cpu_us'])} | {fmt(r.get('accept4_per_conn'), 2)} | "
              f"{fmt(r.get('failed_accept_per_conn'), 2)} | {fmt(r.get('epoll_per_conn'), 2)} "
              f"({fmt(r.get('epoll_idle_ticks_per_conn'), 2)}) | {fmt(r.get('cs_per_conn'), 1)} | "
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
    return "\n".join(lines)


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


# -- main ---------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--workers", type=int, default=0,
                   help="prefork-esmtp workers (default: sessions + 2, so workers >= client sessions)")
    p.add_argument("--servers", default="prefork-esmtp,aiosmtpd,smtp-sink,haraka",
                   help="comma-separated servers to run (prefork-esmtp is always run)")
    p.add_argument("--no-haraka", action="store_true", help="do not install or run Haraka")
    p.add_argument("--idle-sessions", type=int, default=2000,
                   help="sessions before measuring idle worker USS on a fresh server")
    p.add_argument("--no-herd", action="store_true", help="skip the accept-herd measurement")
    p.add_argument("--herd-workers", default="22,64",
                   help="comma-separated pool sizes for the herd measurement")
    p.add_argument("--herd-connections", type=int, default=2000,
                   help="connections counted with perf per herd mode")
    p.add_argument("--run-timeout", type=float, default=300, help="seconds before a run is failed")
    p.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="markdown report")
    p.add_argument("--json", type=Path, default=None, help="also write raw samples as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 1)
        args.conn_messages = min(args.conn_messages, 300)
        args.persist_messages = min(args.persist_messages, 1000)
        args.big_messages = min(args.big_messages, 20)
        args.idle_sessions = min(args.idle_sessions, 300)
        args.herd_connections = min(args.herd_connections, 300)
        args.herd_workers = args.herd_workers.split(",")[0]
    if not args.workers:
        args.workers = max(args.sessions, args.big_sessions) + 2
    args.herd_workers = [int(x) for x in str(args.herd_workers).split(",") if x.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (SMTP_SOURCE,):
        if not os.path.exists(tool):
            print(f"bench: {tool} not found (apt-get install postfix)", file=sys.stderr)
            return 2
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)  # SIGINT too: a shell may have started us with it ignored
    started = datetime.datetime.now().astimezone()
    t_start = time.monotonic()
    workloads = [
        Workload("conn", "Connection per message (2 KB, 20 parallel sessions)", args.sessions, 2048,
                 False, args.conn_messages),
        Workload("persist", "Persistent sessions (2 KB, 20 sessions, `-d`)", args.sessions, 2048,
                 True, args.persist_messages),
        Workload("big", "1 MB messages (4 persistent sessions)", args.big_sessions, 1048576, True,
                 args.big_messages),
    ]
    for wl in workloads:
        if "1 MB" in wl.title:
            wl.title = f"1 MB messages ({args.big_sessions} persistent sessions, MB/s)"
        else:
            wl.title = wl.title.replace("20", str(args.sessions))
    workdir = Path(tempfile.mkdtemp(prefix="prefork-esmtp-bench-"))
    servers: list[Server] = []
    bench_uss: list[int] = []
    idle_rows: list[dict[str, Any]] = []
    herd_rows: list[dict[str, Any]] = []
    try:
        log(f"work dir {workdir}; preparing servers")
        servers.append(PreforkServer(args.workers))
        wanted = set(args.servers)
        servers.append(AiosmtpdServer() if "aiosmtpd" in wanted else
                       Server("aiosmtpd", "aiosmtpd Sink", False, "not selected (--servers)"))
        servers.append(SmtpSinkServer() if "smtp-sink" in wanted else
                       Server("smtp-sink", "Postfix smtp-sink", False, "not selected (--servers)"))
        servers.append(HarakaServer(not args.no_haraka and "haraka" in wanted))
        for s in servers:
            if not s.available:
                log(f"{s.label}: not run ({s.reason})")
                continue
            try:
                s.start(workdir)
                log(f"{s.label} {s.version} on {HOST}:{s.port}, pid {s.proc.pid}, "
                    f"{len(s.procs)} processes")
            except RuntimeError as exc:
                if s is servers[0]:
                    raise
                s.available, s.reason = False, str(exc)
                s.stop()
                log(f"{s.label}: not run ({exc})")
        active = [s for s in servers if s.available]

        log("warm-up")
        for wl in workloads:
            for s in active:
                drive(s, wl, max(wl.sessions * 2, wl.count // 10), args.run_timeout)
        for rep in range(args.reps):
            for wl in workloads:
                k = rep % len(active)
                for s in active[k:] + active[:k]:
                    sample = drive(s, wl, wl.count, args.run_timeout)
                    s.samples.setdefault(wl.key, []).append(sample)
                    unit = "MB/s" if wl.big else "msgs/s"
                    log(f"rep {rep + 1}/{args.reps} {wl.key:7s} {s.label:20s} "
                        f"{rate(wl, sample):9.1f} {unit}  "
                        f"cpu {sample.cpu / sample.messages * 1e6:7.0f} µs/msg"
                        + ("" if sample.ok else f"  FAILED: {sample.error}"))
        bench_uss = servers[0].worker_uss()
        for s in servers:
            s.stop()

        idle_rows = idle_uss(args, workloads[0], workdir)
        if not args.no_herd:
            herd_rows = herd(args, workloads[0], workdir)
    except KeyboardInterrupt:
        log("interrupted: stopping every process started here")
        end_all()
        return 130
    finally:
        for s in servers:
            s.stop()
        end_all()

    body = render(args, workloads, servers, bench_uss, idle_rows, herd_rows, started,
                  time.monotonic() - t_start)
    write_results(args.output, body)
    if args.json:
        raw = {s.key: {k: [vars(x) for x in v] for k, v in s.samples.items()} for s in servers}
        args.json.write_text(json.dumps({"samples": raw, "idle": idle_rows, "herd": herd_rows,
                                         "bench_uss": bench_uss}, indent=1))
    print()
    print(body)
    log(f"wrote {args.output}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
