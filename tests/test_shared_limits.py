"""Per-address limits shared by workers (shared memory) and by hosts (a real redis-server)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from conftest import Client, wait_for
from redis_support import redis_server  # noqa: F401  (fixture)


def connect(srv, source: str = "127.0.0.2") -> Client:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10, source_address=(source, 0))
    c = Client(sock)
    return c


def greeted(srv, source: str = "127.0.0.2") -> Client:
    c = connect(srv, source)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example")[0] == 250
    return c


def mail(c: Client) -> tuple[int, list[str]]:
    code, lines = c.cmd("MAIL FROM:<a@example.org>")
    if code == 250:
        assert c.cmd("RSET")[0] == 250
    return code, lines


def pool(tmp_path, name: str, *extra: str) -> tuple[str, ...]:
    return ("--workers", "2", "--pidfile", str(tmp_path / f"{name}.pid"), *extra)


def test_messages_per_address_are_counted_across_workers(start_server, tmp_path):
    srv = start_server("--max-messages-per-ip", "3", mode=pool(tmp_path, "a"))
    one, two = greeted(srv), greeted(srv)  # two sessions at once: two workers
    assert mail(one)[0] == 250
    assert mail(two)[0] == 250
    assert mail(one)[0] == 250
    code, lines = mail(two)
    assert code == 450 and lines[0].startswith("4.7.1 ") and "too many messages" in lines[0], lines
    one.close()  # two workers: free one for the next client
    other = greeted(srv, "127.0.0.3")  # another address has its own count
    assert mail(other)[0] == 250
    for c in (two, other):
        c.close()


def test_recipients_per_address_and_the_window(start_server, tmp_path):
    srv = start_server("--max-recipients-per-ip", "2", "--limits-window", "2", mode=pool(tmp_path, "a"))
    one, two = greeted(srv), greeted(srv)
    assert one.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert two.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert one.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert two.cmd("RCPT TO:<c@example.org>")[0] == 250
    code, lines = one.cmd("RCPT TO:<d@example.org>")
    assert code == 450 and lines[0].startswith("4.7.1 ") and "too many recipients" in lines[0], lines
    # a new window: the address may send again (bounded wait: two windows at most)
    wait_for(lambda: two.cmd("RCPT TO:<e@example.org>")[0] == 250, 6, interval=0.5,
             message="the next window")
    for c in (one, two):
        c.close()


def test_limits_shared_by_two_hosts_through_redis(start_server, tmp_path, redis_server):
    backend = ("--limits-backend", redis_server.url)
    a = start_server(*backend, "--max-messages-per-ip", "3", "--max-sessions-per-ip", "1",
                     mode=pool(tmp_path, "a"))
    b = start_server(*backend, "--max-messages-per-ip", "3", "--max-sessions-per-ip", "1",
                     mode=pool(tmp_path, "b"))
    on_a = greeted(a)
    # one session from 127.0.0.2 is open on host a: host b refuses a second one
    refused = connect(b)
    code, lines = refused.reply()
    assert code == 421 and lines[0].startswith("4.7.0 "), lines
    refused.close()
    elsewhere = greeted(b, "127.0.0.3")  # another address is welcome
    assert mail(on_a)[0] == 250
    assert mail(on_a)[0] == 250
    on_a.close()
    # the session on a has ended: b takes 127.0.0.2 now, and the message count goes on from 2
    on_b = wait_for(lambda: _greeted_or_none(b), 10, interval=0.2, message="b to accept 127.0.0.2 again")
    assert mail(on_b)[0] == 250
    code, lines = mail(on_b)
    assert code == 450 and lines[0].startswith("4.7.1 "), lines
    assert mail(elsewhere)[0] == 250
    for c in (on_b, elsewhere):
        c.close()


def _greeted_or_none(srv) -> Client | None:
    c = connect(srv)
    code, _ = c.reply()
    if code != 220:
        c.close()
        return None
    assert c.cmd("EHLO client.example")[0] == 250
    return c


def test_redis_down_fails_open(start_server, tmp_path, redis_server):
    log_file = tmp_path / "a.log"
    srv = start_server("--limits-backend", redis_server.url, "--max-messages-per-ip", "1",
                       "--max-sessions-per-ip", "1", mode=pool(tmp_path, "a"), log_file=log_file)
    redis_server.stop()
    started = time.monotonic()
    c = greeted(srv)
    for _ in range(3):
        assert mail(c)[0] == 250, "no limit is better than no mail"
    assert time.monotonic() - started < 5
    c.close()
    wait_for(lambda: "limits not applied: Redis unavailable" in log_file.read_text(), 10,
             message="a warning in the log")


def test_a_bad_backend_is_one_line():
    result = subprocess.run([sys.executable, "-m", "prefork_esmtp", "configtest", "--limits-backend",
                             "memcache://x"], capture_output=True, text=True, timeout=30)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "redis://" in lines[0], lines


@pytest.mark.parametrize("setting", ["--max-messages-per-ip", "--max-recipients-per-ip"])
def test_single_process_mode_counts_too(start_server, setting):
    srv = start_server(setting, "1")
    c = greeted(srv)
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert c.cmd("RSET")[0] == 250
    code, _ = c.cmd("MAIL FROM:<a@example.org>")
    if setting == "--max-recipients-per-ip":
        assert code == 250
        code, _ = c.cmd("RCPT TO:<b@example.org>")
    assert code == 450
    c.close()


# -- the shared table, in-process ----------------------------------------------------------

from prefork_esmtp.limits import RateTable  # noqa: E402


def test_rate_table_counts_per_address_and_window(monkeypatch):
    table = RateTable(entries=64)
    assert table.add("192.0.2.1", 60, 1, 0) == (1, 0)
    assert table.add("192.0.2.1", 60, 0, 3) == (1, 3)
    assert table.add("2001:db8::1", 60, 1, 1) == (1, 1)
    assert table.add("192.0.2.1", 60, 1, 0) == (2, 3)
    now = 1_000_000.0
    monkeypatch.setattr("prefork_esmtp.limits.time.time", lambda: now + 120)  # two windows later
    assert table.add("192.0.2.1", 60, 1, 0) == (1, 0)


def test_rate_table_full_fails_open():
    table = RateTable(entries=4)
    results = [table.add(f"192.0.2.{i}", 3600, 1, 0) for i in range(1, 40)]
    assert None in results, "a full table says so (the caller fails open)"
    assert all(r is None or r == (1, 0) for r in results)


def test_rate_table_is_shared_with_forked_children():
    import os

    table = RateTable(entries=64)
    pid = os.fork()
    if pid == 0:
        try:
            table.add("192.0.2.9", 3600, 5, 0)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert table.add("192.0.2.9", 3600, 1, 0) == (6, 0)
