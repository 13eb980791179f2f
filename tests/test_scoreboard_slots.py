"""The master's bookkeeping of scoreboard slots: which one the next worker gets."""

from __future__ import annotations

from prefork_esmtp.scoreboard import FREE, STARTING, Scoreboard


def test_free_slot_is_the_lowest_unclaimed_and_none_when_full():
    board = Scoreboard(3)
    try:
        assert board.free_slot() == 0
        board.claim(0, 0, 1)
        board.claim(1, 0, 1)
        assert board.free_slot() == 2
        board.claim(2, 0, 1)
        assert board.free_slot() is None
        board.release(1)
        board.release(1)  # released twice (a failed fork, then a reap): still one free slot
        assert board.slot(1).state == FREE
        assert board.free_slot() == 1
        board.claim(1, 0, 2)
        assert board.slot(1).state == STARTING
        assert board.free_slot() is None
        board.release(2)
        board.release(0)
        assert board.free_slot() == 0
        board.claim(0, 0, 2)
        assert board.free_slot() == 2
    finally:
        board.close()


def test_free_slot_stays_cheap_for_a_large_board():
    """Claiming every slot of a 2,008-slot board one by one touches each slot once, not n² times."""
    board = Scoreboard(2008)
    calls = 0
    original = board.slot

    def counting(index):
        nonlocal calls
        calls += 1
        return original(index)

    board.slot = counting
    try:
        for expected in range(2008):
            index = board.free_slot()
            assert index == expected
            board.claim(index, 0, 1)
        assert board.free_slot() is None
        assert calls == 0  # the master's own account, not a scan of the shared memory
    finally:
        board.close()
