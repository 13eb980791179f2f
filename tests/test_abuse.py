"""Abuse defences: bare LF in commands, unauthenticated pipelining and
talking before the greeting, slowloris (minimum data rate), junk-command floods, dot-stuffing bombs,
the per-IP session limit across workers, and error-sleep past the soft error
limit.  Each defence triggers, and the server keeps serving other clients.
"""

from __future__ import annotations

import select
import smtplib
import time

import psutil
import pytest

from conftest import HOSTNAME, Client, wait_for
from protocol_support import module_server
from tls_support import launch, messages_of, records_of

from prefork_esmtp.scoreboard import Scoreboard
from prefork_esmtp.settings import SettingError, resolve

PIPELINING_ABUSE = (554, [f"5.5.0 {HOSTNAME} Error: improper use of SMTP command pipelining"])
MESSAGE = b"Subject: fine\r\n\r\nA well-behaved client.\r\n"


def assert_serves(srv) -> None:
    """A well-behaved client still gets its message through."""
    def good() -> int:
        return sum(m["sender"] == "good@example.org" for m in srv.accepted_messages())

    before = good()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        assert smtp.ehlo("good.example")[0] == 250
        assert smtp.sendmail("good@example.org", ["bob@example.net"], MESSAGE) == {}
    assert good() == before + 1


def connect(srv, greet: bool = True) -> Client:
    c = Client(srv.connect())
    if greet:
        code, lines = c.reply()
        assert code == 220, (code, lines)
    return c


# -- bare LF in commands ------------------------------------------------------------------

def test_command_bare_lf_reject(start_server, clients):
    srv = start_server("--command-bare-lf", "reject", "--error-sleep", "0")
    c = connect(srv)
    clients.append(c)
    bare = (500, ["5.5.2 Error: bare LF in command; lines must end with CRLF"])
    c.send(b"EHLO client.example\n")
    assert c.reply() == bare
    assert c.cmd("EHLO client.example")[0] == 250, "the same command with CRLF is fine"
    c.send(b"MAIL FROM:<bare@example.org>\n")
    assert c.reply() == bare
    c.send(b"NOOP\n")
    assert c.reply() == bare
    assert c.cmd("MAIL FROM:<crlf@example.org>")[0] == 250
    assert [r["args"][0] for r in records_of(srv, c) if r["hook"] == "MAIL"] == ["crlf@example.org"], \
        "the bare-LF MAIL never reached the handler"
    assert c.cmd("QUIT")[0] == 221 and c.closed()
    assert_serves(srv)


def test_command_bare_lf_accepted_by_default(start_server, clients):
    srv = start_server()
    c = connect(srv)
    clients.append(c)
    c.send(b"EHLO client.example\nNOOP\n")
    assert [code for code, _ in c.replies(2)] == [250, 250]


# -- forbid_unauth_pipelining ---------------------------------------------------------------

# forbid_unauth_pipelining, and a CONNECT hook that takes 0.3 s (a slow greeting).
strict = module_server("strict", "--forbid-unauth-pipelining", "--auth-plaintext",
                    "--error-sleep", "0", handler="recorder:AuthRecorder",
                    env={"PREFORK_TEST_CONNECT_DELAY": "0.3"})


def test_talking_before_the_greeting_554_and_close(strict):
    c = connect(strict, greet=False)
    try:
        c.send(b"EHLO client.example\r\n")  # the greeting is 0.3 s away
        assert c.reply() == PIPELINING_ABUSE
        assert c.closed()
        hooks = [r["hook"] for r in records_of(strict, c)]
        assert "EHLO" not in hooks
    finally:
        c.close()
    wait_for(lambda: "talked before the greeting" in strict.log(), 5, message="the log line")
    assert_serves(strict)


@pytest.mark.parametrize("before, batch, expected", [
    ([], b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n", [250]),
    ([], b"HELO client.example\r\nQUIT\r\n", [250]),
    (["EHLO client.example"], b"NOOP\r\nNOOP\r\n", [250]),
    (["EHLO client.example"], b"VRFY bob\r\nRSET\r\n", [252]),
    (["EHLO client.example", "MAIL FROM:<a@example.org>"], b"RCPT TO:<bob@example.net>\r\nNOOP\r\nRSET\r\n",
     [250, 250]),
])
def test_pipelining_past_a_group_ender_554_and_close(strict, before, batch, expected):
    c = connect(strict)
    try:
        for line in before:
            assert c.cmd(line)[0] == 250
        c.send(batch)
        codes = [code for code, _ in c.replies(len(expected))]
        assert codes == expected
        assert c.reply() == PIPELINING_ABUSE
        assert c.closed()
    finally:
        c.close()
    assert_serves(strict)


def test_pipelining_past_data_554_and_close(strict):
    c = connect(strict)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        c.send(b"MAIL FROM:<rushed@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n"
               b"Subject: rushed\r\n\r\nbody\r\n.\r\n")
        assert [code for code, _ in c.replies(3)] == [250, 250, 354]
        assert c.reply() == PIPELINING_ABUSE
        assert c.closed()
        assert messages_of(strict, c) == [], "the message sent before the 354 is not taken"
    finally:
        c.close()
    assert_serves(strict)


def test_well_behaved_pipelining_client_is_fine(strict):
    c = connect(strict)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        c.send(b"MAIL FROM:<pipeliner@example.org>\r\nRCPT TO:<bob@example.net>\r\n"
               b"RCPT TO:<carol@example.net>\r\nDATA\r\n")
        assert [code for code, _ in c.replies(4)] == [250, 250, 250, 354]
        assert c.cmd(MESSAGE + b".")[0] == 250
        c.send(b"RSET\r\nMAIL FROM:<second@example.org>\r\nRCPT TO:<bob@example.net>\r\nBDAT 4 LAST\r\nbody")
        assert [code for code, _ in c.replies(4)] == [250, 250, 250, 250], "BDAT may be pipelined"
        assert c.cmd("QUIT")[0] == 221
        assert c.closed()
        assert [m["sender"] for m in messages_of(strict, c)] == ["pipeliner@example.org", "second@example.org"]
    finally:
        c.close()


def test_authenticated_client_may_pipeline(strict):
    c = connect(strict)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==")[0] == 235  # \0alice\0s3cret
        c.send(b"NOOP\r\nNOOP\r\nEHLO client.example\r\nQUIT\r\n")
        assert [code for code, _ in c.replies(4)] == [250, 250, 250, 221]
    finally:
        c.close()


# -- minimum data rate (slowloris) -------------------------------------------------------------

slow = module_server("slow", "--min-data-rate", "100", "--min-data-rate-grace", "1",
                    "--error-sleep", "0")


def trickle(c: Client, deadline: float = 6.0) -> tuple[float, tuple[int, list[str]]]:
    """Send one byte every 0.1 s until the server answers; (seconds taken, its reply)."""
    start = time.monotonic()
    for _ in range(int(deadline / 0.1)):
        readable, _, _ = select.select([c.sock], [], [], 0.1)
        if readable:
            return time.monotonic() - start, c.reply()
        try:
            c.send(b"x")
        except OSError:
            break
    return time.monotonic() - start, c.reply(timeout=1)


def test_slow_data_gets_421(slow):
    c = connect(slow)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<slowloris@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        elapsed, reply = trickle(c)
        assert reply == (421, [f"4.4.2 {HOSTNAME} Error: data rate too low"])
        assert 0.9 <= elapsed < 3.0, f"cut off after {elapsed:.2f}s (1 s grace, 100 octets/s wanted)"
        assert c.closed()
        assert messages_of(slow, c) == []
    finally:
        c.close()
    wait_for(lambda: "data rate below 100 octets/s" in slow.log(), 5, message="the log line")
    assert_serves(slow)


def test_slow_bdat_gets_421(slow):
    c = connect(slow)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<slowloris@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
        c.send(b"BDAT 1000 LAST\r\n")
        elapsed, reply = trickle(c)
        assert reply == (421, [f"4.4.2 {HOSTNAME} Error: data rate too low"])
        assert 0.9 <= elapsed < 3.0
        assert c.closed()
    finally:
        c.close()
    assert_serves(slow)


def test_pause_within_the_grace_is_fine(slow):
    c = connect(slow)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<pause@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: pause\r\n")
        time.sleep(0.5)  # a client thinking for half the grace period: allowed
        assert c.cmd(b"\r\nbody\r\n.")[0] == 250
    finally:
        c.close()


def test_silence_after_354_gets_421_after_the_grace(slow):
    """No octet at all after the 354 (the read that usually brings the whole message): 421 once
    the grace is over, not after the idle timeout; the same after a message that came at once."""
    c = connect(slow)
    try:
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<quick@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        assert c.cmd(b"Subject: quick\r\n\r\nbody\r\n.")[0] == 250
        assert c.cmd("MAIL FROM:<silent@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        start = time.monotonic()
        reply = c.reply(timeout=10)
        elapsed = time.monotonic() - start
        assert reply == (421, [f"4.4.2 {HOSTNAME} Error: data rate too low"])
        assert 0.9 <= elapsed < 3.0, f"cut off after {elapsed:.2f}s (1 s grace)"
        assert c.closed()
    finally:
        c.close()
    assert_serves(slow)


def test_min_data_rate_grace_setting():
    assert resolve({}, {}).min_data_rate_grace == 10.0
    assert resolve({"min_data_rate_grace": "1"}, {}).min_data_rate_grace == 1.0
    for too_short in ("0", "0.5"):  # every message not already buffered at the 354 would be "too slow"
        with pytest.raises(SettingError, match="--min-data-rate-grace.*at least 1 second"):
            resolve({"min_data_rate_grace": too_short}, {})
    assert resolve({}, {"min_data_rate_grace": 2.5}).min_data_rate_grace == 2.5
    with pytest.raises(SettingError, match="--min-data-rate-grace"):
        resolve({"min_data_rate_grace": "-1"}, {})


# -- junk commands ---------------------------------------------------------------------------

def test_junk_command_flood_421(start_server, clients):
    srv = start_server("--max-junk-commands", "5")
    c = connect(srv)
    clients.append(c)
    assert c.cmd("EHLO client.example")[0] == 250
    for _ in range(5):
        assert c.cmd("NOOP")[0] == 250
    assert c.cmd("NOOP") == (421, [f"4.7.0 {HOSTNAME} Error: too many NOOP, RSET, VRFY, EXPN or HELP commands"])
    assert c.closed()
    assert [r["hook"] for r in records_of(srv, c)].count("NOOP") == 5, "the 6th NOOP never reached the handler"
    c.close()  # -X: the next session starts once this one is gone
    c = connect(srv)  # a new session starts from zero; every junk verb counts
    clients.append(c)
    for command in ("NOOP", "RSET", "VRFY bob", "EXPN list", "HELP"):
        assert c.cmd(command)[0] in (250, 252, 502, 214)
    assert c.cmd("RSET")[0] == 421
    assert c.closed()
    c.close()
    assert_serves(srv)


# -- per-IP session limit (pre-forked: counted across workers) ----------------------------------

def test_sessions_per_ip_limit_across_workers(tmp_path):
    pidfile = tmp_path / "server.pid"
    srv = launch(tmp_path / "run", "--max-sessions-per-ip", "2", "--pidfile", str(pidfile),
                 mode=("--workers", "4"))
    opened: list[Client] = []
    try:
        for _ in range(2):
            opened.append(connect(srv))  # two sessions, each in its own worker
        third = connect(srv, greet=False)
        opened.append(third)
        assert third.reply() == (421, [f"4.7.0 {HOSTNAME} Error: too many connections from your address"])
        assert third.closed()
        third.close()  # its worker lingers until the client goes, still counted for 127.0.0.1
        assert opened[0].cmd("NOOP")[0] == 250, "the sessions within the limit go on"
        assert opened[0].cmd("QUIT")[0] == 221 and opened[0].closed()
        board = str(pidfile) + ".scoreboard"
        wait_for(lambda: Scoreboard.open(board).sessions_from("127.0.0.1") == 1, 5,
                 message="the closed session's worker to be idle")
        again = connect(srv)
        opened.append(again)
        assert again.cmd("EHLO client.example")[0] == 250
        assert again.cmd("MAIL FROM:<again@example.org>")[0] == 250
        assert "too many sessions from 127.0.0.1" in srv.log()
    finally:
        for c in opened:
            c.close()
        srv.stop()


# -- error sleep past the soft error limit ----------------------------------------------------

def timed(c: Client, line: str) -> tuple[float, int]:
    start = time.monotonic()
    code, _ = c.cmd(line)
    return time.monotonic() - start, code


def test_error_replies_delayed_past_the_soft_limit(start_server, clients):
    srv = start_server("--soft-error-limit", "2", "--error-sleep", "0.5", "--max-errors", "10")
    c = connect(srv)
    clients.append(c)
    assert c.cmd("EHLO client.example")[0] == 250
    for _ in range(2):  # up to the soft limit: answered at once
        elapsed, code = timed(c, "BOGUS")
        assert code == 500 and elapsed < 0.4, elapsed
    for _ in range(2):  # past it: each error reply waits error_sleep
        elapsed, code = timed(c, "BOGUS")
        assert code == 500 and 0.5 <= elapsed < 2.5, elapsed
    elapsed, code = timed(c, "NOOP")
    assert code == 250 and elapsed < 0.4, "good replies are not delayed"
    assert c.cmd("QUIT")[0] == 221 and c.closed()
    assert_serves(srv)


def test_dot_stuffed_lines_cost_no_more_cpu_than_plain_ones(start_server, client_for):
    """40 MiB of "..\\r\\n" lines (10 million stuffed dots) past the size limit: the worker's CPU for
    them stays close to what as many octets of plain lines cost, not a per-line price."""
    srv = start_server("--max-message-size", "1M", handler="")  # -X: the server process serves the session
    worker = psutil.Process(srv.proc.pid)
    c = client_for(srv)
    assert c.cmd("EHLO client.example")[0] == 250
    spent = {}
    for name, line in (("plain", b"x" * 62 + b"\r\n"), ("dots", b"..\r\n")):
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        before = sum(worker.cpu_times()[:2])
        block = line * ((1 << 20) // len(line))
        for _ in range(40):
            c.send(block)
        c.send(b".\r\n")
        code, lines = c.reply(timeout=60)
        spent[name] = sum(worker.cpu_times()[:2]) - before
        assert code == 552 and lines[0].startswith("5.3.4 "), (code, lines)
    assert spent["dots"] < 3 * spent["plain"] + 0.5, \
        f"dot-stuffed lines cost {spent['dots']:.2f} s of CPU, plain ones {spent['plain']:.2f} s"
    assert c.cmd("QUIT")[0] == 221
