"""From message bytes to the handler's HEADER, EOH and BODY calls.

The same parser serves DATA (after dot-unstuffing) and BDAT (raw chunks), so a
handler sees the same calls whichever the client used.  Headers are unfolded
(RFC 5322 2.2.3: CRLF before WSP removed) and handed over as str, non-ASCII
kept with UTF-8 and surrogateescape.  The header section ends at the empty
line, or at the first line that is not a header (that line starts the body).
The body goes out in chunks of at most ``chunksize`` while ``chunkmode`` is on,
and line by line (CRLF included) while it is off.
"""

from __future__ import annotations

import re
from typing import Any

from prefork_esmtp.handler import DEFAULT_CHUNKSIZE

# field-name: printable ASCII but colon; obsolete syntax allows WSP before the colon.
_HEADER = re.compile(rb"[!-9;-~]+[ \t]*:")
_NAME_END = re.compile(rb"[ \t]*:$")
# What a line that may still become a header starts with: field-name, then WSP.
_NAME_RUN = re.compile(rb"[!-9;-~]+[ \t]*")


class HeaderTooLong(Exception):
    """One header (unfolded) exceeded the header size limit."""


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


class MessageParser:
    """Feeds one message to a handler's HEADER/EOH/BODY hooks.

    Exceptions from hooks propagate to the caller, which stops feeding and
    answers for the whole message.
    """

    __slots__ = ("handler", "max_header_size", "in_headers", "partial", "name", "value")

    def __init__(self, handler: Any, max_header_size: int) -> None:
        self.handler = handler
        self.max_header_size = max_header_size
        self.in_headers = True
        self.partial = b""  # an incomplete line
        self.name: bytes | None = None  # the header being collected
        self.value = b""

    def feed(self, data: bytes) -> None:
        """Take the next piece of the message."""
        if self.in_headers:
            data = self._feed_headers(data)
            if self.in_headers or not data:
                return
        self._feed_body(data)

    def finish(self) -> None:
        """End of message: flush what is pending; EOH is always called before EOM."""
        if self.in_headers:
            tail, self.partial = bytes(self.partial), b""
            if tail and self._is_header_line(tail):
                self._take_header_line(tail)
                tail = b""
            self._end_headers()
            if tail:
                self._feed_body(tail)
        if self.partial:
            tail, self.partial = bytes(self.partial), b""
            self.handler.BODY(tail)

    # -- headers --------------------------------------------------------------

    def _is_header_line(self, line: bytes) -> bool:
        if line[:1] in (b" ", b"\t"):
            return self.name is not None
        return _HEADER.match(line) is not None

    def _take_header_line(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):
            self.value += line  # unfolding: the CRLF goes, the WSP stays
        else:
            self._emit_header()
            m = _HEADER.match(line)
            self.name = _NAME_END.sub(b"", m.group(0))
            self.value = bytearray(line[m.end():].lstrip(b" \t"))  # grows in place when folded
        if len(self.name) + len(self.value) > self.max_header_size:
            raise HeaderTooLong()

    def _emit_header(self) -> None:
        if self.name is not None:
            name, value = self.name, self.value
            self.name, self.value = None, b""
            self.handler.HEADER(_text(name), _text(value))

    def _check_name_run(self, line: bytes) -> None:
        """Refuse a line whose field name (and WSP) alone runs past the limit.

        Header or not, so that the verdict never depends on where the line
        was cut by the network: a partial line must be judged before its end.
        """
        m = _NAME_RUN.match(line)
        if m is not None and m.end() > self.max_header_size:
            raise HeaderTooLong()

    def _squeeze(self, partial: bytes) -> bytes:
        """Bound an incomplete header line: drop the WSP the unfolding drops anyway.

        Raises HeaderTooLong once name + value so far exceed the limit; what
        is kept is then at most two octets (colon, CR) more than the limit.
        """
        if partial[:1] in (b" ", b"\t"):  # a continuation: all of it is value
            raise HeaderTooLong()
        m = _HEADER.match(partial)
        name = _NAME_END.sub(b"", m.group(0))
        value = partial[m.end():].lstrip(b" \t")
        # a last CR may be the start of the line's CRLF, not value
        if len(name) + len(value) - value.endswith(b"\r") > self.max_header_size:
            raise HeaderTooLong()
        return name + b":" + value

    def _end_headers(self) -> None:
        self._emit_header()
        self.in_headers = False
        self.handler.chunkmode = True  # the seed: chunk mode after the headers; EOH may undo it
        self.handler.EOH()

    def _ends_a_line(self, data: bytes) -> bool:
        """Whether ``data`` completes a CRLF after the incomplete line held in ``partial``."""
        return b"\r\n" in data or (data[:1] == b"\n" and self.partial.endswith(b"\r"))

    def _feed_headers(self, data: bytes) -> bytes:
        """Consume header lines; return what follows the header section, if reached."""
        if self.partial:
            if not self._ends_a_line(data) and len(self.partial) + len(data) <= self.max_header_size:
                self.partial += data  # no line can end here: grow, do not rescan (a trickle stays linear)
                return b""
            buf = bytes(self.partial) + data
        else:
            buf = data
        pos = 0
        while True:
            i = buf.find(b"\r\n", pos)
            if i < 0:
                self.partial = bytearray(buf[pos:])
                if len(self.partial) > self.max_header_size:
                    # Decide now (memory stays bounded) exactly as the whole line would be.
                    self._check_name_run(self.partial)
                    if self._is_header_line(self.partial):
                        self.partial = bytearray(self._squeeze(self.partial))
                        return b""
                    self.partial = b""
                    self._end_headers()
                    return buf[pos:]
                return b""
            if i == pos:  # the empty line: end of headers, not part of the body
                self.partial = b""
                self._end_headers()
                return buf[i + 2:]
            line = buf[pos:i]
            self._check_name_run(line)
            if not self._is_header_line(line):
                self.partial = b""
                self._end_headers()
                return buf[pos:]
            self._take_header_line(line)
            pos = i + 2

    # -- body -----------------------------------------------------------------

    def _chunksize(self) -> int:
        size = getattr(self.handler, "chunksize", DEFAULT_CHUNKSIZE)
        return size if isinstance(size, int) and size > 0 else DEFAULT_CHUNKSIZE

    def _feed_body(self, data: bytes) -> None:
        handler = self.handler
        if self.partial:
            if (not handler.chunkmode and not self._ends_a_line(data)
                    and len(self.partial) + len(data) <= self._chunksize()):
                self.partial += data  # still no line end: grow, do not rescan (a trickle stays linear)
                return
            data, self.partial = bytes(self.partial) + data, b""
        pos = 0
        n = len(data)
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
