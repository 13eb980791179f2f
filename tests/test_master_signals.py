"""The master's signal queue: no stop or reload request is ever lost behind a burst of others."""

from __future__ import annotations

import os
import signal

from prefork_esmtp.master import Master


def bare_queue() -> Master:
    """A Master with only what its signal handler touches (no pool, no sockets)."""
    master = Master.__new__(Master)
    master.queue = []
    master.wake_r, master.wake_w = os.pipe()
    os.set_blocking(master.wake_w, False)
    return master


def test_term_is_queued_after_a_burst_of_sigchld():
    master = bare_queue()
    for _ in range(200):  # many recycling workers exiting at once
        master._queue_signal(signal.SIGCHLD, None)
    master._queue_signal(signal.SIGTERM, None)
    master._queue_signal(signal.SIGHUP, None)
    assert master.queue == [signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP]


def test_ttin_and_ttou_count_each_delivery_up_to_a_bound():
    master = bare_queue()
    for _ in range(3):
        master._queue_signal(signal.SIGTTIN, None)
    assert master.queue.count(signal.SIGTTIN) == 3
    for _ in range(500):
        master._queue_signal(signal.SIGTTOU, None)
    assert master.queue.count(signal.SIGTTOU) == 64
    master._queue_signal(signal.SIGTERM, None)
    assert master.queue[-1] == signal.SIGTERM
