"""Property-based tests against the real server (``start -X``, real loopback sockets).

Hypothesis makes the byte streams; each example is one fresh connection that
sends its stream split at random points, half-closes, and reads every reply
until the server closes.  One server per test function serves all of its
examples (one connection at a time, so every example closes its connection
before the next begins).

(a) junk of every kind never crashes the engine and never breaks reply framing;
(b) pipelined commands get exactly the replies a small state model predicts, in order;
(c) after DATA, the server accepts exactly the messages, with exactly the content,
    that the slow reference (tests/reference_models.py) finds: only CRLF.CRLF ends
    one, so no bare-CR/LF variant can end a message or smuggle in another.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import Client, Server, wait_for
from protocol_support import module_server
from reference_models import bare_newlines, find_end_of_data, split_message, text, unstuff

# Short timeouts so an abandoned session cannot hold the single -X process for
# long; no error sleep (it would only slow the examples down); the junk-command
# limit out of the way (the models below do not count NOOP/RSET/VRFY/EXPN/HELP).
BASE_ARGS = ("--timeout", "2", "--error-sleep", "0", "--max-junk-commands", "1000000")

PROPERTY_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                               HealthCheck.too_slow])

REPLY_LINE = re.compile(rb"([2-5]\d\d)([ -])[^\r\n]*")

#: Pause between pieces so each tends to reach the server in a recv() of its own
#: (it shapes the input; no result is waited for with it).
PIECE_PAUSE = 0.002

cuts = st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=8)


def split(data: bytes, fractions: list[float]) -> list[bytes]:
    points = sorted({int(f * len(data)) for f in fractions} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


# --- talking to the server --------------------------------------------------------


def exchange(srv: Server, pieces: list[bytes], timeout: float = 10.0) -> tuple[bytes, bool, int]:
    """Send the pieces on a fresh connection, half-close, read until the server closes.

    Returns (everything received, whether the connection was reset, our local port).
    A send that fails (the server closed after QUIT or 421) ends the sending.
    """
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
    port = sock.getsockname()[1]
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = bytearray()
    reset = False
    try:
        for piece in pieces:
            try:
                sock.sendall(piece)
            except OSError:
                break
            time.sleep(PIECE_PAUSE)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the server did not close within {timeout}s; got {bytes(received)!r}"
            sock.settimeout(remaining)
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                reset = True
                break
            except socket.timeout:
                continue  # the assertion above ends the loop
            if not data:
                break
            received += data
    finally:
        sock.close()
    return bytes(received), reset, port


def reply_codes(data: bytes, reset: bool) -> list[int]:
    """Check every reply line's framing and return the code of each complete reply.

    Lines of one multi-line reply must share its code.  After a reset the
    last line may be cut short: only then is an unterminated tail allowed.
    """
    lines = data.split(b"\r\n")
    tail = lines.pop()
    if not reset:
        assert tail == b"", f"reply data not ended by CRLF: {data!r}"
    codes: list[int] = []
    pending: bytes | None = None
    for line in lines:
        m = REPLY_LINE.fullmatch(line)
        assert m, f"malformed reply line {line!r} in {data!r}"
        if pending is not None:
            assert m.group(1) == pending, f"code changed inside a multi-line reply: {data!r}"
        if m.group(2) == b"-":
            pending = m.group(1)
        else:
            pending = None
            codes.append(int(m.group(1)))
    if not reset:
        assert pending is None, f"multi-line reply not finished: {data!r}"
    return codes


class Records:
    """The recorder's JSON lines, read incrementally, grouped by session."""

    def __init__(self, srv: Server) -> None:
        self.path = srv.record_path
        self.offset = 0
        self.by_sid: dict[str, list[dict]] = {}
        self.sid_of_port: dict[int, str] = {}

    def _update(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            entry = json.loads(line)
            if "b64" in entry:
                entry["bytes"] = base64.b64decode(entry["b64"])
            self.by_sid.setdefault(entry["sid"], []).append(entry)
            if entry["hook"] == "CONNECT":
                self.sid_of_port[entry["args"][0][1]] = entry["sid"]

    def finished_session(self, port: int) -> list[dict]:
        """The records of the session from our local ``port``, once its DISCONNECT is in."""
        def done() -> list[dict] | None:
            self._update()
            records = self.by_sid.get(self.sid_of_port.get(port, ""), [])
            return records if records and records[-1]["hook"] == "DISCONNECT" else None
        return wait_for(done, 10, message=f"the end of the session from port {port}")


def accepted(records: list[dict]) -> list[dict]:
    """Messages of one session whose EOM was called: headers, their exact bytes, EOH seen, header section, body."""
    out, current = [], None
    for r in records:
        if r["hook"] == "DATA":
            current = {"headers": [], "raws": [], "eoh": 0, "section": b"", "body": b""}
        elif current is None:
            continue
        elif r["hook"] == "HEADER":
            current["headers"].append(tuple(r["args"]))
            current["raws"].append(base64.b64decode(r["raw"]))
        elif r["hook"] == "EOH":
            current["eoh"] += 1
            current["section"] = base64.b64decode(r["raw"])
        elif r["hook"] == "BODY":
            current["body"] += r["bytes"]
        elif r["hook"] == "EOM":
            out.append(current)
            current = None
    return out


def assert_healthy(srv: Server) -> None:
    """The server lives, greets a new connection with 220, answers NOOP with 250; no traceback."""
    assert srv.proc.poll() is None, f"the server died:\n{srv.log()}"
    c = Client(srv.connect(timeout=10))
    try:
        assert c.reply()[0] == 220
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    finally:
        c.close()
    assert "Traceback" not in srv.log(), srv.log()


# --- (a) junk never crashes the engine -------------------------------------------

JUNK_TOKENS = [
    b"\r", b"\n", b"\r\n", b"\x00", b"\xff", b"\xc3\xa9", b" ", b"\t", b":", b".", b"<", b">", b"@",
    b"HELO x", b"EHLO x.example", b"MAIL FROM:<a@b.c>", b"MAIL FROM:", b"RCPT TO:<x@y.z>",
    b"RCPT", b"DATA", b"BDAT 5", b"BDAT 3 LAST", b"BDAT x", b"RSET", b"NOOP", b"QUIT", b"VRFY",
    b"EXPN", b"HELP", b"STARTTLS", b"AUTH PLAIN", b"AUTH LOGIN", b"*", b" SIZE=99999999999",
    b" BODY=8BITMIME", b" SMTPUTF8", b" FOO=bar", b"\r\n.\r\n", b"\n.\n", b"\r.\r\n", b"MAIL",
]
junk_streams = st.lists(st.one_of(st.sampled_from(JUNK_TOKENS), st.binary(max_size=12)),
                        max_size=50).map(b"".join)
long_lines = st.builds(lambda n, unit: unit * n, st.integers(min_value=400, max_value=3000),
                       st.sampled_from([b"A", b"\x00", b" ", b"\r", b"NOOP ", b"\xff"]))
any_stream = st.one_of(
    st.binary(max_size=400),
    junk_streams,
    st.lists(st.one_of(junk_streams, long_lines), min_size=1, max_size=3).map(b"".join),
)


def test_junk_streams_never_crash_the_engine(start_server):
    srv = start_server(*BASE_ARGS)

    @settings(max_examples=120, **PROPERTY_SETTINGS)
    @given(any_stream, cuts)
    def junk(stream, fractions):
        data, reset, _ = exchange(srv, split(stream, fractions))
        codes = reply_codes(data, reset)
        if not reset:
            assert codes[:1] == [220], data
        assert_healthy(srv)

    junk()
    assert_healthy(srv)


# --- (b) pipelined commands: replies in order, as many as commands -----------------

MESSAGE = b"Subject: pipelined\r\n\r\nbody\r\n..dotted\r\n.\r\n"


def step(name: str, s: dict) -> tuple[bytes, list[int]]:
    """One command of the model: the bytes to send and the codes expected for them."""
    simple = {
        "NOOP": (b"NOOP\r\n", 250), "noop": (b"noop\r\n", 250), "NOOP-LF": (b"NOOP\n", 250),
        "NOOP-ARG": (b"NOOP anything\r\n", 250), "HELP": (b"HELP\r\n", 214),
        "HELP-ARG": (b"HELP DATA\r\n", 214), "VRFY": (b"VRFY someone\r\n", 252),
        "VRFY-EMPTY": (b"VRFY\r\n", 501), "EXPN": (b"EXPN staff\r\n", 502),
        "EXPN-EMPTY": (b"EXPN\r\n", 501), "UNKNOWN": (b"FROB it\r\n", 500), "EMPTY": (b"\r\n", 500),
        "NUL": (b"NO\x00OP\r\n", 500), "NON-ASCII": (b"NOOP \xc3\xa9\r\n", 500),
        "LONG": (b"NOOP " + b"x" * 600 + b"\r\n", 500), "RSET-ARG": (b"RSET now\r\n", 501),
        "HELO-EMPTY": (b"HELO\r\n", 501), "DATA-ARG": (b"DATA now\r\n", 501),
    }
    if name in simple:
        data, code = simple[name]
        return data, [code]
    if name == "RSET":
        s.update(mail=False, rcpts=0)
        return b"RSET\r\n", [250]
    if name in ("HELO", "EHLO"):
        s.update(helo=True, mail=False, rcpts=0)
        return name.encode() + b" client.example\r\n", [250]
    if name in ("MAIL", "MAIL-NULL", "MAIL-BAD", "MAIL-PARAM"):
        data = {"MAIL": b"MAIL FROM:<a@b.c>\r\n", "MAIL-NULL": b"MAIL FROM:<>\r\n",
                "MAIL-BAD": b"MAIL FROM:a@b.c\r\n", "MAIL-PARAM": b"MAIL FROM:<a@b.c> FOO=1\r\n"}[name]
        if not s["helo"] or s["mail"]:
            return data, [503]
        if name == "MAIL-BAD":
            return data, [501]
        if name == "MAIL-PARAM":
            return data, [555]
        s["mail"] = True
        return data, [250]
    if name in ("RCPT", "RCPT-BAD"):
        data = b"RCPT TO:<x@y.z>\r\n" if name == "RCPT" else b"RCPT TO:<x@y.z\r\n"
        if not s["helo"] or not s["mail"]:
            return data, [503]
        if name == "RCPT-BAD":
            return data, [501]
        s["rcpts"] += 1
        return data, [250]
    if name == "DATA":
        if not s["helo"] or not s["mail"]:
            return b"DATA\r\n", [503]
        if not s["rcpts"]:
            return b"DATA\r\n", [554]
        s.update(mail=False, rcpts=0, messages=s["messages"] + 1)
        return b"DATA\r\n" + MESSAGE, [354, 250]
    raise AssertionError(name)


COMMANDS = ["NOOP", "noop", "NOOP-LF", "NOOP-ARG", "HELP", "HELP-ARG", "VRFY", "VRFY-EMPTY", "EXPN",
            "EXPN-EMPTY", "UNKNOWN", "EMPTY", "NUL", "NON-ASCII", "LONG", "RSET", "RSET-ARG", "HELO",
            "EHLO", "HELO-EMPTY", "MAIL", "MAIL-NULL", "MAIL-BAD", "MAIL-PARAM", "RCPT", "RCPT-BAD",
            "DATA", "DATA-ARG"]
# Weighted towards the commands that build a transaction, so that DATA often gets 354;
# "TXN" is MAIL, RCPT, DATA in a row.
command_lists = st.tuples(
    st.sampled_from([[], ["EHLO"], ["HELO"]]),
    st.lists(st.one_of(st.sampled_from(COMMANDS),
                       st.sampled_from(["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "TXN"])),
             min_size=1, max_size=25),
).map(lambda t: [n for name in t[0] + t[1] for n in (["MAIL", "RCPT", "DATA"] if name == "TXN" else [name])])
MAX_ERRORS_B = 8


def verb_case(data: bytes, mask: int) -> bytes:
    """The command with the letters of its first four bytes in lower case where ``mask`` has a bit.

    The verb's case must not matter: a mixed-case verb takes the same path as the upper-case one.
    """
    head = bytes(b + 32 if mask >> i & 1 and 65 <= b <= 90 else b for i, b in enumerate(data[:4]))
    return head + data[4:]


def model_batch(names: list[str], quit: bool, mask: int = 0) -> tuple[bytes, list[int], int]:
    """(bytes to send, expected reply codes after the greeting, messages accepted).

    ``mask``: which letters of each verb to send in lower case (0: none; else varied from command to command).
    """
    s = {"helo": False, "mail": False, "rcpts": 0, "messages": 0}
    sent, codes, errors, closed = [], [], 0, False
    for name in names + (["QUIT"] if quit else []):
        if name == "QUIT":
            sent.append(verb_case(b"QUIT\r\n", mask))
            if not closed:
                codes.append(221)
            break
        data, expected = step(name, s) if not closed else (b"NOOP\r\n", [])
        sent.append(verb_case(data, (mask + len(sent)) % 16 if mask else 0))
        for code in expected:
            codes.append(code)
            if code >= 400:
                errors += 1
                if errors >= MAX_ERRORS_B:
                    codes.append(421)  # too many errors: the server closes
                    closed = True
                    break
    return b"".join(sent), codes, s["messages"]


def test_pipelined_batches_get_modelled_replies_in_order(start_server):
    srv = start_server(*BASE_ARGS, "--max-errors", str(MAX_ERRORS_B))
    records = Records(srv)

    @settings(max_examples=150, **PROPERTY_SETTINGS)
    @given(command_lists, st.booleans(), cuts, st.integers(0, 15))
    def batch(names, quit, fractions, mask):
        stream, expected, messages = model_batch(names, quit, mask)
        event(f"messages accepted: {min(messages, 2)}{'+' if messages > 2 else ''}")
        event("ends with 421" if 421 in expected else "no 421")
        data, reset, port = exchange(srv, split(stream, fractions))
        assert not reset, f"connection reset; got {data!r}"
        assert reply_codes(data, reset) == [220] + expected, (names, data)
        eoms = [r for r in records.finished_session(port) if r["hook"] == "EOM"]
        assert len(eoms) == messages

    batch()
    assert_healthy(srv)


# --- (c) DATA: exactly the messages CRLF.CRLF ends, with exactly their content --------

BODY_TOKENS = [
    b"\r", b"\n", b".", b"a", b"\x00", b"\xff", b"\r\n.\r\n", b"\n.\n", b"\r.\r\n", b"\r\n..",
    b".\r\n", b"\r\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"Subject: x", b"X-Y:", b" ", b"\t",
    b":", b"\r\n\r\n", b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<x@y.z>\r\n", b"DATA\r\n",
    b"MAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n",  # a whole next transaction
    b"\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n",  # ... after a real end
    b"\n.\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n",  # ... a smuggling attempt
    b"\r.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n",
]
# A body as tokens, each with a flag: cut the stream just before it (so that
# splits fall where they hurt, e.g. between "\r\n" and ".\r\n").
token_bodies = st.lists(st.tuples(st.sampled_from(BODY_TOKENS), st.booleans()), max_size=60)


def cut_tokens(prefix: bytes, tokens: list[tuple[bytes, bool]], suffix: bytes,
               fractions: list[float]) -> list[bytes]:
    """prefix + tokens + suffix, cut before each flagged token and at the fractions."""
    data = prefix + b"".join(t for t, _ in tokens) + suffix
    points, pos = set(), len(prefix)
    for token, cut in tokens:
        if cut:
            points.add(pos)
        pos += len(token)
    points.add(pos)  # before the optional end of data / QUIT
    points |= {int(f * len(data)) for f in fractions}
    points = sorted(points | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n"
MAX_ERRORS_C = 5


def model_data(stream: bytes, reject_bare: bool) -> tuple[list[object], list[bytes]]:
    """What the server owes for ``stream``, the bytes after an accepted DATA line.

    Returns the replies after the 354 ("E" for any error reply) and the unstuffed
    content of every message it must accept.  After a message, the stream is
    commands again; only the exact lines the body alphabet can form are modelled
    (everything else is an error reply), and DATA after MAIL and RCPT starts
    the next message.
    """
    codes: list[object] = []
    messages: list[bytes] = []
    errors = 0

    def error() -> bool:
        nonlocal errors
        codes.append("E")
        errors += 1
        if errors >= MAX_ERRORS_C:
            codes.append(421)
            return True
        return False

    while True:
        k = find_end_of_data(stream)
        if k is None:
            return codes, messages  # the client vanished mid-DATA: no reply, no message
        content, stream = unstuff(stream[:k]), stream[k + 3:]
        if reject_bare and bare_newlines(content):
            if error():
                return codes, messages
        else:
            codes.append(250)
            messages.append(content)
        mail = rcpt = False
        while True:
            i = stream.find(b"\n")
            if i < 0:
                return codes, messages  # an unfinished command line: the client left
            raw, stream = stream[:i + 1], stream[i + 1:]
            line = raw[:-1][:-1] if raw.endswith(b"\r\n") else raw[:-1]
            line = line.rstrip(b" \t")
            if len(raw) > 512:
                failed = True
            elif line == b"MAIL FROM:<a@b.c>" and not mail:
                codes.append(250)
                mail, failed = True, False
            elif line == b"RCPT TO:<x@y.z>" and mail:
                codes.append(250)
                rcpt, failed = True, False
            elif line == b"DATA" and rcpt:
                codes.append(354)
                break
            elif line == b"QUIT":
                codes.append(221)
                return codes, messages
            else:
                failed = True
            if failed and error():
                return codes, messages


def check_data_stream(srv: Server, records: Records, stream: bytes, pieces: list[bytes],
                      reject_bare: bool) -> None:
    assert b"".join(pieces) == ENVELOPE + stream
    expected, contents = model_data(stream, reject_bare)
    data, reset, port = exchange(srv, pieces)
    assert not reset, f"connection reset; got {data!r}"
    got = [c if c < 400 or c == 421 else "E" for c in reply_codes(data, reset)]
    assert got == [220, 250, 250, 250, 354] + expected, (stream, data)
    messages = accepted(records.finished_session(port))
    assert len(messages) == len(contents), "accepted messages differ from the CRLF.CRLF model"
    for message, content in zip(messages, contents):
        # Kept bare LFs end lines for parsing (under "reject" no message holds one).
        headers, section, body = split_message(content, lf=not reject_bare)
        assert message["headers"] == [(text(n), text(v)) for n, v, _ in headers]
        assert message["raws"] == [raw for _, _, raw in headers]
        assert message["eoh"] == 1
        assert message["section"] == section
        assert message["section"] + message["body"] == content, "not the message byte for byte"
        assert message["body"] == body


@pytest.mark.parametrize("policy", ["keep", "reject"])
def test_data_accepts_exactly_what_crlf_dot_crlf_ends(start_server, policy):
    srv = start_server(*BASE_ARGS, "--max-errors", str(MAX_ERRORS_C), "--bare-newline", policy)
    records = Records(srv)

    @settings(max_examples=150, **PROPERTY_SETTINGS)
    @given(token_bodies, st.booleans(), st.booleans(), cuts)
    def data_stream(tokens, end, quit, fractions):
        suffix = (b"\r\n.\r\n" if end else b"") + (b"QUIT\r\n" if quit else b"")
        pieces = cut_tokens(ENVELOPE, tokens, suffix, fractions)
        stream = b"".join(t for t, _ in tokens) + suffix
        codes, contents = model_data(stream, policy == "reject")
        event(f"messages accepted: {len(contents)}")
        event("ends with 421" if 421 in codes else "no 421")
        check_data_stream(srv, records, stream, pieces, policy == "reject")

    data_stream()
    assert_healthy(srv)


data_srv = module_server("properties", *BASE_ARGS, "--max-errors", str(MAX_ERRORS_C))


@pytest.mark.parametrize("stream", [
    b"line\r\n.\r\n",
    b"line\n.\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nsmuggled\r\n.\r\n",
    b"line\r.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nsmuggled\r\n.\r\n",
    b"line\r\n.\nMAIL FROM:<a@b.c>\r\n",
    b"..stuffed\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n",
])
@pytest.mark.parametrize("fractions", [[], [0.5], [i / 10 for i in range(10)],
                                       [i / 40 for i in range(40)]])
def test_data_examples_in_pieces(data_srv, stream, fractions):
    """Fixed streams the property draws from, so each variant is always exercised."""
    pieces = split(ENVELOPE + stream, fractions)
    check_data_stream(data_srv, Records(data_srv), stream, pieces, False)
