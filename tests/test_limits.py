"""Limits and timeouts over a real socket: command line length, message size,
recipients, errors per session, idle timeout, header size, and a bounded
memory whatever the client sends.
"""

from __future__ import annotations

import time


from conftest import HOSTNAME, wait_for
from protocol_support import (module_server, local_port, nothing_arrives, rss_kib, session_hooks, session_messages,
                              session_records)

SMALL_SIZE = 2000
HEADER_LIMIT = 1000


# Small limits: message size 2000, header size 1000, 100 recipients.
srv = module_server("limits", "--max-message-size", str(SMALL_SIZE),
                    "--max-header-size", str(HEADER_LIMIT), "--max-recipients", "100")


# The default settings.
plain = module_server("limits-default")


# A one-second idle timeout.
slow = module_server("limits-timeout", "--timeout", "1")


def ehlo(client_for, server):
    c = client_for(server)
    assert c.cmd("EHLO client.example")[0] == 250
    return c


def start_data(c, sender="alice@example.org", recipient="bob@example.net"):
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{recipient}>")[0] == 250
    assert c.cmd("DATA")[0] == 354


def enhanced(lines):
    return lines[0].split(" ")[0]


# --- command line: 512 octets including CRLF ---------------------------------------


def test_command_line_of_512_octets_is_served(srv, client_for):
    c = ehlo(client_for, srv)
    line = b"NOOP " + b"x" * (512 - 5 - 2)
    assert len(line + b"\r\n") == 512
    assert c.cmd(line) == (250, ["2.0.0 OK"])


def test_command_line_of_513_octets_is_500_and_session_stays_in_sync(srv, client_for):
    c = ehlo(client_for, srv)
    line = b"NOOP " + b"x" * (513 - 5 - 2)
    c.send(line + b"\r\nHELP\r\n")
    code, lines = c.reply()
    assert (code, enhanced(lines)) == (500, "5.5.2"), lines
    assert c.reply()[0] == 214  # the HELP after it, nothing in between
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert "NOOP" in session_hooks(srv, c)


def test_long_line_tail_is_drained_not_executed(srv, client_for):
    """What follows the 512th octet of a long line must not run as a command."""
    c = ehlo(client_for, srv)
    c.send(b"X" * 510 + b"QUIT\r\nNOOP\r\n")
    code, lines = c.reply()
    assert (code, enhanced(lines)) == (500, "5.5.2"), lines
    assert c.reply() == (250, ["2.0.0 OK"])
    assert "QUIT" not in session_hooks(srv, c)


def test_long_line_sent_in_pieces_gets_one_500(srv, client_for):
    c = ehlo(client_for, srv)
    for _ in range(4):
        c.send(b"y" * 50000)
    c.send(b"\r\nNOOP\r\n")
    assert c.reply()[0] == 500
    assert c.reply() == (250, ["2.0.0 OK"])
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])


def test_huge_line_keeps_memory_bounded_and_server_serves_next_client(plain, client_for):
    c = ehlo(client_for, plain)
    before = rss_kib(plain.proc.pid)
    block = b"z" * (1 << 20)
    for _ in range(24):  # 24 MiB without a line end
        c.send(block)
    c.send(b"\r\n")
    assert c.reply()[0] == 500
    after = rss_kib(plain.proc.pid)
    assert after - before < 8 * 1024, f"RSS grew from {before} to {after} KiB on a 24 MiB line"
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()
    other = ehlo(client_for, plain)
    start_data(other)
    other.send(b"Subject: next\r\n\r\nstill here\r\n.\r\n")
    assert other.reply()[0] == 250
    assert session_messages(plain, other)[0]["body"] == b"still here\r\n"


def test_client_vanishing_mid_huge_line_leaves_server_serving(plain, client_for):
    c = ehlo(client_for, plain)
    for _ in range(4):
        c.send(b"w" * (1 << 20))
    c.close()
    other = ehlo(client_for, plain)
    assert other.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert plain.proc.poll() is None


def test_huge_header_keeps_memory_bounded_and_server_serves_next_client(plain, client_for):
    c = ehlo(client_for, plain)
    start_data(c)
    before = rss_kib(plain.proc.pid)
    c.send(b"X-Huge: ")
    for _ in range(8):  # an 8 MiB header line (limit: 100 KiB), under the 10 MiB size limit
        c.send(b"h" * (1 << 20))
    assert nothing_arrives(c, 0.2)
    c.send(b"\r\n\r\nbody\r\n.\r\n")
    code, lines = c.reply()
    assert (code, enhanced(lines)) == (552, "5.3.4"), lines
    after = rss_kib(plain.proc.pid)
    assert after - before < 8 * 1024, f"RSS grew from {before} to {after} KiB on an 8 MiB header"
    assert "EOM" not in session_hooks(plain, c)
    assert c.cmd("QUIT")[0] == 221
    c.close()
    other = ehlo(client_for, plain)
    assert other.cmd("NOOP")[0] == 250


# --- message size -------------------------------------------------------------------


def test_size_is_advertised(srv, client_for):
    c = client_for(srv)
    code, lines = c.cmd("EHLO client.example")
    assert f"SIZE {SMALL_SIZE}" in lines


def message_of(size: int) -> bytes:
    """A message of exactly ``size`` octets: CRLF-ended lines, none starting with a dot."""
    head = b"Subject: size\r\n\r\n"
    full, rest = divmod(size - len(head), 80)
    if rest == 1:
        full, rest = full - 1, rest + 80
    data = head + (b"b" * 78 + b"\r\n") * full + (b"b" * (rest - 2) + b"\r\n" if rest else b"")
    assert len(data) == size and data.endswith(b"\r\n")
    return data


def test_message_at_the_limit_is_accepted(srv, client_for):
    c = ehlo(client_for, srv)
    start_data(c)
    data = message_of(SMALL_SIZE)
    c.send(data + b".\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert len(message["body"]) == SMALL_SIZE - len(b"Subject: size\r\n\r\n")


def test_message_over_the_limit_is_552_after_end_of_data_and_discarded(srv, client_for):
    c = ehlo(client_for, srv)
    start_data(c)
    c.send(message_of(SMALL_SIZE + 1))
    assert nothing_arrives(c, 0.3), "the size error must come after the end of data"
    c.send(b".\r\n")
    code, lines = c.reply()
    assert (code, enhanced(lines)) == (552, "5.3.4"), lines
    assert "EOM" not in session_hooks(srv, c)
    # the transaction is over and the session is usable
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 503
    start_data(c, "carol@example.org", "dave@example.net")
    c.send(b"Subject: small\r\n\r\nsmall\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert (message["sender"], message["body"]) == ("carol@example.org", b"small\r\n")


def test_much_larger_message_is_drained_and_session_in_sync(srv, client_for):
    c = ehlo(client_for, srv)
    start_data(c)
    c.send(b"Subject: big\r\n\r\n" + (b"a" * 98 + b"\r\n") * 20000 + b".\r\nNOOP\r\n")
    assert c.reply()[0] == 552
    assert c.reply() == (250, ["2.0.0 OK"])
    assert "EOM" not in session_hooks(srv, c)


# --- recipients -------------------------------------------------------------------------


def test_default_accepts_at_least_100_recipients(plain, client_for):
    c = ehlo(client_for, plain)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    count = 120
    c.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(count)))
    assert [code for code, _ in c.replies(count)] == [250] * count
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: many\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(plain, c)
    assert message["recipients"] == [f"r{i}@example.net" for i in range(count)]


def test_recipients_beyond_the_limit_get_452(srv, client_for):
    c = ehlo(client_for, srv)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    c.send(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(102)))
    replies = c.replies(102)
    assert [code for code, _ in replies[:100]] == [250] * 100
    for code, lines in replies[100:]:
        assert (code, enhanced(lines)) == (452, "4.5.3"), lines
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: many\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["recipients"] == [f"r{i}@example.net" for i in range(100)]
    rcpt_calls = [r for r in session_records(srv, c) if r["hook"] == "RCPT"]
    assert len(rcpt_calls) == 100  # the hook is not asked about the ones over the limit


def test_refused_recipients_do_not_count_toward_the_limit(srv, client_for):
    c = ehlo(client_for, srv)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    c.send(b"RCPT TO:<reject@example.net>\r\n" * 5
           + b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(100)))
    codes = [code for code, _ in c.replies(105)]
    assert codes == [550] * 5 + [250] * 100


# --- errors per session -------------------------------------------------------------------


def test_max_errors_gives_421_and_close(start_server, client_for):
    srv = start_server("--max-errors", "3")
    c = client_for(srv)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("FOO")[0] == 500
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 503
    code, lines = c.cmd("MAIL FROM:bad")
    assert code == 501
    code, lines = c.reply()
    assert code == 421 and lines[0] == f"4.7.0 {HOSTNAME} Error: too many errors", lines
    assert c.closed(5)
    c.close()
    wait_for(lambda: "DISCONNECT" in srv.hooks(), 5, message="DISCONNECT")
    # the server serves the next client with a fresh count
    c2 = client_for(srv)
    assert c2.cmd("FOO")[0] == 500
    assert c2.cmd("NOOP")[0] == 250


def test_successes_do_not_count_as_errors(start_server, client_for):
    srv = start_server("--max-errors", "2")
    c = client_for(srv)
    assert c.cmd("FOO")[0] == 500
    for _ in range(5):
        assert c.cmd("NOOP")[0] == 250
    assert c.cmd("FOO")[0] == 500
    assert c.reply()[0] == 421
    assert c.closed(5)


# --- idle timeout -------------------------------------------------------------------------


def assert_timeout_reply(c, started):
    code, lines = c.reply(timeout=6)
    elapsed = time.monotonic() - started
    assert (code, lines) == (421, [f"4.4.2 {HOSTNAME} Error: timeout exceeded"])
    assert 0.8 <= elapsed < 5, elapsed
    assert c.closed(5)


def test_idle_timeout_after_greeting(slow, client_for):
    c = client_for(slow)
    started = time.monotonic()
    assert_timeout_reply(c, started)


def test_timeout_mid_command_line(slow, client_for):
    c = client_for(slow)
    c.send(b"NOO")
    started = time.monotonic()
    assert_timeout_reply(c, started)
    assert "NOOP" not in session_hooks(slow, c)


def test_timeout_mid_data_never_calls_eom(slow, client_for):
    c = client_for(slow)
    local_port(c)  # remembered for after the close
    assert c.cmd("EHLO client.example")[0] == 250
    start_data(c)
    c.send(b"Subject: never finished\r\n\r\nhalf a mess")
    started = time.monotonic()
    assert_timeout_reply(c, started)
    c.close()
    wait_for(lambda: "DISCONNECT" in session_hooks(slow, c), 5, message="DISCONNECT")
    hooks = session_hooks(slow, c)
    assert "EOM" not in hooks
    assert hooks[-1] == "DISCONNECT"
    assert session_messages(slow, c) == []


def test_timeout_is_per_read_not_per_session(slow, client_for):
    c = client_for(slow)
    assert c.cmd("EHLO client.example")[0] == 250
    start_data(c)
    c.send(b"Subject: trickle\r\n\r\n")
    started = time.monotonic()
    for i in range(6):  # 1.5 s in all, never 1 s without a byte
        time.sleep(0.25)
        c.send(b"line %d\r\n" % i)
    assert time.monotonic() - started > 1.0
    c.send(b".\r\n")
    assert c.reply()[0] == 250
    assert session_messages(slow, c)[0]["body"] == b"".join(b"line %d\r\n" % i for i in range(6))


def test_server_serves_after_a_timeout(slow, client_for):
    c = client_for(slow)
    assert c.reply(timeout=6)[0] == 421
    c.close()
    other = client_for(slow)
    assert other.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert slow.proc.poll() is None


# --- header size ---------------------------------------------------------------------------


def test_header_within_the_limit_is_accepted(srv, client_for):
    c = ehlo(client_for, srv)
    start_data(c)
    value = "v" * (HEADER_LIMIT - len("X-Long"))
    c.send(b"X-Long: " + value.encode() + b"\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["headers"] == [("X-Long", value)]


def test_header_over_the_limit_is_552_after_end_of_data(srv, client_for):
    c = ehlo(client_for, srv)
    start_data(c)
    c.send(b"Subject: ok\r\nX-Long: " + b"v" * (HEADER_LIMIT + 10) + b"\r\n\r\nbody\r\n")
    assert nothing_arrives(c, 0.3), "the header error must come after the end of data"
    c.send(b".\r\n")
    code, lines = c.reply()
    assert (code, enhanced(lines)) == (552, "5.3.4"), lines
    assert "EOM" not in session_hooks(srv, c)
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])


def test_folded_header_over_the_limit_is_552(srv, client_for):
    c = ehlo(client_for, srv)
    start_data(c)
    folded = b"X-Fold: start\r\n" + b"".join(b" " + b"f" * 70 + b"\r\n" for _ in range(15))
    c.send(folded + b"\r\nbody\r\n.\r\n")
    code, lines = c.reply()
    assert (code, enhanced(lines)) == (552, "5.3.4"), lines
    assert "EOM" not in session_hooks(srv, c)
    start_data(c)
    c.send(b"Subject: fine\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
