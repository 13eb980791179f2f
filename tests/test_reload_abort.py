"""Reloads that cannot complete, with real processes: no session is cut and nothing loops.

An aborted reload (a new worker fails to boot) leaves the new workers that
already serve a session alone: they finish it, then exit, like retiring old
workers.  A handler import that hangs is a boot failure too: the stuck-worker
killer ends it after ``worker_timeout``, the reload is aborted with a reason
(with ``--preload`` the master's own import is interrupted), a first start
fails with that reason, and workers that keep hanging at import are not
retried every ``worker_timeout`` but paused with a growing back-off.

The handler module below misbehaves at import time on request, driven by
files next to it that the test creates after the first generation has booted
(the workers import the module themselves: no ``--preload``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from conftest import ROOT, TESTS, Client, server_env, wait_for
from master_support import (cli, one_error_line, pool_mode, processes, status_json, wait_gone, wait_pool,
                            workers_of)

WORKER_TIMEOUT = 2.0

HANDLER = '''
"""Imported by every worker; its import misbehaves when a flag file exists next to it."""
import os
import time
from pathlib import Path

from recorder import Recorder

HERE = Path(__file__).resolve().parent

if (HERE / "hang").exists():
    # A hanging import: note the attempt, then wait far longer than worker_timeout.
    with open(HERE / "hung.txt", "a") as attempts:
        attempts.write(f"{os.getpid()}\\n")
    time.sleep(60)



def fail_on_go():
    """Wait (bounded) until the test creates "go", then fail the import."""
    deadline = time.monotonic() + 20
    while not (HERE / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    raise ImportError("made to fail")


if (HERE / "one-boots").exists():
    # The first worker to get here boots; every other one fails on "go".
    try:
        os.close(os.open(HERE / "token", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        fail_on_go()

if (HERE / "none-boots").exists():
    fail_on_go()  # every worker fails, all at the same moment


class Handler(Recorder):
    def NOOP(self):
        self._record("NOOP")
        return 250, f"2.0.0 pid {os.getpid()}"
'''


def handler_env(tmp_path: Path) -> dict[str, str]:
    """The misbehaving handler module in ``tmp_path``, importable by the server."""
    (tmp_path / "abortable.py").write_text(HANDLER)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS), str(ROOT)]),
            "PYTHONDONTWRITEBYTECODE": "1"}


def start_pool(start_server, tmp_path: Path, *args: str, workers: int = 2):
    """A pool importing the misbehaving handler, with a pidfile and a log file."""
    env = handler_env(tmp_path)
    srv = start_server(*args, handler="abortable:Handler", env=env, log_file=tmp_path / "master.log",
                       mode=pool_mode(tmp_path, "--workers", str(workers)))
    return srv, wait_pool(srv, workers)


def reload_in_background(tmp_path: Path) -> subprocess.Popen:
    """``prefork-esmtp reload`` (it waits for the outcome) without blocking the test."""
    return subprocess.Popen([sys.executable, "-m", "prefork_esmtp", "reload", "--pidfile", str(tmp_path / "p.pid")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env())


def finished(proc: subprocess.Popen, timeout: float = 30.0) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def served_by(client: Client) -> int:
    """The pid of the worker serving this session (the handler names it in its NOOP reply)."""
    code, lines = client.cmd("NOOP")
    assert code == 250, (code, lines)
    return int(lines[0].rsplit(" ", 1)[1])


def send_message(client: Client, recipient: str) -> None:
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert client.cmd(f"RCPT TO:<{recipient}>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    code, lines = client.cmd(b"Subject: test\r\n\r\nbody\r\n.")
    assert code == 250, (code, lines)


def delivered_by(srv, recipient: str) -> set[int]:
    return {r["pid"] for r in srv.records() if r["hook"] == "EOM" and r["recipients"] == [recipient]}


def attempts(tmp_path: Path) -> int:
    """How many workers have started the hanging import so far."""
    try:
        return len((tmp_path / "hung.txt").read_text().split())
    except FileNotFoundError:
        return 0


def test_aborted_reload_lets_new_workers_finish_their_sessions(start_server, client_for, tmp_path):
    srv, old_pool = start_pool(start_server, tmp_path)
    # Both old workers busy with a session each: the next client can only go to a new worker.
    held = [client_for(srv), client_for(srv)]
    assert {served_by(c) for c in held} == old_pool

    (tmp_path / "one-boots").touch()
    reload = reload_in_background(tmp_path)
    try:
        new_worker = wait_for(lambda: next((pid for pid, t in workers_of(srv.proc.pid).items()
                                            if "[gen 2] idle" in t), None), 15,
                              message="the first worker of generation 2 to boot")
        client = client_for(srv)
        assert served_by(client) == new_worker
        assert client.cmd("EHLO client.example")[0] == 250
        assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250  # a transaction in progress
        assert reload.poll() is None  # the other new worker is still booting: no outcome yet

        (tmp_path / "go").touch()  # ... now it fails to boot: the reload is aborted
        line = one_error_line(finished(reload))
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.communicate()
    assert "reload failed, the old generation keeps serving" in line, line
    assert "ImportError: made to fail" in line, line

    # The session on the new worker goes on: the transaction completes, and QUIT ends it.
    assert client.cmd("RCPT TO:<new@example.org>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    assert client.cmd(b"Subject: test\r\n\r\nbody\r\n.")[0] == 250
    assert client.cmd("QUIT")[0] == 221
    assert client.closed()
    assert delivered_by(srv, "new@example.org") == {new_worker}
    wait_gone([new_worker])  # told to retire: it exits once its session has ended

    # The old generation keeps serving, the held sessions and new clients alike.
    for c in held:
        send_message(c, "held@example.org")
        assert c.cmd("QUIT")[0] == 221
    later = client_for(srv)
    assert served_by(later) in old_pool
    send_message(later, "later@example.org")
    assert later.cmd("QUIT")[0] == 221
    assert delivered_by(srv, "held@example.org") == old_pool
    assert wait_pool(srv, 2) == old_pool
    status = status_json(tmp_path / "p.pid")
    assert status["master"]["generation"] == 1
    assert "ImportError: made to fail" in status["master"]["last_reload_error"]
    log = srv.log()
    assert "reload failed, generation 1 keeps serving" in log
    assert "no new workers" not in log  # the aborted reload's failures are no respawn failures


def test_new_workers_failing_together_abort_the_reload_once(start_server, tmp_path):
    """Every new worker fails at once: one abort, and the others' failures pause nothing."""
    srv, old_pool = start_pool(start_server, tmp_path, workers=4)
    (tmp_path / "none-boots").touch()
    reload = reload_in_background(tmp_path)
    try:
        def booting() -> list[psutil.Process] | None:
            found = [pid for pid, t in workers_of(srv.proc.pid).items() if "[gen 2] starting" in t]
            return processes(found) if len(found) == 4 else None

        new = wait_for(booting, 15, message="four workers of generation 2 booting")
        # The master is held still while they all fail, so that it reaps every failure in one
        # turn: the first aborts the reload, the others belong to an aborted generation.
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            (tmp_path / "go").touch()
            wait_for(lambda: all(p.status() == psutil.STATUS_ZOMBIE for p in new), 15,
                     message="the new workers to fail")
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        line = one_error_line(finished(reload))
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.communicate()
    assert "ImportError: made to fail" in line, line
    assert wait_pool(srv, 4) == old_pool
    log = srv.log()
    assert log.count("reload failed") == 1, log
    assert "could not boot" not in log and "no new workers" not in log, log


def test_reload_whose_handler_import_hangs_is_aborted_once(start_server, client_for, tmp_path):
    srv, old_pool = start_pool(start_server, tmp_path, "--worker-timeout", str(WORKER_TIMEOUT))
    (tmp_path / "hang").touch()
    started = time.monotonic()
    line = one_error_line(finished(reload_in_background(tmp_path), 15))
    assert "reload failed, the old generation keeps serving" in line, line
    assert f"the handler import did not finish within {WORKER_TIMEOUT:.0f}s" in line, line
    # killed by the stuck-worker killer: after worker_timeout, well before its 60 s sleep
    assert WORKER_TIMEOUT <= time.monotonic() - started < 15
    tried = attempts(tmp_path)
    assert 1 <= tried <= 2  # the workers of the new generation, once each

    # Observe for three worker timeouts: a retry loop would start and kill new workers again.
    window_end = time.monotonic() + 3 * WORKER_TIMEOUT
    while time.monotonic() < window_end:
        assert attempts(tmp_path) == tried, srv.log()
        time.sleep(0.1)
    log = srv.log()
    assert log.count("is stuck") == 1, log  # the abort killed the other one: no second report
    assert log.count("reload failed") == 1, log
    assert "no new workers" not in log, log  # nothing is paused: the old generation is complete

    # The old generation serves throughout.
    client = client_for(srv)
    assert served_by(client) in old_pool
    send_message(client, "b@example.org")
    assert client.cmd("QUIT")[0] == 221
    assert wait_pool(srv, 2) == old_pool
    assert status_json(tmp_path / "p.pid")["master"]["generation"] == 1

    # Once the import is fixed, the next reload goes through.
    (tmp_path / "hang").unlink()
    result = finished(reload_in_background(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not wait_pool(srv, 2) & old_pool


def test_preloaded_reload_whose_import_hangs_is_aborted(start_server, client_for, tmp_path):
    """With --preload the master imports the new handler itself: that import gets worker_timeout too."""
    srv, old_pool = start_pool(start_server, tmp_path, "--preload", "--worker-timeout", str(WORKER_TIMEOUT))
    (tmp_path / "hang").touch()
    started = time.monotonic()
    line = one_error_line(finished(reload_in_background(tmp_path), 15))
    assert "reload failed, the old generation keeps serving" in line, line
    assert f"import did not finish within {WORKER_TIMEOUT:.0f}s" in line, line
    assert WORKER_TIMEOUT <= time.monotonic() - started < 15
    assert attempts(tmp_path) == 1  # once, in the master

    client = client_for(srv)  # the old generation serves, and the master still answers
    assert served_by(client) in old_pool
    send_message(client, "d@example.org")
    assert client.cmd("QUIT")[0] == 221
    assert status_json(tmp_path / "p.pid")["master"]["generation"] == 1
    (tmp_path / "hang").unlink()
    result = finished(reload_in_background(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not wait_pool(srv, 2) & old_pool


def test_respawned_worker_whose_import_hangs_backs_off(start_server, client_for, tmp_path):
    """Without a reload: a replacement worker imports the file as it is now, and that import hangs."""
    srv, pool = start_pool(start_server, tmp_path, "--worker-timeout", str(WORKER_TIMEOUT))
    (tmp_path / "hang").touch()
    os.kill(min(pool), signal.SIGKILL)
    wait_for(lambda: "no new workers for 2s" in srv.log(), 15, message="the first back-off")
    assert attempts(tmp_path) == 1
    # After the pause one more attempt, killed in its turn, and a longer pause: not a retry
    # every worker_timeout.
    wait_for(lambda: "no new workers for 4s" in srv.log(), 15, message="the second, longer back-off")
    assert attempts(tmp_path) == 2, srv.log()
    assert srv.log().count("could not boot: the handler import did not finish within 2s") == 2

    # The surviving worker serves throughout.
    client = client_for(srv)
    assert served_by(client) == max(pool)
    send_message(client, "c@example.org")
    assert client.cmd("QUIT")[0] == 221

    # The operator fixes the handler and reloads: a full pool at once.
    (tmp_path / "hang").unlink()
    result = finished(reload_in_background(tmp_path))
    assert result.returncode == 0, result.stderr
    wait_pool(srv, 2)


def test_start_whose_handler_import_hangs_fails_with_the_reason(tmp_path):
    """On first start a hanging import is a boot failure like a broken one: one line, exit 1."""
    env = handler_env(tmp_path)
    (tmp_path / "hang").touch()
    started = time.monotonic()
    result = cli("start", "--workers", "2", "--listen", "127.0.0.1:0", "--handler", "abortable:Handler",
                 "--worker-timeout", "1", env=env, cwd=tmp_path, timeout=20)
    line = one_error_line(result)
    assert "the handler import did not finish within 1s" in line, line
    assert time.monotonic() - started < 15
    assert 1 <= attempts(tmp_path) <= 2  # the first workers, once each: no retry


def test_stop_during_a_preloaded_reload_whose_import_hangs_is_not_delayed(start_server, tmp_path):
    """TERM while the master's own reload import hangs: the import is given up at once and the
    stop goes on, instead of waiting for worker_timeout first (here 20 s) and only then stopping."""
    srv, pool = start_pool(start_server, tmp_path, "--preload", "--worker-timeout", "20",
                           "--graceful-timeout", "2")
    (tmp_path / "hang").touch()
    srv.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: attempts(tmp_path) == 1, 10, message="the master to start the hanging import")
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        srv.proc.wait(15)
    except subprocess.TimeoutExpired:
        pass
    took = time.monotonic() - started
    assert srv.proc.returncode == 0, (srv.proc.returncode, srv.log())
    assert took < 8, f"the stop waited {took:.1f}s behind the hanging import"
    wait_gone(processes(pool), 5)
    log = srv.log()
    assert "reload failed" in log and "interrupted by a stop" in log, log
