"""Prometheus metrics from the master: scraped with real HTTP clients during load, across worker
recycling and a reload, and checked against what the client sent; without prometheus-client the
server still runs, and asking for metrics is one error line."""

from __future__ import annotations

import base64
import os
import smtplib
import threading
from pathlib import Path

import pytest

from conftest import ROOT, TESTS, Client, require_tool, wait_for
from master_support import cli, one_error_line, pool_mode, strays, wait_pool  # noqa: F401
from metrics_support import counter_samples, metrics_port, scrape, value

JUDGE = "metrics_handlers:Judge"
THREADS, PER_THREAD = 4, 10


def message(subject: str) -> bytes:
    return f"Subject: {subject}\r\nFrom: a@example.net\r\n\r\nhello\r\n".encode()


def send_batch(port: int, thread: int, outcome: dict) -> None:
    """PER_THREAD messages, one session each: subjects 0 and 5 are refused at EOM, and
    messages 0, 3, 6, 9 also go to nobody@ (refused at RCPT)."""
    for i in range(PER_THREAD):
        recipients = [f"r{thread}.{i}@example.org"] + (["nobody@example.org"] if i % 3 == 0 else [])
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            try:
                refused = client.sendmail("a@example.net", recipients, message("refuse" if i % 5 == 0 else "hi"))
                outcome["accepted"] += 1
                outcome["rcpt_refused"] += len(refused)
            except smtplib.SMTPDataError as exc:
                assert exc.smtp_code == 554
                outcome["refused"] += 1
                outcome["rcpt_refused"] += len(recipients) - 1


def test_counts_add_up_during_load_across_recycling_and_a_reload(start_server, tmp_path, strays):
    require_tool("curl")
    srv = start_server("--metrics-listen", "127.0.0.1:0", "--max-connections-per-child", "3",
                       handler=JUDGE, mode=pool_mode(tmp_path, "--workers", "2"))
    strays.add_tree(srv.proc.pid)
    port = metrics_port(srv)
    wait_pool(srv, 2)
    outcomes = [{"accepted": 0, "refused": 0, "rcpt_refused": 0} for _ in range(THREADS)]
    threads = [threading.Thread(target=send_batch, args=(srv.port, t, outcomes[t])) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    # Scrapes during the load (workers recycle every 3 or 4 sessions meanwhile): no counter goes down.
    scrapes = 0
    previous = counter_samples(scrape(port))
    while any(t.is_alive() for t in threads) and scrapes < 500:
        now = counter_samples(scrape(port))
        went_down = {k: (previous[k], v) for k, v in now.items() if k in previous and v < previous[k]}
        assert not went_down
        previous, scrapes = now, scrapes + 1
    for thread in threads:
        thread.join(60)
    assert scrapes > 0, "the load ended before a scrape: make it longer"
    sent = THREADS * PER_THREAD
    refused = sum(o["refused"] for o in outcomes)
    assert refused == THREADS * 2 and sum(o["accepted"] for o in outcomes) == sent - refused
    rcpt_refused = sum(o["rcpt_refused"] for o in outcomes)
    assert rcpt_refused == THREADS * 4

    # Session-end counts (duration, octets) come after the client has its 221: wait for them.
    wait_for(lambda: value(scrape(port), "prefork_esmtp_session_duration_seconds_count") == sent, 10,
             message=f"{sent} sessions ended in the metrics")
    m = scrape(port, via="curl")
    assert value(m, "prefork_esmtp_messages_total", result="accepted") == sent - refused
    assert value(m, "prefork_esmtp_messages_total", result="accepted", **{"class": "2xx"}) == sent - refused
    assert value(m, "prefork_esmtp_messages_total", result="refused", **{"class": "5xx"}) == refused
    assert value(m, "prefork_esmtp_messages_total") == sent
    assert value(m, "prefork_esmtp_sessions_total") == sent
    assert value(m, "prefork_esmtp_transactions_total") == sent
    assert value(m, "prefork_esmtp_recipients_total", result="accepted") == sent
    assert value(m, "prefork_esmtp_recipients_total", result="refused") == rcpt_refused
    assert value(m, "prefork_esmtp_error_replies_total", code="550") == rcpt_refused
    assert value(m, "prefork_esmtp_error_replies_total", code="554") == refused
    assert value(m, "prefork_esmtp_error_replies_total") == rcpt_refused + refused
    size = len(message("hi"))  # "refuse" is as long as "hi" plus 4
    assert value(m, "prefork_esmtp_message_size_octets_count") == sent
    assert value(m, "prefork_esmtp_message_size_octets_sum") == sent * size + refused * 4
    assert value(m, "prefork_esmtp_message_size_octets_bucket", le="1024.0") == sent
    assert value(m, "prefork_esmtp_received_octets_total") > sent * size
    assert value(m, "prefork_esmtp_hook_exceptions_total") == 0
    # the handler's own metrics, summed over every worker that ever served
    assert value(m, "prefork_esmtp_judge_verdicts_total", verdict="accepted") == sent - refused
    assert value(m, "prefork_esmtp_judge_verdicts_total", verdict="refused") == refused
    assert value(m, "prefork_esmtp_judge_recipients_count") == sent
    assert value(m, "prefork_esmtp_judge_recipients_bucket", le="1.0") == sent  # one accepted recipient each
    restarts = value(m, "prefork_esmtp_worker_restarts_total", reason="recycled")
    assert restarts >= sent // 4 - 2  # each worker served 3 or 4 sessions
    assert value(m, "prefork_esmtp_worker_restarts_total", reason="crashed") == 0
    assert value(m, "prefork_esmtp_generation") == 1
    assert value(m, "prefork_esmtp_reloads_total") == 0

    # A reload: the new generation counts on top of what the old one counted.
    result = cli("reload", "--pidfile", str(tmp_path / "p.pid"), timeout=60)
    assert result.returncode == 0, result.stderr
    for _ in range(5):
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
            client.sendmail("a@example.net", ["after@example.org"], message("hi"))
    wait_for(lambda: value(scrape(port), "prefork_esmtp_session_duration_seconds_count") == sent + 5, 10,
             message="the sessions after the reload in the metrics")
    wait_pool(srv, 2)
    m = scrape(port, via="curl")
    assert value(m, "prefork_esmtp_messages_total", result="accepted") == sent - refused + 5
    assert value(m, "prefork_esmtp_messages_total", result="refused") == refused
    assert value(m, "prefork_esmtp_sessions_total") == sent + 5
    assert value(m, "prefork_esmtp_judge_verdicts_total", verdict="accepted") == sent - refused + 5
    assert value(m, "prefork_esmtp_generation") == 2
    assert value(m, "prefork_esmtp_reloads_total", result="ok") == 1
    assert value(m, "prefork_esmtp_reloads_total", result="failed") == 0
    assert value(m, "prefork_esmtp_workers", state="idle") == 2
    assert value(m, "prefork_esmtp_workers", state="busy") == 0
    assert value(m, "prefork_esmtp_worker_restarts_total", reason="recycled") >= restarts
    assert " ERROR " not in srv.log()


def test_outcomes_hook_exceptions_auth_limits_and_timeouts(start_server, tmp_path, strays, client_for):
    srv = start_server("--metrics-listen", "127.0.0.1:0", "--auth-plaintext", "--max-sessions-per-ip", "1",
                       "--max-recipients-per-ip", "1", "--timeout", "2", handler=JUDGE, mode=pool_mode(tmp_path, "--workers", "2"))
    strays.add_tree(srv.proc.pid)
    port = metrics_port(srv)
    wait_pool(srv, 2)
    c = client_for(srv)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"\0user\0wrong").decode())[0] == 535
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"\0user\0secret").decode())[0] == 235
    assert c.cmd("MAIL FROM:<a@example.net>")[0] == 250
    assert c.cmd("RCPT TO:<crash@example.org>")[0] == 451  # the hook raised
    assert c.cmd("RCPT TO:<b@example.org>")[0] == 450  # one RCPT per minute from this address
    # While this session is open, a second one from the same address is over the limit.
    second = client_for(srv, greet=False)
    assert second.reply()[0] == 421
    assert second.closed()
    assert c.cmd("QUIT")[0] == 221
    assert c.closed()
    wait_pool(srv, 2)  # both sessions over: the next one is the only one from this address
    # A client that says nothing: 421 after the 2 s timeout.
    idle = client_for(srv)
    assert idle.reply(timeout=10)[0] == 421
    wait_for(lambda: value(scrape(port), "prefork_esmtp_session_duration_seconds_count") == 3, 10,
             message="three sessions ended in the metrics")
    m = scrape(port)
    assert value(m, "prefork_esmtp_auth_total", result="failure") == 1
    assert value(m, "prefork_esmtp_auth_total", result="success") == 1
    assert value(m, "prefork_esmtp_auth_total", result="tempfail") == 0
    assert value(m, "prefork_esmtp_hook_exceptions_total", hook="RCPT") == 1
    assert value(m, "prefork_esmtp_hook_exceptions_total") == 1
    assert value(m, "prefork_esmtp_error_replies_total", code="451") == 1
    assert value(m, "prefork_esmtp_error_replies_total", code="535") == 1
    assert value(m, "prefork_esmtp_error_replies_total", code="421") == 2  # the limit and the timeout
    assert value(m, "prefork_esmtp_ip_limit_hits_total", limit="sessions") == 1
    assert value(m, "prefork_esmtp_ip_limit_hits_total", limit="recipients") == 1
    assert value(m, "prefork_esmtp_ip_limit_hits_total") == 2
    assert value(m, "prefork_esmtp_error_replies_total", code="450") == 1
    assert value(m, "prefork_esmtp_limits_failed_open_total") == 0
    assert value(m, "prefork_esmtp_timeouts_total", kind="idle") == 1
    assert value(m, "prefork_esmtp_timeouts_total") == 1
    assert value(m, "prefork_esmtp_transactions_total") == 1
    assert value(m, "prefork_esmtp_messages_total") == 0


def test_metrics_http_answers_only_get_metrics(start_server, tmp_path, strays):
    import socket

    srv = start_server("--metrics-listen", "127.0.0.1:0", mode=pool_mode(tmp_path, "--workers", "1"))
    strays.add_tree(srv.proc.pid)
    port = metrics_port(srv)

    def ask(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    assert ask(b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert ask(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert ask(b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    head = ask(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    openmetrics = ask(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n")
    assert b"application/openmetrics-text" in openmetrics.split(b"\r\n\r\n")[0]
    assert openmetrics.rstrip().endswith(b"# EOF")
    # A scraper that never finishes its request holds nothing: the next one is served.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert scrape(port)[("prefork_esmtp_generation", frozenset())] == 1
    assert srv.proc.poll() is None


@pytest.fixture
def without_prometheus_client(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import prometheus_client`` fails, as when the extra is not installed."""
    hidden = tmp_path / "hidden"
    (hidden / "prometheus_client").mkdir(parents=True)
    (hidden / "prometheus_client" / "__init__.py").write_text("raise ImportError('not installed')\n")
    return {"PYTHONPATH": os.pathsep.join([str(hidden), str(TESTS), str(ROOT)])}


def test_without_prometheus_client_the_server_runs_and_metrics_listen_is_one_error_line(
        start_server, tmp_path, without_prometheus_client):
    env = without_prometheus_client
    line = one_error_line(cli("start", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", env=env))
    assert "prometheus-client" in line and "prefork-esmtp[metrics]" in line
    line = one_error_line(cli("configtest", "--metrics-listen", "127.0.0.1:0", env=env))
    assert "prometheus-client" in line
    srv = start_server(handler=JUDGE, mode=pool_mode(tmp_path, "--workers", "1"), env=env)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        client.sendmail("a@example.net", ["b@example.org"], message("hi"))
    assert "message from=<a@example.net> nrcpt=1" in srv.log()


def test_metrics_listen_errors_are_one_line(tmp_path):
    line = one_error_line(cli("start", "-X", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"))
    assert "-X" in line
    line = one_error_line(cli("start", "--listen", "127.0.0.1:0", "--metrics-listen", "nonsense"))
    assert "--metrics-listen" in line
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        line = one_error_line(cli("start", "--listen", "127.0.0.1:0", "--metrics-listen", busy,
                                  "--pidfile", str(tmp_path / "p.pid")))
    assert "metrics_listen" in line and busy in line


def test_limits_that_fail_open_are_counted(start_server, tmp_path, strays):
    import socket

    pytest.importorskip("redis")
    with socket.socket() as closed:  # a port where no Redis listens
        closed.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{closed.getsockname()[1]}/0"
    srv = start_server("--metrics-listen", "127.0.0.1:0", "--limits-backend", nowhere,
                       "--max-messages-per-ip", "1", mode=pool_mode(tmp_path, "--workers", "1"))
    strays.add_tree(srv.proc.pid)
    port = metrics_port(srv)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as client:
        for _ in range(2):  # over the limit of one, but the limit cannot be applied: mail flows
            client.sendmail("a@example.net", ["b@example.org"], message("hi"))
    m = scrape(port)
    assert value(m, "prefork_esmtp_messages_total", result="accepted") == 2
    assert value(m, "prefork_esmtp_limits_failed_open_total") >= 2
    assert value(m, "prefork_esmtp_ip_limit_hits_total") == 0
