"""Server adapters: how the benchmark installs, starts, finds and stops each server.

Each adapter knows its command line, how many child processes make it ready,
and how to stop it; ``Server.start`` runs it on a free port on 127.0.0.1 and
waits until it answers with a 220 greeting.  The servers:

* prefork-esmtp with the base handler (accept and discard), from command-line
  flags only (no configuration file, no environment variables);
* aiosmtpd's stock ``Sink`` handler (``aiosmtpd_sink.py``), pip-installed into
  this Python when missing;
* Postfix's ``smtp-sink``;
* Haraka in cluster mode, npm-installed once into a cache outside the
  repository, with one plugin that accepts every recipient and discards the
  message;
* the Python floor (``python_floor.py``), a reference rather than a peer:
  the least a Python prefork SMTP server can do per session, run in the two
  2 KB workloads only and never part of a target.

For the reload and HAProxy figures (``production.py``): prefork-esmtp with
a benchmark-only handler that records every message it accepts
(``counting_handler.py``) and reports its reloads to a ``NOTIFY_SOCKET`` of
ours, one of them with ``--proxy-protocol`` behind a real HAProxy
(``send-proxy-v2``); and, as a reference beside that figure, ``smtp-sink``
direct and behind a second HAProxy forwarding plain TCP.

For the relay workloads (group ``relay``), each forwarding to one shared
``smtp-sink`` (the upstream, started first and not measured):

* prefork-esmtp with the streaming relay handler
  (``prefork_esmtp.handlers.relay:Relay``, ``upstream=127.0.0.1:PORT``);
* Haraka with its stock ``rcpt_to.in_host_list`` and ``queue/smtp_forward``
  plugins, from a config directory of its own.

A server that cannot be installed or started is marked unavailable with the
reason, and the run goes on without it (except prefork-esmtp).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from procs import HOST, end_process, free_port, greets, log, process_tree, run_cmd, spawn

if TYPE_CHECKING:
    from measure import Sample

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PREFORK_ESMTP_BENCH_CACHE",
                            Path.home() / ".cache" / "prefork-esmtp-bench"))
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


@dataclass
class Server:
    """One server under test: its command line, its process tree, and the samples measured on it.

    The base class is also what an unselected or unavailable server is: a row
    in the report with the reason it was not run.
    """

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
    group: str = "sink"  # which workloads drive it: "sink" (accept and discard) or "relay"
    only: frozenset[str] | None = None  # the keys of the workloads it runs in; None: all of its group
    reference: bool = False  # a yardstick shown beside the others, never a peer of a target

    def runs(self, workload_key: str) -> bool:
        """Whether it runs in that workload of its group."""
        return self.only is None or workload_key in self.only

    def command(self, port: int) -> list[str]:
        """The command line that serves SMTP on 127.0.0.1:port."""
        raise NotImplementedError

    def environment(self, workdir: Path) -> dict[str, str] | None:
        """The environment to start it with; None: this process's own."""
        return None

    def start(self, workdir: Path) -> None:
        """Start on a free port (output to workdir/KEY.log) and wait up to 60 s for a 220 greeting."""
        self.port = free_port()
        cmd = self.command(self.port)
        with open(workdir / f"{self.key}.log", "wb") as logf:
            self.proc = spawn(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=str(workdir),
                              env=self.environment(workdir))
        self.root = self.proc.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start-up (status {self.proc.returncode}); "
                                   f"see {workdir / (self.key + '.log')}")
            tree = process_tree(self.proc.pid)
            if len(tree) - 1 >= self.expected_children and self.answers():
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{self.label} did not answer on {HOST}:{self.port} within 60 s")
        time.sleep(0.5)
        self.refresh_tree()

    def answers(self) -> bool:
        """Whether it serves: a connection gets a 220 greeting."""
        return greets(self.port)

    def refresh_tree(self) -> None:
        """Look up the process tree again (workers may have been replaced)."""
        self.procs = process_tree(self.root)

    def stop(self) -> None:
        """Stop the server and whatever is left of its process tree (nothing when not started)."""
        if self.proc is not None:
            end_process(self.proc, self.stop_signal)
            self.proc = None
            self.root = 0

    stop_signal = signal.SIGTERM

    def workers(self) -> list[psutil.Process]:
        """The top process's direct children (prefork-esmtp's workers, Haraka's nodes)."""
        if not self.root:
            return []
        try:
            return psutil.Process(self.root).children()
        except psutil.Error:
            return []


class PreforkServer(Server):
    """prefork-esmtp from this Python's environment, base handler, a fixed pool of workers.

    ``extra`` adds flags for the side measurements (``--accept-mode``,
    ``--preload``).  The handler is named on the command line rather than left
    to the default, and no configuration file is read, so the server measured
    stays the accept-and-discard base handler whatever the default becomes.
    """

    stop_signal = signal.SIGINT  # fast stop: nothing is in flight between runs
    handler = "prefork_esmtp:ESMTPHandler"

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
                           "--hostname", "prefork-esmtp.bench",
                           "--handler", self.handler] + self.handler_options() + self.extra

    def handler_options(self) -> list[str]:
        """``--handler-option`` flags for the handler (none for the base handler)."""
        return []

    def worker_uss(self) -> list[int]:
        """USS in bytes of each worker: the memory only that worker maps."""
        values = []
        for p in self.workers():
            try:
                values.append(p.memory_full_info().uss)
            except psutil.Error:
                pass
        return values


class PreforkRelayServer(PreforkServer):
    """prefork-esmtp with the streaming relay handler, forwarding to ``upstream`` (an smtp-sink).

    Same flags and worker count as the accept-and-discard server; only the
    handler and its ``upstream`` option differ.  The upstream's port is known
    once it has started, so the option is built at start.
    """

    handler = "prefork_esmtp.handlers.relay:Relay"

    def __init__(self, workers: int, upstream: Server) -> None:
        super().__init__(workers, key="prefork-relay", label="prefork-esmtp relay")
        self.group = "relay"
        self.upstream = upstream

    def handler_options(self) -> list[str]:
        return ["--handler-option", f"upstream={HOST}:{self.upstream.port}"]


class Notices:
    """A datagram socket a server's master reports to as it would to systemd (``NOTIFY_SOCKET``).

    The master sends ``RELOADING=1`` when a HUP starts a reload and
    ``READY=1`` when the new generation serves (with ``STATUS=... last
    reload failed: ...`` when it did not), so the benchmark knows when a
    reload is over without polling.  ``hup`` counts a reload as under way
    from the moment the signal is sent, so a ``READY=1`` can never be missed.
    """

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.reloading = False
        self.reloads = 0  # reloads over (READY=1 after a HUP)
        self.failed = 0  # of which the master said they failed
        self.durations: list[float] = []  # seconds from each HUP to its READY=1
        self.status = ""
        self.hup_at = 0.0

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> None:
        """Read every datagram waiting and follow the state they tell."""
        for _ in range(10000):  # bounded: a master sends a few per reload
            try:
                text = self.sock.recv(4096).decode(errors="replace")
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            lines = text.splitlines()
            for line in lines:
                if line.startswith("STATUS="):
                    self.status = line[len("STATUS="):]
            if "RELOADING=1" in lines:
                self.reloading = True
            if "READY=1" in lines and self.reloading:
                self.reloading = False
                self.reloads += 1
                self.durations.append(time.monotonic() - self.hup_at)
                if "last reload failed" in self.status:
                    self.failed += 1

    def hup(self, pid: int) -> None:
        """Send HUP to the master: a reload is under way from now until its ``READY=1``."""
        self.drain()
        self.reloading = True
        self.hup_at = time.monotonic()
        os.kill(pid, signal.SIGHUP)

    def wait_reloaded(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the reload under way to be over: whether none is under way."""
        deadline = time.monotonic() + seconds
        self.drain()
        while self.reloading:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([self.sock], [], [], left)
            self.drain()
        return True

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class PreforkCountingServer(PreforkServer):
    """prefork-esmtp with the benchmark's counting handler, reporting its reloads to a notify socket.

    The same flags as the accept-and-discard server (``extra`` adds
    ``--proxy-protocol`` for the one behind HAProxy).  The handler
    (``counting_handler.py``, found through ``PYTHONPATH``) records every
    message it accepts, so messages acknowledged but not taken can be
    counted; ``NOTIFY_SOCKET`` points at a :class:`Notices` socket, so the
    benchmark knows when each reload is over, as systemd would.
    """

    handler = "counting_handler:CountingHandler"

    def __init__(self, workers: int, extra: list[str] | None = None, key: str = "prefork-counting",
                 label: str = "prefork-esmtp (counting handler)") -> None:
        super().__init__(workers, extra, key=key, label=label)
        self.count_dir: Path | None = None
        self.notices: Notices | None = None

    def start(self, workdir: Path) -> None:
        self.count_dir = workdir / f"{self.key}-counts"
        self.count_dir.mkdir(exist_ok=True)
        self.notices = Notices(workdir / f"{self.key}.notify")
        super().start(workdir)

    def handler_options(self) -> list[str]:
        return ["--handler-option", f"dir={self.count_dir}"]

    def answers(self) -> bool:
        """A 220 greeting; with ``--proxy-protocol`` after a PROXY v1 header, as a load balancer sends it."""
        if "--proxy-protocol" in self.extra:
            return greets(self.port, preamble=f"PROXY TCP4 {HOST} {HOST} 1 {self.port}\r\n".encode())
        return greets(self.port)

    def environment(self, workdir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = str(self.notices.path) if self.notices else ""
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
        return env

    def recorded(self) -> int:
        """Messages the handler has taken since start, over every worker that ever ran."""
        if self.count_dir is None:
            return 0
        total = 0
        for entry in os.scandir(self.count_dir):
            try:
                total += entry.stat().st_size
            except OSError:
                pass
        return total

    def stop(self) -> None:
        super().stop()
        if self.notices is not None:
            self.notices.close()
            self.notices = None


class HAProxyServer(Server):
    """A real HAProxy in TCP mode in front of one server, sending it the PROXY protocol v2 header.

    Its own config in the work directory, run in the foreground (``-db``), so
    the pid held is HAProxy's; never the system's service or config.  What
    it runs with is :data:`HAPROXY_TUNING` (see benchmarks/README.md for the
    measurements behind it); ``tuning`` replaces it for a comparison
    (``haproxy_options.py``).  ``send_proxy=False`` forwards plain TCP, for a
    backend that cannot read the header (the smtp-sink reference).
    """

    def __init__(self, backend: Server, tuning: dict[str, list[str]] | None = None,
                 key: str = "haproxy", label: str = "", send_proxy: bool = True) -> None:
        super().__init__(key, label or ("HAProxy send-proxy-v2 → prefork-esmtp --proxy-protocol" if send_proxy
                                        else f"HAProxy (plain TCP) → {backend.label}"))
        self.backend = backend
        self.send_proxy = send_proxy
        self.tuning = HAPROXY_TUNING if tuning is None else tuning
        self.binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.workdir: Path | None = None
        if not os.path.exists(self.binary):
            self.available, self.reason = False, "haproxy not found (apt-get install haproxy)"
            return
        try:
            first = run_cmd([self.binary, "-v"]).stdout.split("\n")[0]
            self.version = first.split()[2] if len(first.split()) > 2 else first
        except Exception:  # noqa: BLE001 - version is only a label
            self.version = ""

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        super().start(workdir)

    def command(self, port: int) -> list[str]:
        assert self.workdir is not None
        config = self.workdir / f"{self.key}.cfg"
        config.write_text(haproxy_config(port, self.backend.port, self.tuning, self.send_proxy))
        return [self.binary, "-db", "-f", str(config)]


#: What the benchmark's HAProxy runs with, beyond a plain TCP front: one thread (on two cores
#: shared with the server and the client, HAProxy's default of a thread per CPU costs it about
#: a fifth more CPU per connection; measured with haproxy_options.py, see benchmarks/README.md).
#: No logging and no health checks: the first greeting through it shows the path works.
HAPROXY_TUNING: dict[str, list[str]] = {
    "global": ["nbthread 1"],
}


def haproxy_config(port: int, backend_port: int, tuning: dict[str, list[str]],
                   send_proxy: bool = True) -> str:
    """An SMTP TCP front on ``port`` to one server sending PROXY v2, with ``tuning``'s lines added.

    Timeouts as an SMTP operator sets them: the client and the server may
    each be silent for SMTP's five minutes (RFC 5321 4.5.3.2).  Without
    ``send_proxy`` the same front forwards plain TCP (no PROXY header).
    """
    def extra(section: str) -> list[str]:
        return [f"    {line}" for line in tuning.get(section, [])]
    return "\n".join([
        "global",
        "    maxconn 4096",
        *extra("global"),
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 300s",
        "    timeout server 300s",
        *extra("defaults"),
        "frontend smtp",
        f"    bind {HOST}:{port}",
        "    default_backend prefork",
        *extra("frontend"),
        "backend prefork",
        f"    server s1 {HOST}:{backend_port}" + (" send-proxy-v2" if send_proxy else ""),
        *extra("backend"),
    ]) + "\n"


class AiosmtpdServer(Server):
    """aiosmtpd's stock SMTP protocol with the ``Sink`` handler, one asyncio process."""

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
    """Postfix's ``smtp-sink`` test server: one event-driven C process."""

    def __init__(self, key: str = "smtp-sink", label: str = "Postfix smtp-sink") -> None:
        super().__init__(key, label)
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


class PythonFloorServer(Server):
    """The Python floor (``python_floor.py``): forked workers blocking in accept(), fixed replies.

    A reference, not a peer: what a Python prefork server costs per session
    with no SMTP engine at all (no parsing, handler, limits or timeouts).  It
    runs in the two 2 KB workloads only, with as many workers as
    prefork-esmtp, and the report never makes it part of a target.
    """

    def __init__(self, workers: int) -> None:
        super().__init__("python-floor", "Python floor (no SMTP engine; reference only)")
        self.n_workers = workers
        self.expected_children = workers
        self.only = frozenset({"conn", "persist"})
        self.reference = True
        self.version = "Python " + ".".join(map(str, sys.version_info[:3]))

    def command(self, port: int) -> list[str]:
        return [sys.executable, str(HERE / "python_floor.py"), HOST, str(port), str(self.n_workers)]


class HarakaServer(Server):
    """Haraka in cluster mode (a master and NODES workers) with an accept-and-discard plugin."""

    NODES = 2

    def __init__(self, enabled: bool, key: str = "haraka", label: str = "",
                 config_dir: str = "bench-config") -> None:
        super().__init__(key, label or f"Haraka ({self.NODES} nodes)")
        self.expected_children = self.NODES
        self.home = CACHE / "haraka"
        self.config = self.home / config_dir
        if not enabled:
            self.available, self.reason = False, "skipped (--no-haraka)"
            return
        self.available, self.reason = self.install()

    def install(self) -> tuple[bool, str]:
        """npm-install Haraka into the cache and create its config once: (available, reason if not)."""
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
        """Listen on the port with NODES workers, only the bench_accept plugin, warnings only."""
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


class HarakaForwardServer(HarakaServer):
    """Haraka as a relay: stock ``rcpt_to.in_host_list`` and ``queue/smtp_forward`` to ``upstream``.

    Its own config directory (``bench-relay-config``), so the accept-and-discard
    Haraka keeps its own.  smtp_forward opens a connection to the upstream for
    each message at queue time, after the whole message has arrived.
    """

    def __init__(self, enabled: bool, upstream: Server) -> None:
        super().__init__(enabled, key="haraka-forward",
                         label=f"Haraka smtp_forward ({self.NODES} nodes)",
                         config_dir="bench-relay-config")
        self.group = "relay"
        self.upstream = upstream

    def write_config(self, port: int) -> None:
        """Listen on the port with NODES workers; accept recipients at bench.example, forward upstream."""
        cfg = self.config / "config"
        (cfg / "plugins").write_text("rcpt_to.in_host_list\nqueue/smtp_forward\n")
        (cfg / "host_list").write_text("bench.example\n")  # smtp-source's -t sink@bench.example
        (cfg / "smtp_forward.ini").write_text(
            f"host={HOST}\nport={self.upstream.port}\nenable_tls=false\n")
        (cfg / "smtp.ini").write_text(f"[main]\nlisten={HOST}:{port}\nnodes={self.NODES}\n")
        (cfg / "log.ini").write_text("[main]\nlevel=warn\ntimestamps=false\nformat=default\n")
        (cfg / "me").write_text("haraka-forward.bench\n")


def ensure_aiosmtpd() -> tuple[bool, str]:
    """Make aiosmtpd importable in this Python (pip install when missing): (ok, reason if not)."""
    probe = [sys.executable, "-c", "import aiosmtpd"]
    if run_cmd(probe).returncode == 0:
        return True, ""
    log("aiosmtpd missing: pip install aiosmtpd")
    r = run_cmd([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd"], timeout=600)
    if r.returncode != 0 or run_cmd(probe).returncode != 0:
        return False, "aiosmtpd not installable: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return True, ""


def side_by_side(workers: int, wanted: set[str], haraka: bool) -> list[Server]:
    """The servers of one run, prefork-esmtp first; peers not in ``wanted`` are listed as not run.

    The Python floor comes last: a reference beside the peers, not one of them.
    """
    return [
        PreforkServer(workers),
        AiosmtpdServer() if "aiosmtpd" in wanted else
        Server("aiosmtpd", "aiosmtpd Sink", False, "not selected (--servers)"),
        SmtpSinkServer() if "smtp-sink" in wanted else
        Server("smtp-sink", "Postfix smtp-sink", False, "not selected (--servers)"),
        HarakaServer(haraka and "haraka" in wanted),
        PythonFloorServer(workers) if "python-floor" in wanted else
        Server("python-floor", "Python floor (no SMTP engine; reference only)", False,
               "not selected (--servers)", reference=True),
    ]


def relay_pair(workers: int, haraka: bool, upstream: Server) -> list[Server]:
    """The relay servers, prefork-esmtp's first, both forwarding to ``upstream`` (not started yet)."""
    return [PreforkRelayServer(workers, upstream), HarakaForwardServer(haraka, upstream)]


def start_relays(upstream: Server, relays: list[Server], workdir: Path) -> list[Server]:
    """Start the shared upstream, then the relays; without an upstream no relay runs.  The running ones."""
    if upstream.available:
        try:
            upstream.start(workdir)
            log(f"{upstream.label} on {HOST}:{upstream.port}, pid {upstream.root}")
        except RuntimeError as exc:
            upstream.available, upstream.reason = False, str(exc)
            upstream.stop()
    if not upstream.available:
        for s in relays:
            s.available, s.reason = False, f"no relay upstream ({upstream.reason})"
            log(f"{s.label}: not run ({s.reason})")
        return []
    return start_all(relays, workdir)


def start_all(servers: list[Server], workdir: Path) -> list[Server]:
    """Start every available server; a peer that fails is marked not run.  The running ones.

    prefork-esmtp (the first) failing to start ends the run with the error.
    """
    for s in servers:
        if not s.available:
            log(f"{s.label}: not run ({s.reason})")
            continue
        try:
            s.start(workdir)
            log(f"{s.label} {s.version} on {HOST}:{s.port}, pid {s.root}, "
                f"{len(s.procs)} processes")
        except RuntimeError as exc:
            if s is servers[0]:
                raise
            s.available, s.reason = False, str(exc)
            s.stop()
            log(f"{s.label}: not run ({exc})")
    return [s for s in servers if s.available]
