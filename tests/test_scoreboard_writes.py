"""What the master can read of a slot while its worker is in the middle of writing it.

The master reads the scoreboard without a lock while workers write their own
slots, and kills a worker whose slot says it missed its check-in.  A write
must therefore never show a value the worker did not mean, however it is
interleaved with a read: every field reads as it was before the write or as
it is after it.

The interleaving is made deterministic: the clock the scoreboard reads
returns numbers that, at the moment a write converts them to store them,
take a snapshot of the slot, as a master reading at that instant would see
it (the worker paused there, preempted, for as long as it takes).
"""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import time
import types
from dataclasses import astuple, fields, replace

import pytest

from prefork_esmtp import scoreboard as scoreboard_module
from prefork_esmtp.master import Child, Master
from prefork_esmtp.scoreboard import BUSY, IDLE, STARTING, Scoreboard, Slot

SLOT = 2
WORKER_TIMEOUT = 60.0  # the master's default grace past a promised check-in
FIELDS = ("pid", "generation", "state", "sessions", "started", "seen", "expect", "peer")


class Reading:
    """A clock reading that snapshots the slot when a write turns it into the stored double.

    Not a float subclass: a float would be stored without calling back.
    """

    def __init__(self, value: float, snap) -> None:
        self.value, self.snap = value, snap

    def __float__(self) -> float:
        self.snap()
        return self.value

    def __add__(self, other: float) -> "Reading":
        return Reading(self.value + float(other), self.snap)

    __radd__ = __add__


class PausingClock:
    """Stands for the ``time`` module in scoreboard.py; its readings snapshot ``board``'s slot."""

    def __init__(self, board: Scoreboard, on_pause=None) -> None:
        self.board = board
        self.on_pause = on_pause  # run at each pause too (the master's loop turning meanwhile)
        self.offset = 0.0  # seconds added to the real clocks (a check-in long ago: negative)
        self.snapshots: list = []

    def _snap(self) -> None:
        self.snapshots.append(self.board.slot(SLOT))
        if self.on_pause is not None:
            self.on_pause()

    def time(self) -> Reading:
        return Reading(time.time() + self.offset, self._snap)

    def monotonic(self) -> Reading:
        return Reading(time.monotonic() + self.offset, self._snap)


@pytest.fixture
def board():
    board = Scoreboard(4)
    board.claim(SLOT, 0, 7)
    board.set_pid(SLOT, 4242)
    yield board
    board.close()


def _paused_write(monkeypatch, board: Scoreboard, write, offset: float = 0.0, on_pause=None) -> tuple:
    """Run ``write`` with the pausing clock; the slot before, at each pause, and after."""
    clock = PausingClock(board, on_pause)
    clock.offset = offset
    with monkeypatch.context() as patch:
        patch.setattr(scoreboard_module, "time", types.SimpleNamespace(time=clock.time,
                                                                       monotonic=clock.monotonic))
        before = board.slot(SLOT)
        write()
    after = board.slot(SLOT)
    assert clock.snapshots, "the write read no clock: nothing was interleaved"
    return before, clock.snapshots, after


def _assert_old_or_new(before, during, after) -> None:
    for snapshot in during:
        for name in FIELDS:
            value = getattr(snapshot, name)
            assert value in (getattr(before, name), getattr(after, name)), (
                f"mid-write the master reads {name}={value!r}, written by nobody "
                f"(before {getattr(before, name)!r}, after {getattr(after, name)!r}): {astuple(snapshot)}")


def _looks_stuck(slot) -> bool:
    """The master's test of a missed check-in, as it applies it to a slot it reads."""
    return slot.overdue(time.monotonic(), WORKER_TIMEOUT)


def test_a_check_in_never_shows_a_check_in_time_of_zero(board, monkeypatch):
    """A busy worker checks in before each read from its client; the master reads meanwhile."""
    board.update(SLOT, BUSY, 3, "192.0.2.7:4000", 300.0)
    before, during, after = _paused_write(monkeypatch, board, lambda: board.check_in(SLOT, 300.0))
    _assert_old_or_new(before, during, after)
    assert not any(_looks_stuck(s) for s in [before, *during, after])


@pytest.mark.parametrize("state, peer, expect", [(BUSY, "192.0.2.7:4000", 300.0), (IDLE, "", math.inf)])
def test_a_change_of_state_shows_each_field_old_or_new(board, monkeypatch, state, peer, expect):
    board.update(SLOT, IDLE if state == BUSY else BUSY, 5, "" if state == BUSY else "192.0.2.9:25", 1.0)
    before, during, after = _paused_write(monkeypatch, board, lambda: board.update(SLOT, state, 6, peer, expect))
    _assert_old_or_new(before, during, after)
    assert (after.state, after.sessions, after.peer, after.expect, after.pid) == (state, 6, peer, expect, 4242)


def test_the_pid_the_master_writes_after_the_fork_keeps_the_workers_fields(board):
    """A worker that boots fast reports before the master has written its pid: both survive."""
    board.claim(1, 0, 8)
    board.update(1, IDLE, 0, "", math.inf)
    board.set_pid(1, 5151)
    slot = board.slot(1)
    assert (slot.pid, slot.generation, slot.state, slot.expect) == (5151, 8, IDLE, math.inf)
    assert board.slot(SLOT).pid == 4242 and board.slot(SLOT).state == STARTING


# -- the stuck-worker killer, given what it can read ---------------------------------------


@pytest.fixture
def victim():
    """A live process standing for the worker: the killer's SIGKILL would end it."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait(timeout=10)


def _killer(board, pid: int) -> Master:
    """The real master's supervision state for one worker of generation 7 in SLOT."""
    master = Master.__new__(Master)
    master.config = types.SimpleNamespace(worker_timeout=WORKER_TIMEOUT)
    master.generation = 7
    master.children = {pid: Child(pid, SLOT, 7, time.time())}
    master.scoreboard = board
    return master


def _assert_alive(victim, caplog) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        victim.wait(timeout=0.5)  # a SIGKILLed child is gone within milliseconds
    assert "is stuck" not in caplog.text


def test_the_killer_spares_a_worker_paused_in_the_middle_of_any_write(monkeypatch, victim, caplog):
    """The worker preempted mid-write while the master's loop turns (twice at each pause)."""
    caplog.set_level(logging.WARNING, logger="prefork_esmtp.master")
    board = Scoreboard(4)
    try:
        board.claim(SLOT, 0, 7)
        board.set_pid(SLOT, victim.pid)
        master = _killer(board, victim.pid)
        turns = lambda: (master.murder_stale(), master.murder_stale())  # noqa: E731
        _paused_write(monkeypatch, board, lambda: board.update(SLOT, IDLE, 0, "", math.inf), on_pause=turns)
        _paused_write(monkeypatch, board, lambda: board.update(SLOT, BUSY, 0, "192.0.2.7:4000", 300.0),
                      on_pause=turns)
        _paused_write(monkeypatch, board, lambda: board.check_in(SLOT, 300.0), on_pause=turns)
        _paused_write(monkeypatch, board, lambda: board.update(SLOT, IDLE, 1, "", math.inf), on_pause=turns)
    finally:
        board.close()
    _assert_alive(victim, caplog)


class _Reading:
    """A board whose slot reads as a given snapshot (what the master assembled from memory)."""

    def __init__(self, slot: Slot) -> None:
        self.snapshot = slot

    def slot(self, index: int) -> Slot:
        return self.snapshot


def test_the_killer_spares_a_worker_whatever_mix_of_two_check_ins_it_reads(monkeypatch, victim, caplog):
    """A worker idle for an hour (promising no check-in) takes a client: its check-in moves from
    'an hour ago, silent as long as it likes' to 'now, within the read timeout'.  A master read
    overlapping that write may take each field from either; no mix may look like a missed check-in."""
    caplog.set_level(logging.WARNING, logger="prefork_esmtp.master")
    board = Scoreboard(4)
    try:
        with monkeypatch.context() as patch:
            hour_ago = types.SimpleNamespace(time=lambda: time.time() - 3600,
                                             monotonic=lambda: time.monotonic() - 3600)
            patch.setattr(scoreboard_module, "time", hour_ago)
            board.claim(SLOT, 0, 7)
            board.set_pid(SLOT, victim.pid)
            board.update(SLOT, IDLE, 4, "", math.inf)
        before = board.slot(SLOT)
        board.update(SLOT, BUSY, 4, "192.0.2.7:4000", 300.0)
        after = board.slot(SLOT)
    finally:
        board.close()
    changed = [f.name for f in fields(Slot) if getattr(before, f.name) != getattr(after, f.name)]
    assert {"seen", "expect", "state"} <= set(changed)
    mixes = 0
    for taken in itertools.product((before, after), repeat=len(changed)):
        mix = replace(before, **{name: getattr(source, name) for name, source in zip(changed, taken)})
        _killer(_Reading(mix), victim.pid).murder_stale()
        mixes += 1
    assert mixes == 2 ** len(changed)
    _assert_alive(victim, caplog)


def test_the_bound_check_in_writes_what_check_in_writes():
    """Scoreboard.checker(i) (the worker's per-read check-in) stores seen, expect and due in slot i only."""
    board = Scoreboard(4)
    try:
        for index in range(4):
            board.claim(index, 1000 + index, 1)
        check_in = board.checker(SLOT)
        before = [board.slot(i) for i in range(4)]
        wall, mono = time.time(), time.monotonic()
        check_in(42.5)
        slot = board.slot(SLOT)
        assert slot.expect == 42.5
        assert wall <= slot.seen <= time.time()
        assert mono + 42.5 <= slot.due <= time.monotonic() + 42.5
        assert replace(slot, seen=0.0, expect=0.0, due=0.0) == replace(before[SLOT], seen=0.0, expect=0.0, due=0.0)
        assert [board.slot(i) for i in range(4) if i != SLOT] == [before[i] for i in range(4) if i != SLOT]
        board.check_in(SLOT, 7.0)  # the method writes the same words
        assert board.slot(SLOT).expect == 7.0
        check_in(9.0)
        assert board.slot(SLOT).expect == 9.0
    finally:
        board.close()
