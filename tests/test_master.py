"""The prefork master with real processes: pool, titles, signals, recycling, orphans, privileges.

Every server here is the real ``prefork-esmtp start`` (no ``-X``) with the
recording handler; pool sizes are read from the master's children and their
process titles (setproctitle), each wait bounded by a deadline.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import stat
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from conftest import launch, server_env, wait_for
from master_support import pool_mode, pool_pids, processes, strays, title, wait_gone, wait_pool, workers_of  # noqa: F401


def smtp_noop(srv) -> int:
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        return smtp.noop()[0]


def session_pids(srv) -> list[int]:
    """The worker pid of each session, in the order the sessions connected."""
    return [r["pid"] for r in srv.records() if r["hook"] == "CONNECT"]


# -- pool and titles -----------------------------------------------------------------------------

def test_pool_has_the_configured_workers_and_titles_show_state(start_server, client_for, tmp_path):
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "4"))
    pids = wait_pool(srv, 4)
    master = title(srv.proc.pid)
    assert master.startswith("prefork-esmtp: master"), master
    assert f"127.0.0.1:{srv.port}" in master
    for pid in pids:
        assert re.fullmatch(r"prefork-esmtp: worker .*\bidle\b.*\b0 sessions", title(pid)), title(pid)
        assert psutil.Process(pid).ppid() == srv.proc.pid

    client = client_for(srv)  # greeting read: a worker has accepted
    peer = f"127.0.0.1:{client.sock.getsockname()[1]}"
    busy = wait_for(lambda: [p for p, t in workers_of(srv.proc.pid).items() if "busy" in t and peer in t],
                    5, message=f"a worker titled busy with {peer}")
    assert len(busy) == 1
    assert client.cmd("QUIT")[0] == 221
    assert client.closed()
    wait_for(lambda: re.search(r"\bidle\b.*\b1 sessions", title(busy[0])), 5,
             message="the worker's title to show idle, 1 session served")
    assert pool_pids(srv) == pids  # serving a session changed nobody


def test_worker_killed_with_sigkill_is_replaced(start_server, tmp_path):
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "4"))
    before = wait_pool(srv, 4)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # Until the kernel has torn it down, the victim still reads as a live worker: a pool of 4
    # counted at once may be the old one.
    wait_for(lambda: victim not in workers_of(srv.proc.pid), 10, message="the killed worker gone")
    after = wait_pool(srv, 4)
    assert victim not in after
    assert len(after - before) == 1
    wait_for(lambda: re.search(rf"worker {victim} .*signal 9", srv.log()), 5,
             message="the master to log the killed worker")
    assert smtp_noop(srv) == 250


def test_ttin_adds_and_ttou_removes_a_worker_never_below_one(start_server, tmp_path):
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "2"))
    wait_pool(srv, 2)
    for expected in (3, 4):
        os.kill(srv.proc.pid, signal.SIGTTIN)
        wait_pool(srv, expected)
    for expected in (3, 2, 1):
        os.kill(srv.proc.pid, signal.SIGTTOU)
        wait_pool(srv, expected)
    os.kill(srv.proc.pid, signal.SIGTTOU)
    wait_for(lambda: srv.log().count("TTOU: workers now 1") == 2, 5, message="the second TTOU at one worker")
    assert len(wait_pool(srv, 1)) == 1
    assert smtp_noop(srv) == 250


def test_worker_recycles_after_max_connections_per_child(start_server, client_for, tmp_path):
    srv = start_server("--max-connections-per-child", "10",
                       mode=pool_mode(tmp_path, "--workers", "1"))
    wait_pool(srv, 1)
    for _ in range(12):  # 10 sessions plus at most 10% jitter: the 12th is a new worker's
        client = client_for(srv)
        assert client.cmd("QUIT")[0] == 221
        assert client.closed()
        client.close()
    pids = session_pids(srv)
    assert len(pids) == 12
    first = pids[0]
    served = next(i for i, pid in enumerate(pids) if pid != first)
    assert 10 <= served <= 11, pids
    assert all(pid == first for pid in pids[:served])
    assert first not in pool_pids(srv)
    assert f"served {served} sessions; recycling" in srv.log()
    assert "replacing it" not in srv.log()  # a recycled worker is not reported as a crash


# -- no orphans ----------------------------------------------------------------------------------

def _kill_master_and_check_workers_go(srv, client, strays) -> None:
    workers = wait_for(lambda: pool_pids(srv) if len(pool_pids(srv)) == 3 else None, 10,
                       message="three workers")
    strays.add(*workers)
    handles = processes(workers)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(5)
    started = time.monotonic()
    wait_gone(handles, 5)
    assert time.monotonic() - started < 5
    # the session in progress is ended too, not left hanging until the idle timeout
    client.sock.settimeout(5)
    try:
        data = client.buf + client.sock.recv(4096)
    except ConnectionResetError:
        data = b""
    assert data in (b"",) or data.startswith(b"421 "), data


def test_master_killed_with_sigkill_leaves_no_worker(start_server, client_for, tmp_path, strays):
    srv = start_server("--timeout", "60", mode=pool_mode(tmp_path, "--workers", "3"))
    client = client_for(srv)
    assert client.cmd("EHLO client.example")[0] == 250
    _kill_master_and_check_workers_go(srv, client, strays)


def world_writable_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="prefork-esmtp-test-"))
    path.chmod(0o777)
    return path


def readable_handler_env(records: Path) -> dict[str, str]:
    """PYTHONPATH with a copy of the test handler where a dropped worker can read it.

    The checkout may live in a directory other users cannot enter (a 0700 temporary
    directory); workers running as ``nobody`` import the handler after the drop.
    """
    shutil.copy(Path(__file__).with_name("recorder.py"), records / "recorder.py")
    (records / "recorder.py").chmod(0o644)
    return {"PYTHONPATH": os.pathsep.join([str(records), server_env()["PYTHONPATH"]])}


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")


@needs_root
def test_master_killed_leaves_no_worker_after_privilege_drop(start_server, client_for, tmp_path, strays):
    """Changing uid clears the parent-death signal; the workers must still go with the master."""
    records = world_writable_dir()
    srv = start_server("--timeout", "60", "--user", "nobody", mode=pool_mode(tmp_path, "--workers", "3"),
                       env={"PREFORK_TEST_RECORD": str(records / "records.jsonl"), **readable_handler_env(records)})
    client = client_for(srv)
    assert client.cmd("EHLO client.example")[0] == 250
    _kill_master_and_check_workers_go(srv, client, strays)


@needs_root
def test_workers_drop_privileges_and_master_stays_root(start_server, tmp_path):
    nobody = pwd.getpwnam("nobody")
    records = world_writable_dir()
    record_file = records / "records.jsonl"
    srv = start_server("--user", "nobody", mode=pool_mode(tmp_path, "--workers", "2"),
                       env={"PREFORK_TEST_RECORD": str(record_file), **readable_handler_env(records)})
    pids = wait_pool(srv, 2)
    master = psutil.Process(srv.proc.pid)
    assert master.uids().real == 0 and master.uids().effective == 0
    for pid in pids:
        proc = psutil.Process(pid)
        assert set(proc.uids()) == {nobody.pw_uid}, proc.uids()
        assert set(proc.gids()) == {nobody.pw_gid}, proc.gids()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        assert smtp.sendmail("a@example.org", ["b@example.net"], b"Subject: drop\r\n\r\nhi\r\n") == {}
    # the handler ran as nobody: the file it created is nobody's
    assert record_file.stat().st_uid == nobody.pw_uid
    assert stat.S_IMODE(records.stat().st_mode) == 0o777


@needs_root
def test_handler_unreadable_by_worker_user_is_named(tmp_path):
    """A handler in a directory the dropped user cannot enter: the error says so."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "privhandler.py").write_text("from prefork_esmtp import ESMTPHandler\n"
                                            "class H(ESMTPHandler):\n    pass\n")
    srv = launch(tmp_path, "--user", "nobody", handler="privhandler:H", wait=False,
                 mode=pool_mode(tmp_path, "--workers", "1"),
                 env={"PYTHONPATH": os.pathsep.join([str(private), server_env()["PYTHONPATH"]])})
    try:
        assert srv.proc.wait(30) != 0
    finally:
        srv.stop()
    log = srv.log()
    assert "No module named 'privhandler'" in log and "cannot read" in log and str(private) in log, log


# -- adaptive pool -------------------------------------------------------------------------------

def test_adaptive_pool_grows_under_load_and_shrinks_when_idle(start_server, client_for, tmp_path):
    srv = start_server(mode=pool_mode(tmp_path, "--min-spare", "2", "--max-spare", "3", "--max-workers", "8"))
    wait_pool(srv, 2)
    clients = [client_for(srv, greet=False) for _ in range(5)]
    for client in clients:  # the last three wait in the backlog until the pool has grown
        assert client.reply(timeout=10)[0] == 220

    def grown() -> dict[int, str] | None:
        pool = workers_of(srv.proc.pid)
        idle = [t for t in pool.values() if " idle" in t]
        return pool if len(pool) >= 7 and len(idle) >= 2 else None

    pool = wait_for(grown, 10, message=f"5 busy + 2 idle workers (now {workers_of(srv.proc.pid)})")
    assert len(pool) <= 8
    assert sum(1 for t in pool.values() if "busy" in t) == 5
    for client in clients:
        assert client.cmd("QUIT")[0] == 221
    wait_for(lambda: len(workers_of(srv.proc.pid)) <= 3, 12,
             message=f"the idle pool to shrink to max-spare 3 (now {workers_of(srv.proc.pid)})")
    time.sleep(1.5)  # two adaptive ticks: it stays at or above min-spare
    assert 2 <= len(workers_of(srv.proc.pid)) <= 3


# -- graceful stop -------------------------------------------------------------------------------

def _open_data(client, subject: str) -> None:
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.net>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(f"Subject: {subject}\r\n\r\nfirst half\r\n".encode())


def test_term_during_data_finishes_the_message_then_421(start_server, client_for, tmp_path):
    srv = start_server("--graceful-timeout", "5", mode=pool_mode(tmp_path, "--workers", "2"))
    wait_pool(srv, 2)
    client = client_for(srv)
    _open_data(client, "term")
    wait_for(lambda: "EOH" in srv.hooks(), 5, message="the header to reach the handler")
    os.kill(srv.proc.pid, signal.SIGTERM)
    wait_for(lambda: len(workers_of(srv.proc.pid)) == 1, 5, message="the idle worker to exit")
    with pytest.raises(OSError):  # listeners are closed: nobody new gets in during the stop
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
    client.send(b"second half\r\n.\r\n")
    assert client.reply()[0] == 250
    client.send(b"NOOP\r\n")
    code, lines = client.reply()
    assert code == 421, lines
    assert client.closed()
    assert srv.proc.wait(10) == 0
    messages = srv.accepted_messages()
    assert len(messages) == 1
    assert messages[0]["headers"] == [("Subject", "term")]
    assert messages[0]["body"] == b"first half\r\nsecond half\r\n"
    assert not (tmp_path / "p.pid").exists()


def test_term_lets_an_open_transaction_finish_then_421(start_server, client_for, tmp_path):
    """TERM after MAIL/RCPT but before DATA: the transaction still completes (design.md)."""
    srv = start_server("--graceful-timeout", "5", mode=pool_mode(tmp_path, "--workers", "2"))
    wait_pool(srv, 2)
    client = client_for(srv)
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
    os.kill(srv.proc.pid, signal.SIGTERM)
    wait_for(lambda: len(workers_of(srv.proc.pid)) == 1, 5, message="the idle worker to exit")
    assert client.cmd("DATA")[0] == 354
    client.send(b"Subject: finished\r\n\r\nafter TERM\r\n.\r\n")
    assert client.reply()[0] == 250
    code, lines = client.cmd("NOOP")
    assert code == 421, lines
    assert client.closed()
    assert srv.proc.wait(10) == 0
    assert [m["body"] for m in srv.accepted_messages()] == [b"after TERM\r\n"]


def test_usr1_while_workers_boot_does_not_kill_them(start_server, tmp_path):
    """logrotate's USR1 may come while a slow handler module is still importing."""
    (tmp_path / "slowimport.py").write_text(
        "import time\ntime.sleep(1.5)\nfrom prefork_esmtp import ESMTPHandler\n"
        "class Handler(ESMTPHandler):\n    pass\n")
    log_file = tmp_path / "prefork.log"
    srv = start_server(log_file=log_file, handler="slowimport:Handler",
                       mode=pool_mode(tmp_path, "--workers", "2"), wait=False,
                       env={"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    wait_for(lambda: len(workers_of(srv.proc.pid)) == 2, 10, message="two workers forked")
    booting = set(workers_of(srv.proc.pid))
    os.kill(srv.proc.pid, signal.SIGUSR1)  # the master forwards it to the booting workers
    wait_for(lambda: log_file.exists() and "ready: generation 1 serving" in log_file.read_text(), 15,
             message="the pool to boot")
    assert set(workers_of(srv.proc.pid)) == booting
    assert "exited with signal" not in log_file.read_text()


def test_term_kills_what_is_left_at_the_graceful_timeout(start_server, client_for, tmp_path):
    srv = start_server("--graceful-timeout", "1", mode=pool_mode(tmp_path, "--workers", "2"))
    wait_pool(srv, 2)
    client = client_for(srv)
    _open_data(client, "never finished")
    wait_for(lambda: "EOH" in srv.hooks(), 5, message="the header to reach the handler")
    started = time.monotonic()
    os.kill(srv.proc.pid, signal.SIGTERM)
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - started < 4
    assert client.closed(5)
    assert "stop timeout: killing 1 workers" in srv.log()
    assert srv.accepted_messages() == []


# -- logs ----------------------------------------------------------------------------------------

def test_usr1_reopens_the_log_file_in_master_and_workers(start_server, client_for, tmp_path):
    log_file = tmp_path / "prefork.log"
    srv = start_server("--timeout", "1", mode=pool_mode(tmp_path, "--workers", "1"), log_file=log_file)
    wait_pool(srv, 1)
    rotated = tmp_path / "prefork.log.1"
    log_file.rename(rotated)
    os.kill(srv.proc.pid, signal.SIGUSR1)
    os.kill(srv.proc.pid, signal.SIGTTIN)  # handled after USR1: its log line goes to the new file
    wait_for(lambda: log_file.exists() and "TTIN: workers now 2" in log_file.read_text(), 5,
             message="the master's next line in a fresh file at the old path")
    workers = wait_pool(srv, 2)
    clients = [client_for(srv) for _ in range(2)]  # one idle session per worker, both time out
    for client in clients:
        assert client.reply(timeout=5)[0] == 421
    text = log_file.read_text()
    timed_out = re.findall(r"\[(\d+)\] INFO prefork_esmtp\.session: timeout after", text)
    assert {int(pid) for pid in timed_out} == workers, text
    assert "TTIN" not in rotated.read_text() and "timeout after" not in rotated.read_text()


# -- heartbeat -----------------------------------------------------------------------------------

def test_stuck_worker_is_killed_and_replaced(start_server, client_for, tmp_path):
    # CONNECT sleeps 30 s: the worker promised to check in within --timeout (1 s) and goes silent
    srv = start_server("--timeout", "1", "--worker-timeout", "1", mode=pool_mode(tmp_path, "--workers", "2"),
                       env={"PREFORK_TEST_CONNECT_DELAY": "30"})
    before = wait_pool(srv, 2)
    client = client_for(srv, greet=False)
    started = time.monotonic()
    assert client.closed(10)  # killed: the connection ends without a greeting
    assert time.monotonic() - started < 6
    assert client.buf == b""
    stuck = int(wait_for(lambda: re.search(r"worker (\d+) is stuck", srv.log()), 5,
                         message="the master to log the stuck worker").group(1))
    assert stuck in before
    after = wait_pool(srv, 2)
    assert stuck not in after and len(after & before) == 1
