"""MAIL and RCPT take two shortcuts; each must answer exactly as the general path does.

The whole plain argument (``FROM:<a@b>``, ``TO:<c@d>``, no parameters) is taken
in one match instead of by the full parser, and a handler that keeps the base
MAIL and RCPT hooks gets their reply without the call.  Here the same commands
go through a Transaction with both shortcuts and with both turned off (the full
parser, the hook called): the reply bytes and the envelope must not differ.
"""

from __future__ import annotations

from dataclasses import fields
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_esmtp import ESMTPHandler
from prefork_esmtp import replies as R
from prefork_esmtp import transaction as T
from prefork_esmtp.settings import resolve
from prefork_esmtp.state import ConnectionState, Envelope, attach

CONFIG = resolve({}, {"hostname": "mx.test.example"}, source="test")


class Conn:
    """What the transaction asks of the connection for MAIL and RCPT: the client's name for logs."""

    who = "192.0.2.1:1025"


class CallsSuper(ESMTPHandler):
    """The base hooks' replies, through hooks of its own (never a shortcut)."""

    def MAIL(self, env_sender):
        return super().MAIL(env_sender)

    def RCPT(self, env_recipient):
        return super().RCPT(env_recipient)


class Refuses(ESMTPHandler):
    def MAIL(self, env_sender):
        return (550, "no senders today") if env_sender.startswith("x") else super().MAIL(env_sender)

    def RCPT(self, env_recipient):
        return (550, "no such user") if env_recipient.startswith("x") else super().RCPT(env_recipient)


def run(handler_class: type, commands: list[tuple[str, str]], config=CONFIG, client: str | None = "c.example"):
    """Each command's reply as it goes on the wire, then the envelope and counts as the transaction left them."""
    handler = handler_class()
    state = ConnectionState(peer=("192.0.2.1", 1025), client=client, esmtp=True)
    attach(handler, state)
    t = T.Transaction(handler, state, Conn(), config)
    out = []
    for verb, arg in commands:
        reply = (t.mail if verb == "MAIL" else t.rcpt)(arg)
        out.append((R.wire(reply, verb), reply.counts, reply.closes))
    env = t.envelope
    items = list(env.mail_params.items()), list(env.rcpt_params.items())  # the order too: a handler may see it
    return out, (env.sender, env.mail_params, env.recipients, env.rcpt_params, env.recipients_params, items,
                 t.accepted, t.number, t.started is not None, handler.env_sender, handler.env_recipients)


def run_general(handler_class: type, commands: list[tuple[str, str]], **kwargs):
    """:func:`run` with both shortcuts off: the full parser for every argument, every hook called."""
    with mock.patch.object(T, "common_sender", lambda arg: None), mock.patch.object(T, "plain_recipient", lambda arg: None), \
            mock.patch.object(T, "_BASE_MAIL", None), mock.patch.object(T, "_BASE_RCPT", None):
        return run(handler_class, commands, **kwargs)


def agree(commands: list[tuple[str, str]], **kwargs) -> None:
    fast = run(ESMTPHandler, commands, **kwargs)
    assert fast == run_general(ESMTPHandler, commands, **kwargs)
    assert fast == run(CallsSuper, commands, **kwargs)
    assert run(Refuses, commands, **kwargs) == run_general(Refuses, commands, **kwargs)


_TOKENS = ["<", ">", "@", ".", "a", "x", "Z9", "-", "+", "é", "\u2028", "\"", "[127.0.0.1]", ":", " ", "\t",
           "postmaster", "<>", " SIZE=10", " SMTPUTF8", " NOTIFY=NEVER", " BODY=8BITMIME", "=", "l" * 64,
           "d" * 63 + ".", "\u212a", " SIZE=", "0", "9" * 9, " SIZE=1024", " BODY=7BIT", " BODY=BINARYMIME",
           " BODY=8BIT", " BODY=", "BODY"]
_ARG = st.one_of(st.lists(st.sampled_from(_TOKENS), max_size=12).map("".join), st.text(max_size=40))
_PREFIXED = st.tuples(st.sampled_from(["", "FROM:", "from: ", "TO:", "to:"]), _ARG).map("".join)


@settings(max_examples=700, deadline=None)
@given(st.one_of(_PREFIXED, st.just("FROM:<a@b.example>")),
       st.lists(st.one_of(_PREFIXED, st.just("TO:<c@d.example>")), max_size=4))
def test_mail_and_rcpt_answer_as_the_general_path_does(mail, rcpts):
    agree([("MAIL", mail)] + [("RCPT", r) for r in rcpts])


@pytest.mark.parametrize("commands", [
    [("MAIL", "FROM:<a@b.example> SIZE=1024 BODY=8BITMIME"), ("RCPT", "TO:<c@d.example>")],
    [("MAIL", "FROM:<a@b.example> SIZE=1024 BODY=8BIT"), ("MAIL", "FROM:<a@b.example> SIZE=1 BODY=")],
    [("MAIL", "FROM:<a@b.example> SIZE=99999999999"), ("MAIL", "FROM:<a@b.example> SIZE=10 BODY=7BIT")],
    [("MAIL", "FROM:<a@b.example> SIZE=" + "9" * 21), ("MAIL", "FROM:<a@b.example> SIZE=0 BODY=BINARYMIME")],
    [("MAIL", "FROM:<a@b.example> SIZE=1 BODY=8BITMIME SMTPUTF8"), ("RCPT", "TO:<jürgen@d.example>")],
    [("MAIL", "FROM:<a@b.example>"), ("RCPT", "TO:<c@d.example>"), ("RCPT", "to: <e.f+g@H-i.example>")],
    [("MAIL", "FROM:<xa@b.example>"), ("MAIL", "FROM:<a@b.example>"), ("RCPT", "TO:<xc@d.example>"),
     ("RCPT", "TO:<c@d.example>")],
    [("RCPT", "TO:<c@d.example>"), ("MAIL", "FROM:<a@b.example>"), ("MAIL", "FROM:<a@b.example>")],
    [("MAIL", "FROM:<a@b.example> SMTPUTF8"), ("RCPT", "TO:<jürgen@d.example>"), ("RCPT", "TO:<j\u2028@d>")],
    [("MAIL", "FROM:<a@b.example>"), ("RCPT", "TO:<jürgen@d.example>"), ("RCPT", "TO:<Postmaster>")],
    [("MAIL", "FROM:<" + "l" * 65 + "@b.example>"), ("MAIL", "FROM:<>"), ("RCPT", "TO:<c@d> NOTIFY=NEVER")],
])
def test_examples_answer_as_the_general_path_does(commands):
    agree(commands)


def test_the_size_limit_answers_as_the_general_path_does():
    config = resolve({}, {"hostname": "mx.test.example", "max_message_size": 1000}, source="test")
    commands = [("MAIL", "FROM:<a@b.example> SIZE=1001"), ("MAIL", "FROM:<a@b.example> SIZE=1000 BODY=8BITMIME")]
    replies, envelope = run(ESMTPHandler, commands, config=config)
    assert [r[0] for r in replies] == [b"552 5.3.4 Error: message size exceeds the fixed limit of 1000 octets\r\n",
                                       b"250 2.1.0 <a@b.example>, sender ok\r\n"]
    assert envelope[5][0] == [("SIZE", "1000"), ("BODY", "8BITMIME")]
    agree(commands, config=config)


def test_before_helo_and_max_recipients_answer_as_the_general_path_does():
    agree([("MAIL", "FROM:<a@b.example>"), ("RCPT", "TO:<c@d.example>")], client=None)
    config = resolve({}, {"hostname": "mx.test.example", "max_recipients": 100}, source="test")
    commands = [("MAIL", "FROM:<a@b.example>")] + [("RCPT", f"TO:<r{i}@d.example>") for i in range(101)]
    replies, envelope = run(ESMTPHandler, commands, config=config)
    assert replies[-2][0] == b"250 2.1.5 <r99@d.example>, recipient ok\r\n"
    assert replies[-1][0] == b"452 4.5.3 Error: too many recipients\r\n"
    assert len(envelope[2]) == 100
    agree(commands, config=config)


def test_auth_required_answers_as_the_general_path_does():
    config = resolve({}, {"hostname": "mx.test.example", "require_auth": True}, source="test")
    replies, _ = run(ESMTPHandler, [("MAIL", "FROM:<a@b.example>")], config=config)
    assert replies[0][0] == b"530 5.7.0 Authentication required\r\n"
    agree([("MAIL", "FROM:<a@b.example>"), ("RCPT", "TO:<c@d.example>")], config=config)
    replies, _ = run(ESMTPHandler, [("MAIL", "FROM:<a@b.example>")], config=config, client=None)
    assert replies[0][0] == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_the_shortcut_replies_are_the_base_hooks_bytes():
    replies, envelope = run(ESMTPHandler, [("MAIL", "FROM:<a@b.example>"), ("RCPT", "TO:<c@d.example>")])
    assert [r[0] for r in replies] == [b"250 2.1.0 <a@b.example>, sender ok\r\n",
                                       b"250 2.1.5 <c@d.example>, recipient ok\r\n"]
    assert envelope[:5] == ("a@b.example", {}, ["c@d.example"], {}, [{}])
    assert envelope[1] is not envelope[3]  # each its own dict, as the parser makes them


def test_a_hook_set_on_the_handler_object_answers():
    class OwnHooks(ESMTPHandler):
        def __init__(self):
            self.MAIL = lambda env_sender: (250, f"mail hook {env_sender}")
            self.RCPT = lambda env_recipient: (550, "rcpt hook says no")

    replies, envelope = run(OwnHooks, [("MAIL", "FROM:<a@b.example>"), ("RCPT", "TO:<c@d.example>")])
    assert [r[0] for r in replies] == [b"250 2.1.0 mail hook a@b.example\r\n", b"550 5.0.0 rcpt hook says no\r\n"]
    assert envelope[2] == []


def test_a_reset_makes_an_envelope_as_envelope_makes_a_blank_one():
    """The transaction writes a blank Envelope out field by field: every field set, as Envelope() sets
    it, in new objects of its own (a handler may keep the last envelope's lists)."""
    handler = ESMTPHandler()
    state = ConnectionState(peer=("192.0.2.1", 1025), client="c.example", esmtp=True)
    attach(handler, state)
    t = T.Transaction(handler, state, Conn(), CONFIG)
    t.mail("FROM:<a@b.example>")
    t.rcpt("TO:<c@d.example>")
    old = t.envelope
    t._clear()
    env, blank = t.envelope, Envelope()
    assert type(env) is Envelope and handler._esmtp_envelope is env and env is not old
    assert [getattr(env, f.name) for f in fields(Envelope)] == [getattr(blank, f.name) for f in fields(Envelope)]
    assert env == blank
    for f in fields(Envelope):
        value = getattr(env, f.name)
        assert value is None or all(value is not getattr(e, f.name) for e in (old, blank)), f.name
    assert len({id(env.recipients), id(env.mail_params), id(env.rcpt_params), id(env.recipients_params)}) == 4
    assert old.recipients == ["c@d.example"] and old.sender == "a@b.example"  # the last envelope is left as it was
    assert t.accepted == [] and t.started is None and t.intake is None


def test_an_address_with_percent_signs_is_printed_as_it_is():
    """The base hooks' replies put the address in with %: a "%s" in the address stays as it is."""
    commands = [("MAIL", "FROM:<a%s%%b@b.example>"), ("RCPT", "TO:<c%s@d.example>"),
                ("RCPT", "TO:<100%@d.example> NOTIFY=NEVER")]
    replies, envelope = run(ESMTPHandler, commands)
    assert [r[0] for r in replies] == [b"250 2.1.0 <a%s%%b@b.example>, sender ok\r\n",
                                       b"250 2.1.5 <c%s@d.example>, recipient ok\r\n",
                                       b"250 2.1.5 <100%@d.example>, recipient ok\r\n"]
    assert envelope[2] == ["c%s@d.example", "100%@d.example"]
    agree(commands)


# --- the base replies made with their bytes ---------------------------------------------------

from prefork_esmtp.handler import RECIPIENT_OK, SENDER_OK  # noqa: E402

_ATEXT = "abcXYZ019!#$%&'*+-/=?^_`{|}~"
_LABEL = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,20}[a-zA-Z0-9])?", fullmatch=True)
#: Addresses the plain matchers take (dot-strings, lengths up to the limits) and ones only the full
#: parser takes: quoted local parts, UTF-8 (with SMTPUTF8), Postmaster, the null sender.
_PLAIN_ADDRESS = st.tuples(
    st.one_of(st.lists(st.text(_ATEXT, min_size=1, max_size=20), min_size=1, max_size=3).map(".".join),
              st.integers(60, 64).map(lambda n: "l" * n)),
    st.one_of(st.lists(_LABEL, min_size=1, max_size=4).map(".".join),
              st.just(".".join(["d" * 63, "d" * 63, "d" * 61])))).map("@".join)
_OTHER_ADDRESS = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e, blacklist_characters='"\\'), max_size=10)
    .map(lambda local: f'"{local}"@q.example'),
    st.text("abcé日ü", min_size=1, max_size=8).map(lambda local: f"{local}@ü.example"))


def _base_reply(verb: str, address: str) -> R.HookReply:
    """The base hook's reply for ``address`` as the engine would take it from the call."""
    hook = ESMTPHandler.MAIL if verb == "MAIL" else ESMTPHandler.RCPT
    return R.normalize(hook(ESMTPHandler(), address))


def _check_framed(reply, verb: str, address: str) -> None:
    expected = _base_reply(verb, address)
    assert type(reply) is R.FramedReply
    assert reply.data == reply[1] == R.wire(expected, verb) == R.wire(reply, verb)
    assert (reply.code, reply.lines, reply.counts, reply.closes) == (expected.code, expected.lines, True, False)
    assert R.first_line(reply, verb) == R.first_line(expected, verb)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_PLAIN_ADDRESS, _OTHER_ADDRESS, st.just("")),
       st.one_of(_PLAIN_ADDRESS, _OTHER_ADDRESS, st.sampled_from(["Postmaster", "postmaster"])),
       st.sampled_from(["", " SIZE=100", " SIZE=100 BODY=8BITMIME"]))
def test_the_base_replies_carry_the_bytes_wire_frames_from_the_hooks_reply(sender, recipient, params):
    """MAIL and RCPT answer a handler that keeps the base hooks with the hook's reply made with its bytes:
    the bytes wire() frames from the hook's own reply (default enhanced code included), read as that reply."""
    utf8 = " SMTPUTF8" if not (sender + recipient).isascii() else ""
    handler = ESMTPHandler()
    state = ConnectionState(peer=("192.0.2.1", 1025), client="c.example", esmtp=True)
    attach(handler, state)
    t = T.Transaction(handler, state, Conn(), CONFIG)
    _check_framed(t.mail(f"FROM:<{sender}>{params}{utf8}"), "MAIL", sender)
    _check_framed(t.rcpt(f"TO:<{recipient}>"), "RCPT", recipient)
    assert (t.envelope.sender, t.envelope.recipients) == (sender, [recipient])


def test_a_real_server_sends_the_base_replies_as_they_were(start_server, client_for):
    """The exact octets of the base MAIL and RCPT replies from a running server (a handler that keeps
    the base hooks), pipelined and one by one, and the session's log line when it ends after RCPT."""
    import re
    import smtplib

    from conftest import wait_for

    srv = start_server(handler="prefork_esmtp.handlers.sink:Sink")
    c = client_for(srv)
    assert c.cmd("EHLO client.example")[0] == 250
    c.send(b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<Postmaster>\r\n"
           b"RCPT TO:<\"q r\"@d.example>\r\nRSET\r\nMAIL FROM:<> SMTPUTF8\r\n"
           + "RCPT TO:<jürgen@bücher.example>\r\n".encode() + b"RCPT TO:<e.f+g@H-i.example>\r\n")
    assert [c._line(10) + b"\r\n" for _ in range(8)] == [
        b"250 2.1.0 <a@b.example>, sender ok\r\n", b"250 2.1.5 <c@d.example>, recipient ok\r\n",
        b"250 2.1.5 <Postmaster>, recipient ok\r\n", b"250 2.1.5 <\"q r\"@d.example>, recipient ok\r\n",
        b"250 2.0.0 OK\r\n", b"250 2.1.0 <>, sender ok\r\n",
        "250 2.1.5 <jürgen@bücher.example>, recipient ok\r\n".encode(), b"250 2.1.5 <e.f+g@H-i.example>, recipient ok\r\n"]
    port = c.sock.getsockname()[1]
    c.close()  # the session ends after RCPT: its log line shows that reply
    line = wait_for(lambda: re.search(rf"session client=127\.0\.0\.1:{port} .*", srv.log()), 10,
                    message="the session's log line")
    assert 'reply="250 2.1.5 <e.f+g@H-i.example>, recipient ok"' in line.group(0)
    assert "transactions=2 accepted=0" in line.group(0)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        assert smtp.mail("a@b.example") == (250, b"2.1.0 <a@b.example>, sender ok")
        assert smtp.rcpt("c@d.example") == (250, b"2.1.5 <c@d.example>, recipient ok")
