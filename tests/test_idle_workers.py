"""Idle workers sleep in the kernel: no periodic wake-up, never taken for stuck, still orphan-safe.

With PR_SET_PDEATHSIG the master's death arrives as a signal, so an idle
worker waits for a connection or a signal without a timeout; where the
kernel cannot tell it, the worker falls back to checking its parent once
per tick.
"""

from __future__ import annotations

import math
import os
import threading
import time

import psutil

from conftest import wait_for
from master_support import pool_mode, wait_pool
from prefork_esmtp import ESMTPHandler, boot
from prefork_esmtp import worker as worker_module
from prefork_esmtp.reporter import Reporter
from prefork_esmtp.scoreboard import IDLE, Scoreboard
from prefork_esmtp.settings import resolve
from prefork_esmtp.worker import Worker


def _wakeups(pids) -> int:
    """Voluntary context switches of the processes so far: one per sleep that ended."""
    return sum(psutil.Process(pid).num_ctx_switches().voluntary for pid in pids)


def test_idle_pool_does_not_wake_and_is_not_taken_for_stuck(start_server, client_for, tmp_path):
    # A worker timeout of 1 s: an idle worker that promised a check-in every tick would be
    # killed after 2 s of silence; an idle one promises none.
    srv = start_server("--worker-timeout", "1", mode=pool_mode(tmp_path, "--workers", "3"))
    pids = wait_pool(srv, 3)
    client = client_for(srv)  # one session: the worker that served it goes back to the same sleep
    assert client.cmd("QUIT")[0] == 221
    assert client.closed()
    board_path = f"{tmp_path / 'p.pid'}.scoreboard"
    wait_for(lambda: [s for s in Scoreboard.open(board_path).slots() if s.state == IDLE and s.sessions == 1],
             5, message="the worker that served to report idle again")
    time.sleep(0.3)  # the last wake-ups of that session (its reports) are over
    before = _wakeups(pids)
    time.sleep(3.0)  # a window: with the old once-a-second heartbeat, 3 wake-ups per worker
    assert _wakeups(pids) - before == 0
    assert wait_pool(srv, 3) == pids
    assert "stuck" not in srv.log()
    slots = Scoreboard.open(board_path).slots()
    assert [s.expect for s in slots] == [math.inf] * 3


def test_die_with_parent_reports_whether_the_kernel_will_tell():
    """In a child: prctl(PR_SET_PDEATHSIG) is there on Linux, and says so."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, b"1" if boot.die_with_parent(os.getppid()) else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 1)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == (b"1" if boot._PRCTL is not None else b"0")


class _Orphaned(Reporter):
    """A reporter whose master is gone after ``after`` checks."""

    def __init__(self, after: int) -> None:
        self.checks = 0
        self.after = after

    def master_alive(self) -> bool:
        self.checks += 1
        return self.checks < self.after


def test_without_a_parent_death_signal_an_idle_worker_checks_its_master_each_tick(listener, monkeypatch):
    monkeypatch.setattr(worker_module, "TICK", 0.05)
    reporter = _Orphaned(after=3)
    worker = Worker([listener], ESMTPHandler, resolve({}, {}), reporter=reporter, idle_tick=0.05)
    thread = threading.Thread(target=worker.run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the orphaned worker kept waiting"
    assert reporter.checks == 3 and time.monotonic() - started < 2


def test_with_the_signal_an_idle_worker_waits_without_a_timeout(listener, monkeypatch):
    timeouts = []

    class RecordingPoller(worker_module._Poller):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            real_poll = self.poll  # what the serve loop waits with

            def recording_poll(timeout):
                timeouts.append(timeout)
                return real_poll(timeout)

            self.poll = recording_poll

    monkeypatch.setattr(worker_module, "_Poller", RecordingPoller)
    worker = Worker([listener], ESMTPHandler, resolve({}, {}))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_for(lambda: timeouts, 5, message="the worker to wait")
    worker.stop()  # what a retire or a TERM does: the wake pipe ends the wait
    thread.join(5)
    assert not thread.is_alive()
    assert timeouts and all(t is None for t in timeouts)
