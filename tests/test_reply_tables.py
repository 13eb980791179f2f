"""The session frames a hook's one-line reply from a table filled by the first reply of each (verb, code).

What goes into that table must be the same for every reply that uses it: a
handler's reply code that is an int subclass (an enum of codes) must not put
its name on the wire, for its own reply or for any later reply of the worker.
"""

from __future__ import annotations

from prefork_esmtp import replies as R


def test_a_code_from_an_int_enum_is_framed_as_its_number_in_this_and_later_sessions(start_server, client_for):
    srv = start_server("--handler", "code_handlers:EnumCodes")
    first = client_for(srv)
    first.cmd("EHLO client.example")
    first.cmd("MAIL FROM:<a@b.example>")
    first.send(b"RCPT TO:<enum@x.example>\r\n")
    lines = [first._line(10)]
    first.send(b"RCPT TO:<plain@x.example>\r\n")
    lines.append(first._line(10))
    first.cmd("QUIT")
    second = client_for(srv)  # the same worker process (-X): the table it filled is still there
    second.cmd("EHLO client.example")
    second.cmd("MAIL FROM:<a@b.example>")
    second.send(b"RCPT TO:<plain@x.example>\r\n")
    lines.append(second._line(10))
    # the later replies, which took the table the enum's reply filled, then the enum's own
    assert lines[1:] == [b"251 2.1.5 forwarding plain@x.example", b"251 2.1.5 forwarding plain@x.example"]
    assert lines[0] == b"251 2.1.5 forwarding enum@x.example"


def test_normalize_makes_an_int_subclass_code_a_plain_int() -> None:
    from code_handlers import Code

    reply = R.normalize((Code.FORWARD, "x"))
    assert type(reply.code) is int and reply.code == 251
    assert R.wire(R.normalize((Code.FORWARD, "x")), "RCPT") == b"251 2.1.5 x\r\n"
