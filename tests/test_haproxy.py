"""prefork-esmtp behind a real HAProxy: send-proxy (v1) and send-proxy-v2, health checks with the header.

Two instances, each behind its own HAProxy frontend (and two more behind one
backend, sharing per-client limits through Redis).  Clients connect from
127.0.0.2, HAProxy from 127.0.0.1, so the address the server reports tells
which one it took: the handler, the logs, the Received line, ``status`` must
all name 127.0.0.2.  HAProxy's health checks (``option smtpchk``, which says
EHLO and QUIT) carry the header too and must find the servers UP.
"""

from __future__ import annotations

import smtplib
import socket
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import HOSTNAME, launch, wait_for
from haproxy_support import Frontend, running_haproxy
from master_support import status_json
from redis_support import redis_server  # noqa: F401 (a fixture)
from tls_support import client_context, pki  # noqa: F401 (pki is a fixture)

CLIENT = "127.0.0.2"  # the client's own address; HAProxy connects from 127.0.0.1
HANDLER = "proxy_handlers:ProxyRecorder"


@pytest.fixture(scope="module")
def behind(tmp_path_factory, pki):
    """(haproxy, maildir instance behind send-proxy, recorder instance behind send-proxy-v2 with TLS)."""
    base = tmp_path_factory.mktemp("haproxy")
    maildir = base / "maildir"
    v1 = launch(base / "v1", "--proxy-protocol", "--proxy-trusted", "127.0.0.1", "--pidfile", str(base / "v1.pid"),
                "--handler-option", f"root={maildir}", mode=("--workers", "2"),
                handler="prefork_esmtp.handlers.maildir:Maildir", log_file=base / "v1.log")
    v2 = launch(base / "v2", "--proxy-protocol", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                mode=("--workers", "2"), handler=HANDLER, tls_listen=True)
    try:
        frontends = [Frontend("v1", [v1.port], "send-proxy check-send-proxy"),
                     Frontend("v2", [v2.port], "send-proxy-v2 check-send-proxy"),
                     Frontend("v2tls", [v2.tls_port], "send-proxy-v2 check-send-proxy check-ssl verify none")]
        with running_haproxy(base / "haproxy", frontends) as haproxy:
            yield haproxy, v1, v2, maildir, base
    finally:
        v1.stop()
        v2.stop()


def message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "alice@example.org", "bob@example.org", subject
    msg.set_content("through the load balancer\n")
    return msg


def stored(maildir: Path, subject: str) -> bytes | None:
    for path in maildir.rglob("new/*"):
        content = path.read_bytes()
        if f"Subject: {subject}".encode() in content:
            return content
    return None


def test_health_checks_carry_the_header_and_find_the_servers_up(behind):
    haproxy, v1, v2, _, _ = behind
    status = haproxy.server_status()
    assert status == {"v1/s1": "UP L7OK", "v2/s1": "UP L7OK", "v2tls/s1": "UP L7OK"}, status  # smtpchk: EHLO got 250
    # v2 health checks are LOCAL: the server keeps the connection's own addresses (HAProxy's).
    checks = [r for r in v2.records() if r["hook"] == "CONNECT" and r["args"][2]["proxy"]["command"] == "LOCAL"]
    assert checks and all(r["args"][2]["peer"][0] == "127.0.0.1" for r in checks)
    assert not any("bad PROXY header" in text for text in (v1.log(), v2.log()))


def test_send_proxy_v1_maildir_received_line_and_logs_name_the_client(behind):
    haproxy, v1, _, maildir, base = behind
    with smtplib.SMTP("127.0.0.1", haproxy.frontends["v1"].port, source_address=(CLIENT, 0), timeout=10) as smtp:
        own_port = smtp.sock.getsockname()[1]
        code, banner = smtp.ehlo("client.example")
        assert code == 250
        refused = smtp.send_message(message("via v1"))
        assert refused == {}

        # while this session is open, status shows the client, not HAProxy
        def busy_peers() -> set[str]:
            return {w["peer"] for w in status_json(base / "v1.pid")["workers"] if w["state"] == "busy"}
        wait_for(lambda: f"{CLIENT}:{own_port}" in busy_peers(), 10, message="status to show the client")
    content = wait_for(lambda: stored(maildir, "via v1"), 10, message="the stored message")
    received = content.split(b"\nReceived: ", 1)[1].split(b"\n\t", 1)[0]
    assert received == f"from client.example ([{CLIENT}])".encode(), content[:300]
    assert f"client={CLIENT}:{own_port}" in v1.log()


def test_send_proxy_v2_handler_sees_the_client(behind):
    haproxy, _, v2, _, _ = behind
    with smtplib.SMTP("127.0.0.1", haproxy.frontends["v2"].port, source_address=(CLIENT, 0), timeout=10) as smtp:
        own_port = smtp.sock.getsockname()[1]
        assert smtp.send_message(message("via v2")) == {}
    connect = wait_for(lambda: [r for r in v2.records() if r["hook"] == "CONNECT"
                                and r["args"][0] == [CLIENT, own_port]], 10, message="the client's session")
    facts = connect[0]["args"][2]
    assert facts["proxy"]["version"] == 2 and facts["proxy"]["command"] == "PROXY"
    assert facts["proxy"]["protocol"] == "TCP4"
    assert facts["local"] == ["127.0.0.1", haproxy.frontends["v2"].port]  # what the client connected to
    eom = [r for r in v2.records() if r["hook"] == "EOM" and r["args"][0]["peer"] == [CLIENT, own_port]]
    assert len(eom) == 1 and eom[0]["sender"] == "alice@example.org"


def test_implicit_tls_behind_the_header(behind, pki):
    haproxy, _, v2, _, _ = behind
    port = haproxy.frontends["v2tls"].port
    with smtplib.SMTP_SSL("127.0.0.1", port, source_address=(CLIENT, 0), timeout=10,
                          context=client_context(pki)) as smtp:
        own_port = smtp.sock.getsockname()[1]
        assert smtp.ehlo("client.example")[0] == 250
        assert smtp.send_message(message("via tls")) == {}
    eom = wait_for(lambda: [r for r in v2.records() if r["hook"] == "EOM"
                            and r["args"][0]["peer"] == [CLIENT, own_port]], 10, message="the TLS session's EOM")
    assert eom[0]["args"][0]["tls"] is True and eom[0]["tls"] is not None
    assert eom[0]["args"][0]["local"] == ["127.0.0.1", port]


def test_a_client_that_skips_the_balancer_is_refused(behind):
    """v1's instance trusts only 127.0.0.1: the same header from 127.0.0.2 directly is dropped unanswered."""
    _, v1, _, _, _ = behind
    with socket.create_connection(("127.0.0.1", v1.port), source_address=(CLIENT, 0), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 192.0.2.66 127.0.0.1 4000 25\r\n")
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass
    wait_for(lambda: f"connection from {CLIENT}" in v1.log() and "not a trusted PROXY sender" in v1.log(), 5,
             message="the untrusted log line")


def test_two_instances_behind_one_backend_share_per_client_limits_through_redis(start_server, tmp_path,
                                                                                 redis_server):
    """The fleet-wide limits count the client HAProxy names, not HAProxy: one limit for 127.0.0.2 on both."""
    common = ("--proxy-protocol", "--limits-backend", redis_server.url, "--max-messages-per-ip", "3",
              "--max-sessions-per-ip", "1")
    a = start_server(*common, mode=("--workers", "2", "--pidfile", str(tmp_path / "a.pid")), handler=HANDLER)
    b = start_server(*common, mode=("--workers", "2", "--pidfile", str(tmp_path / "b.pid")), handler=HANDLER)
    with running_haproxy(tmp_path / "haproxy", [Frontend("mx", [a.port, b.port], "send-proxy-v2 check-send-proxy")]) \
            as haproxy:
        port = haproxy.frontends["mx"].port

        def attempt(source: str) -> smtplib.SMTP | None:
            try:
                smtp = smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10)
            except smtplib.SMTPConnectError as exc:
                assert exc.smtp_code == 421, exc
                return None
            assert smtp.ehlo("client.example")[0] == 250
            return smtp

        def session(source: str) -> smtplib.SMTP:
            # The last session's host forgets it just after its 221: until then the next is one too many.
            return wait_for(lambda: attempt(source), 10, interval=0.1, message=f"a session for {source}")

        codes = []
        for _ in range(4):  # round robin: a, b, a, b; one count for 127.0.0.2 across both
            with session(CLIENT) as smtp:
                code, text = smtp.mail("alice@example.org")
                codes.append(code)
                if code == 450:
                    assert text.startswith(b"4.7.1 "), text
                smtp.rset()
        assert codes == [250, 250, 250, 450], codes
        with session("127.0.0.3") as smtp:  # another client through the same HAProxy: its own count
            assert smtp.mail("carol@example.org")[0] == 250
        served = {srv.port: {tuple(r["args"][0]) for r in srv.records()
                             if r["hook"] == "CONNECT" and r["args"][2]["proxy"]["command"] == "PROXY"}
                  for srv in (a, b)}
        assert all(any(peer[0] == CLIENT for peer in peers) for peers in served.values()), served

        # one session of 127.0.0.2 open on one host: the next is refused, whichever host HAProxy picks
        with session(CLIENT):
            with socket.create_connection(("127.0.0.1", port), source_address=(CLIENT, 0), timeout=10) as sock:
                reply = sock.recv(1024)
                assert reply.startswith(b"421 4.7.0 "), reply
