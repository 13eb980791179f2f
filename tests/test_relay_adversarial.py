"""The relay against an upstream that misbehaves on purpose: a reply trickled octet by octet, a reply
out of turn (before end-of-data, a second one after it, a 250 to DATA), an idle session closed by
real Postfix, LMTP replies that take their time.  Each must end in a 4xx in time, never a 250."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import Client, wait_for
from mailservers import postfix_instance  # noqa: F401
from relay_support import RawUpstream, ehlo_reply, read_message, start_relay


def connect(srv) -> Client:
    c = Client(socket.create_connection(("127.0.0.1", srv.port), timeout=15))
    assert c.reply()[0] == 220
    return c


def dialogue(sock: socket.socket, reader, answers: dict[str, bytes], on_data, refuse: bytes = b"",
             state: dict | None = None) -> None:
    """Greet, EHLO with PIPELINING, answer each verb from ``answers`` (default 250), RCPT of an
    address containing ``refuse`` with 550; DATA: ``on_data``.  ``state["answered"]`` counts commands."""
    sock.sendall(b"220 upstream.test ESMTP\r\n")
    while True:
        line = reader.readline(4096)
        if not line:
            return
        verb = line.split(b" ", 1)[0].strip().upper().decode()
        if verb == "EHLO":
            sock.sendall(ehlo_reply("PIPELINING", "8BITMIME"))
        elif verb == "DATA":
            if on_data(sock, reader) is False:
                return
        elif verb == "QUIT":
            sock.sendall(b"221 bye\r\n")
            return
        elif verb == "RCPT" and refuse and refuse in line:
            sock.sendall(b"550 5.1.1 no such user here\r\n")
        else:
            sock.sendall(answers.get(verb, b"250 2.0.0 ok\r\n"))
        if state is not None:
            state["answered"] = state.get("answered", 0) + 1


def test_a_trickled_upstream_reply_is_bounded_as_a_whole(start_server):
    """One octet of a reply now and then must not hold the worker past the upstream timeout."""
    def script(sock, reader, state):
        sock.sendall(b"220 upstream.test ESMTP\r\n")
        reader.readline()
        sock.sendall(ehlo_reply("PIPELINING"))
        reader.readline()  # MAIL (or XFORWARD): answer a never-ending reply, one octet at a time
        deadline = time.monotonic() + 20
        for octet in b"250-" + b"x" * 400:
            if state.get("stop") or time.monotonic() > deadline:
                return
            sock.sendall(bytes([octet]))
            time.sleep(0.05)

    with RawUpstream(script) as upstream:
        relay = start_relay(start_server, upstream.address, "timeout=1.5")
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        started = time.monotonic()
        c.send(b"MAIL FROM:<alice@example.org>\r\n")
        code, lines = c.reply(timeout=25)
        took = time.monotonic() - started
        upstream.state["stop"] = True
        assert code == 451 and lines[0].startswith("4.4.2 "), (code, lines)
        assert took < 5, f"the trickle held the worker {took:.1f}s"
        c.close()


def test_an_early_reply_during_data_is_never_taken_for_the_end_of_data_reply(start_server):
    """An upstream that says 250 before the message ended, then refuses it: the client must not get 250."""
    def on_data(sock, reader):
        sock.sendall(b"354 go ahead\r\n250 2.0.0 early bird\r\n")
        if read_message(reader) is None:
            return False
        sock.sendall(b"554 5.7.1 refused at end of data\r\n")

    with RawUpstream(lambda s, r, st: dialogue(s, r, {}, on_data)) as upstream:
        relay = start_relay(start_server, upstream.address, "timeout=3", "data_timeout=3")
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: x\r\n\r\n" + b"body\r\n" * 100 + b".\r\n")
        code, lines = c.reply(timeout=15)
        assert code != 250 and code >= 400, (code, lines)
        c.close()


def test_a_success_reply_to_data_is_not_passed_to_the_client(start_server):
    """DATA answered 250 (no 354) by the upstream: the client must get a refusal, not 250."""
    def on_data(sock, reader):
        sock.sendall(b"250 2.0.0 thanks, I guess\r\n")

    with RawUpstream(lambda s, r, st: dialogue(s, r, {}, on_data)) as upstream:
        relay = start_relay(start_server, upstream.address, "timeout=3")
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
        code, lines = c.cmd("DATA")
        assert code >= 400, (code, lines)
        c.close()


def test_a_stray_upstream_reply_does_not_shift_the_next_transactions_replies(start_server):
    """Two replies to one end-of-data: the second must not be taken as the reply to the next MAIL.

    Else every later reply is off by one: the MAIL's 250 answers the refused RCPT.
    """
    def on_data(sock, reader):
        sock.sendall(b"354 go ahead\r\n")
        if read_message(reader) is None:
            return False
        sock.sendall(b"250 2.0.0 queued\r\n250 2.0.0 stray\r\n")

    def script(sock, reader, state):
        dialogue(sock, reader, {}, on_data, refuse=b"unknown@", state=state)

    with RawUpstream(script) as upstream:
        relay = start_relay(start_server, upstream.address, "timeout=3", "xforward=false")
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: one\r\n\r\nbody\r\n.\r\n")
        assert c.reply()[0] == 250
        wait_for(lambda: upstream.state.get("answered", 0) >= 4, 10, message="the stray reply sent")
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        code, lines = c.cmd("RCPT TO:<unknown@example.org>")
        assert code == 550 and "no such user" in lines[0], (code, lines)
        c.close()


def test_postfix_closing_an_idle_session_is_reopened_transparently(start_server, postfix_instance):
    """Postfix answers 421 and closes an idle session: the next MAIL must go out on a fresh one."""
    pf = postfix_instance(settings={"smtpd_timeout": "2s"})
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}", "xforward=false")
    c = connect(relay)
    assert c.cmd("EHLO client.example")[0] == 250
    for n in (1, 2):
        assert c.cmd("MAIL FROM:<sender@example.org>") == (250, ["2.1.0 Ok"]), n
        assert c.cmd(f"RCPT TO:<{pf.address_of('alice')}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(f"Subject: {n}\r\n\r\nbody\r\n.\r\n".encode())
        assert c.reply(timeout=20)[0] == 250
        if n == 1:
            pf.wait_log(r"timeout after END-OF-MESSAGE", timeout=20)
    c.close()
    assert len(pf.wait_messages("alice", 2, timeout=20)) == 2


def test_lmtp_replies_after_the_message_share_one_deadline(start_server):
    """An LMTP upstream taking almost data_timeout for each recipient's reply: the client must hear
    within data_timeout in all, not once per recipient (it would give up first and send again)."""
    def on_data(sock, reader):
        sock.sendall(b"354 go ahead\r\n")
        if read_message(reader) is None:
            return False
        for n in range(4):
            sock.sendall(f"250 2.0.0 <r{n}@example.org> delivered\r\n".encode())
            time.sleep(1.2)

    def script(sock, reader, state):
        sock.sendall(b"220 lmtp.test LMTP\r\n")
        while True:
            line = reader.readline(4096)
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"LHLO":
                sock.sendall(ehlo_reply("PIPELINING", "8BITMIME"))
            elif verb == b"DATA":
                if on_data(sock, reader) is False:
                    return
            elif verb == b"QUIT":
                sock.sendall(b"221 bye\r\n")
                return
            else:
                sock.sendall(b"250 2.0.0 ok\r\n")

    with RawUpstream(script) as upstream:
        relay = start_relay(start_server, upstream.address, "data_timeout=2.5",
                            handler="prefork_esmtp.handlers.lmtp:LMTP")
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        for n in range(4):
            assert c.cmd(f"RCPT TO:<r{n}@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        started = time.monotonic()
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        code, lines = c.reply(timeout=15)
        took = time.monotonic() - started
        assert code == 451 and lines[0].startswith("4.4.2 "), (code, lines)
        assert took < 3.5, f"{took:.1f}s for the replies to end-of-data"
        c.close()



def test_a_worker_waiting_on_a_slow_upstream_is_not_killed_as_stuck(start_server, tmp_path):
    """A pool worker promises the master to speak again within the client timeout; a relay waiting
    longer for the upstream's reply to end-of-data (a content filter at work) must say so, or the
    master kills it: the upstream has the message, our client sees a dropped connection and sends it again."""
    from master_support import pool_mode

    def on_data(sock, reader):
        sock.sendall(b"354 go ahead\r\n")
        if read_message(reader) is None:
            return False
        time.sleep(5)
        sock.sendall(b"250 2.0.0 scanned and queued\r\n")

    with RawUpstream(lambda s, r, st: dialogue(s, r, {}, on_data)) as upstream:
        relay = start_relay(start_server, upstream.address, "data_timeout=15",
                            args=("--timeout", "2", "--worker-timeout", "1"),
                            mode=pool_mode(tmp_path, "--workers", "1"))
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        assert c.reply(timeout=20) == (250, ["2.0.0 scanned and queued"])
        c.close()
        assert "stuck" not in relay.log()


# -- half messages and smuggling, against real Postfix ------------------------------------------

HALF = b"Subject: half\r\n\r\n" + b"the first half of a message\r\n" * 200


def _cut_short(case: str, c: Client, relay) -> None:
    """Start a message through the relay and have it end short in the way ``case`` names."""
    if case == "size":
        c.send(HALF * 10 + b".\r\n")
        assert c.reply(timeout=20)[0] == 552
        assert c.cmd("RSET")[0] == 250
        return
    if case == "header_lines":
        c.send(b"".join(b"X-Line-%d: x\r\n" % n for n in range(20)) + b"\r\nbody\r\n.\r\n")
        assert c.reply(timeout=20)[0] == 552
        assert c.cmd("NOOP")[0] == 250
        c.send(b"QUIT\r\n")
        return
    if case == "bare_lf":
        c.send(HALF + b"a bare\nline feed\r\n.\r\n")
        assert c.reply(timeout=20)[0] == 554
        assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250  # a new transaction: the old one is gone
        c.send(b"QUIT\r\n")
        return
    c.send(HALF)
    if case == "vanish":
        time.sleep(0.2)
        c.close()
        return
    if case == "term":
        time.sleep(0.2)
        relay.proc.terminate()  # graceful: the message under way gets graceful_timeout, then the worker dies
    code, lines = c.reply(timeout=20) if case != "term" else (None, None)
    if case in ("timeout", "data_rate", "session_time"):
        assert code == 421, (code, lines)
    assert c.closed(timeout=20)


CASES = {
    "vanish": (),
    "timeout": ("--timeout", "2"),
    "data_rate": ("--min-data-rate", "100000", "--min-data-rate-grace", "1"),
    "session_time": ("--max-session-time", "3"),
    "size": ("--max-message-size", "20K"),
    "header_lines": ("--max-header-lines", "5"),
    "bare_lf": ("--bare-newline", "reject"),
    "term": ("--graceful-timeout", "2"),
}


def test_a_message_cut_short_on_our_side_is_never_delivered_by_postfix(start_server, postfix_instance, tmp_path):
    """Each way a message can end short here must reach Postfix as a lost connection in DATA, not a dot."""
    from master_support import pool_mode

    pf = postfix_instance()
    for n, (case, args) in enumerate(CASES.items(), 1):
        mode = pool_mode(tmp_path, "--workers", "1") if case == "term" else ("-X",)
        relay = start_relay(start_server, f"127.0.0.1:{pf.port}", args=args, mode=mode)
        c = connect(relay)
        assert c.cmd("EHLO client.example")[0] == 250
        assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
        assert c.cmd(f"RCPT TO:<{pf.address_of('alice')}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        _cut_short(case, c, relay)
        c.close()
        wait_for(lambda: pf.log().count("lost connection after DATA") >= n, 20,
                 message=f"Postfix to see the message cut short ({case})")
    pf.flush()
    time.sleep(1)  # nothing may arrive: give a delivery that should not happen the chance to show
    assert pf.messages("alice") == []
    assert "queued as" not in pf.log() and "status=sent" not in pf.log()


SMUGGLE = (b"Subject: smuggling\r\n\r\n"
           b"bare LF end\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<%(bob)s>\nDATA\n"
           b"bare CR end\r.\rMAIL FROM:<evil@example.org>\r"
           b"mixed\n.\r\nRCPT TO:<%(bob)s>\r\n"
           b"other mixed\r\n.\nRCPT TO:<%(bob)s>\r\n"
           b"and\r.\nQUIT\r\n")


def test_no_line_end_variant_ends_the_message_early_at_postfix(start_server, postfix_instance):
    """Bare LF/CR dot lines (kept as they came) and dots at BDAT chunk edges reach Postfix as text."""
    pf = postfix_instance()
    relay = start_relay(start_server, f"127.0.0.1:{pf.port}", args=("--bare-newline", "keep"))
    message = SMUGGLE % {b"bob": pf.address_of("bob").encode()}
    c = connect(relay)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    assert c.cmd(f"RCPT TO:<{pf.address_of('alice')}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    assert c.reply(timeout=20)[0] == 250
    # BDAT: each chunk as the client cut it, the dots right at the edges
    assert c.cmd("MAIL FROM:<sender@example.org>")[0] == 250
    assert c.cmd(f"RCPT TO:<{pf.address_of('alice')}>")[0] == 250
    chunks = [b"Subject: chunks\r\n\r\nline\r", b"\n", b".\r\nMAIL FROM:<evil@example.org>\r\n", b".", b"\r\n",
              b"RCPT TO:<" + pf.address_of("bob").encode() + b">\r\n\r", b".\r", b"\n"]
    for chunk in chunks:
        c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        assert c.reply()[0] == 250
    assert c.cmd("BDAT 0 LAST")[0] == 250
    c.close()
    stored = pf.wait_messages("alice", 2, timeout=20)
    assert len(stored) == 2
    assert stored[0].count(b"MAIL FROM:<evil@example.org>") == 2 and stored[0].rstrip().endswith(b"QUIT")
    assert b"\nMAIL FROM:<evil@example.org>\n" in stored[1] and b"\n.\n" in stored[1]
    time.sleep(0.5)
    assert pf.messages("bob") == [] and "evil@example.org" not in pf.log()


def test_a_chunk_the_upstream_refuses_gives_its_class_with_a_matching_enhanced_code(start_server):
    """BINARYMIME goes upstream in BDAT chunks; a 552 for one reaches the client as 5xx with 5.x.x."""
    upstream = start_server("--max-message-size", "6K")
    relay = start_relay(start_server, f"127.0.0.1:{upstream.port}")
    c = connect(relay)
    assert c.cmd("EHLO client.example")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.org> BODY=BINARYMIME")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
    for chunk in (b"Subject: x\r\n\r\n" + b"y" * 5000, b"z" * 5000):
        c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        assert c.reply()[0] == 250  # ours; the upstream's refusal is owed at the end
    c.send(b"BDAT 10 LAST\r\n" + b"z" * 10)
    code, lines = c.reply()
    assert code == 552 and lines[0].startswith("5.3.0 ") and "5.3.4" in lines[0], (code, lines)
    c.close()
    assert upstream.accepted_messages() == []
