"""Unit tests of the adaptive pool's arithmetic (Apache prefork's spare-server rules)."""

from __future__ import annotations

from prefork_esmtp.pool import MAX_SPAWN_RATE, Step, adaptive_step, max_spare_default


def test_spawn_rate_doubles_while_short_and_caps_at_32():
    rate, workers, rates = 1, 0, []
    for _ in range(8):  # a steady shortage: no worker ever becomes idle
        step = adaptive_step(workers, 0, 1000, 2000, 10_000, rate)
        rates.append(step.spawn)
        workers += step.spawn
        rate = step.spawn_rate
    assert rates == [1, 2, 4, 8, 16, 32, 32, 32]
    assert rate == MAX_SPAWN_RATE


def test_spawn_never_past_max_workers_or_the_shortage():
    assert adaptive_step(9, 0, 5, 10, 10, 8) == Step(1, 0, 16)
    assert adaptive_step(2, 3, 5, 10, 100, 32).spawn == 2  # only what min_spare needs
    assert adaptive_step(10, 0, 5, 10, 10, 8).spawn == 0


def test_rate_falls_back_to_one_when_the_shortage_ends():
    assert adaptive_step(10, 5, 5, 10, 100, 16) == Step(0, 0, 1)


def test_too_many_idle_retires_one_per_turn_never_the_last():
    assert adaptive_step(20, 15, 5, 10, 100, 1) == Step(0, 1, 1)
    assert adaptive_step(1, 1, 0, 0, 100, 1) == Step(0, 0, 1)


def test_over_max_workers_retires_the_excess_at_once():
    assert adaptive_step(12, 2, 1, 10, 8, 1) == Step(0, 4, 1)


def test_max_spare_defaults_to_twice_min_spare():
    assert max_spare_default(5, None) == 10
    assert max_spare_default(None, None) == 2
    assert max_spare_default(0, None) == 2
    assert max_spare_default(5, 7) == 7
