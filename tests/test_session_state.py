"""Session facts as read-only views of the engine's state, and the one reply path.

Unit tests of the handler outside a session (the defaults, nothing shared
between instances, the views cannot be written), of ``state.attach`` (how a
handler author unit-tests a hook), and of the facts a handler sees inside a
real Session run in-process over a socketpair.
"""

from __future__ import annotations

import socket

import pytest

from prefork_esmtp import ESMTPHandler
from prefork_esmtp import replies as R
from prefork_esmtp.session import Session
from prefork_esmtp.settings import resolve
from prefork_esmtp.state import ConnectionState, Envelope, attach
from protocol_support import session_over

TIMEOUT = 5.0

DEFAULTS = {
    "client": None, "esmtp": False, "env_sender": None, "env_recipients": [], "mail_params": {},
    "rcpt_params": {}, "recipients_params": [], "peer": None, "local": None, "hostname": "",
    "tls": None, "auth_user": None, "auth_mechanism": None,
}


def test_a_handler_outside_a_session_shows_the_documented_defaults():
    h = ESMTPHandler()
    assert {name: getattr(h, name) for name in DEFAULTS} == DEFAULTS
    assert (h.chunkmode, h.chunksize, h.disconnect, h.input_handle, h.output_handle) == (False, 65536, False, None, None)


def test_handlers_share_no_mutable_state():
    a, b = ESMTPHandler(), ESMTPHandler()
    a.env_recipients.append("x@example.org")
    a.mail_params["SIZE"] = "1"
    assert b.env_recipients == [] and b.mail_params == {}
    assert ESMTPHandler().env_recipients == []
    mutable = {name for cls in ESMTPHandler.__mro__ for name, value in vars(cls).items()
               if isinstance(value, (list, dict, set, bytearray)) and not name.startswith("__")}
    assert not mutable, f"mutable class-level defaults: {mutable}"


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_session_facts_cannot_be_written(name):
    with pytest.raises(AttributeError):
        setattr(ESMTPHandler(), name, DEFAULTS[name])


def test_the_seed_properties_stay_writable():
    h = ESMTPHandler()
    h.chunkmode, h.chunksize, h.disconnect, h.input_handle, h.output_handle = True, 10, True, 1, 2
    assert (h.chunkmode, h.chunksize, h.disconnect, h.input_handle, h.output_handle) == (True, 10, True, 1, 2)
    assert ESMTPHandler().chunkmode is False and ESMTPHandler().disconnect is False


def test_attach_shows_the_given_facts():
    h = ESMTPHandler()
    attach(h, ConnectionState(peer=("192.0.2.1", 25), client="c.example", esmtp=True, auth_user="alice"),
           Envelope(sender="a@example.org", recipients=["b@example.org"], mail_params={"BODY": "8BITMIME"}))
    assert (h.peer, h.client, h.esmtp, h.auth_user, h.tls) == (("192.0.2.1", 25), "c.example", True, "alice", None)
    assert (h.env_sender, h.env_recipients, h.mail_params) == ("a@example.org", ["b@example.org"], {"BODY": "8BITMIME"})
    assert h.MAIL("a@example.org") == (250, "<a@example.org>, sender ok")


# --- the reply path --------------------------------------------------------------------------


def test_no_enhanced_code_on_greeting_helo_ehlo_and_3xx():
    assert [R.default_enhanced(code, verb) for code, verb in
            [(220, "CONNECT"), (250, "HELO"), (250, "EHLO"), (354, "DATA"), (334, "AUTH")]] == [None] * 5
    assert [R.default_enhanced(code, verb) for code, verb in
            [(250, "MAIL"), (250, "RCPT"), (250, "EOM"), (550, "RCPT"), (421, "")]] == \
        ["2.1.0", "2.1.5", "2.0.0", "5.0.0", "4.3.0"]


def test_a_failing_hook_gets_the_uncounted_451():
    class Broken(ESMTPHandler):
        def NOOP(self):
            raise RuntimeError("on purpose")

        def RSET(self):
            return "not a reply"

    assert R.call_hook(Broken(), "NOOP", "test") is R.HOOK_FAILED
    assert R.call_hook(Broken(), "RSET", "test") is R.HOOK_FAILED
    assert R.HOOK_FAILED.counts is False
    assert R.call_hook(Broken(), "VRFY", "test", "x") == R.HookReply(252, ["Cannot VRFY user; try RCPT to attempt delivery"])


# --- inside a session --------------------------------------------------------------------------


class Keeper(ESMTPHandler):
    """Keeps what it saw, to look at after the session."""

    seen: list  # set per instance in __init__

    def __init__(self) -> None:
        self.seen = []
        Keeper.last = self

    def RCPT(self, env_recipient):
        self.seen.append(("RCPT", self.env_sender, list(self.env_recipients), dict(self.rcpt_params)))
        return super().RCPT(env_recipient)

    def EOM(self):
        self.kept = self.env_recipients  # a reference, kept past the transaction
        self.seen.append(("EOM", self.client, self.esmtp, self.hostname, self.peer, list(self.env_recipients)))
        return super().EOM()


def converse(lines: list[bytes], **settings) -> list[str]:
    """Run a Session with Keeper over a socketpair; send each line, collect every reply line."""
    config = resolve({}, {"hostname": "mx.test.example", **settings}, source="test")
    ours, theirs = socket.socketpair()
    return session_over(Session(ours, ("192.0.2.1", 4321), Keeper, config).run, theirs, lines, TIMEOUT)


def test_the_handler_sees_the_session_and_keeps_an_old_envelope_intact():
    replies = converse([b"EHLO c.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org> NOTIFY=NEVER",
                        b"DATA", b"Subject: x", b"", b"hi", b".",
                        b"MAIL FROM:<c@example.org>", b"RCPT TO:<d@example.org>", b"QUIT"])
    assert replies[-1] == "221 2.0.0 Closing connection"
    h = Keeper.last
    assert h.seen[0] == ("RCPT", "a@example.org", [], {"NOTIFY": "NEVER"})
    assert h.seen[1] == ("EOM", "c.example", True, "mx.test.example", ("192.0.2.1", 4321), ["b@example.org"])
    assert h.seen[2] == ("RCPT", "c@example.org", [], {})
    assert h.kept == ["b@example.org"], "a new transaction gets a new envelope; the old one is not cleared"
    assert h.env_recipients == ["d@example.org"]


def test_errors_count_through_the_one_reply_path():
    recipients = [b"RCPT TO:<r%d@example.org>" % i for i in range(100)]
    replies = converse([b"EHLO c.example", b"RCPT TO:<b@example.org>", b"MAIL FROM:<a@example.org>"]
                       + recipients + [b"RCPT TO:<x@example.org>"] * 3 + [b"QUIT"], max_recipients=100, max_errors=2)
    # 452 for too many recipients is a limit, not the client's error: only "need MAIL" counted
    assert replies[-4:] == ["452 4.5.3 Error: too many recipients"] * 3 + ["221 2.0.0 Closing connection"]
    replies = converse([b"EHLO c.example", b"RCPT TO:<b@example.org>", b"FOO"], max_errors=2)
    assert replies[-3:] == ["503 5.5.1 Error: need MAIL command", "500 5.5.2 Command unrecognized: FOO",
                            "421 4.7.0 mx.test.example Error: too many errors"]
