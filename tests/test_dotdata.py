"""DotDecoder (end of DATA, dot-unstuffing) and count_bare_newlines against slow models.

The model (tests/reference_models.py) works on the whole stream at once:
prepend CRLF, find the first CRLF.CRLF, unstuff line by line.  The engine's
decoder works incrementally on whatever the socket delivered; these tests
simulate the reader (keep the unconsumed bytes, append the next piece, decode
again) over adversarial streams split at every kind of point.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_esmtp.dotdata import DotDecoder, count_bare_newlines
from reference_models import bare_newlines, decode_data, find_end_of_data, unstuff

# Bytes and whole tokens that matter to end-of-data detection and unstuffing.
ATOMS = [b"\r", b"\n", b".", b"a", b"\x00", b"\xff",
         b"\r\n.\r\n", b"\n.\n", b"\r.\r\n", b"\r\n..", b".\r\n", b"\r\n", b"\n.\r\n",
         b"\r\n.\n", b"\r\n.\r"]

streams = st.lists(st.sampled_from(ATOMS), max_size=40).map(b"".join)
# Cut points as fractions, so one draw fits any stream length.
cuts = st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=8)


def split(data: bytes, fractions: list[float]) -> list[bytes]:
    """Cut ``data`` at the given fractions of its length (empty pieces dropped)."""
    points = sorted({int(f * len(data)) for f in fractions} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


def run_reader(pieces: list[bytes]) -> tuple[list[bytes], bool, int, int]:
    """Drive a DotDecoder as reader.read_data does: (output pieces, ended, consumed, max held).

    ``consumed`` is the absolute stream offset the decoder stopped at;
    ``max held`` the most bytes it left undecided before the next piece came.
    """
    decoder = DotDecoder()
    out: list[bytes] = []
    buf, pos, dropped, held = b"", 0, 0, 0
    for piece in pieces:
        dropped += pos
        buf, pos = buf[pos:] + piece, 0
        chunk, pos, ended = decoder.decode(buf, pos)
        assert 0 <= pos <= len(buf)
        out.extend(chunk)
        if ended:
            return out, True, dropped + pos, held
        held = max(held, len(buf) - pos)
    return out, False, dropped + pos, held


def check_stream(stream: bytes, pieces: list[bytes]) -> None:
    assert b"".join(pieces) == stream
    out, ended, consumed, held = run_reader(pieces)
    assert all(out), "the decoder must not hand out empty pieces"
    decoded = b"".join(out)
    content, end = decode_data(stream)
    if content is None:
        assert not ended, f"ended without CRLF.CRLF in {stream!r}"
        # Everything decided so far is right, and only a dot, a CR or ".\r" waits.
        whole = unstuff(stream)
        assert whole.startswith(decoded)
        assert len(whole) - len(decoded) <= 1
        assert held <= 2 and len(stream) - consumed <= 2
    else:
        assert ended, f"missed the CRLF.CRLF in {stream!r} split {pieces!r}"
        assert decoded == content
        assert consumed == end


# --- examples -------------------------------------------------------------------


@pytest.mark.parametrize("stream, content", [
    (b"Hello\r\n.\r\n", b"Hello\r\n"),
    (b".\r\n", b""),  # empty message: the DATA line's CRLF starts the terminator
    (b"..\r\n.\r\n", b".\r\n"),
    (b"...\r\n.\r\n", b"..\r\n"),
    (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n"),
    (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),
    (b"a.\r\n.a\r\n.\r\n", b"a.\r\na\r\n"),
    (b"\r\n.\r\n", b"\r\n"),
    (b"x\n.\r\n.\r\n", b"x\n.\r\n"),  # "\n." is not a line start: the dot stays
])
def test_examples_end_and_unstuff(stream, content):
    decoded, consumed = decode_data(stream)
    assert decoded == content and consumed == len(stream)  # the model agrees
    out, pos, ended = DotDecoder().decode(stream, 0)
    assert (b"".join(out), pos, ended) == (content, len(stream), True)


@pytest.mark.parametrize("variant", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r.\r", b"\n.\r", b"\r\n.\r", b"\r.\n",
])
def test_no_bare_newline_variant_ends_data(variant):
    stream = b"text" + variant + b"MAIL FROM:<evil@example.org>\r\n"
    out, pos, ended = DotDecoder().decode(stream, 0)
    assert not ended
    assert b"".join(out) == unstuff(stream[:pos])
    assert b"MAIL FROM" in b"".join(out)  # the would-be smuggled command is message data


def test_nothing_decoded_after_the_terminator():
    stream = b"one\r\n.\r\nRSET\r\n..x\r\n.\r\n"
    out, pos, ended = DotDecoder().decode(stream, 0)
    assert ended and pos == len(b"one\r\n.\r\n")
    assert b"".join(out) == b"one\r\n"


def test_data_starting_with_a_stuffed_dot():
    out, pos, ended = DotDecoder().decode(b"..\r\n", 0)
    assert b"".join(out) == b".\r\n" and not ended


@pytest.mark.parametrize("pieces", [
    [b"abc\r\n", b".\r\n"],  # the terminator's CRLF at the end of one read
    [b"abc\r\n", b".", b"\r", b"\n"],
    [b"abc\r", b"\n", b".\r\n"],
    [b"abc\r", b"\n.", b"\r\n"],
    [b"a\r\n", b"..b\r\n", b".\r\n"],
    [b"a\r\n", b".", b".b\r\n.\r\n"],
])
def test_terminator_split_across_reads(pieces):
    """Every way of splitting CRLF.CRLF over reads still ends the message."""
    stream = b"".join(pieces)
    content, end = decode_data(stream)
    out, ended, consumed, _ = run_reader(pieces)
    assert ended and consumed == end == len(stream)
    assert b"".join(out) == content


@pytest.mark.parametrize("pieces", [
    [b"a\r\n", b"..b\r\n"],
    [b"a\r", b"\n..b\r\n"],
    [b"a\r\n.", b".b\r\n"],
])
def test_stuffed_dot_split_across_reads(pieces):
    out, ended, _, _ = run_reader(pieces)
    assert not ended and b"".join(out) == b"a\r\n.b\r\n"


def test_waits_for_undecidable_bytes():
    decoder = DotDecoder()
    # A trailing CR may be the start of CRLF: held back.
    assert decoder.decode(b"abc\r", 0) == ([b"abc"], 3, False)
    decoder = DotDecoder()
    assert decoder.decode(b"abc\r\n.", 0) == ([b"abc\r\n"], 5, False)
    assert decoder.decode(b"abc\r\n.\r", 5) == ([], 5, False)
    assert decoder.decode(b"abc\r\n.\rx", 5) == ([b"\rx"], 8, False)


# --- properties ------------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(streams, cuts)
def test_decoder_matches_model_for_any_split(stream, fractions):
    check_stream(stream, split(stream, fractions))


@settings(max_examples=500, deadline=None)
@given(streams)
def test_decoder_matches_model_byte_by_byte(stream):
    check_stream(stream, [stream[i:i + 1] for i in range(len(stream))])


@settings(max_examples=500, deadline=None)
@given(streams, streams, cuts)
def test_decoder_stops_right_after_terminator(body, after, fractions):
    """Whatever follows CRLF.CRLF (the next commands) is left to the reader."""
    stream = body + b"\r\n.\r\n" + after
    k = find_end_of_data(stream)
    assert k is not None and k <= len(body) + 2
    pieces = split(stream, fractions)
    out, ended, consumed, _ = run_reader(pieces)
    assert ended and consumed == k + 3
    assert b"".join(out) == unstuff(stream[:k])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), cuts)
def test_decoder_on_random_bytes(stream, fractions):
    check_stream(stream, split(stream, fractions))


# --- count_bare_newlines ----------------------------------------------------------

newline_data = st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\n\r"]),
                        max_size=30).map(b"".join)


@pytest.mark.parametrize("data, expected", [
    (b"", 0), (b"a\r\nb\r\n", 0), (b"a\nb", 1), (b"a\rb", 1), (b"\n\r", 2),
    (b"\r\r\n", 1), (b"\r\n\n", 1), (b"a\r", 1),
])
def test_bare_newline_model_examples(data, expected):
    assert bare_newlines(data) == expected


def engine_bare_count(pieces: list[bytes]) -> int:
    """Use count_bare_newlines as the session does: carry a trailing CR to the next piece."""
    total, prev_cr = 0, False
    for piece in pieces:
        total += count_bare_newlines(piece, prev_cr)
        prev_cr = piece.endswith(b"\r")
    return total + (1 if prev_cr else 0)


@settings(max_examples=1000, deadline=None)
@given(newline_data, cuts)
def test_count_bare_newlines_matches_model_for_any_split(data, fractions):
    assert engine_bare_count(split(data, fractions)) == bare_newlines(data)


@settings(max_examples=300, deadline=None)
@given(streams, cuts)
def test_bare_newlines_in_decoded_pieces(stream, fractions):
    """The session counts bare newlines over the decoder's output pieces, not the raw input."""
    out, ended, _, _ = run_reader(split(stream, fractions))
    if ended:
        assert engine_bare_count(out) == bare_newlines(b"".join(out))
