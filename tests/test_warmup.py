"""The master's warm-up sessions before the first fork: complete, silent, counted nowhere."""

from __future__ import annotations

import logging
import smtplib
import time

import pytest

from master_support import pool_mode, strays, wait_pool  # noqa: F401
from metrics_support import metrics_port, scrape, value
from prefork_esmtp import warmup
from prefork_esmtp.settings import resolve


@pytest.mark.parametrize("values", [{}, {"protocol": "lmtp"}, {"proxy_protocol": True},
                                    {"protocol": "lmtp", "proxy_protocol": True},
                                    {"forbid_unauth_pipelining": True, "error_sleep": "5"}])
def test_every_warm_up_session_completes_and_logging_is_back(values, caplog):
    caplog.set_level(logging.DEBUG)
    assert warmup.warm_up(resolve({"hostname": "mx.test.example", **values}, {})) == warmup.SESSIONS
    assert logging.root.manager.disable == logging.NOTSET
    assert not caplog.records  # not a line from the sessions, nor a failure


def test_a_configuration_that_refuses_the_script_ends_the_warm_up_at_once(caplog):
    """A message over the size limit: errors, which past the soft limit would sleep 5 s each."""
    caplog.set_level(logging.DEBUG)
    config = resolve({"max_message_size": "512", "soft_error_limit": "1", "error_sleep": "5"}, {})
    started = time.monotonic()
    assert warmup.warm_up(config) == 0
    assert time.monotonic() - started < warmup.BUDGET + 0.5
    assert logging.root.manager.disable == logging.NOTSET
    assert not caplog.records


def test_the_script_speaks_the_configured_protocol():
    assert warmup.script(resolve({}, {})).startswith(b"EHLO ")
    assert warmup.script(resolve({"protocol": "lmtp"}, {})).startswith(b"LHLO ")
    assert warmup.script(resolve({"proxy_protocol": True}, {})).startswith(b"PROXY TCP4 ")
    assert warmup.script(resolve({}, {})).endswith(b"QUIT\r\n")


def test_a_pool_counts_and_logs_only_real_sessions(start_server, tmp_path, strays):
    srv = start_server("--metrics-listen", "127.0.0.1:0", "--log-level", "info",
                       mode=pool_mode(tmp_path, "--workers", "2"))
    strays.add_tree(srv.proc.pid)
    port = metrics_port(srv)
    wait_pool(srv, 2)
    samples = scrape(port)
    assert value(samples, "prefork_esmtp_sessions_total") == 0
    assert value(samples, "prefork_esmtp_messages_total") == 0
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.sendmail("a@example.org", ["b@example.org"], b"Subject: real\r\n\r\nreal\r\n")
    samples = scrape(port)
    assert value(samples, "prefork_esmtp_sessions_total") == 1
    assert value(samples, "prefork_esmtp_messages_total") == 1
    assert "warm-up" not in srv.log()


def test_filling_the_pools_leaves_no_scattered_free_blocks(capfd):
    """Holes made on purpose (every other block of one size class freed) are filled: at most the
    pool being carved keeps free blocks (fewer than a 16 KiB pool holds)."""
    if not warmup._free_blocks():
        pytest.skip("no pymalloc statistics in this interpreter")
    kept = [bytes(100) for _ in range(20000)]  # 133-byte blocks: the 144-byte class
    del kept[::2]
    before = warmup._free_blocks()
    assert before.get(144, 0) >= 10000
    assert warmup.fill_pools() >= 10000
    after = warmup._free_blocks()
    assert after.get(144, 0) < 16384 // 144, after
    assert sum(after.values()) < sum(before.values()) - 10000
    out, err = capfd.readouterr()
    assert "avail blocks" not in out + err  # the statistics never reach the real stderr


def test_without_allocator_statistics_nothing_is_filled(monkeypatch):
    monkeypatch.delattr("sys._debugmallocstats")
    assert warmup.fill_pools() == 0


def _child_writes(fn) -> bytes:
    """What a forked child of this process writes to a pipe after running ``fn``, which returns bytes."""
    import os

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, fn())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read()


def test_warming_the_fork_callbacks_changes_nothing_in_a_single_threaded_process():
    import random
    import threading

    main = threading.main_thread()
    handler = logging.StreamHandler()
    logging.getLogger("warmup-test").addHandler(handler)
    try:
        if threading.active_count() != 1 or len(threading._dangling) > 1:
            assert not warmup.warm_fork_callbacks()
            pytest.skip("this test process runs other threads")
        assert warmup.warm_fork_callbacks()
        assert threading.current_thread() is main and threading.enumerate() == [main]
        assert not handler.lock._is_owned() and handler.lock.acquire(timeout=1)  # a free lock, usable
        handler.lock.release()
        logging.getLogger("warmup-test").warning("still logs")  # the module lock works too
        # A thread still starts, runs and is joined; and children still get their own seed.
        ran = []
        t = threading.Thread(target=ran.append, args=(1,))
        t.start()
        t.join(5)
        assert ran == [1] and not t.is_alive()
        assert _child_writes(lambda: str(random.random()).encode()) != \
            _child_writes(lambda: str(random.random()).encode())
    finally:
        logging.getLogger("warmup-test").removeHandler(handler)


def test_with_another_thread_the_fork_callbacks_are_left_alone():
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, args=(10,))
    t.start()
    try:
        assert not warmup.warm_fork_callbacks()
        assert t.is_alive()
    finally:
        stop.set()
        t.join(5)


def test_relocate_gives_what_a_session_runs_fresh_copies_that_serve_the_same():
    from prefork_esmtp.session import Session

    config = resolve({"hostname": "mx.test.example"}, {})
    ran: set = set()
    assert warmup.warm_up(config, sessions=1, ran=ran) == 1
    original = Session.run.__code__
    assert original in ran and warmup.script.__code__ not in ran  # what the session ran, only that
    assert warmup.relocate(ran) >= 20
    copy = Session.run.__code__
    assert copy is not original and copy == original
    strings = [(a, b) for a, b in zip(original.co_consts, copy.co_consts)
               if type(a) is str and 2 <= len(a) <= 80 and not a.isidentifier()]
    assert strings and all(a == b and a is not b for a, b in strings)
    assert warmup.script.__code__ is not copy  # untouched: not run by a session
    assert warmup.warm_up(config) == warmup.SESSIONS  # the copies serve whole sessions


@pytest.mark.parametrize("value", ["a b", "a." * 40, b"xy", 10**20, 257, -6, 2.5, float("inf"),
                                   ("ab", 1000, (b"cd",)), frozenset({"ab", "cd"})])
def test_a_relocated_constant_is_an_equal_new_object(value):
    fresh = warmup._fresh(value, set(), lambda code: code)
    assert fresh == value and type(fresh) is type(value) and fresh is not value


@pytest.mark.parametrize("value", [None, True, 0, 256, -5, "a", "", b"", "x." * 41, "data_rate", 0.0, -0.0, Ellipsis])
def test_a_constant_with_nothing_to_gain_is_kept(value):
    assert warmup._fresh(value, set(), lambda code: code) is value
