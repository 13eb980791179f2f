"""Unit tests of the reply formatter and of hook results made replies (replies.py).

The common cases (a tuple of an int and printable strings; a one-line reply)
take short paths: these tests hold them to what the general code gives.
"""

from __future__ import annotations

import pytest

from prefork_esmtp import replies as R


@pytest.mark.parametrize("result", [
    (250, "OK"),
    (250, ""),
    (250, "first", "second"),
    (250, "line one\r\nline two"),  # CR LF inside a message split it
    (250, "a\x0bb\x1cc\u2028d"),  # every line boundary str.splitlines knows
    (250, "tab\there"),  # not printable, not a boundary: one line
    (250, b"bytes \xc3\xa9"),
    (250, 42),
    (550, "caf\u00e9 \U0001f600"),
])
def test_a_tuple_result_is_what_the_general_path_makes_of_it(result):
    reply = R.normalize(result)
    assert reply == R.normalize(list(result))  # a list takes the general path
    assert type(reply) is R.HookReply and reply.counts is True
    assert all("\r" not in line and "\n" not in line for line in reply.lines)


def test_splitting_and_refusals_of_normalize():
    assert R.normalize((250, "a\r\nb")).lines == ["a", "b"]
    assert R.normalize((250, "a\u2028b")).lines == ["a", "b"]
    assert R.normalize((250,)) == R.HookReply(250, [])
    assert R.normalize(250) == R.HookReply(250, [])
    for bad in [(True, "x"), (199, "x"), (600, "x"), ("abc", "x"), (), None, 250.0]:
        with pytest.raises(R.BadHookResult):
            R.normalize(bad)


@pytest.mark.parametrize("code, lines, enhanced, wire", [
    (250, ["OK"], "2.0.0", b"250 2.0.0 OK\r\n"),
    (250, ["2.1.5 own code"], "2.0.0", b"250 2.1.5 own code\r\n"),
    (250, ["2.x not a code"], "2.0.0", b"250 2.0.0 2.x not a code\r\n"),
    (250, ["2.1.5"], "2.0.0", b"250 2.1.5\r\n"),
    (250, [""], "2.0.0", b"250 2.0.0\r\n"),
    (250, [""], None, b"250 \r\n"),
    (220, ["mx ready"], None, b"220 mx ready\r\n"),
    (250, [], "2.0.0", b"250 2.0.0\r\n"),
    (250, ["a", "2.1.0 b", "c"], "2.0.0", b"250-2.0.0 a\r\n250-2.1.0 b\r\n250 2.1.0 c\r\n"),
    (550, ["caf\u00e9"], "5.0.0", "550 5.0.0 caf\u00e9\r\n".encode()),
])
def test_format_reply(code, lines, enhanced, wire):
    assert R.format_reply(code, lines, enhanced) == wire


@pytest.mark.parametrize("reply", [
    R.HookReply(250, ["OK"]),
    R.HookReply(250, ["2.1.5 own code"]),
    R.HookReply(250, [""]),
    R.HookReply(250, []),
    R.HookReply(250, ["a", "2.1.0 b", "c"]),
    R.HookReply(354, ["go ahead"]),
    R.HookReply(550, ["caf\u00e9"]),
    R.HookReply(552, ["x"], counts=False),
    R.NEED_MAIL,
    R.SYNTAX_NOARGS.format("RSET"),
    R.UNSUPPORTED_PARAMETER.format("X-ANY"),
])
@pytest.mark.parametrize("verb", ["", "CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "EOM", "UNKNOWN"])
def test_wire_is_format_reply_with_the_default_code(reply, verb):
    expected = R.format_reply(reply.code, reply.lines, R.default_enhanced(reply.code, verb))
    assert R.wire(reply, verb) == expected
    assert R.wire(reply, verb) == expected  # the second time from the tables


def test_a_two_tuple_hook_result_is_what_normalize_makes_of_it():
    class Hooks:
        def A(self):
            return 250, "fine"

        def B(self):
            return 250, "two\r\nlines"

        def C(self):
            return 250, b"bytes"

    for hook in "ABC":
        result = getattr(Hooks(), hook)()
        assert R.call_hook(Hooks(), hook, "client") == R.normalize(result)


@pytest.mark.parametrize("lines", [[], [""], ["a"], ["a", ""], ["", "b"], ["a", "b", "c"], ["caf\u00e9", "x y"]])
@pytest.mark.parametrize("code", [220, 250, 354])
def test_format_reply_without_codes_frames_every_line(code, lines):
    expected = [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1] if lines else ''}"]
    assert R.format_reply(code, lines, None) == "".join(f"{x}\r\n" for x in expected).encode()


# -- the base handler's fixed replies -------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prefork_esmtp.handler import ESMTPHandler  # noqa: E402
from prefork_esmtp.state import ConnectionState, Envelope, attach  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(hook=st.sampled_from(sorted(R._FIXED_HOOKS)), arg=st.text(max_size=20),
       client=st.none() | st.text(max_size=20), sender=st.none() | st.text(max_size=20),
       verb=st.sampled_from(["", "CONNECT", "HELO", "DATA", "EOM", "NOOP", "RSET", "QUIT", "VRFY", "EXPN",
                             "STARTTLS"]))
def test_a_fixed_reply_is_what_calling_the_base_hook_gives(hook, arg, client, sender, verb):
    """Whatever the session's state and the hook's argument, the reply used without the call
    frames to the bytes (and logs as the line) the call's reply does."""
    handler = ESMTPHandler()
    attach(handler, ConnectionState(client=client), Envelope(sender=sender))
    fixed = R.fixed_replies(ESMTPHandler)[hook]
    called = R.call_hook(handler, hook, "client", *([arg] if R._FIXED_HOOKS[hook] else []))
    assert R.wire(fixed, verb) == R.wire(called, verb)
    assert R.first_line(fixed, verb) == R.first_line(called, verb)
    assert fixed.lines == called.lines and fixed.code == called.code
    assert (fixed.counts, fixed.closes) == (called.counts, called.closes)


def test_fixed_replies_leave_out_the_hooks_a_class_overrides():
    class Mine(ESMTPHandler):
        def QUIT(self):
            return 221, "bye"

    class Below(Mine):
        pass

    assert set(R.fixed_replies(ESMTPHandler)) == set(R._FIXED_HOOKS)
    for cls in (Mine, Below):
        fixed = R.fixed_replies(cls)
        assert "QUIT" not in fixed and set(fixed) == set(R._FIXED_HOOKS) - {"QUIT"}


@settings(max_examples=500, deadline=None)
@given(code=st.integers(200, 599),
       line=st.one_of(st.text(max_size=12), st.sampled_from(["", "2.1.0", "2.1.0 x", "5.5.2x", "4.7.0 ", "x.y", "2."]),
                      st.tuples(st.sampled_from(["2.0.0", "5.1.1", "4.4.2"]), st.text(max_size=6)).map(" ".join)),
       verb=st.sampled_from(["", "CONNECT", "HELO", "EHLO", "MAIL", "RCPT", "DATA", "EOM", "VRFY", "UNKNOWN"]))
def test_wire_of_any_one_line_hook_reply_is_format_reply(code, line, verb):
    """wire's one-line path (and its table of default codes) frames as format_reply does."""
    reply = R.HookReply(code, [line])
    expected = R.format_reply(code, [line], R.default_enhanced(code, verb))
    assert R.wire(reply, verb) == expected
    assert R.wire(reply, verb) == expected
