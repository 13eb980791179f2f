"""The worker's reporter: what reaches the scoreboard slot and the master's wake pipe."""

from __future__ import annotations

import os
import time

import pytest
from setproctitle import getproctitle, setproctitle

from prefork_esmtp.reporter import NO_REPORTER, ScoreboardReporter
from prefork_esmtp.scoreboard import BUSY, IDLE, Scoreboard


@pytest.fixture
def board():
    """A scoreboard with slot 2 claimed; the test process's title is put back afterwards."""
    title = getproctitle()
    board = Scoreboard(4)
    board.claim(2, 0, 7)
    yield board
    board.close()
    setproctitle(title)


def test_busy_idle_and_served_reach_the_slot(board):
    wake_r, wake_w = os.pipe()
    try:
        reporter = ScoreboardReporter(board, 2, 7, os.getppid(), idle_expect=1.5, busy_expect=300.0,
                                      wake_fd=wake_w)
        reporter.idle()
        assert os.read(wake_r, 16) == b"b"  # the master hears of the boot at once
        slot = board.slot(2)
        assert (slot.state, slot.sessions, slot.peer, slot.expect) == (IDLE, 0, "", 1.5)

        reporter.busy(("192.0.2.7", 4000))
        slot = board.slot(2)
        assert (slot.state, slot.sessions, slot.peer, slot.expect) == (BUSY, 0, "192.0.2.7:4000", 300.0)
        assert reporter.sessions_from("192.0.2.7") == 1
        assert reporter.sessions_from("192.0.2.8") == 0
        reporter.check_in(12.5)
        assert board.slot(2).expect == 12.5

        reporter.served()
        reporter.idle()
        slot = board.slot(2)
        assert (slot.state, slot.sessions, slot.peer) == (IDLE, 1, "")
        assert getproctitle() == "prefork-esmtp: worker [gen 7] idle, 1 sessions"
        os.set_blocking(wake_r, False)
        with pytest.raises(BlockingIOError):
            os.read(wake_r, 16)  # written once only
    finally:
        os.close(wake_r)
        os.close(wake_w)


def test_an_ipv6_client_is_written_in_brackets_and_counted_by_its_address(board):
    """Status, titles and the per-IP limit read ``[v6]:port`` as the logs write it, never ``::1:port``."""
    reporter = ScoreboardReporter(board, 2, 7, os.getppid(), idle_expect=1.0, busy_expect=300.0)
    reporter.busy(("2001:db8::7", 4000, 0, 0))
    assert board.slot(2).peer == "[2001:db8::7]:4000"
    assert getproctitle() == "prefork-esmtp: worker [gen 7] busy [2001:db8::7]:4000, 0 sessions"
    assert reporter.sessions_from("2001:db8::7") == 1
    assert reporter.sessions_from("2001:db8:") == 0  # a prefix of the address is not the address
    assert reporter.sessions_from("2001:db8::") == 0
    reporter.busy(("192.0.2.70", 4000))
    assert reporter.sessions_from("192.0.2.7") == 0
    assert reporter.sessions_from("192.0.2.70") == 1


def test_master_alive_is_the_parent_check(board):
    assert ScoreboardReporter(board, 2, 7, os.getppid(), idle_expect=1.0, busy_expect=300.0).master_alive()
    assert not ScoreboardReporter(board, 2, 7, os.getpid(), idle_expect=1.0, busy_expect=300.0).master_alive()


def test_the_single_process_reporter_reports_nothing():
    NO_REPORTER.idle()
    NO_REPORTER.busy(("192.0.2.7", 4000))
    NO_REPORTER.served()
    NO_REPORTER.check_in(1.0)
    assert NO_REPORTER.master_alive()
    assert NO_REPORTER.sessions_from("192.0.2.7") == 0


def test_idle_again_with_nothing_new_writes_neither_slot_nor_title(board):
    """The serve loop comes round again (a connection another worker took): nothing to write."""
    reporter = ScoreboardReporter(board, 2, 7, os.getppid(), idle_expect=float("inf"), busy_expect=300.0)
    reporter.idle()
    seen = board.slot(2).seen
    setproctitle("marker")
    reporter.idle()
    assert getproctitle() == "marker" and board.slot(2).seen == seen
    reporter.busy(("192.0.2.7", 4000))
    assert getproctitle() == "prefork-esmtp: worker [gen 7] busy 192.0.2.7:4000, 0 sessions"
    reporter.served()
    reporter.idle()
    assert getproctitle() == "prefork-esmtp: worker [gen 7] idle, 1 sessions"
    assert (board.slot(2).state, board.slot(2).sessions) == (IDLE, 1)


def test_idle_again_in_the_tick_fallback_still_checks_in(board):
    """Without a parent-death signal an idle worker promised a check-in each tick: it keeps it."""
    reporter = ScoreboardReporter(board, 2, 7, os.getppid(), idle_expect=1.0, busy_expect=300.0)
    reporter.idle()
    first = board.slot(2).seen
    deadline = time.monotonic() + 1
    while time.time() <= first and time.monotonic() < deadline:
        pass  # the clock moves on (microseconds)
    reporter.idle()
    assert board.slot(2).seen > first
    assert board.slot(2).expect == 1.0


def test_check_in_writes_the_time_and_the_promise_into_its_own_slot(board, monkeypatch):
    monkeypatch.setattr(time, "time", lambda: 1234.5)  # bound by the reporter's check-in: patch first
    monkeypatch.setattr(time, "monotonic", lambda: 77.25)
    reporter = ScoreboardReporter(board, 2, 7, os.getppid(), idle_expect=1.0, busy_expect=300.0)
    neighbour = board.slot(3)
    reporter.check_in(42.0)
    slot = board.slot(2)
    assert (slot.seen, slot.expect, slot.due) == (1234.5, 42.0, 77.25 + 42.0)  # as Scoreboard.check_in writes
    assert board.slot(3) == neighbour  # the slot next to it is not touched


def test_a_connection_behind_a_proxy_is_busy_at_once_and_titled_once_with_the_client(board):
    """Before the PROXY header names the client: the slot says busy (no address), the title waits."""
    reporter = ScoreboardReporter(board, 2, 7, os.getppid(), idle_expect=float("inf"), busy_expect=300.0)
    reporter.idle()
    setproctitle("marker")
    reporter.accepted()
    slot = board.slot(2)
    assert (slot.state, slot.peer, slot.expect) == (BUSY, "", 300.0)
    assert reporter.sessions_from("192.0.2.7") == 0
    assert getproctitle() == "marker"
    reporter.busy(("192.0.2.7", 4000))
    assert board.slot(2).peer == "192.0.2.7:4000" and reporter.sessions_from("192.0.2.7") == 1
    assert getproctitle() == "prefork-esmtp: worker [gen 7] busy 192.0.2.7:4000, 0 sessions"
    reporter.served()
    reporter.idle()
    assert getproctitle() == "prefork-esmtp: worker [gen 7] idle, 1 sessions"
    NO_REPORTER.accepted()


@pytest.mark.parametrize("peer", ["192.0.2.7:4000", "[2001:db8::7]:4000", "", "x" * 100])
def test_the_bound_updater_writes_what_update_writes(peer):
    """Scoreboard.updater (what the reporter writes with) and Scoreboard.update: the same slot."""
    board = Scoreboard(4)
    try:
        before = time.monotonic()
        board.update(1, BUSY, 7, peer, 300.0)
        board.updater(2)(BUSY, 7, peer, 300.0)
        after = time.monotonic()
        one, two = board.slot(1), board.slot(2)
        assert (two.state, two.sessions, two.peer, two.expect) == (one.state, one.sessions, one.peer, one.expect)
        assert two.peer == peer[:63]
        assert before + 300.0 <= two.due <= after + 300.0 and abs(two.seen - one.seen) < 5
        board.updater(2)(IDLE, 8, "", 1.5)
        assert (board.slot(2).state, board.slot(2).sessions, board.slot(2).peer) == (IDLE, 8, "")
        assert (board.slot(1).state, board.slot(1).sessions, board.slot(3).sessions) == (BUSY, 7, 0)  # neighbours
    finally:
        board.close()
