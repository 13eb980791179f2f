"""A worker out of file descriptors at accept(): it pauses between tries instead of spinning.

The refused connection stays in the listen queue and the listener stays
ready, so a worker that went straight back to its poll would burn a core and
write "accept failed" thousands of times a second.  A real pool of one worker,
its descriptor limit lowered from outside (as a leak or a low ``ulimit -n``
would), then raised again: the client waiting in the queue is served.
"""

from __future__ import annotations

import os
import time

import psutil

from conftest import wait_for


def _worker(srv) -> psutil.Process:
    return wait_for(lambda: (psutil.Process(srv.proc.pid).children() or [None])[0], message="the worker")


def test_a_worker_out_of_descriptors_pauses_logs_once_a_second_and_serves_once_it_has_them(start_server):
    srv = start_server("--workers", "1", mode=())
    worker = _worker(srv)
    limits = worker.rlimit(psutil.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{worker.pid}/fd"))
    worker.rlimit(psutil.RLIMIT_NOFILE, (in_use, limits[1]))  # not one more: accept() gets EMFILE
    client = srv.connect()
    try:
        wait_for(lambda: "accept failed" in srv.log(), message="the accept failure logged")
        cpu_before, started = sum(worker.cpu_times()[:2]), time.monotonic()
        time.sleep(1.5)  # the window measured: the shortage lasts through it
        cpu = sum(worker.cpu_times()[:2]) - cpu_before
        elapsed = time.monotonic() - started
        assert cpu < 0.3 * elapsed, f"the worker spun: {cpu:.2f}s of CPU in {elapsed:.2f}s"
        failures = srv.log().count("accept failed")
        assert 1 <= failures <= 4, f"{failures} 'accept failed' lines in about 2 s"
        assert "Too many open files" in srv.log() and "pausing" in srv.log()
        worker.rlimit(psutil.RLIMIT_NOFILE, limits)  # descriptors again: the queued client is served
        client.settimeout(10)
        assert client.recv(512).startswith(b"220 ")
    finally:
        client.close()
    assert worker.is_running()
