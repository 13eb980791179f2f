"""The master's rehearsal of a worker's start-up before the first fork: leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from setproctitle import getproctitle, setproctitle

from prefork_esmtp import boot
from prefork_esmtp.limits import RateTable
from prefork_esmtp.scoreboard import FREE, Scoreboard
from prefork_esmtp.settings import resolve


def _plan(listener: socket.socket, board: Scoreboard) -> boot.WorkerPlan:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return boot.WorkerPlan(master_pid=os.getpid(), generation=1, config=resolve({}, {}), handler_class=None,
                           ids=None, listeners=[listener], tls_context=None, tls_fds=frozenset(),
                           scoreboard=board, rate_table=RateTable(16), wake_fd=w, error_fd=w,
                           master_fds=(), signals=frozenset())


def test_a_rehearsal_leaves_no_descriptor_handler_slot_or_connection_behind(listener):
    board = Scoreboard(4)
    plan = _plan(listener, board)
    fds = sorted(os.listdir("/proc/self/fd"))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    setproctitle("rehearsal test")
    boot.rehearse(plan, times=3)
    assert sorted(os.listdir("/proc/self/fd")) == fds  # pipes, epoll sets and the scratch board closed
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert all(board.slot(i).state == FREE for i in range(board.nslots))  # the real board untouched
    assert getproctitle().startswith("prefork-esmtp: worker")  # the one side effect, documented
    # The listener still accepts, and nobody took the connection.
    listener.setblocking(True)
    listener.settimeout(5)
    with socket.create_connection(listener.getsockname(), timeout=5):
        conn, _ = listener.accept()
        conn.close()
    board.close()


def test_a_rehearsal_records_the_start_up_code_and_sets_no_parent_death_signal(listener):
    import ctypes
    import sys

    board = Scoreboard(4)
    ran: set = set()
    boot.rehearse(_plan(listener, board), times=2, ran=ran)
    names = {code.co_qualname for code in ran}
    assert {"Worker.__init__", "ScoreboardReporter.idle", "ScoreboardReporter.busy", "load_handler",
            "Worker.run", "Worker.serve", "Session.run"} <= names
    assert sys.getprofile() is None
    pdeathsig = ctypes.c_int(-1)
    assert ctypes.CDLL(None).prctl(2, ctypes.byref(pdeathsig), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
    assert pdeathsig.value == 0
    board.close()


def test_a_rehearsal_never_imports_a_handler_the_master_has_not(listener, monkeypatch):
    import sys

    board = Scoreboard(4)
    plan = _plan(listener, board)
    plan = boot.WorkerPlan(**{**plan.__dict__, "config": resolve({"handler": "no_such_module_here:H"}, {})})
    boot.rehearse(plan, times=1)
    assert "no_such_module_here" not in sys.modules
    board.close()


@pytest.mark.parametrize("values", [{}, {"protocol": "lmtp"}, {"proxy_protocol": True}])
def test_a_rehearsal_session_is_served_to_its_end_silently(listener, values, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    board = Scoreboard(4)
    plan = _plan(listener, board)
    plan = boot.WorkerPlan(**{**plan.__dict__, "config": resolve(values, {})})
    scratch = Scoreboard(1)
    assert boot.serve_rehearsal(plan, scratch)
    assert scratch.slot(0).sessions == 1  # reported on the scratch board, not the real one
    assert all(board.slot(i).state == FREE for i in range(board.nslots))
    assert not caplog.records
    scratch.close()
    board.close()


def test_a_handler_the_master_cannot_look_up_is_left_to_the_worker(listener):
    board = Scoreboard(4)
    plan = _plan(listener, board)
    plan = boot.WorkerPlan(**{**plan.__dict__, "config": resolve({"handler": "prefork_esmtp:NoSuchHandler"}, {})})
    boot.rehearse(plan, times=2)  # the module is here, the class is not: no exception in the master
    board.close()


def test_after_a_rehearsal_session_fails_no_other_is_tried(listener, monkeypatch):
    calls = []
    monkeypatch.setattr(boot, "serve_rehearsal", lambda plan, board: calls.append(1) and False)
    board = Scoreboard(4)
    boot.rehearse(_plan(listener, board), times=4)
    assert calls == [1]
    board.close()


def test_a_running_profiler_is_left_alone_and_nothing_is_recorded(listener):
    import sys

    def profiler(frame, event, arg):
        return None

    board = Scoreboard(4)
    ran: set = set()
    sys.setprofile(profiler)
    try:
        boot.rehearse(_plan(listener, board), times=1, ran=ran)
        assert sys.getprofile() is profiler
    finally:
        sys.setprofile(None)
    assert not ran
    board.close()


def test_a_rehearsal_session_that_never_arrives_ends_at_its_bound(listener, monkeypatch):
    import time

    elsewhere = socket.create_server(("127.0.0.1", 0))  # the client connects here: the scratch worker waits in vain
    connect = socket.create_connection
    monkeypatch.setattr(boot.socket, "create_connection", lambda address, timeout: connect(elsewhere.getsockname(), timeout))
    board = Scoreboard(4)
    scratch = Scoreboard(1)
    started = time.monotonic()
    assert not boot.serve_rehearsal(_plan(listener, board), scratch)
    assert time.monotonic() - started < 3 * boot.REHEARSAL_TIMEOUT + 1
    elsewhere.close()
    scratch.close()
    board.close()
