"""The adaptive pool's arithmetic, as pure functions: Apache prefork's spare-server rules.

The master counts its workers and their states once a second and asks
:func:`adaptive_step` what to do; nothing here forks or signals, so the rules
are unit-tested without processes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Apache's cap on the doubling spawn rate (MAX_SPAWN_RATE in prefork.c).
MAX_SPAWN_RATE = 32


@dataclass(frozen=True)
class Step:
    """One second's decision: workers to start, idle workers to retire, the next spawn rate."""

    spawn: int
    retire: int
    spawn_rate: int


def max_spare_default(min_spare: int | None, max_spare: int | None) -> int:
    """MaxSpareServers, defaulting to twice MinSpareServers (at least 2)."""
    if max_spare is not None:
        return max_spare
    return max(min_spare or 0, 1) * 2


def adaptive_step(workers: int, idle: int, min_spare: int, max_spare: int, max_workers: int,
                  spawn_rate: int) -> Step:
    """Apache prefork's rule for one maintenance turn.

    Too few idle workers: start up to ``spawn_rate`` (never past ``max_workers``
    or past what ``min_spare`` needs), and double the rate for the next turn
    while the shortage lasts (1, 2, 4 ... 32); otherwise the rate falls back to
    1. Too many: above ``max_workers`` retire the excess at once; above
    ``max_spare`` idle retire one per turn, never the last worker.
    """
    spawn = 0
    if idle < min_spare and workers < max_workers:
        spawn = min(spawn_rate, max_workers - workers, min_spare - idle)
        next_rate = min(spawn_rate * 2, MAX_SPAWN_RATE)
    else:
        next_rate = 1
    if workers > max_workers:
        retire = workers - max_workers
    elif idle > max_spare and workers > 1:
        retire = 1
    else:
        retire = 0
    return Step(spawn, retire, next_rate)
