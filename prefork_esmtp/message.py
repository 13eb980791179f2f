"""From message bytes to the handler's HEADER, EOH and BODY calls.

The same parser serves DATA (after dot-unstuffing) and BDAT (raw chunks), so a
handler sees the same calls whichever the client used.  Headers are unfolded
(RFC 5322 2.2.3: the line end before WSP removed) and handed over as str,
non-ASCII kept with UTF-8 and surrogateescape; the exact bytes of each header
(``header_raw``) and of the whole header section (``header_section``) are set
on the handler as well, so it can keep the message byte for byte.  The header
section ends at the empty line, or at the first line that is not a header
(that line starts the body).  The body goes out in chunks of at most
``chunksize`` while ``chunkmode`` is on, and line by line (line end included)
while it is off (a line of the body ends with CRLF).

Header lines end with CRLF; with ``lf_ends_lines`` a bare LF ends them too
(as Postfix reads mail), so a message written with LF line ends keeps its
structure: headers apart, EOH at the empty line, the body in BODY.  The bytes
themselves are never changed.
"""

from __future__ import annotations

import re
from typing import Any

from prefork_esmtp.handler import DEFAULT_CHUNKSIZE, ESMTPHandler

# field-name (printable ASCII but colon), the WSP after it, and the colon if there is one:
# a line is a header when the colon is there (obsolete syntax allows WSP before it).
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*(:?)")
# A header section every line of which is plainly a header or its continuation, and the empty
# line after it (group 1: the last header).  Each line runs to its first LF, which must follow a
# CR; a bare CR inside a line is not excluded here (``.`` is quicker than ``[^\r\n]``): counting
# the CRs and LFs of the section tells.
_PLAIN_SECTION = re.compile(rb"(?:([!-9;-~]+[ \t]*:.*\r\n(?:[ \t].*\r\n)*))+\r\n")
_BASE_HEADER = ESMTPHandler.HEADER


class HeaderTooLong(Exception):
    """One header (unfolded) exceeded the header size limit."""


class TooManyHeaderLines(Exception):
    """The header section has more lines (continuation lines included) than the cap."""


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def plain_section(data: bytes, max_header_size: int, max_header_lines: int | None) -> re.Match[bytes] | None:
    """The header section at the start of ``data`` up to its empty line (``end()``; ``start(1)``:
    its last header) when every line of it is plainly a header or its continuation, ended by CRLF,
    within the limits; else None.

    Such a section parses the same line by line, whether a bare LF ends lines or not:
    a line with a bare CR or LF is not plain.
    """
    m = _PLAIN_SECTION.match(data)
    if m is None:
        return None
    end = m.end()
    lines = data.count(b"\n", 0, end)  # each LF ends a line (the empty one too): the match put a CR before each
    if end - 2 > max_header_size or data.count(b"\r", 0, end) != lines \
            or (max_header_lines is not None and lines > max_header_lines + 1):
        return None  # no single header can be too long when the section is not; a bare CR inside a line
    return m


def feed_body(handler: Any, data: bytes) -> None:
    """The whole body of a message whose header section is over (EOH called), as :class:`MessageParser`
    feeds it (chunks or lines, by ``chunkmode`` and ``chunksize``) and finishes.  Hooks' exceptions propagate."""
    parser = MessageParser.__new__(MessageParser)  # the parser's state after EOH
    parser.handler = handler
    parser.in_headers = False
    parser.partial = b""
    parser._feed_body(data)
    parser.finish()


class MessageParser:
    """Feeds one message to a handler's HEADER/EOH/BODY hooks.

    Exceptions from hooks propagate to the caller, which stops feeding and
    answers for the whole message.  Every byte of the header section is kept
    (``section``) until EOH, so that the handler gets the exact bytes;
    offsets into it say where each header and the section end.
    """

    __slots__ = ("handler", "max_header_size", "max_header_lines", "lf", "in_headers", "partial",
                 "name", "value", "lines", "section", "line_off", "header_off")

    def __init__(self, handler: Any, max_header_size: int, max_header_lines: int | None = None,
                 lf_ends_lines: bool = False) -> None:
        self.handler = handler
        self.max_header_size = max_header_size
        self.max_header_lines = max_header_lines
        self.lf = lf_ends_lines
        self.in_headers = True
        self.partial = b""  # an incomplete line (while in headers: maybe squeezed, see _squeeze)
        self.name: bytes | None = None  # the header being collected
        self.value = b""
        self.lines = 0  # header lines taken so far
        self.section = bytearray()  # every byte fed while in headers, as it came
        self.line_off = 0  # where the line being examined starts, in ``section``
        self.header_off = 0  # where the header being collected starts, in ``section``
        handler.header_raw = b""
        handler.header_section = b""

    def feed(self, data: bytes) -> None:
        """Take the next piece of the message."""
        if self.in_headers:
            if self.lines == 0 and not self.section and self._whole_section(data):
                data = data[len(self.handler.header_section):]
            else:
                data = self._feed_headers(data)
            if self.in_headers or not data:
                return
        self._feed_body(data)

    def _whole_section(self, data: bytes) -> bool:
        """The common case in one look, when the handler does not take HEADER calls: the first
        piece holds the whole header section, plain headers within the limits.

        Ends the header section as the line-by-line parser would (``header_raw``
        holding the last header, ``header_section``, EOH) and returns True; else False,
        and nothing happened.  Lines with a bare CR or LF take the line-by-line way, so
        whether a bare LF ends lines (``lf_ends_lines``) makes no difference here.
        """
        handler = self.handler
        if type(handler).HEADER is not _BASE_HEADER or "HEADER" in handler.__dict__:  # a HEADER of its own
            return False
        m = plain_section(data, self.max_header_size, self.max_header_lines)
        if m is None:
            return False
        end = m.end()
        handler.header_raw = data[m.start(1):end - 2]
        self.in_headers = False
        self.section = bytearray()
        handler.header_section = data[:end]
        handler.chunkmode = True  # as in _end_headers
        handler.EOH()
        return True

    def finish(self) -> None:
        """End of message: flush what is pending; EOH is always called before EOM."""
        if self.in_headers:
            tail, self.partial = bytes(self.partial), b""
            end = len(self.section)
            if tail:
                header = self._classify(tail)
                if header is not None:
                    self._take_header_line(tail, header)
                    self._end_headers(end, end)
                    return
            self._end_headers(self.line_off, self.line_off)
            if tail:
                self._feed_body(tail)
        if self.partial:
            tail, self.partial = bytes(self.partial), b""
            self.handler.BODY(tail)

    # -- headers --------------------------------------------------------------

    def _classify(self, line: bytes) -> re.Match[bytes] | bool | None:
        """What a header-section line is: a header (its match), a continuation (True) or neither (None).

        A line whose field name (and WSP) alone runs past the limit is refused,
        header or not, so that the verdict never depends on where the network
        cut the line: a partial line must be judged before its end.
        """
        if line[:1] in (b" ", b"\t"):
            return True if self.name is not None else None
        m = _FIELD.match(line)
        if m is None:
            return None
        if m.start(2) > self.max_header_size:
            raise HeaderTooLong()
        return m if m.end(2) > m.start(2) else None

    def _take_header_line(self, line: bytes, header: re.Match[bytes] | bool) -> None:
        """Add one header line (its line end stripped) to the header being collected."""
        self.lines += 1
        if self.max_header_lines is not None and self.lines > self.max_header_lines:
            raise TooManyHeaderLines()
        if header is True:
            self.value += line  # unfolding: the line end goes, the WSP stays
        else:
            self._emit_header(self.line_off)
            self.header_off = self.line_off
            self.name = header.group(1)
            self.value = bytearray(line[header.end():].lstrip(b" \t"))  # grows in place when folded
        if len(self.name) + len(self.value) > self.max_header_size:
            raise HeaderTooLong()

    def _emit_header(self, end: int) -> None:
        """Hand the header collected so far to HEADER; its exact bytes run up to ``end``."""
        if self.name is not None:
            name, value = self.name, self.value
            self.name, self.value = None, b""
            handler = self.handler
            handler.header_raw = bytes(self.section[self.header_off:end])
            handler.HEADER(_text(name), _text(value))

    def _squeeze(self, partial: bytes, header: re.Match[bytes] | bool) -> bytes:
        """Bound an incomplete header line: drop the WSP the unfolding drops anyway.

        Raises HeaderTooLong once name + value so far exceed the limit; what
        is kept is then at most two octets (colon, CR) more than the limit.
        Only the parsing copy is squeezed: ``section`` keeps every byte.
        """
        if header is True:  # a continuation: all of it is value
            raise HeaderTooLong()
        name = header.group(1)
        value = partial[header.end():].lstrip(b" \t")
        # a last CR may be the start of the line's CRLF, not value
        if len(name) + len(value) - value.endswith(b"\r") > self.max_header_size:
            raise HeaderTooLong()
        return name + b":" + value

    def _end_headers(self, header_end: int, section_end: int) -> None:
        """The header section is over: the last header ends at ``header_end``, the section at ``section_end``."""
        self._emit_header(header_end)
        self.in_headers = False
        handler = self.handler
        handler.header_section = bytes(self.section[:section_end])
        self.section = bytearray()
        handler.chunkmode = True  # the seed: chunk mode after the headers; EOH may undo it
        handler.EOH()

    def _ends_a_line(self, data: bytes, lf: bool) -> bool:
        """Whether ``data`` completes a line after the incomplete line held in ``partial``."""
        if lf:
            return 10 in data  # LF, as an octet value (see Session._dispatch)
        return b"\r\n" in data or (data[:1] == b"\n" and self.partial.endswith(b"\r"))

    def _feed_headers(self, data: bytes) -> bytes:
        """Consume header lines; return what follows the header section, if reached."""
        self.section += data
        if self.partial:
            if not self._ends_a_line(data, self.lf) and len(self.partial) + len(data) <= self.max_header_size:
                self.partial += data  # no line can end here: grow, do not rescan (a trickle stays linear)
                return b""
            buf = bytes(self.partial) + data
        else:
            buf = data
        # Offsets in ``section`` of positions in ``buf`` past the partial line (where every
        # line end lies): the partial line may have been squeezed, the new data never is.
        base = len(self.section) - len(buf)
        lf = self.lf
        pos = 0
        while True:
            if lf:
                i = buf.find(b"\n", pos)
                nxt = i + 1
                if i > pos and buf[i - 1] == 0x0D:
                    i -= 1  # CRLF
            else:
                i = buf.find(b"\r\n", pos)
                nxt = i + 2
            if i < 0:
                self.partial = bytearray(buf[pos:])
                if len(self.partial) > self.max_header_size:
                    # Decide now (memory stays bounded) exactly as the whole line would be.
                    header = self._classify(self.partial)
                    if header is not None:
                        self.partial = bytearray(self._squeeze(self.partial, header))
                        return b""
                    self.partial = b""
                    self._end_headers(self.line_off, self.line_off)
                    return buf[pos:]
                return b""
            if i == pos:  # the empty line: end of headers, not part of the body
                self.partial = b""
                self._end_headers(self.line_off, base + nxt)
                return buf[nxt:]
            line = buf[pos:i]
            header = self._classify(line)
            if header is None:
                self.partial = b""
                self._end_headers(self.line_off, self.line_off)
                return buf[pos:]
            self._take_header_line(line, header)
            pos = nxt
            self.line_off = base + nxt

    # -- body -----------------------------------------------------------------

    def _chunksize(self) -> int:
        size = getattr(self.handler, "chunksize", DEFAULT_CHUNKSIZE)
        return size if isinstance(size, int) and size > 0 else DEFAULT_CHUNKSIZE

    def _feed_body(self, data: bytes) -> None:
        handler = self.handler
        if self.partial:
            if (not handler.chunkmode and not self._ends_a_line(data, False)
                    and len(self.partial) + len(data) <= self._chunksize()):
                self.partial += data  # still no line end: grow, do not rescan (a trickle stays linear)
                return
            data, self.partial = bytes(self.partial) + data, b""
        n = len(data)
        if n and handler.chunkmode:  # the common case: one BODY call for a piece within the chunk size
            size = getattr(handler, "chunksize", DEFAULT_CHUNKSIZE)
            if type(size) is int and n <= size:
                handler.BODY(data)
                return
        pos = 0
        while pos < n:
            size = self._chunksize()
            if handler.chunkmode:
                end = min(pos + size, n)
            else:
                i = data.find(b"\r\n", pos, pos + size)
                if i < 0:
                    if n - pos <= size:
                        self.partial = bytearray(data[pos:])  # an incomplete line: wait for its end
                        return
                    end = pos + size  # a line longer than chunksize goes in pieces
                    if size > 1 and data[end - 1] == 0x0D and data[end] == 0x0A:
                        end -= 1  # ... but its CRLF is not cut in two
                else:
                    end = i + 2
            handler.BODY(data[pos:end] if pos or end < n else data)
            pos = end
