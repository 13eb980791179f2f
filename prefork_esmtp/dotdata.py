"""The DATA byte stream: end-of-data detection and dot-unstuffing (RFC 5321 4.5.2).

Only ``<CRLF>.<CRLF>`` ends a message: a line is a run of bytes ended by CRLF, and
no bare LF or bare CR counts as a line end, so no ``\\n.\\n``-style variant can end
a message early or smuggle a second transaction in.  Work is done on whole
buffers (one search for the first line that starts with a dot, ``bytes.replace``
for stuffed dots): no line costs Python work of its own.
"""

from __future__ import annotations

import re

#: A line that starts with a dot (found by the regular expression engine: several times faster
#: than ``bytes.find`` for this needle in CRLF-dense text).
_LINE_DOT = re.compile(rb"\r\n\.")
#: ``line_dot(buf, pos)``: the first ``<CRLF>.`` in ``buf`` from ``pos`` on (a match), or None.
line_dot = _LINE_DOT.search

_CR = 0x0D
_LF = 0x0A
_DOT = 0x2E


class DotDecoder:
    """Incremental decoder of one DATA section.

    Feed it the receive buffer with :meth:`decode`; it returns the unstuffed
    message bytes it could decide on, how far it consumed, and whether the
    end-of-data line was seen.  Bytes it cannot decide on yet (a trailing CR,
    or a dot at the start of a line) are left in the buffer for the next call.
    """

    __slots__ = ("bol",)

    def __init__(self) -> None:
        # The first byte after the DATA command line starts a line.
        self.bol = True

    def decode(self, buf: bytes, pos: int) -> tuple[list[bytes], int, bool]:
        """Decode ``buf[pos:]``; return (pieces, next position, ended).

        Whole runs of lines are unstuffed with one ``bytes.replace``: before the
        first ``<CRLF>.<CRLF>`` (or before the last CRLF, when there is none) every
        ``<CRLF>.`` is a stuffed dot, so a message of dot-lines costs no per-line work.
        """
        out: list[bytes] = []
        n = len(buf)
        while pos < n:
            if self.bol:
                if buf[pos] == _DOT:
                    if n - pos < 2:
                        break  # a lone dot: need the next byte
                    if buf[pos + 1] == _CR:
                        if n - pos < 3:
                            break  # ".\r": need one more byte
                        if buf[pos + 2] == _LF:
                            return out, pos + 3, True
                    pos += 1  # a stuffed dot: drop it, the line goes on
                self.bol = False
                continue
            # Not at a line start, and no CR of a CRLF consumed without its LF: every line
            # start from here on follows a CRLF inside buf[pos:].
            m = _LINE_DOT.search(buf, pos)
            if m is None:
                end = buf.rfind(b"\r\n", pos)  # no line starts with a dot: complete lines go as they are
                if end >= 0:
                    out.append(buf[pos:end + 2])
                    pos = end + 2
                    self.bol = True
                    continue
            else:
                end = m.start()
                if buf[end + 3:end + 5] == b"\r\n":  # the first dot line ends the data: nothing to unstuff
                    out.append(buf[pos:end + 2])
                    return out, end + 5, True
            # Dot lines to unstuff, or no line end at all: the general way.
            end = buf.find(b"\r\n.\r\n", pos)
            if end >= 0:
                out.append(unstuff(buf[pos:end + 2]))
                return out, end + 5, True
            end = buf.rfind(b"\r\n", pos)
            if end >= 0:
                out.append(unstuff(buf[pos:end + 2]))
                pos = end + 2
                self.bol = True  # the next line's first byte may be a dot: decided above
                continue
            end = n - 1 if buf[n - 1] == _CR else n  # a last CR may be the CR of a CRLF: decide next time
            if end > pos:
                out.append(buf[pos:end])
            pos = end
            break
        return out, pos, False


def unstuff(lines: bytes) -> bytes:
    """Drop the stuffed dot of each line that starts after a CRLF in ``lines`` (which ends with CRLF
    and holds no end-of-data line)."""
    return lines.replace(b"\r\n.", b"\r\n") if b"\r\n." in lines else lines


def count_bare_newlines(data: bytes, prev_cr: bool) -> int:
    """Count bare LFs and bare CRs in ``data``, a piece of a CRLF-delimited stream.

    ``prev_cr`` says the previous piece ended with CR, so a leading LF is
    not bare.  A trailing CR is not counted: the caller passes it on as
    ``prev_cr`` and counts it as bare if the next piece does not start with LF.
    """
    if not data:
        return 0
    crlf = data.count(b"\r\n")
    bare_lf = data.count(b"\n") - crlf
    bare_cr = data.count(b"\r") - crlf
    if prev_cr and data[:1] == b"\n":
        bare_lf -= 1
    elif prev_cr:
        bare_cr += 1  # the previous piece's trailing CR was bare after all
    if data[-1:] == b"\r":
        bare_cr -= 1
    return bare_lf + bare_cr
