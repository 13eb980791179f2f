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


def parse_message(message: bytes, limit: int | None = None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Split a message into unfolded headers and the body, line by line.

    The header section ends at the first empty line (which belongs to neither
    part) or at the first line that is neither a header nor the continuation
    (leading WSP) of one; that line is the first line of the body.  A last line
    without CRLF is judged the same way.  Unfolding removes the CRLF before
    a continuation line and keeps its WSP.  Names lose WSP before the colon,
    values lose WSP after it.

    With ``limit``, raise HeaderLimit if a header's name + value exceeds it,
    or if a line examined in the header section (the line that ends it
    included) starts with field-name characters and WSP longer than the
    limit: such a line could still become a header when it ends, and the
    engine must decide on bounded memory whatever way the line arrives.
    """
    headers: list[list[bytes]] = []

    def result(body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
        if limit is not None and any(len(n) + len(v) > limit for n, v in headers):
            raise HeaderLimit()
        return [(n, v) for n, v in headers], body

    pos = 0
    while pos < len(message):
        i = message.find(CRLF, pos)
        line = message[pos:] if i < 0 else message[pos:i]
        nxt = len(message) if i < 0 else i + 2
        if i >= 0 and line == b"":
            return result(message[nxt:])
        run = NAME_RUN.match(line)
        if limit is not None and run and run.end() > limit:
            raise HeaderLimit()
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1] += line
        elif HEADER_LINE.match(line):
            name, _, value = line.partition(b":")
            headers.append([name.rstrip(b" \t"), value.lstrip(b" \t")])
        else:
            return result(message[pos:])
        pos = nxt
    return result(b"")


def text(data: bytes) -> str:
    """Bytes as the engine hands them to HEADER: UTF-8 with surrogateescape."""
    return data.decode("utf-8", "surrogateescape")
