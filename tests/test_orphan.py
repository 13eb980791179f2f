"""kill -9 of the master: a worker in a transaction frees the port at once, finishes, then 421."""

from __future__ import annotations

import os
import signal
import socket
import time

from conftest import wait_for
from master_support import pool_pids, pool_mode, processes, strays, wait_gone  # noqa: F401


def port_free(port: int) -> bool:
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_orphaned_busy_worker_frees_the_port_and_ends_after_the_transaction(start_server, client_for,
                                                                           tmp_path, strays):
    srv = start_server("--timeout", "60", mode=pool_mode(tmp_path, "--workers", "2"))
    client = client_for(srv)
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250  # a transaction is open
    workers = wait_for(lambda: pool_pids(srv) if len(pool_pids(srv)) == 2 else None, 10,
                       message="two workers")
    strays.add(*workers)
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(5)
    wait_for(lambda: port_free(srv.port), 5, message="the port to be free for a new master")
    # the transaction may finish ...
    assert client.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert client.cmd("RSET")[0] == 250
    # ... and the next command after it gets 421
    code, lines = client.cmd("NOOP")
    assert code == 421, (code, lines)
    started = time.monotonic()
    wait_gone(processes(workers), 10)
    assert time.monotonic() - started < 10
