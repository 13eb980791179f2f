"""Helpers for the process tests (master, reload, CLI): pools, titles, the CLI, strays.

A pool server is ``start_server(..., mode=pool_mode(tmp_path, "--workers", "4"))``:
the real ``prefork-esmtp start`` without ``-X``, with a pidfile so that the
``status``/``reload``/``stop`` commands can find it.  Every process a test
learns about (workers, daemonized masters) goes to the ``strays`` fixture,
which SIGKILLs whatever is still alive at teardown, pass or fail.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import Server, server_env, wait_for

__all__ = ["pool_mode", "title", "workers_of", "pool_pids", "cli", "one_error_line", "Strays", "strays",
           "processes", "wait_gone", "wait_pool", "status_json"]


def pool_mode(tmp_path: Path, *args: str) -> tuple[str, ...]:
    """``mode`` for start_server: a pool with a pidfile at ``tmp_path / "p.pid"``."""
    return (*args, "--pidfile", str(tmp_path / "p.pid"))


def title(pid: int) -> str:
    """The process title (setproctitle rewrites /proc/<pid>/cmdline), or '' if gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def workers_of(master_pid: int) -> dict[int, str]:
    """Live worker children of a master: pid -> title (zombies excluded)."""
    out = {}
    try:
        children = psutil.Process(master_pid).children()
    except psutil.Error:
        return {}
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        text = title(child.pid)
        if text.startswith("prefork-esmtp: worker"):
            out[child.pid] = text
    return out


def pool_pids(srv: Server) -> set[int]:
    return set(workers_of(srv.proc.pid))


def wait_pool(srv: Server, count: int, timeout: float = 10.0, idle: bool = True) -> set[int]:
    """Wait until the master has exactly ``count`` workers (all idle, by title, if ``idle``)."""
    def ready() -> set[int] | None:
        pool = workers_of(srv.proc.pid)
        if len(pool) != count:
            return None
        if idle and not all(" idle" in t for t in pool.values()):
            return None
        return set(pool)
    return wait_for(ready, timeout, message=f"a pool of {count} {'idle ' if idle else ''}workers "
                    f"(now: {workers_of(srv.proc.pid)})")


def processes(pids) -> list[psutil.Process]:
    """psutil handles for ``pids`` (those still there): unlike a bare pid, a handle never
    matches another process that reuses the number later."""
    out = []
    for pid in pids:
        if isinstance(pid, psutil.Process):
            out.append(pid)
            continue
        try:
            out.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return out


def wait_gone(pids, timeout: float = 5.0) -> None:
    """Wait until none of ``pids`` (ints or psutil handles) is alive (zombies count as gone)."""
    procs = processes(pids)

    def alive(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    wait_for(lambda: not any(alive(p) for p in procs), timeout,
             message=f"processes {sorted(p.pid for p in procs if alive(p))} to exit")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run ``prefork-esmtp ARGS`` (as ``python -m prefork_esmtp``) to completion."""
    return subprocess.run([sys.executable, "-m", "prefork_esmtp", *args], capture_output=True, text=True,
                          env=server_env(env), cwd=str(cwd) if cwd else None, timeout=timeout)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Check a failed command: non-zero exit, no traceback, exactly one error line; return it."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("prefork-esmtp: error:")]
    assert len(errors) == 1, output
    return errors[0]


def status_json(pidfile: Path) -> dict:
    import json

    result = cli("status", "--json", "--pidfile", str(pidfile))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class Strays:
    """Processes to SIGKILL at teardown if still alive (workers of a killed master, daemons)."""

    def __init__(self) -> None:
        self.procs: list[psutil.Process] = []

    def add(self, *pids: int) -> None:
        self.procs.extend(processes(pids))

    def add_tree(self, pid: int) -> None:
        """A master and its current workers."""
        self.add(pid, *workers_of(pid))

    def kill(self) -> None:
        for proc in self.procs:
            try:
                if proc.is_running():  # the same process (pid and start time), not a successor
                    proc.kill()
            except psutil.Error:
                pass


@pytest.fixture
def strays() -> Iterator[Strays]:
    tracker = Strays()
    yield tracker
    tracker.kill()
