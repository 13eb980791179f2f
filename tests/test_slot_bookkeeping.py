"""The master's slot bookkeeping under any sequence of forks, failed forks, exits, reaps and reloads.

The real ``Master.spawn`` and ``Master.reap`` run against a real scoreboard;
only the kernel is played by the test (``os.fork`` hands out pids or fails
with EAGAIN part-way through a batch, ``os.waitpid`` reports the workers the
test let exit).  Hypothesis drives the sequence; after every step:

* no two workers that are alive or not yet reaped share a slot, and each
  worker's slot is the one it was forked for (claimed before its fork);
* each such slot names its worker's pid and is not free;
* every other slot is free and unnamed, and the next free slot is the
  lowest of them: so a slot is never handed out while its worker can still
  write it, and a release never frees a slot someone else holds.
"""

from __future__ import annotations

import errno
import math
import os
from unittest import mock

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from prefork_esmtp.exposition import NO_METRICS
from prefork_esmtp.master import Master
from prefork_esmtp.scoreboard import BUSY, FREE, IDLE, Scoreboard

NSLOTS = 8


class Kernel:
    """Plays fork and waitpid for the master under test."""

    def __init__(self, board: Scoreboard) -> None:
        self.next_pid = 40000
        self.fail_at: int | None = None  # the fork of this index in the next batch fails
        self.batch = 0
        self.claimed: list[int] = []  # slots claimed by the batch under way, in order
        self.slot_of: dict[int, int] = {}  # pid -> the slot it was forked for (what _run_child got)
        self.running: set[int] = set()  # forked and not exited
        self.exited: list[tuple[int, int]] = []  # (pid, wait status) not yet collected
        original_claim = board.claim

        def claim(index: int, pid: int, generation: int) -> None:
            self.claimed.append(index)
            original_claim(index, pid, generation)

        board.claim = claim

    def fork(self) -> int:
        if self.fail_at is not None and self.batch == self.fail_at:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        self.batch += 1
        pid, self.next_pid = self.next_pid, self.next_pid + 1
        self.slot_of[pid] = self.claimed.pop(0)
        self.running.add(pid)
        return pid

    def waitpid(self, pid: int, options: int) -> tuple[int, int]:
        assert (pid, options) == (-1, os.WNOHANG)
        if not self.exited:
            if not self.running:
                raise ChildProcessError(errno.ECHILD, "No child processes")
            return 0, 0
        return self.exited.pop(0)


class SlotBookkeeping(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        self.board = Scoreboard(NSLOTS)
        self.kernel = Kernel(self.board)
        master = Master.__new__(Master)
        master.scoreboard = self.board
        master.children = {}
        master.generation = 1
        master.stop_deadline = None
        master.spawn_paused_until = 0.0
        master.metrics = NO_METRICS
        master._plan = lambda: None  # what a forked child would get; no fork here returns in a child
        self.master = master
        self.patches = [mock.patch.object(os, "fork", self.kernel.fork),
                        mock.patch.object(os, "waitpid", self.kernel.waitpid)]
        for patch in self.patches:
            patch.start()

    def teardown(self) -> None:
        for patch in getattr(self, "patches", []):
            patch.stop()
        if hasattr(self, "board"):
            self.board.close()

    @rule(count=st.integers(0, 5), fail_at=st.none() | st.integers(0, 4))
    def spawn(self, count: int, fail_at: int | None) -> None:
        self.kernel.fail_at, self.kernel.batch, self.kernel.claimed = fail_at, 0, []
        self.master.spawn_paused_until = 0.0  # a failed fork pauses spawning for a second: not here
        self.master.spawn(count)
        for slot in self.kernel.claimed:  # claimed, but its fork failed: given back
            assert self.board.slot(slot).state == FREE

    @precondition(lambda self: self.kernel.running)
    @rule(data=st.data(), busy=st.booleans())
    def worker_reports(self, data: st.DataObject, busy: bool) -> None:
        """A live worker writes its own slot, as its reporter does (its pid may not be written yet)."""
        pid = data.draw(st.sampled_from(sorted(self.kernel.running)))
        slot = self.kernel.slot_of[pid]
        if busy:
            self.board.update(slot, BUSY, 1, "192.0.2.7:4000", 300.0)
        else:
            self.board.update(slot, IDLE, 1, "", math.inf)

    @precondition(lambda self: self.kernel.running)
    @rule(data=st.data(), status=st.sampled_from([0, 9, 1 << 8]))
    def worker_exits(self, data: st.DataObject, status: int) -> None:
        """Recycled (0), killed (SIGKILL) or crashed (1): a zombie until the master reaps it."""
        pid = data.draw(st.sampled_from(sorted(self.kernel.running)))
        self.kernel.running.discard(pid)
        self.kernel.exited.append((pid, status))

    @rule()
    def reap(self) -> None:
        self.master.reap()

    @rule()
    def reload(self) -> None:
        """A new generation: its workers are forked while the old ones still hold their slots."""
        for child in self.master.children.values():
            child.retiring = True
        self.master.generation += 1

    @invariant()
    def slots_are_owned_once_and_released_only_when_reaped(self) -> None:
        if not hasattr(self, "master"):
            return
        unreaped = self.kernel.running | {pid for pid, _ in self.kernel.exited}
        assert set(self.master.children) == unreaped
        owned = {}
        for pid in unreaped:
            slot = self.kernel.slot_of[pid]
            assert slot not in owned, f"slot {slot} held by {owned.get(slot)} and {pid}"
            owned[slot] = pid
            assert self.master.children[pid].slot == slot
            row = self.board.slot(slot)
            assert row.pid == pid and row.state != FREE
        for index in range(NSLOTS):
            if index not in owned:
                row = self.board.slot(index)
                assert (row.pid, row.state) == (0, FREE), f"slot {index} is not free: {row}"
        free = [index for index in range(NSLOTS) if index not in owned]
        assert self.board.free_slot() == (free[0] if free else None)


SlotBookkeeping.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_slot_bookkeeping = SlotBookkeeping.TestCase
