"""Processes the benchmark starts, and the loopback helpers every part of it uses.

Every process started through ``spawn`` runs in its own session (so a Ctrl-C
at the terminal reaches only the benchmark) and is registered, so that
``end_all`` can stop whatever is left when the run ends, by pid: SIGTERM or
SIGINT first, then SIGKILL of the process and every descendant still alive.
Only 127.0.0.1 is used.

Servers get the environment a production server has: no
``PYTHONDONTWRITEBYTECODE`` (with it, each worker that imports its handler
would compile the module from source at every boot), and the benchmark's own
modules (the handlers its servers load) and the package are byte-compiled
before the first process starts.
"""

from __future__ import annotations

import compileall
import os
import signal
import socket
import subprocess
import time
from typing import Any

import psutil

HOST = "127.0.0.1"
#: Variables a production server does not run with: left out of every started process's environment.
NOT_IN_PRODUCTION = ("PYTHONDONTWRITEBYTECODE",)


def log(msg: str) -> None:
    """One progress line on standard output, with the time of day."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(cmd: list[str], timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
    """Run a short helper command (a version probe, an installer) and capture its text output."""
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# -- processes we start: all of them are registered and ended at exit ---------------------

STARTED: list[subprocess.Popen] = []


_compiled: list[bool] = []


def byte_compile() -> None:
    """Write the .pyc files of benchmarks/ (the handlers the servers import) and of the package, once.

    A production handler has its .pyc; without one, every worker boot (and
    every reload's new generation) compiles the handler module from source.
    """
    if _compiled:
        return
    _compiled.append(True)
    import prefork_esmtp

    for directory in (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(prefork_esmtp.__file__)):
        compileall.compile_dir(directory, quiet=1)


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen:
    """Start a process in its own session (so Ctrl-C reaches only us) and register it.

    Its environment (``env``, else ours) leaves out :data:`NOT_IN_PRODUCTION`;
    the .pyc files are written before the first start (:func:`byte_compile`).
    """
    kw.setdefault("stdin", subprocess.DEVNULL)
    env = kw.get("env")
    kw["env"] = {k: v for k, v in (os.environ if env is None else env).items() if k not in NOT_IN_PRODUCTION}
    byte_compile()
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    STARTED.append(proc)
    return proc


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (empty when it is gone)."""
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
    release(proc)


def release(proc: subprocess.Popen) -> None:
    """Stop tracking a registered process that has ended by itself."""
    if proc in STARTED:
        STARTED.remove(proc)


def end_all() -> None:
    """End every registered process still running, newest first."""
    for proc in list(reversed(STARTED)):
        end_process(proc, grace=3.0)


def on_signal(signum: int, frame: Any) -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into KeyboardInterrupt, so the run's clean-up code ends everything."""
    raise KeyboardInterrupt(f"signal {signum}")


# -- loopback -----------------------------------------------------------------------------

def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def greets(port: int, timeout: float = 2.0, preamble: bytes = b"") -> bool:
    """Whether a connection to the port gets a 220 greeting (then QUIT politely).

    ``preamble`` is sent first (a PROXY protocol header for a server that expects one).
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            if preamble:
                s.sendall(preamble)
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

