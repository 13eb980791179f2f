"""AUTH (RFC 4954) with PLAIN (RFC 4616) and LOGIN: swaks, smtplib and raw
sockets; every failure code; passwords never logged.  The handler is
recorder:AuthRecorder, whose AUTH hook accepts alice/s3cret only.
"""

from __future__ import annotations

import base64
import smtplib
import subprocess

import pytest

from conftest import HOSTNAME, Client, wait_for
from test_tls import require_swaks_tls
from tls_support import (pki, client_context, ehlo_keywords, launch, messages_of, records_of,  # noqa: F401 (pki is a fixture)
                         starttls_client)

AUTH_HANDLER = "recorder:AuthRecorder"
MESSAGE = b"Subject: submitted\r\n\r\nHello from an authenticated client.\r\n"
PASSWORD = "s3cret"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{user}\0{password}")


@pytest.fixture(scope="module")
def srv(pki, tmp_path_factory):
    """AUTH only inside TLS (the default); debug logging so the password check sees everything."""
    server = launch(tmp_path_factory.mktemp("auth"), "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                    "--error-sleep", "0", "--log-level", "debug", handler=AUTH_HANDLER, tls_listen=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def submission(pki, tmp_path_factory):
    """A submission port: AUTH allowed in plaintext, and required before MAIL."""
    server = launch(tmp_path_factory.mktemp("submission"), "--tls-cert", str(pki.cert), "--tls-key",
                    str(pki.key), "--auth-plaintext", "--require-auth", "--error-sleep", "0",
                    handler=AUTH_HANDLER)
    yield server
    server.stop()


@pytest.fixture
def tc(srv, pki, clients):
    """A raw client inside TLS (STARTTLS) after EHLO: AUTH may start."""
    c = starttls_client(pki, srv)
    clients.append(c)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "AUTH" in ehlo_keywords(lines)
    return c


def plain_client(srv, clients, ehlo: bool = True) -> Client:
    c = Client(srv.connect())
    clients.append(c)
    assert c.reply()[0] == 220
    if ehlo:
        assert c.cmd("EHLO client.example")[0] == 250
    return c


def auth_records(srv, c) -> list[list]:
    return [r["args"] for r in records_of(srv, c) if r["hook"] == "AUTH"]


# -- success ----------------------------------------------------------------------------

def test_auth_advertised_only_inside_tls_and_538_outside(srv, pki, clients):
    c = plain_client(srv, clients, ehlo=False)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "AUTH" not in ehlo_keywords(lines)
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == \
        (538, ["5.7.11 Encryption required for requested authentication mechanism"])
    assert c.cmd("AUTH LOGIN") == (538, ["5.7.11 Encryption required for requested authentication mechanism"])
    assert auth_records(srv, c) == [], "the hook is never asked outside TLS"
    assert c.cmd("QUIT")[0] == 221 and c.closed()  # -X: one session at a time
    t = starttls_client(pki, srv)
    clients.append(t)
    code, lines = t.cmd("EHLO client.example")
    assert code == 250 and "AUTH PLAIN LOGIN" in lines


def test_auth_plain_with_initial_response(srv, tc):
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (235, ["2.7.0 Authentication successful"])
    code, lines = tc.cmd("EHLO client.example")
    assert code == 250 and "AUTH" not in ehlo_keywords(lines), "no AUTH offered once authenticated"
    assert tc.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert tc.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert tc.cmd("DATA")[0] == 354
    assert tc.cmd(MESSAGE + b".")[0] == 250
    assert auth_records(srv, tc) == [["PLAIN", "alice", ""]]
    [message] = messages_of(srv, tc)
    assert message["record"]["auth_user"] == "alice"
    assert message["record"]["auth_mechanism"] == "PLAIN"


def test_auth_plain_without_initial_response_and_authzid(srv, tc):
    assert tc.cmd("AUTH PLAIN") == (334, [""])
    assert tc.cmd(plain("alice", PASSWORD, authzid="postmaster")) == (235, ["2.7.0 Authentication successful"])
    assert auth_records(srv, tc) == [["PLAIN", "alice", "postmaster"]]


def test_auth_login_with_challenges(srv, tc):
    assert tc.cmd("AUTH LOGIN") == (334, ["VXNlcm5hbWU6"])  # "Username:"
    assert tc.cmd(b64("alice")) == (334, ["UGFzc3dvcmQ6"])  # "Password:"
    assert tc.cmd(b64(PASSWORD)) == (235, ["2.7.0 Authentication successful"])
    assert auth_records(srv, tc) == [["LOGIN", "alice", ""]]


def test_auth_login_with_initial_username(srv, tc):
    assert tc.cmd(f"AUTH login {b64('alice')}") == (334, ["UGFzc3dvcmQ6"])
    assert tc.cmd(b64(PASSWORD)) == (235, ["2.7.0 Authentication successful"])


def test_smtplib_login_plain_and_login(srv, pki):
    for mechanism in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
            smtp.starttls(context=client_context(pki))
            smtp.ehlo("client.example")
            assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
            if mechanism == "PLAIN":
                code, text = smtp.login("alice", PASSWORD)  # smtplib picks PLAIN
            else:
                smtp.user, smtp.password = "alice", PASSWORD
                code, text = smtp.auth("LOGIN", smtp.auth_login)
            assert (code, text) == (235, b"2.7.0 Authentication successful")
            sender = f"smtplib-{mechanism.lower()}@example.org"
            assert smtp.sendmail(sender, ["bob@example.net"], MESSAGE) == {}
        eom = [r for r in srv.records() if r["hook"] == "EOM" and r["sender"] == sender]
        assert [(r["auth_user"], r["auth_mechanism"]) for r in eom] == [("alice", mechanism)]


def test_smtplib_login_wrong_password(srv, pki):
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.starttls(context=client_context(pki))
        smtp.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            smtp.login("alice", "wrong-password")
        assert info.value.smtp_code == 535
        assert info.value.smtp_error == b"5.7.8 Authentication credentials invalid"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_over_tls(srv, pki, mechanism):
    swaks = require_swaks_tls()
    sender = f"swaks-{mechanism.lower()}@example.org"
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--tls", "--tls-verify",
         "--tls-ca-path", str(pki.ca), "--tls-sni", HOSTNAME, "-a", mechanism, "--auth-user", "alice",
         "--auth-password", PASSWORD, "--from", sender, "--to", "bob@example.net"],
        capture_output=True, timeout=30)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert f"~> AUTH {mechanism}" in out
    assert "<~  235 2.7.0 Authentication successful" in out
    eom = [r for r in srv.records() if r["hook"] == "EOM" and r["sender"] == sender]
    assert [(r["auth_user"], r["auth_mechanism"]) for r in eom] == [("alice", mechanism)]


def test_swaks_wrong_password_fails(srv, pki):
    swaks = require_swaks_tls()
    result = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--tls", "--tls-verify",
         "--tls-ca-path", str(pki.ca), "--tls-sni", HOSTNAME, "-a", "LOGIN", "--auth-user", "alice",
         "--auth-password", "not-the-password", "--from", "swaks-bad@example.org", "--to", "bob@example.net"],
        capture_output=True, timeout=30)
    out = result.stdout.decode(errors="replace")
    assert result.returncode != 0
    assert "<~* 535 5.7.8 Authentication credentials invalid" in out
    assert not [r for r in srv.records() if r["hook"] == "MAIL" and r["args"][0] == "swaks-bad@example.org"]


# -- failures ---------------------------------------------------------------------------

def test_wrong_credentials_535(srv, tc):
    assert tc.cmd(f"AUTH PLAIN {plain('alice', 'wrong')}") == (535, ["5.7.8 Authentication credentials invalid"])
    assert tc.cmd(f"AUTH PLAIN {plain('mallory', PASSWORD)}") == (535, ["5.7.8 Authentication credentials invalid"])
    assert tc.cmd("AUTH LOGIN") == (334, ["VXNlcm5hbWU6"])
    assert tc.cmd(b64("alice")) == (334, ["UGFzc3dvcmQ6"])
    assert tc.cmd(b64("nope")) == (535, ["5.7.8 Authentication credentials invalid"])
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235, "a later good attempt succeeds"


def test_star_cancels_with_501(srv, tc):
    assert tc.cmd("AUTH PLAIN") == (334, [""])
    assert tc.cmd("*") == (501, ["5.7.0 Authentication cancelled"])
    assert tc.cmd("AUTH LOGIN") == (334, ["VXNlcm5hbWU6"])
    assert tc.cmd(b64("alice")) == (334, ["UGFzc3dvcmQ6"])
    assert tc.cmd("*") == (501, ["5.7.0 Authentication cancelled"])
    assert auth_records(srv, tc) == [], "a cancelled exchange never reaches the hook"
    assert tc.cmd("NOOP")[0] == 250, "the session is in sync after the cancel"
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235


@pytest.mark.parametrize("exchange", [
    ["AUTH PLAIN not*base64!"],
    ["AUTH PLAIN", "%%%%"],
    ["AUTH LOGIN", "YWxpY2U"],  # base64 with its padding missing
    ["AUTH LOGIN", b64("alice"), "s3cret"],  # the password not encoded
    ["AUTH PLAIN " + b64("alice s3cret")],  # base64 fine, but not authzid NUL authcid NUL password
    ["AUTH LOGIN", b64("abc") + "=="],  # surplus padding after a complete group (RFC 4954 4)
    ["AUTH PLAIN " + plain("alice", PASSWORD) + "===="],  # a whole group of padding
])
def test_bad_base64_or_response_501(srv, tc, exchange):
    for line in exchange[:-1]:
        assert tc.cmd(line)[0] == 334
    code, lines = tc.cmd(exchange[-1])
    assert code == 501 and lines[0].startswith("5.5.2 Error: cannot decode the response"), (code, lines)
    assert auth_records(srv, tc) == []
    assert tc.cmd("NOOP")[0] == 250


def test_auth_twice_503(srv, tc):
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (503, ["5.5.1 Error: already authenticated"])
    assert tc.cmd("AUTH LOGIN") == (503, ["5.5.1 Error: already authenticated"])


def test_auth_during_transaction_503(srv, tc):
    assert tc.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (503, ["5.5.1 Error: MAIL transaction in progress"])
    assert auth_records(srv, tc) == []
    assert tc.cmd("RSET")[0] == 250
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235, "allowed again after RSET"


def test_auth_before_ehlo_and_unknown_mechanism(srv, pki, clients):
    c = starttls_client(pki, srv)
    clients.append(c)
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (503, ["5.5.1 Error: send HELO/EHLO first"])
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("AUTH CRAM-MD5") == (504, ["5.5.4 Unrecognized authentication type"])
    assert c.cmd("AUTH") == (501, ["5.5.4 Syntax: AUTH mechanism [initial-response]"])


def test_handler_reply_and_handler_failure(srv, tc):
    assert tc.cmd(f"AUTH PLAIN {plain('tempfail', 'x')}") == (454, ["4.7.0 Try again later"])
    assert tc.cmd(f"AUTH PLAIN {plain('raise', 'x')}") == (454, ["4.7.0 Temporary authentication failure"])
    assert tc.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235


def test_failed_attempts_count_toward_max_errors(start_server, client_for):
    srv = start_server("--auth-plaintext", "--max-errors", "3", "--error-sleep", "0", handler=AUTH_HANDLER)
    c = client_for(srv)
    assert c.cmd("EHLO client.example")[0] == 250
    for attempt in range(2):
        assert c.cmd(f"AUTH PLAIN {plain('alice', f'guess{attempt}')}")[0] == 535
    c.send(f"AUTH PLAIN {plain('alice', 'guess2')}\r\n".encode())
    assert c.reply()[0] == 535
    assert c.reply() == (421, [f"4.7.0 {HOSTNAME} Error: too many errors"])
    assert c.closed()
    c.close()  # -X: the next session starts once this one is gone
    other = client_for(srv)  # the server goes on
    assert other.cmd("EHLO client.example")[0] == 250
    assert other.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235


def test_auth_not_offered_without_a_hook(start_server, client_for):
    srv = start_server("--auth-plaintext")  # the plain Recorder does not override AUTH
    c = client_for(srv)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "AUTH" not in ehlo_keywords(lines)
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}") == (502, ["5.5.1 Error: authentication not enabled"])


# -- submission: plaintext AUTH allowed, AUTH required ----------------------------------

def test_require_auth_530_before_auth(submission, clients):
    c = plain_client(submission, clients, ehlo=False)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "AUTH PLAIN LOGIN" in lines, "auth_plaintext offers AUTH without TLS"
    assert c.cmd("MAIL FROM:<a@example.org>") == (530, ["5.7.0 Authentication required"])
    assert c.cmd(f"AUTH PLAIN {plain('alice', 'wrong')}")[0] == 535
    assert c.cmd("MAIL FROM:<a@example.org>") == (530, ["5.7.0 Authentication required"])
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
    assert c.cmd("MAIL FROM:<a@example.org> AUTH=alice@example.org")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(MESSAGE + b".")[0] == 250
    [message] = messages_of(submission, c)
    assert message["record"]["auth_user"] == "alice"
    assert message["record"]["mail_params"] == {"AUTH": "alice@example.org"}
    assert message["record"]["tls"] is None


def test_starttls_forgets_auth(submission, pki, clients):
    c = plain_client(submission, clients)
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    c.sock = client_context(pki).wrap_socket(c.sock, server_hostname=HOSTNAME)
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and "AUTH PLAIN LOGIN" in lines, "AUTH is offered again: the plaintext AUTH is forgotten"
    assert c.cmd("MAIL FROM:<a@example.org>") == (530, ["5.7.0 Authentication required"])
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250


def test_mail_auth_parameter_validated(submission, clients):
    c = plain_client(submission, clients)
    assert c.cmd(f"AUTH PLAIN {plain('alice', PASSWORD)}")[0] == 235
    assert c.cmd("MAIL FROM:<a@example.org> AUTH=bad+zz")[0] == 501
    assert c.cmd("MAIL FROM:<a@example.org> AUTH=<>")[0] == 250
    mail = [r for r in records_of(submission, c) if r["hook"] == "MAIL"]
    assert mail[-1]["args"] == ["a@example.org", {"AUTH": "<>"}]


# -- passwords never logged ----------------------------------------------------------------

def test_passwords_never_in_logs(start_server, client_for):
    """Debug logging, successful and failed PLAIN and LOGIN, a raising hook: no password, in any form."""
    wrong = "Wr0ng-pa55-plugh"
    srv = start_server("--auth-plaintext", "--log-level", "debug", "--error-sleep", "0", handler=AUTH_HANDLER)
    attempts = (("alice", PASSWORD), ("alice", wrong), ("raise", wrong))
    for user, password in attempts:
        c = client_for(srv)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd(f"AUTH PLAIN {plain(user, password)}")[0] in (235, 535, 454)
        assert c.cmd("QUIT")[0] == 221
        assert c.closed()
        c = client_for(srv)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd(b64(user))[0] == 334
        assert c.cmd(b64(password))[0] in (235, 535, 454)
        assert c.cmd("QUIT")[0] == 221
        assert c.closed()
    wait_for(lambda: srv.log().count("AUTH hook raised") == 2, 5, message="the raising hook logged twice")
    log = srv.log()
    assert log.count("authenticated 127.0.0.1") == 2
    assert log.count("authentication failed for 'alice'") == 2
    for user, password in attempts:
        for form in (password, b64(password), plain(user, password)):
            assert form not in log, f"{form!r} appears in the server log"


@pytest.mark.parametrize("text,ok", [
    ("QUJD", True), ("QUI=", True), ("QQ==", True), ("", True), ("=", True),
    ("QUJD=", False), ("QUJD==", False), ("QQ=", False), ("QQ===", False), ("QQ==QQ==", False),
    ("QU JD", False), ("QUJ", False),
])
def test_b64decode_follows_rfc4954_grammar(text, ok):
    from prefork_esmtp import sasl

    if ok:
        sasl.b64decode(text)
    else:
        with pytest.raises(sasl.SASLError):
            sasl.b64decode(text)
