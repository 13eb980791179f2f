"""What a reload pays for: the master's import set (each fork copies its page tables, each worker's
exit unmaps them) and the benchmark's servers started the way production starts them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))  # appended: the benchmark's module names never shadow others

import procs  # noqa: E402  (benchmarks/procs.py)


def _master_modules() -> set[str]:
    """The modules a fresh interpreter holds once it has imported the CLI and the master."""
    code = "import sys, json, prefork_esmtp.cli, prefork_esmtp.master; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout))


def test_master_holds_the_option_readers():
    """New workers find handlers.options loaded (no import at each boot)."""
    modules = _master_modules()
    assert "prefork_esmtp.handlers.options" in modules
    # Only our helper: no ready-made handler is imported by the master.
    assert not {"prefork_esmtp.handlers.sink", "prefork_esmtp.handlers.maildir",
                "prefork_esmtp.handlers.relay", "prefork_esmtp.handlers.lmtp"} & modules


def test_pidfile_tells_live_from_gone():
    """A live process is alive, a reaped one is not."""
    from prefork_esmtp import pidfile

    assert pidfile.alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    assert not pidfile.alive(child.pid)


def test_benchmark_processes_start_without_dont_write_bytecode(monkeypatch):
    """The benchmark's servers get a production environment, and the handlers they import their .pyc."""
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    code = "import os, sys; print(os.environ.get('PYTHONDONTWRITEBYTECODE'), sys.dont_write_bytecode)"
    for env in (None, dict(os.environ)):
        proc = procs.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        try:
            out, _ = proc.communicate(timeout=30)
        finally:
            procs.release(proc)
        assert out.split() == [b"None", b"False"]
    cached = list((BENCHMARKS / "__pycache__").glob("counting_handler.*.pyc"))
    assert cached and cached[0].stat().st_mtime >= (BENCHMARKS / "counting_handler.py").stat().st_mtime
