"""The base handler's constant replies, used without calling its hooks, on the wire.

With the base handler the replies are the hooks' own; a hook the handler
object sets on itself (when made, or mid-session) answers instead.
"""

from __future__ import annotations

MESSAGE = b"Subject: x\r\n\r\nbody\r\n.\r\n"


def converse(c) -> list[tuple[int, list[str]]]:
    """NOOP, a transaction, QUIT: their replies."""
    out = [c.cmd("NOOP"), c.cmd("EHLO client.example"), c.cmd("MAIL FROM:<a@b.c>"), c.cmd("RCPT TO:<x@y.z>"),
           c.cmd("DATA")]
    c.send(MESSAGE)
    out += [c.reply(), c.cmd("QUIT")]
    return out


def test_the_base_handler_answers_with_its_hooks_replies(start_server, client_for):
    srv = start_server()
    c = client_for(srv)
    noop, _, _, _, data, eom, quit = converse(c)
    assert noop == (250, ["2.0.0 OK"])
    assert data == (354, ['Enter mail, end with "." on a line by itself'])
    assert eom == (250, ["2.0.0 Message accepted for delivery"])
    assert quit == (221, ["2.0.0 Closing connection"])
    assert c.closed()


def test_hooks_set_on_the_handler_object_answer(start_server, client_for):
    srv = start_server("--handler", "fixed_handlers:OwnOnInstance")
    c = client_for(srv)
    noop, _, mail, _, data, eom, quit = converse(c)
    assert noop == (250, ["2.0.0 instance noop"])
    assert mail == (250, ["2.1.0 <a@b.c>, sender ok"])
    assert data == (354, ["instance: go ahead"])
    assert eom == (250, ["2.0.0 instance took it"])
    assert quit == (221, ["2.0.0 instance says bye"])
    assert c.closed()


def test_the_base_mail_and_rcpt_replies_on_the_wire(start_server, client_for):
    srv = start_server()
    c = client_for(srv)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@b.c>") == (250, ["2.1.0 <a@b.c>, sender ok"])
    assert c.cmd("RCPT TO:<x@y.z>") == (250, ["2.1.5 <x@y.z>, recipient ok"])
    assert c.cmd("RCPT TO:<Postmaster>") == (250, ["2.1.5 <Postmaster>, recipient ok"])
    assert c.cmd("RSET") == (250, ["2.0.0 OK"])
    assert c.cmd("MAIL FROM:<> SIZE=100") == (250, ["2.1.0 <>, sender ok"])
    assert c.cmd("RCPT to:<first.last+tag@sub.y-z.example> NOTIFY=NEVER") == \
        (250, ["2.1.5 <first.last+tag@sub.y-z.example>, recipient ok"])


def test_mail_and_rcpt_set_on_the_handler_object_answer(start_server, client_for):
    srv = start_server("--handler", "fixed_handlers:OwnMailRcptOnInstance")
    c = client_for(srv)
    c.cmd("EHLO client.example")
    assert c.cmd("MAIL FROM:<a@b.c>") == (250, ["2.1.0 instance sender a@b.c"])
    assert c.cmd("RCPT TO:<x@y.z>") == (550, ["5.0.0 instance refuses x@y.z"])
    assert c.cmd("DATA") == (554, ["5.5.1 Error: no valid recipients"])


def test_the_base_ehlo_reply_is_the_hook_s_own(start_server, client_for):
    """Made by the engine for the base handler, by the hook for one calling super: the same lines."""
    replies = []
    for args in ((), ("--handler", "fixed_handlers:EhloBySuper")):
        c = client_for(start_server(*args))
        replies.append([c.cmd("EHLO client.example"), c.cmd("HELO other.example"), c.cmd("EHLO x.example")])
        c.cmd("QUIT")
    assert replies[0] == replies[1]
    ehlo = replies[0][0]
    assert ehlo[0] == 250 and ehlo[1][0] == "mx.test.example client.example, pleased to meet you"
    assert ehlo[1][1] == "HELP" and "PIPELINING" in ehlo[1]  # the hook's keyword line, then the engine's


def test_ehlo_set_on_the_handler_object_answers(start_server, client_for):
    c = client_for(start_server("--handler", "fixed_handlers:OwnEhloOnInstance"))
    code, lines = c.cmd("EHLO client.example")
    assert code == 250 and lines[:2] == ["mx.test.example instance hello client.example", "X-OWN"]


def test_header_set_on_the_handler_object_gets_every_header(start_server, client_for):
    """The whole message in one write (taken at once), in pieces, in one BDAT chunk: HEADER is called for each header."""
    c = client_for(start_server("--handler", "fixed_handlers:OwnHeaderOnInstance"))
    c.cmd("EHLO client.example")
    message = b"Subject: x\r\nX-A: b\r\n\tc\r\n\r\nbody\r\n.\r\n"
    for pieces in ([message], [message[:5], message[5:]]):
        assert c.cmd("MAIL FROM:<a@b.c>")[0] == 250
        assert c.cmd("RCPT TO:<x@y.z>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        for piece in pieces:
            c.send(piece)
        assert c.reply() == (250, ["2.0.0 headers Subject,X-A"]), pieces
    chunk = message[:-3]  # BDAT: the message in one chunk, no end-of-data line
    assert c.cmd("MAIL FROM:<a@b.c>")[0] == 250
    assert c.cmd("RCPT TO:<x@y.z>")[0] == 250
    c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert c.reply() == (250, ["2.0.0 headers Subject,X-A"])
