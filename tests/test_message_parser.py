"""MessageParser: HEADER (unfolded), the exact bytes, EOH placement, BODY in chunk and line mode.

A fake handler records the calls.  Examples pin each rule; hypothesis checks
the parser against the line-by-line model in tests/reference_models.py for
messages fed whole and at random split points, with CRLF line ends and with
bare LF ending lines too.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_esmtp.message import DEFAULT_CHUNKSIZE, HeaderTooLong, MessageParser, TooManyHeaderLines
from reference_models import CRLF, HeaderLimit, HeaderLines, parse_message, split_message, text


class FakeHandler:
    """Records HEADER/EOH/BODY calls; ``line_mode`` makes EOH turn chunk mode off."""

    def __init__(self, chunksize: int | None = None, line_mode: bool = False) -> None:
        self.chunkmode = False
        if chunksize is not None:
            self.chunksize = chunksize
        self.line_mode = line_mode
        self.calls: list[tuple] = []
        self.raws: list[bytes] = []  # header_raw at each HEADER call
        self.sections: list[bytes] = []  # header_section at each EOH call

    def HEADER(self, name: str, value: str) -> None:
        assert isinstance(name, str) and isinstance(value, str)
        assert isinstance(self.header_raw, bytes)
        self.calls.append(("HEADER", name, value))
        self.raws.append(self.header_raw)

    def EOH(self) -> None:
        self.calls.append(("EOH", self.chunkmode))
        self.sections.append(self.header_section)
        if self.line_mode:
            self.chunkmode = False

    def BODY(self, chunk: bytes) -> None:
        assert isinstance(chunk, bytes) and chunk
        self.calls.append(("BODY", chunk, self.chunkmode))

    # views
    def headers(self) -> list[tuple[str, str]]:
        return [(c[1], c[2]) for c in self.calls if c[0] == "HEADER"]

    def chunks(self) -> list[bytes]:
        return [c[1] for c in self.calls if c[0] == "BODY"]

    def body(self) -> bytes:
        return b"".join(self.chunks())

    def shape(self) -> list[str]:
        """The call sequence with BODY runs collapsed: e.g. HEADER HEADER EOH BODY."""
        out: list[str] = []
        for c in self.calls:
            if not (c[0] == "BODY" and out and out[-1] == "BODY"):
                out.append(c[0])
        return out


def parse(pieces: list[bytes], chunksize: int | None = None, line_mode: bool = False,
          max_header_size: int = 1 << 20, max_header_lines: int | None = None,
          lf: bool = False) -> FakeHandler:
    handler = FakeHandler(chunksize, line_mode)
    parser = MessageParser(handler, max_header_size, max_header_lines, lf)
    for piece in pieces:
        parser.feed(piece)
    parser.finish()
    return handler


def line_pieces(body: bytes, size: int) -> list[bytes]:
    """Line mode, modelled: one piece per line (CRLF included, a last line may lack it).

    A line longer than ``size`` goes in pieces of ``size`` octets, and its CRLF
    is never cut in two (unless ``size`` is 1): the CRLF joins the last piece
    if it fits, else comes alone.  No piece holds bytes of two lines.
    """
    lines = body.split(CRLF)
    out: list[bytes] = []
    for n, line in enumerate(lines):
        pieces = [line[i:i + size] for i in range(0, len(line), size)]
        if n < len(lines) - 1:  # this line ended with CRLF
            if size == 1:
                pieces += [b"\r", b"\n"]
            elif pieces and len(pieces[-1]) + 2 <= size:
                pieces[-1] += CRLF
            else:
                pieces.append(CRLF)
        out += pieces
    return out


# --- headers and EOH ----------------------------------------------------------


def test_headers_unfolded_and_blank_line_ends_them():
    h = parse([b"Subject: hello\r\n  world\r\n\tagain\r\nTo: a@b.c\r\n\r\nBody line\r\n"])
    assert h.calls == [
        ("HEADER", "Subject", "hello  world\tagain"),
        ("HEADER", "To", "a@b.c"),
        ("EOH", True),
        ("BODY", b"Body line\r\n", True),
    ]


def test_blank_line_is_not_part_of_the_body():
    h = parse([b"A: 1\r\n\r\n\r\nx\r\n"])
    assert h.headers() == [("A", "1")]
    assert h.body() == b"\r\nx\r\n"


def test_name_loses_wsp_before_colon_value_loses_wsp_after():
    h = parse([b"Subject \t:  \t spaced  \r\nX-Empty:\r\nX-Colon: a:b: c\r\n\r\n"])
    assert h.headers() == [("Subject", "spaced  "), ("X-Empty", ""), ("X-Colon", "a:b: c")]


def test_eoh_at_first_line_that_is_not_a_header():
    h = parse([b"Subject: x\r\nThis is not a header\r\nNor: this one\r\n"])
    assert h.shape() == ["HEADER", "EOH", "BODY"]
    assert h.body() == b"This is not a header\r\nNor: this one\r\n"


@pytest.mark.parametrize("message, headers, body", [
    (b"Hello there\r\n", [], b"Hello there\r\n"),
    (b" leading space\r\n", [], b" leading space\r\n"),  # a continuation of nothing
    (b"\r\nSubject: in body\r\n", [], b"Subject: in body\r\n"),
    (b": no name\r\n", [], b": no name\r\n"),
    (b"Bad Name: x\r\n", [], b"Bad Name: x\r\n"),
    (b"From sender Mon Jan 1\r\nA: b\r\n", [], b"From sender Mon Jan 1\r\nA: b\r\n"),
    (b"A: b\r\n>From x\r\n", [("A", "b")], b">From x\r\n"),
    (b"", [], b""),
    (b"A: b\r\n", [("A", "b")], b""),
    (b"A: b", [("A", "b")], b""),  # a last header without CRLF
    (b"A: b\r\nno header", [("A", "b")], b"no header"),
    (b"A: b\r\n c", [("A", "b c")], b""),
])
def test_eoh_placement(message, headers, body):
    h = parse([message])
    assert h.headers() == headers
    assert h.body() == body
    assert [c[0] for c in h.calls].count("EOH") == 1
    assert h.shape()[len(headers)] == "EOH"


def test_non_ascii_header_kept_with_surrogateescape():
    h = parse([b"Subject: caf\xc3\xa9 \xff\xfe\r\nX-\xc3\xa9: 1\r\n\r\n"])
    # a non-ASCII name is not a field-name: that line starts the body
    assert h.headers() == [("Subject", "caf\u00e9 \udcff\udcfe")]
    assert h.headers()[0][1].encode("utf-8", "surrogateescape") == b"caf\xc3\xa9 \xff\xfe"
    assert h.body() == b"X-\xc3\xa9: 1\r\n\r\n"


def test_chunk_mode_is_on_at_eoh_and_eoh_may_turn_it_off():
    h = parse([b"A: 1\r\n\r\nx\r\ny\r\n"], line_mode=True)
    assert h.calls == [("HEADER", "A", "1"), ("EOH", True),
                       ("BODY", b"x\r\n", False), ("BODY", b"y\r\n", False)]


def test_default_chunksize_when_handler_has_none_or_a_bad_one():
    body = b"x" * (DEFAULT_CHUNKSIZE + 10)
    for size in (None, 0, -5, "big"):
        h = parse([b"\r\n" + body], chunksize=size)
        assert [len(c) for c in h.chunks()] == [DEFAULT_CHUNKSIZE, 10]


# --- body: chunk mode and line mode ---------------------------------------------


def test_chunk_mode_chunks_within_chunksize():
    body = bytes(range(256)) * 3
    h = parse([b"\r\n" + body[:100], body[100:]], chunksize=64)
    assert h.body() == body
    assert all(len(c) <= 64 for c in h.chunks())
    assert all(c[2] is True for c in h.calls if c[0] == "BODY")


def test_line_mode_one_call_per_line():
    body = b"one\r\ntwo\r\n\r\nthree\r\n"
    h = parse([b"S: x\r\n\r\n" + body[:5], body[5:]], chunksize=100, line_mode=True)
    assert h.chunks() == [b"one\r\n", b"two\r\n", b"\r\n", b"three\r\n"]


def test_line_mode_bare_newlines_do_not_end_lines():
    h = parse([b"\r\na\nb\rc\r\nd\r\n"], chunksize=100, line_mode=True)
    assert h.chunks() == [b"a\nb\rc\r\n", b"d\r\n"]


def test_line_mode_long_line_in_chunksize_pieces_and_last_unended_piece():
    h = parse([b"\r\n" + b"x" * 25 + b"\r\nshort\r\ntail"], chunksize=10, line_mode=True)
    assert h.chunks() == [b"x" * 10, b"x" * 10, b"xxxxx\r\n", b"short\r\n", b"tail"]


def test_line_mode_line_of_exactly_chunksize_with_crlf_straddling():
    # "aaaa\r\n" is 6 octets: with chunksize 5 the CRLF straddles the cut
    h = parse([b"\r\naaaa\r\nb\r\n"], chunksize=5, line_mode=True)
    assert h.chunks() == [b"aaaa", b"\r\n", b"b\r\n"]
    h = parse([b"\r\n: \r\n\r\nb\r\n"], chunksize=3, line_mode=True)
    assert h.chunks() == [b": ", b"\r\n", b"\r\n", b"b\r\n"]  # the empty line stays a line
    h = parse([b"\r\naaa\r\nb\r\n"], chunksize=5, line_mode=True)
    assert h.chunks() == [b"aaa\r\n", b"b\r\n"]


# --- HeaderTooLong ---------------------------------------------------------------


def test_header_at_the_limit_passes_one_more_octet_raises():
    # the limit counts name + value octets (as the --max-header-size help says: unfolded)
    ok = b"Subject: " + b"v" * 13 + b"\r\n\r\n"  # 7 + 13 = 20
    assert parse([ok], max_header_size=20).headers() == [("Subject", "v" * 13)]
    with pytest.raises(HeaderTooLong):
        parse([b"Subject: " + b"v" * 14 + b"\r\n\r\n"], max_header_size=20)


def test_folded_header_too_long_raises():
    message = b"Subject: start\r\n" + b" more words\r\n" * 10 + b"\r\nbody\r\n"
    with pytest.raises(HeaderTooLong):
        parse([message], max_header_size=100)
    assert parse([message], max_header_size=200).headers()[0][1].startswith("start more words")


def test_endless_header_line_raises_before_it_ends():
    """Memory stays bounded: an over-long header line is refused while it is still coming."""
    handler = FakeHandler()
    parser = MessageParser(handler, 100)
    parser.feed(b"Subject: ")
    with pytest.raises(HeaderTooLong):
        for _ in range(100):
            parser.feed(b"x" * 10)
    assert len(parser.partial) <= 200


def test_long_line_that_is_no_header_goes_to_the_body():
    line = b"no header here " + b"y" * 300 + b"\r\n"
    h = parse([line[:50], line[50:]], max_header_size=100)
    assert h.headers() == [] and h.body() == line


# --- properties -------------------------------------------------------------------

TOKENS = [b"Subject: ", b"X-A:", b"To :", b"Bad Name: ", b": ", b" ", b"\t", b"a", b"Zz",
          b"\xff", b"\xc3\xa9", b":", b"\x00", b".", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\r\n "]
messages = st.lists(st.sampled_from(TOKENS), max_size=40).map(b"".join)
cuts = st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=8)


def split(data: bytes, fractions: list[float]) -> list[bytes]:
    points = sorted({int(f * len(data)) for f in fractions} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def expected_calls(message: bytes) -> tuple[list[tuple[str, str]], bytes]:
    headers, body = parse_message(message)
    return [(text(n), text(v)) for n, v in headers], body


@settings(max_examples=600, deadline=None)
@given(messages, cuts, st.integers(min_value=1, max_value=12))
def test_chunk_mode_matches_model_for_any_split(message, fractions, chunksize):
    headers, body = expected_calls(message)
    h = parse(split(message, fractions), chunksize=chunksize)
    assert h.headers() == headers
    assert h.shape()[:len(headers) + 1] == ["HEADER"] * len(headers) + ["EOH"]
    assert h.shape()[len(headers) + 1:] in ([], ["BODY"])
    assert h.body() == body
    assert all(1 <= len(c) <= chunksize for c in h.chunks())
    assert all(c[2] is True for c in h.calls if c[0] == "BODY")


@settings(max_examples=600, deadline=None)
@given(messages, cuts, st.integers(min_value=1, max_value=12))
def test_line_mode_matches_model_for_any_split(message, fractions, chunksize):
    headers, body = expected_calls(message)
    h = parse(split(message, fractions), chunksize=chunksize, line_mode=True)
    assert h.headers() == headers
    assert h.shape()[:len(headers) + 1] == ["HEADER"] * len(headers) + ["EOH"]
    # the same pieces whatever the split: whole lines, long ones cut every chunksize octets
    assert h.chunks() == line_pieces(body, chunksize)
    assert all(c[2] is False for c in h.calls if c[0] == "BODY")


@settings(max_examples=300, deadline=None)
@given(messages, cuts, cuts)
def test_two_splits_give_identical_calls(message, a, b):
    one = parse(split(message, a), chunksize=7, line_mode=True)
    two = parse(split(message, b), chunksize=7, line_mode=True)
    assert one.calls == two.calls


@settings(max_examples=800, deadline=None)
@given(messages, cuts, st.integers(min_value=4, max_value=30))
def test_header_limit_same_outcome_for_any_split(message, fractions, limit):
    """HeaderTooLong iff the model says so, however the message arrives (TCP decides the split)."""
    try:
        headers, _ = parse_message(message, limit)
    except HeaderLimit:
        with pytest.raises(HeaderTooLong):
            parse(split(message, fractions), max_header_size=limit)
    else:
        h = parse(split(message, fractions), max_header_size=limit)
        assert h.headers() == [(text(n), text(v)) for n, v in headers]


@pytest.mark.parametrize("pieces", [
    [b"X-Long: " + b"v" * 14 + b"\r\n\r\n"],
    [b"X-Long: " + b"v" * 14, b"\r\n\r\n"],  # more than 20 octets wait without their CRLF
    [b"X-Long:" + b" " * 30, b"v" * 14 + b"\r\n\r\n"],  # WSP after the colon is not counted
    [b"X-Long" + b" " * 3, b"  : " + b"v" * 14 + b"\r\n\r\n"],
    [b"X-Long: " + b"v" * 14 + b"\r", b"\n\r\n"],  # the CR of the CRLF is not value
])
def test_header_at_the_limit_whatever_the_split(pieces):
    """name + value = 6 + 14 = 20 = the limit: accepted however the octets arrive."""
    h = parse(pieces, max_header_size=20)
    assert h.headers() == [("X-Long", "v" * 14)]


@pytest.mark.parametrize("pieces", [
    [b"X" * 30 + b": v\r\n\r\n"],
    [b"X" * 25, b"X" * 5 + b": v\r\n\r\n"],
    [b"X" * 25, b"X" * 5 + b" no header after all\r\n\r\n"],
    [b"X" * 30 + b" no header after all\r\n\r\n"],
])
def test_line_starting_with_an_overlong_field_name_is_refused(pieces):
    """A header-section line whose field name runs past the limit is refused, header or not,
    so that the verdict does not depend on where the line was cut."""
    with pytest.raises(HeaderTooLong):
        parse(pieces, max_header_size=20)


# --- the exact bytes: header_raw and header_section -----------------------------------


def test_exact_bytes_of_each_header_and_of_the_section():
    message = (b"Subject:  hello\r\n  world\r\n\tagain\r\nX-Odd \t:v  \r\n"
               b"To: a@b.c\r\n\r\nBody line\r\n")
    h = parse([message])
    assert h.headers() == [("Subject", "hello  world\tagain"), ("X-Odd", "v  "), ("To", "a@b.c")]
    assert h.raws == [b"Subject:  hello\r\n  world\r\n\tagain\r\n", b"X-Odd \t:v  \r\n", b"To: a@b.c\r\n"]
    assert h.sections == [message[:-len(b"Body line\r\n")]]  # the empty line included
    assert h.sections[0] + h.body() == message


@pytest.mark.parametrize("message, raws, section", [
    (b"A: 1\r\nnot a header\r\n", [b"A: 1\r\n"], b"A: 1\r\n"),  # the body's first line is not in it
    (b"A: 1\r\n b", [b"A: 1\r\n b"], b"A: 1\r\n b"),  # no line end at the very end
    (b"A: 1\r\n\r\n", [b"A: 1\r\n"], b"A: 1\r\n\r\n"),
    (b"body only\r\n", [], b""),
    (b"\r\nbody\r\n", [], b"\r\n"),
    (b"", [], b""),
])
def test_exact_bytes_where_the_section_ends(message, raws, section):
    h = parse([message])
    assert h.raws == raws
    assert h.sections == [section]
    assert section + h.body() == message


def test_exact_bytes_survive_a_squeezed_header_line():
    """A header line longer than the limit only through WSP is accepted, and its bytes are all kept."""
    message = b"X-Pad:" + b" \t" * 100 + b"value\r\n\r\nbody"
    h = parse([message[:50], message[50:120], message[120:]], max_header_size=20)
    assert h.headers() == [("X-Pad", "value")]
    assert h.raws == [message[:-len(b"\r\nbody")]]
    assert h.sections[0] + h.body() == message


def test_each_message_starts_with_empty_exact_bytes():
    handler = FakeHandler()
    handler.header_raw, handler.header_section = b"stale", b"stale"
    MessageParser(handler, 100)
    assert handler.header_raw == b"" and handler.header_section == b""


# --- a bare LF ends a line (the bare-newline policy keeps it) --------------------------


def test_bare_lf_ends_header_lines_and_the_section():
    message = b"From: a@b.c\nSubject: two\n lines\n\nbody one\nbody two\n"
    h = parse([message], lf=True)
    assert h.headers() == [("From", "a@b.c"), ("Subject", "two lines")]
    assert h.raws == [b"From: a@b.c\n", b"Subject: two\n lines\n"]
    assert h.sections == [b"From: a@b.c\nSubject: two\n lines\n\n"]
    assert h.body() == b"body one\nbody two\n"


def test_bare_lf_and_crlf_mixed_and_crlf_only_without_the_option():
    message = b"A: 1\r\nB: 2\n\r\nbody\n"
    assert parse([message], lf=True).headers() == [("A", "1"), ("B", "2")]
    assert parse([message], lf=True).body() == b"body\n"
    assert parse([message]).headers() == [("A", "1"), ("B", "2\n")]  # CRLF only: one line


def test_body_lines_end_with_crlf_only_in_line_mode():
    """Line mode hands over body lines as before: a bare LF in the body ends no line."""
    h = parse([b"A: 1\n\nx\ny\r\nz"], chunksize=100, line_mode=True, lf=True)
    assert h.chunks() == [b"x\ny\r\n", b"z"]


def test_a_large_lf_message_is_not_one_giant_header():
    body = b"line of text\n" * 20000
    h = parse([b"From: a@b.c\nTo: d@e.f\n\n" + body], max_header_size=1000, lf=True)
    assert h.headers() == [("From", "a@b.c"), ("To", "d@e.f")]
    assert h.body() == body


# --- the header line cap -------------------------------------------------------------------


def test_header_lines_at_the_cap_pass_one_more_raises():
    three = b"A: 1\r\nB: 2\r\n 3\r\n"  # continuation lines count
    assert parse([three + b"\r\nbody"], max_header_lines=3).headers() == [("A", "1"), ("B", "2 3")]
    with pytest.raises(TooManyHeaderLines):
        parse([three + b" 4\r\n\r\nbody"], max_header_lines=3)
    with pytest.raises(TooManyHeaderLines):
        parse([three + b"C: 4"], max_header_lines=3)  # a last line without its end counts too


def test_header_bomb_stops_at_the_cap_without_calling_hooks_for_the_rest():
    handler = FakeHandler()
    parser = MessageParser(handler, 1 << 20, 1000, lf_ends_lines=True)
    with pytest.raises(TooManyHeaderLines):
        parser.feed(b"a:\n" * 1_000_000)
    assert len(handler.headers()) == 999  # the 1000th is still being collected
    assert "EOH" not in handler.shape()


# --- properties: exact bytes, bare LF, the line cap --------------------------------------


@settings(max_examples=600, deadline=None)
@given(messages, cuts, st.integers(min_value=1, max_value=12), st.booleans(), st.booleans())
def test_exact_bytes_match_model_and_rebuild_the_message(message, fractions, chunksize, lf, line_mode):
    """Whatever the split: HEADER, header_raw, header_section and BODY as the model says,
    the exact bytes of the headers make up the section, and section + body is the message."""
    headers, section, body = split_message(message, lf=lf)
    h = parse(split(message, fractions), chunksize=chunksize, line_mode=line_mode, lf=lf)
    assert h.headers() == [(text(n), text(v)) for n, v, _ in headers]
    assert h.raws == [raw for _, _, raw in headers]
    assert h.sections == [section]
    assert section.startswith(b"".join(h.raws))
    assert section[len(b"".join(h.raws)):] in (b"", b"\r\n", b"\n")  # the empty line, if any
    assert h.sections[0] + h.body() == message
    if line_mode:
        assert h.chunks() == line_pieces(body, chunksize)
    else:
        assert all(1 <= len(c) <= chunksize for c in h.chunks())


@settings(max_examples=600, deadline=None)
@given(messages, cuts, st.integers(min_value=0, max_value=6), st.booleans())
def test_header_line_cap_same_outcome_for_any_split(message, fractions, cap, lf):
    try:
        headers, _, _ = split_message(message, max_lines=cap, lf=lf)
    except HeaderLines:
        with pytest.raises(TooManyHeaderLines):
            parse(split(message, fractions), max_header_lines=cap, lf=lf)
    else:
        h = parse(split(message, fractions), max_header_lines=cap, lf=lf)
        assert h.raws == [raw for _, _, raw in headers]


@settings(max_examples=600, deadline=None)
@given(messages, cuts, st.integers(min_value=4, max_value=30), st.integers(min_value=0, max_value=6))
def test_both_header_limits_refuse_what_the_model_refuses(message, fractions, limit, cap):
    """With both limits, refused or not is the model's verdict (which limit speaks first may
    depend on the split when a line breaks both; either is 552 5.3.4 on the wire)."""
    try:
        headers, _, _ = split_message(message, limit, cap, lf=True)
    except (HeaderLimit, HeaderLines):
        with pytest.raises((HeaderTooLong, TooManyHeaderLines)):
            parse(split(message, fractions), max_header_size=limit, max_header_lines=cap, lf=True)
    else:
        h = parse(split(message, fractions), max_header_size=limit, max_header_lines=cap, lf=True)
        assert h.raws == [raw for _, _, raw in headers]


@settings(max_examples=400, deadline=None)
@given(messages, cuts, st.integers(min_value=4, max_value=30))
def test_header_limit_with_bare_lf_same_outcome_for_any_split(message, fractions, limit):
    try:
        headers, _ = parse_message(message, limit, lf=True)
    except HeaderLimit:
        with pytest.raises(HeaderTooLong):
            parse(split(message, fractions), max_header_size=limit, lf=True)
    else:
        h = parse(split(message, fractions), max_header_size=limit, lf=True)
        assert h.headers() == [(text(n), text(v)) for n, v in headers]


# --- the one-look header section (a handler without HEADER) ----------------------------------

from prefork_esmtp.handler import ESMTPHandler  # noqa: E402


class NoHeaderHandler(ESMTPHandler):
    """Takes no HEADER calls (the parser may then take the header section in one look)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def EOH(self) -> None:
        self.calls.append(("EOH", self.header_section, self.header_raw, self.chunkmode))

    def BODY(self, chunk: bytes) -> None:
        self.calls.append(("BODY", chunk, self.chunkmode))


class LineByLineHandler(NoHeaderHandler):
    """The same, but with a HEADER of its own: the parser goes line by line."""

    def HEADER(self, name: str, value: str) -> None:
        pass


def outcome(handler_class: type, pieces: list[bytes], **limits) -> tuple:
    handler = handler_class()
    parser = MessageParser(handler, limits.get("size", 1 << 20), limits.get("lines"), limits.get("lf", False))
    try:
        for piece in pieces:
            parser.feed(piece)
        parser.finish()
    except (HeaderTooLong, TooManyHeaderLines) as exc:
        return type(exc).__name__, handler.calls
    return "ok", handler.calls, handler.header_raw, handler.header_section


PLAIN = (b"Received: from a\r\n\tby b\r\nFrom: <a@example.org>\r\nSubject: hi\r\n"
         b"X-Folded: one\r\n two\r\n\tthree\r\n\r\nbody line\r\n.dot\r\n")


@pytest.mark.parametrize("message", [
    PLAIN,
    b"Subject: x\r\n\r\n",  # no body
    b"\r\nbody only\r\n",  # no headers
    b" starts folded\r\nSubject: x\r\n\r\nb\r\n",  # a continuation first: no header at all
    b"Subject: x\r\nnot a header\r\n\r\nb\r\n",  # the section ends at the line that is no header
    b"Subject: x\nFrom: y\r\n\r\nb\r\n",  # a bare LF inside the section
    b"Subject: x\r\rFrom: y\r\n\r\nb\r\n",  # a bare CR
    b"Subject: x\r\n\n\r\nb\r\n",  # an empty line ended by a bare LF
    b"Subject : spaced name\r\nX:\r\n\r\n",  # WSP before the colon, an empty value
    b"Subject: caf\xc3\xa9 \xff\r\n\r\n\xff\r\n",  # non-ASCII octets
])
@pytest.mark.parametrize("lf", [False, True])
def test_one_look_header_section_is_the_line_by_line_one(message, lf):
    assert outcome(NoHeaderHandler, [message], lf=lf) == outcome(LineByLineHandler, [message], lf=lf)


@pytest.mark.parametrize("size, lines", [(len(PLAIN), None), (30, None), (20, None), (1 << 20, 8),
                                         (1 << 20, 7), (1 << 20, 6)])
def test_one_look_header_section_keeps_the_limits(size, lines):
    """At, just under and over each limit, refused or not exactly as line by line."""
    for limits in ({"size": size, "lines": lines}, {"size": size, "lines": lines, "lf": True}):
        assert outcome(NoHeaderHandler, [PLAIN], **limits) == outcome(LineByLineHandler, [PLAIN], **limits)


@settings(max_examples=600, deadline=None)
@given(messages, cuts, st.integers(min_value=4, max_value=60), st.integers(min_value=0, max_value=8), st.booleans())
def test_one_look_header_section_matches_line_by_line_for_any_message(message, fractions, size, cap, lf):
    pieces = split(message, fractions)
    for limits in ({"lf": lf}, {"size": size, "lines": cap, "lf": lf}):
        assert outcome(NoHeaderHandler, pieces, **limits) == outcome(LineByLineHandler, pieces, **limits)
