"""Microbenchmark of the engine alone: Sessions over socketpair() in one process, no network.

Each session runs in the main thread (``prefork_esmtp.session.Session`` with
the base handler and the default settings, as a worker runs it); a client
thread plays a non-pipelining client (send a command, read its reply) on
the other end.  Only the server thread's CPU time is counted
(``time.thread_time``), so the client's work and the GIL hand-overs stay
out of the figures.  Three workloads:

- ``conn``: connection per message (greeting, EHLO, MAIL, RCPT, DATA with a
  2 KB message, QUIT), reported per session;
- ``persistent``: one session with 20 messages, reported per message;
- ``worker``: the ``conn`` session as a pre-forked worker serves it: the
  worker's own loop (``Worker.run``: wait, accept over loopback TCP, serve)
  with the real :class:`~prefork_esmtp.reporter.ScoreboardReporter` on a
  real scoreboard (process title included), so the work a worker does
  around each session (accept, scoreboard, title, connection set-up) shows
  in the figures next to ``conn``'s.

With ``--proxy`` the server has ``proxy_protocol`` on and every session
starts with the PROXY v2 header HAProxy's ``send-proxy-v2`` sends (TCP4,
no TLVs), so what the header costs is the difference from a run without.

Reported: µs of server CPU (median of ``--rounds`` rounds, and the spread),
Python function calls per session/message (``sys.setprofile``: Python-level
calls, and calls into C), and with ``--strace`` the server thread's system
calls per session/message (needs strace; ``futex`` there is the GIL handed
between the two threads, not the engine's).

    .venv/bin/python benchmarks/engine_micro.py                 # ~20 s
    .venv/bin/python benchmarks/engine_micro.py --strace        # + syscalls per session
    .venv/bin/python benchmarks/engine_micro.py --proxy         # behind a PROXY v2 header
    .venv/bin/python benchmarks/engine_micro.py --workloads worker --strace
    .venv/bin/python benchmarks/engine_micro.py --scripted      # + the engine over a scripted socket

With ``--scripted`` the conn and persistent sessions also run over a scripted
socket (one client write per read, nothing sent anywhere): no system call, no
second thread, so the figure is the engine's Python work alone, steadier than
the socketpair figure on a shared machine.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import queue
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefork_esmtp import ESMTPHandler  # noqa: E402
from prefork_esmtp.connection import listener_read_timeout  # noqa: E402
from prefork_esmtp.listeners import lower_read_timeout  # noqa: E402
from prefork_esmtp.reporter import ScoreboardReporter  # noqa: E402
from prefork_esmtp.scoreboard import Scoreboard  # noqa: E402
from prefork_esmtp.session import Session  # noqa: E402
from prefork_esmtp.settings import resolve  # noqa: E402
from prefork_esmtp.worker import Worker  # noqa: E402

PEER = ("192.0.2.1", 40000)
MESSAGES_PER_SESSION = 20


def make_message(size: int = 2048) -> bytes:
    """A plausible 2 KB message: a dozen headers, then body lines of 70 octets, CRLF line ends."""
    headers = (
        b"Received: from client.example (client.example [192.0.2.1])\r\n\tby mx.bench.example with ESMTP\r\n"
        b"From: Sender <sender@example.org>\r\n"
        b"To: Recipient <recipient@bench.example>\r\n"
        b"Subject: microbenchmark message\r\n"
        b"Date: Tue, 25 Nov 2025 12:00:00 +0000\r\n"
        b"Message-ID: <0123456789.abcdef@example.org>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"\r\n"
    )
    body = bytearray()
    line = b"x" * 68 + b"\r\n"
    while len(headers) + len(body) + len(line) <= size:
        body += line
    return headers + bytes(body)


MESSAGE = make_message()

#: What HAProxy's send-proxy-v2 sends first: signature, PROXY over TCP4, the two addresses and ports.
PROXY_V2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + (12).to_bytes(2, "big")
            + socket.inet_aton(PEER[0]) + socket.inet_aton("198.51.100.1")
            + PEER[1].to_bytes(2, "big") + (25).to_bytes(2, "big"))
#: Sent before the greeting is read: empty, or PROXY_V2 with --proxy.
PREAMBLE = [b""]


def _reply(sock: socket.socket, buf: bytearray) -> bytes:
    """Read one whole reply (up to its last line, ``code SP``) from ``sock``; return its first line."""
    while True:
        end = buf.find(b"\r\n")
        while end >= 0:
            line = bytes(buf[:end])
            del buf[:end + 2]
            if len(line) < 4 or line[3:4] != b"-":
                return line
            end = buf.find(b"\r\n")
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed early")
        buf += data


def client(sock: socket.socket, messages: int) -> None:
    """A non-pipelining client: EHLO, ``messages`` × (MAIL, RCPT, DATA, message), QUIT."""
    buf = bytearray()
    if PREAMBLE[0]:
        sock.sendall(PREAMBLE[0])
    if _reply(sock, buf)[:3] != b"220":
        raise RuntimeError("no greeting")
    sock.sendall(b"EHLO client.example\r\n")
    if _reply(sock, buf)[:3] != b"250":
        raise RuntimeError("EHLO refused")
    for _ in range(messages):
        for command, code in ((b"MAIL FROM:<sender@example.org>\r\n", b"250"),
                              (b"RCPT TO:<recipient@bench.example>\r\n", b"250"),
                              (b"DATA\r\n", b"354"),
                              (MESSAGE + b".\r\n", b"250")):
            sock.sendall(command)
            line = _reply(sock, buf)
            if line[:3] != code:
                raise RuntimeError(f"unexpected reply {line!r}")
    sock.sendall(b"QUIT\r\n")
    if _reply(sock, buf)[:3] != b"221":
        raise RuntimeError("no 221")
    sock.close()


def _client_loop(jobs: "queue.Queue[tuple[socket.socket | tuple[str, int], int] | None]",
                 errors: list[BaseException]) -> None:
    """Play each job's client: on a connected socket, or (an address) on a new TCP connection to it."""
    while (job := jobs.get()) is not None:
        target, messages = job
        sock = None
        try:
            sock = target if isinstance(target, socket.socket) else socket.create_connection(target)
            client(sock, messages)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            if sock is not None:
                sock.close()


class Bench:
    """Runs sessions in this thread against a client thread; counts server CPU only."""

    def __init__(self) -> None:
        settings = {"hostname": "mx.bench.example"}
        if PREAMBLE[0]:
            settings["proxy_protocol"] = True
        self.config = resolve({}, settings, source="bench")
        self.jobs: queue.Queue = queue.Queue()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=_client_loop, args=(self.jobs, self.errors), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(10)
        if self.worker is not None:
            self.worker.listeners[0].close()
            self.board.close()

    worker: Worker | None = None

    def _worker(self) -> Worker:
        """A worker as a pre-forked one is (scoreboard reporter, a loopback listener), made once."""
        if self.worker is None:
            listener = socket.create_server(("127.0.0.1", 0), backlog=128)
            listener.setblocking(False)
            lower_read_timeout(listener, listener_read_timeout(self.config))  # as the master sets its listeners
            self.board = Scoreboard(4)
            reporter = ScoreboardReporter(self.board, 0, 1, os.getppid(), idle_expect=math.inf,
                                          busy_expect=self.config.timeout)
            self.worker = Worker([listener], ESMTPHandler, self.config, reporter=reporter, idle_tick=None)
        return self.worker

    def worker_sessions(self, sessions: int, around: Callable[[Callable[[], None]], None] | None = None) -> float:
        """``sessions`` connection-per-message sessions through the worker's loop; its thread's CPU seconds."""
        worker = self._worker()
        address = worker.listeners[0].getsockname()
        for _ in range(sessions):
            self.jobs.put((address, 1))
        worker.max_sessions = worker.served + sessions  # Worker.run returns after the last of them
        start = time.thread_time()
        if around is None:
            worker.run()
        else:
            around(worker.run)
        spent = time.thread_time() - start
        if self.errors:
            raise self.errors[0]
        return spent

    def session(self, messages: int, around: Callable[[Callable[[], None]], None] | None = None) -> float:
        """One session with ``messages`` messages; returns the server thread's CPU seconds for it."""
        ours, theirs = socket.socketpair()
        self.jobs.put((theirs, messages))
        start = time.thread_time()
        session = Session(ours, PEER, ESMTPHandler, self.config)
        if around is None:
            session.run()
        else:
            around(session.run)
        spent = time.thread_time() - start
        if self.errors:
            raise self.errors[0]
        return spent

    def rounds(self, messages: int, sessions: int, rounds: int, worker: bool = False) -> list[float]:
        """µs of server CPU per session (per message when ``messages`` > 1), one figure per round."""
        result = []
        for _ in range(rounds):
            if worker:
                total = self.worker_sessions(sessions)
            else:
                total = sum(self.session(messages) for _ in range(sessions))
            result.append(total / sessions / messages * 1e6)
        return result

    def calls(self, messages: int, sessions: int, worker: bool = False) -> tuple[float, float]:
        """Python-level calls and calls into C per session (per message when ``messages`` > 1)."""
        counts = collections.Counter()

        def profile(frame, event, arg):  # noqa: ANN001
            counts[event] += 1

        def around(run: Callable[[], None]) -> None:
            sys.setprofile(profile)
            try:
                run()
            finally:
                sys.setprofile(None)

        if worker:
            self.worker_sessions(sessions, around)
        else:
            for _ in range(sessions):
                self.session(messages, around)
        per = sessions * messages
        return counts["call"] / per, counts["c_call"] / per


WORKLOADS = {"conn": 1, "persistent": MESSAGES_PER_SESSION, "worker": 1}


class ScriptedSocket:
    """A socket stand-in that hands out one scripted piece per ``recv`` (then EOF) and keeps what is sent.

    Here the pieces are the client's writes of :func:`client` (which waits for
    each reply, so each write comes in a read of its own); with it a session
    does all of its Python work and no system call, and its CPU time is the
    engine's alone, without the kernel's noise.  The tests build on it
    (``_take`` and ``_keep`` are theirs to extend).
    """

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(reversed(pieces))
        self.sent: list[bytes] = []

    def _take(self) -> bytes:
        """The next scripted piece (there is one)."""
        return self.pieces.pop()

    def _keep(self, data: bytes) -> None:
        self.sent.append(bytes(data))  # the same object for bytes; a copy of a memoryview

    def recv(self, size: int, flags: int = 0) -> bytes:
        if not self.pieces:
            return b""
        if flags & socket.MSG_PEEK:
            return self.pieces[-1][:size]
        data = self._take()
        if len(data) > size:  # the rest comes with the next read
            data, rest = data[:size], data[size:]
            self.pieces.append(rest)
        return data

    def send(self, data: bytes, flags: int = 0) -> int:
        self._keep(data)
        return len(data)

    def sendall(self, data: bytes) -> None:
        self._keep(data)

    def gettimeout(self) -> None:
        return None

    def getsockname(self) -> tuple[str, int]:
        return ("192.0.2.25", 25)

    def setblocking(self, flag: bool) -> None: ...
    def settimeout(self, seconds: float | None) -> None: ...
    def setsockopt(self, *args: object) -> None: ...
    def shutdown(self, how: int) -> None: ...
    def close(self) -> None: ...

    def fileno(self) -> int:
        return -1


def client_writes(messages: int) -> list[bytes]:
    """What :func:`client` sends, one item per write."""
    writes = [b"EHLO client.example\r\n"]
    for _ in range(messages):
        writes += [b"MAIL FROM:<sender@example.org>\r\n", b"RCPT TO:<recipient@bench.example>\r\n",
                   b"DATA\r\n", MESSAGE + b".\r\n"]
    return writes + [b"QUIT\r\n"]


def scripted(config, messages: int, sessions: int, rounds: int) -> list[float]:  # noqa: ANN001
    """µs of CPU per session (per message when ``messages`` > 1) over :class:`ScriptedSocket`, per round."""
    writes = ([PREAMBLE[0]] if PREAMBLE[0] else []) + client_writes(messages)
    result = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(sessions):
            sock = ScriptedSocket(writes)
            Session(sock, PEER, ESMTPHandler, config).run()
        result.append((time.thread_time() - start) / sessions / messages * 1e6)
        if not sock.sent[-1].startswith(b"221 "):
            raise RuntimeError(f"scripted session did not end with 221: {sock.sent[-3:]!r}")
    return result


def syscalls(workload: str, sessions: int) -> tuple[float, dict[str, float]] | None:
    """System calls of the server thread per session (per message), by running this script under strace."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trace"
        proc = subprocess.run([strace, "-f", "-qq", "-o", str(out), sys.executable, __file__,
                               "--traced", workload, "--sessions", str(sessions)]
                              + (["--proxy"] if PREAMBLE[0] else []),
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"traced run failed: {proc.stderr}")
        tid = proc.stdout.split()[-1]
        counting = False
        names: collections.Counter = collections.Counter()
        for line in out.read_text().splitlines():
            pid, _, call = line.partition(" ")
            if pid != tid:
                continue
            call = call.lstrip()
            if call.startswith('write(-1, "start"'):
                counting = True
                continue
            if call.startswith('write(-1, "stop"'):
                break
            if counting:
                m = re.match(r"(\w+)\(", call)
                if m:
                    names[m.group(1)] += 1
    per = sessions * WORKLOADS[workload]
    engine = sum(n for name, n in names.items() if name != "futex")  # futex: the GIL, the benchmark's two threads
    return engine / per, {name: n / per for name, n in names.most_common()}


def traced(workload: str, sessions: int) -> None:
    """The run strace watches: warm up, make every socket pair and queue every client job first,
    then mark the window with failing writes on fd -1, so the window holds the sessions' own calls."""
    bench = Bench()
    messages = WORKLOADS[workload]
    if workload == "worker":
        bench.worker_sessions(3)
        try:
            os.write(-1, b"start")
        except OSError:
            pass
        bench.worker_sessions(sessions)  # the clients connect from their own thread, not counted
        try:
            os.write(-1, b"stop")
        except OSError:
            pass
        bench.close()
        print(threading.get_native_id())
        return
    for _ in range(3):
        bench.session(messages)
    pairs = [socket.socketpair() for _ in range(sessions)]
    for _, theirs in pairs:
        bench.jobs.put((theirs, messages))
    try:
        os.write(-1, b"start")
    except OSError:
        pass
    for ours, _ in pairs:
        Session(ours, PEER, ESMTPHandler, bench.config).run()
    try:
        os.write(-1, b"stop")
    except OSError:
        pass
    bench.close()
    if bench.errors:
        raise bench.errors[0]
    print(threading.get_native_id())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000, help="connection-per-message sessions per round")
    parser.add_argument("--persistent-sessions", type=int, default=50,
                        help=f"persistent sessions ({MESSAGES_PER_SESSION} messages each) per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--strace", action="store_true", help="also count system calls (needs strace)")
    parser.add_argument("--scripted", action="store_true",
                        help="also time the engine over a scripted socket (Python work only, no system calls)")
    parser.add_argument("--proxy", action="store_true",
                        help="proxy_protocol on; each session starts with a PROXY v2 header")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated, of: " + ", ".join(WORKLOADS) + " (default: all)")
    parser.add_argument("--traced", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    wanted = [w for w in args.workloads.split(",") if w]
    unknown = set(wanted) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    if args.proxy:
        PREAMBLE[0] = PROXY_V2
    if args.traced:
        traced(args.traced, args.sessions)
        return

    bench = Bench()
    try:
        for _ in range(50):  # warm up: imports, caches, first-use allocations
            bench.session(1)
        if "worker" in wanted:
            bench.worker_sessions(50)
        rows = []
        for workload, sessions, unit in (("conn", args.sessions, "session"),
                                         ("persistent", args.persistent_sessions, "message"),
                                         ("worker", args.sessions, "session")):
            if workload not in wanted:
                continue
            messages = WORKLOADS[workload]
            worker = workload == "worker"
            figures = bench.rounds(messages, sessions, args.rounds, worker)
            py_calls, c_calls = bench.calls(messages, max(1, sessions // 10), worker)
            rows.append((workload, unit, figures, py_calls, c_calls))
    finally:
        bench.close()

    print(f"engine microbenchmark{' behind a PROXY v2 header' if args.proxy else ''}: "
          f"Python {sys.version.split()[0]}, {args.rounds} rounds "
          f"({args.sessions} connection-per-message sessions, {args.persistent_sessions} persistent "
          f"sessions of {MESSAGES_PER_SESSION} messages), server thread CPU only")
    print(f"{'workload':<12} {'per':<8} {'µs median':>10} {'min..max':>16} {'py calls':>9} {'C calls':>8}")
    # On a shared machine the minimum is the steadier figure; the calls are exact.
    for workload, unit, figures, py_calls, c_calls in rows:
        spread = f"{min(figures):.1f}..{max(figures):.1f}"
        print(f"{workload:<12} {unit:<8} {statistics.median(figures):>10.1f} {spread:>16} "
              f"{py_calls:>9.1f} {c_calls:>8.1f}")
    if args.scripted:
        for _ in range(50):
            scripted(bench.config, 1, 1, 1)
        for workload, sessions, unit in (("conn", args.sessions, "session"),
                                         ("persistent", args.persistent_sessions, "message")):
            figures = scripted(bench.config, WORKLOADS[workload], sessions, args.rounds)
            print(f"scripted socket, {workload} per {unit}: {statistics.median(figures):.1f} µs median "
                  f"({min(figures):.1f}..{max(figures):.1f}), no system calls")
    if args.strace:
        for workload, sessions in (("conn", 200), ("persistent", 10), ("worker", 200)):
            if workload not in wanted:
                continue
            result = syscalls(workload, sessions)
            if result is None:
                print("strace not found: no system call counts")
                break
            total, names = result
            detail = ", ".join(f"{name} {n:.1f}" for name, n in names.items() if n >= 0.05)
            print(f"syscalls per {'message' if workload == 'persistent' else 'session'} ({workload}): "
                  f"{total:.1f} without futex  ({detail})")


if __name__ == "__main__":
    main()
