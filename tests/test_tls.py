"""TLS: STARTTLS (RFC 3207) and implicit TLS (RFC 8314) with real
certificates made at test time, driven by smtplib, ``openssl s_client``,
``swaks --tls``, ``curl smtps://`` and raw sockets for exact bytes.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import warnings

import pytest

from conftest import HOSTNAME, ROOT, Client, require_tool, server_env, wait_for
from tls_support import pki, client_context, ehlo_keywords, launch, make_leaf, records_of  # noqa: F401 (pki is a fixture)

MESSAGE = b"Subject: over TLS\r\nFrom: a@example.org\r\n\r\nSecret body.\r\n"


@pytest.fixture(scope="module")
def srv(pki, tmp_path_factory):
    """STARTTLS and an implicit-TLS listener; client certificates asked for (optional)."""
    server = launch(tmp_path_factory.mktemp("tls"), "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                    "--tls-client-ca", str(pki.ca), "--tls-handshake-timeout", "1",
                    "--error-sleep", "0", tls_listen=True)
    yield server
    server.stop()


def plain_client(srv, clients) -> Client:
    c = Client(srv.connect())
    clients.append(c)
    code, lines = c.reply()
    assert code == 220, (code, lines)
    return c


def assert_serves(srv, pki) -> None:
    """The server still takes a whole message over STARTTLS (after some abuse)."""
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.starttls(context=client_context(pki))
        assert smtp.sendmail("after@example.org", ["bob@example.net"], MESSAGE) == {}
        assert smtp.noop()[0] == 250


# -- STARTTLS -------------------------------------------------------------------------

def test_starttls_with_smtplib_verifying_context(srv, pki):
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        code, _ = smtp.ehlo("client.example")
        assert code == 250 and smtp.has_extn("starttls")
        code, text = smtp.starttls(context=client_context(pki))  # verifies chain and hostname
        assert code == 220, text
        peer = dict(x[0] for x in smtp.sock.getpeercert()["subject"])
        assert peer == {"commonName": HOSTNAME, "organizationName": "First"}
        version, cipher = smtp.sock.version(), smtp.sock.cipher()[0]
        assert version in ("TLSv1.2", "TLSv1.3")
        code, _ = smtp.ehlo("client.example")
        assert code == 250 and not smtp.has_extn("starttls"), "STARTTLS is offered only before TLS"
        assert smtp.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
        port = smtp.sock.getsockname()[1]
    sid = wait_for(lambda: next((r["sid"] for r in srv.records() if r["hook"] == "CONNECT"
                                 and r["args"][0][1] == port), None), 5)
    records = [r for r in srv.records() if r["sid"] == sid]
    hooks = [r["hook"] for r in records]
    assert hooks[:4] == ["CONNECT", "EHLO", "STARTTLS", "EHLO"]
    ehlos = [r for r in records if r["hook"] == "EHLO"]
    assert ehlos[0]["tls"] is None
    assert ehlos[1]["tls"]["version"] == version and ehlos[1]["tls"]["cipher"] == cipher
    eom = next(r for r in records if r["hook"] == "EOM")
    assert eom["tls"]["version"] == version
    assert eom["tls"]["cipher"] == cipher
    assert eom["tls"]["bits"] >= 128
    assert eom["tls"]["peer_subject"] is None, "no client certificate was sent"


def test_openssl_s_client_starttls(srv, pki):
    openssl = require_tool("openssl")
    result = subprocess.run(
        [openssl, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{srv.port}",
         "-CAfile", str(pki.ca), "-verify_return_error", "-servername", HOSTNAME, "-crlf", "-ign_eof"],
        input=b"EHLO client.example\nQUIT\n", capture_output=True, timeout=20)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in out
    assert "subject=CN = mx.test.example, O = First" in out
    assert "Cipher is TLS" in out or "Cipher    : " in out
    # The EHLO typed after the handshake, inside TLS: its reply no longer offers STARTTLS.
    tail = out[out.index("Verify return code"):]
    assert f"250-{HOSTNAME} client.example" in tail, tail
    assert "STARTTLS" not in tail
    assert "221 2.0.0" in tail


def require_swaks_tls() -> str:
    swaks = require_tool("swaks")
    support = subprocess.run([swaks, "--support"], capture_output=True, timeout=20)
    if b"TLS supported" not in support.stdout + support.stderr:
        if os.environ.get("PREFORK_ESMTP_REQUIRE_TOOLS") == "1":
            pytest.fail("swaks has no TLS support (install libnet-ssleay-perl)")
        pytest.skip("swaks has no TLS support (Net::SSLeay missing)")
    return swaks


def test_swaks_tls(srv, pki):
    swaks = require_swaks_tls()
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--tls", "--tls-verify",
         "--tls-ca-path", str(pki.ca), "--tls-sni", HOSTNAME, "--helo", "swaks.example",
         "--from", "swaks@example.org", "--to", "bob@example.net", "--header", "Subject: swaks tls"],
        capture_output=True, timeout=30)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert "=== TLS started with cipher TLSv1." in out
    assert 'TLS peer DN="/CN=mx.test.example/O=First"' in out
    assert "<~  250 2.0.0 Message accepted for delivery" in out
    mine = [m for m in srv.accepted_messages() if m["sender"] == "swaks@example.org"]
    assert len(mine) == 1 and ("Subject", "swaks tls") in mine[0]["headers"]


def test_starttls_advertised_only_before_tls_and_refused_inside(srv, pki, clients):
    c = plain_client(srv, clients)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "STARTTLS" in ehlo_keywords(lines)
    assert c.cmd("STARTTLS")[0] == 220
    c.sock = client_context(pki).wrap_socket(c.sock, server_hostname=HOSTNAME)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "STARTTLS" not in ehlo_keywords(lines)
    assert c.cmd("STARTTLS") == (503, ["5.5.1 Error: TLS already active"])
    assert c.cmd("NOOP")[0] == 250, "the session goes on inside TLS"


def test_starttls_with_arguments_is_501(srv, clients):
    c = plain_client(srv, clients)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("STARTTLS now") == (501, ["5.5.4 Syntax: STARTTLS"])
    assert c.cmd("NOOP")[0] == 250, "still plaintext, still in sync"


def test_starttls_not_configured_is_454_and_not_advertised(start_server, client_for):
    srv = start_server()
    c = client_for(srv)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "STARTTLS" not in ehlo_keywords(lines)
    assert c.cmd("STARTTLS") == (454, ["4.7.0 TLS not available"])
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250, "the session goes on in plaintext"


def test_plaintext_behind_starttls_is_discarded(srv, pki, clients):
    """CVE-2011-0411: STARTTLS and RSET in one write; nothing may answer the RSET."""
    c = plain_client(srv, clients)
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(b"STARTTLS\r\nRSET\r\n")
    assert c.reply() == (220, ["2.0.0 Ready to start TLS"])
    assert c.buf == b"", "nothing but the 220 in plaintext"
    c.sock = client_context(pki).wrap_socket(c.sock, server_hostname=HOSTNAME)
    c.send(b"EHLO client.example\r\n")
    code, lines = c.reply()
    assert code == 250 and lines[0] == f"{HOSTNAME} client.example, pleased to meet you", \
        "the first reply inside TLS must be to our EHLO, not to the injected RSET"
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert c.buf == b""
    assert c.cmd("QUIT")[0] == 221
    assert c.closed()
    assert "RSET" not in [r["hook"] for r in records_of(srv, c)]


def test_injected_mail_behind_starttls_starts_no_transaction(srv, pki, clients):
    c = plain_client(srv, clients)
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
    assert c.reply()[0] == 220
    c.sock = client_context(pki).wrap_socket(c.sock, server_hostname=HOSTNAME)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>") == (503, ["5.5.1 Error: need MAIL command"])
    assert "MAIL" not in [r["hook"] for r in records_of(srv, c)]


def test_after_starttls_new_ehlo_required_and_state_forgotten(srv, pki, clients):
    c = plain_client(srv, clients)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<before@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    c.sock = client_context(pki).wrap_socket(c.sock, server_hostname=HOSTNAME)
    assert c.cmd("MAIL FROM:<a@example.org>") == (503, ["5.5.1 Error: send HELO/EHLO first"])
    assert c.cmd("HELO client.example")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>") == (503, ["5.5.1 Error: need MAIL command"]), \
        "the plaintext transaction is forgotten"
    assert c.cmd("DATA")[0] == 503


# -- implicit TLS -------------------------------------------------------------------


def test_implicit_tls_with_smtplib_smtp_ssl(srv, pki):
    with smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, context=client_context(pki), timeout=10) as smtp:
        code, _ = smtp.ehlo("client.example")
        assert code == 250 and not smtp.has_extn("starttls"), "no STARTTLS inside implicit TLS"
        assert smtp.docmd("STARTTLS") == (503, b"5.5.1 Error: TLS already active")
        assert smtp.sendmail("implicit@example.org", ["bob@example.net"], MESSAGE) == {}
        version = smtp.sock.version()
    mine = [m for m in srv.accepted_messages() if m["sender"] == "implicit@example.org"]
    assert len(mine) == 1 and mine[0]["body"] == b"Secret body.\r\n"
    eom = [r for r in srv.records() if r["hook"] == "EOM" and r["sender"] == "implicit@example.org"]
    assert eom[0]["tls"]["version"] == version


def test_implicit_tls_with_curl(srv, pki, tmp_path):
    curl = require_tool("curl")
    message = tmp_path / "message.eml"
    message.write_bytes(b"Subject: from curl\r\nFrom: curl@example.org\r\n\r\nSent by curl over smtps.\r\n")
    result = subprocess.run(
        [curl, "-sS", "--max-time", "20", "--ssl-reqd", f"smtps://127.0.0.1:{srv.tls_port}",
         "--cacert", str(pki.ca), "--mail-from", "curl@example.org", "--mail-rcpt", "bob@example.net",
         "-T", str(message)], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    mine = [m for m in srv.accepted_messages() if m["sender"] == "curl@example.org"]
    assert len(mine) == 1
    assert mine[0]["recipients"] == ["bob@example.net"]
    assert ("Subject", "from curl") in mine[0]["headers"]
    assert mine[0]["body"] == b"Sent by curl over smtps.\r\n"


def test_handler_sees_client_certificate(srv, pki):
    context = client_context(pki, client_cert=True)
    with smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, context=context, timeout=10) as smtp:
        assert smtp.sendmail("withcert@example.org", ["bob@example.net"], MESSAGE) == {}
        cipher = smtp.sock.cipher()[0]
    eom = [r for r in srv.records() if r["hook"] == "EOM" and r["sender"] == "withcert@example.org"]
    assert len(eom) == 1
    facts = eom[0]["tls"]
    assert facts["peer_subject"] == {"commonName": "client.example", "organizationName": "Client"}
    assert facts["peer_cert_der"] is True
    assert facts["cipher"] == cipher


# -- require_tls --------------------------------------------------------------------

def test_require_tls_refuses_all_but_ehlo_noop_starttls_quit(start_server, client_for, pki):
    srv = start_server("--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--require-tls",
                       "--error-sleep", "0")
    c = client_for(srv)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "STARTTLS" in ehlo_keywords(lines)
    assert c.cmd("NOOP")[0] == 250
    required = (530, ["5.7.0 Must issue a STARTTLS command first"])
    for command in ("MAIL FROM:<a@example.org>", "RCPT TO:<bob@example.net>", "DATA", "HELO client.example",
                    "RSET", "VRFY bob", "BDAT 0 LAST", "HELP"):
        assert c.cmd(command) == required, command
    assert c.cmd("STARTTLS")[0] == 220
    c.sock = client_context(pki).wrap_socket(c.sock, server_hostname=HOSTNAME)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: x\r\n\r\nbody\r\n.")[0] == 250
    assert len(srv.accepted_messages()) == 1
    assert c.cmd("QUIT")[0] == 221 and c.closed()
    quitter = client_for(srv)  # -X serves one session at a time: after c
    assert quitter.cmd("QUIT")[0] == 221, "QUIT works before TLS"
    assert quitter.closed()


# -- handshake failures, plaintext on the TLS port, stalls ----------------------------

def wait_log(srv, text: str, timeout: float = 5.0) -> None:
    wait_for(lambda: text in srv.log(), timeout, message=f"{text!r} in the server log")


def test_handshake_failure_is_logged_and_server_goes_on(srv, pki):
    context = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1  # the server wants TLS 1.2+
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    raw = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
    port = raw.getsockname()[1]
    with pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname=HOSTNAME)
    raw.close()
    wait_log(srv, f"TLS handshake with 127.0.0.1:{port} failed")
    assert_serves(srv, pki)


def test_plaintext_on_tls_port_is_closed_and_logged(srv, pki):
    c = Client(socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10))
    port = c.sock.getsockname()[1]
    try:
        c.send(b"EHLO client.example\r\n")
        start = time.monotonic()
        assert c.closed(timeout=10)
        assert time.monotonic() - start < 5
        assert b"220" not in c.buf and b"250" not in c.buf, "no SMTP spoken in plaintext on a TLS port"
    finally:
        c.close()
    wait_log(srv, f"TLS handshake with 127.0.0.1:{port} failed")
    assert_serves(srv, pki)


def partial_client_hello(pki) -> bytes:
    """The first half of a real ClientHello: a client stalled in the middle of its handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(pki).wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    return hello[: len(hello) // 2]


def test_client_stalling_mid_handshake_on_tls_port_is_cut_off(srv, pki):
    c = Client(socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10))
    port = c.sock.getsockname()[1]
    try:
        c.send(partial_client_hello(pki))
        start = time.monotonic()
        assert c.closed(timeout=10)
        elapsed = time.monotonic() - start
        assert 0.5 <= elapsed < 5, f"closed after {elapsed:.2f}s with --tls-handshake-timeout 1"
    finally:
        c.close()
    wait_log(srv, f"TLS handshake with 127.0.0.1:{port} failed")
    assert_serves(srv, pki)


def test_client_stalling_after_starttls_is_cut_off(srv, pki, clients):
    c = plain_client(srv, clients)
    port = c.sock.getsockname()[1]
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    start = time.monotonic()  # and now say nothing at all
    assert c.closed(timeout=10)
    elapsed = time.monotonic() - start
    assert 0.5 <= elapsed < 5, f"closed after {elapsed:.2f}s with --tls-handshake-timeout 1"
    wait_log(srv, f"TLS handshake with 127.0.0.1:{port} failed")
    assert_serves(srv, pki)


# -- HUP reloads certificates -------------------------------------------------------

def peer_organization(sock: ssl.SSLSocket) -> str:
    return dict(x[0] for x in sock.getpeercert()["subject"])["organizationName"]


def test_reload_uses_new_certificate(pki, tmp_path):
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.cert, cert)
    shutil.copy(pki.key, key)
    pidfile = tmp_path / "server.pid"
    srv = launch(tmp_path / "run", "--tls-cert", str(cert), "--tls-key", str(key),
                 "--pidfile", str(pidfile), mode=("--workers", "2"), tls_listen=True)
    try:
        with smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, context=client_context(pki), timeout=10) as smtp:
            assert peer_organization(smtp.sock) == "First"
        new_cert, new_key = make_leaf(pki, "second", f"/CN={HOSTNAME}/O=Second")
        shutil.copy(new_cert, cert)
        shutil.copy(new_key, key)
        result = subprocess.run([sys.executable, "-m", "prefork_esmtp", "reload", "--pidfile", str(pidfile)],
                                capture_output=True, timeout=60, env=server_env(), cwd=str(ROOT))
        assert result.returncode == 0, result.stdout + result.stderr
        assert b"reloaded: generation" in result.stdout
        with smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, context=client_context(pki), timeout=10) as smtp:
            assert peer_organization(smtp.sock) == "Second", "implicit TLS uses the new certificate"
            assert smtp.sendmail("reload@example.org", ["bob@example.net"], MESSAGE) == {}
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
            smtp.starttls(context=client_context(pki))
            assert peer_organization(smtp.sock) == "Second", "STARTTLS uses the new certificate"
    finally:
        srv.stop()
    assert srv.proc.returncode is not None
