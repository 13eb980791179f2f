"""Slow, obviously-correct models of what the engine computes fast.

Shared by the unit and property tests (test_dotdata.py, test_message_parser.py,
test_properties.py).  Everything here works on whole byte strings, one rule of
RFC 5321 / RFC 5322 at a time, with no incremental state: the engine's
incremental decoders must agree with these whatever the split of their input.
"""

from __future__ import annotations

import re

CRLF = b"\r\n"
END_OF_DATA = b"\r\n.\r\n"


# --- DATA: end of data and dot-unstuffing (RFC 5321 4.5.2) -------------------


def find_end_of_data(stream: bytes) -> int | None:
    """Where the message ends in ``stream`` (the bytes after the DATA line), or None.

    The DATA line's own CRLF makes the first byte of ``stream`` a line start,
    so conceptually we search ``CRLF + stream`` for CRLF.CRLF.  The returned
    ``k`` means: the (stuffed) content is ``stream[:k]`` (it includes the CRLF
    before the dot) and the terminator ends at ``stream[k + 3]``.
    """
    k = (CRLF + stream).find(END_OF_DATA)
    return None if k < 0 else k


def unstuff(content: bytes) -> bytes:
    """Remove the first '.' of every CRLF-delimited line that starts with '.'."""
    return CRLF.join(line[1:] if line.startswith(b".") else line
                     for line in content.split(CRLF))


def decode_data(stream: bytes) -> tuple[bytes | None, int | None]:
    """(unstuffed content, octets consumed through the terminator), or (None, None)."""
    k = find_end_of_data(stream)
    if k is None:
        return None, None
    return unstuff(stream[:k]), k + 3


def bare_newlines(data: bytes) -> int:
    """Count LFs not preceded by CR and CRs not followed by LF, byte by byte."""
    count = 0
    for i, byte in enumerate(data):
        if byte == 0x0A and (i == 0 or data[i - 1] != 0x0D):
            count += 1
        elif byte == 0x0D and (i + 1 == len(data) or data[i + 1] != 0x0A):
            count += 1
    return count


# --- the message: headers, end of headers, body (RFC 5322 2.2, 2.2.3) ---------

# A header line: field-name (printable ASCII but colon), optional WSP, colon.
HEADER_LINE = re.compile(rb"[!-9;-~]+[ \t]*:")
# What a line that may still turn out to be a header starts with.
NAME_RUN = re.compile(rb"[!-9;-~]+[ \t]*")


class HeaderLimit(Exception):
    """The model's verdict: the header section breaks the header size limit."""


class HeaderLines(Exception):
    """The model's verdict: the header section has more lines than the header line cap."""


def next_line(message: bytes, pos: int, lf: bool = False) -> tuple[bytes, int, bool]:
    """The line starting at ``pos``: (its content without the line end, where the next starts, ended?).

    A line ends with CRLF; with ``lf`` a bare LF ends it too (and a CR right
    before that LF belongs to the line end).  A last line may have no end.
    """
    i = message.find(b"\n" if lf else CRLF, pos)
    if i < 0:
        return message[pos:], len(message), False
    nxt = i + (1 if lf else 2)
    if lf and i > pos and message[i - 1] == 0x0D:
        i -= 1
    return message[pos:i], nxt, True


def split_message(message: bytes, limit: int | None = None, max_lines: int | None = None,
                  lf: bool = False) -> tuple[list[tuple[bytes, bytes, bytes]], bytes, bytes]:
    """Split a message into headers (name, value unfolded, exact bytes), the header section and the body.

    The header section ends at the first empty line (which belongs to the
    section, not the body) or at the first line that is neither a header nor
    the continuation (leading WSP) of one; that line is the first line of the
    body.  A last line without a line end is judged the same way.  Unfolding
    removes the line end before a continuation line and keeps its WSP.  Names
    lose WSP before the colon, values lose WSP after it.  A header's exact bytes
    run from its first line's start to the start of the line after its last.

    With ``limit``, raise HeaderLimit if a header's name + value exceeds it,
    or if a line examined in the header section (the line that ends it
    included) starts with field-name characters and WSP longer than the
    limit: such a line could still become a header when it ends, and the
    engine must decide on bounded memory whatever way the line arrives.
    With ``max_lines``, raise HeaderLines when there are more header lines
    (continuation lines included).
    """
    headers: list[list[bytes]] = []  # name, value, start offset
    starts: list[int] = []

    def result(header_end: int, section_end: int) -> tuple[list[tuple[bytes, bytes, bytes]], bytes, bytes]:
        if limit is not None and any(len(n) + len(v) > limit for n, v in headers):
            raise HeaderLimit()
        ends = starts[1:] + [header_end]
        raws = [message[a:b] for a, b in zip(starts, ends)]
        return ([(n, v, raw) for (n, v), raw in zip(headers, raws)],
                message[:section_end], message[section_end:])

    pos = lines = 0
    while pos < len(message):
        line, nxt, ended = next_line(message, pos, lf)
        if ended and line == b"":
            return result(pos, nxt)
        run = NAME_RUN.match(line)
        if limit is not None and run and run.end() > limit:
            raise HeaderLimit()
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1] += line
        elif HEADER_LINE.match(line):
            name, _, value = line.partition(b":")
            headers.append([name.rstrip(b" \t"), value.lstrip(b" \t")])
            starts.append(pos)
        else:
            return result(pos, pos)
        lines += 1
        if max_lines is not None and lines > max_lines:
            raise HeaderLines()
        pos = nxt
    return result(len(message), len(message))


def parse_message(message: bytes, limit: int | None = None, lf: bool = False) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Unfolded headers (name, value) and the body: :func:`split_message` without the exact bytes."""
    headers, _, body = split_message(message, limit, lf=lf)
    return [(n, v) for n, v, _ in headers], body


def text(data: bytes) -> str:
    """Bytes as the engine hands them to HEADER: UTF-8 with surrogateescape."""
    return data.decode("utf-8", "surrogateescape")
