"""The line/chunk reader: one buffer per session, large recv()s, bounded memory.

Command lines are found with ``bytes.find``; a line longer than the limit is
drained to its end and reported, so the session stays in sync and memory stays
bounded.  DATA is decoded on whole buffers by :class:`~prefork_esmtp.dotdata.DotDecoder`.
Before every blocking read the reply writer is flushed, which is what makes
pipelined replies leave in one send.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

from prefork_esmtp.dotdata import DotDecoder
from prefork_esmtp.writer import ClientGone, ReplyWriter

RECV_SIZE = 65536


class ReadTimeout(Exception):
    """The client sent nothing for the idle timeout."""


class StopSession(Exception):
    """The server is stopping and the session may be ended now (421)."""


class DataTooSlow(Exception):
    """During DATA/BDAT the client fell below the minimum data rate."""


class CommandTooSlow(Exception):
    """A command line took longer than the command deadline from its first octet to its end."""


class SessionTooLong(Exception):
    """The session outlived the session deadline (max_session_time)."""


class LineTooLong(Exception):
    """A command line exceeded the limit; it has been drained up to its LF."""


class Reader:
    """Reads command lines, DATA sections and exact byte counts from a socket."""

    def __init__(self, sock: socket.socket, writer: ReplyWriter, timeout: float,
                 check_in: Callable[[float], None] | None = None) -> None:
        self.sock = sock
        self.timeout = timeout
        #: called before each blocking read with the longest it may block, so the
        #: master can tell a worker waiting on a slow client from a stuck one
        self.check_in = check_in
        self.writer = writer
        self.buf = b""
        self.pos = 0
        self.received = 0
        #: whether the last command line ended with a bare LF instead of CRLF
        self.bare_lf = False
        #: set by the session while it waits for a command: a blocked read may then
        #: be interrupted (graceful stop); ``waiting`` is true only inside recv().
        self.interruptible = False
        self.waiting = False
        #: asked just before an interruptible read: true means end the session now
        self.stop_check: Callable[[], bool] | None = None
        # the minimum data rate: (octets/s, start time, octets received at start, grace), or None
        self._rate: tuple[float, float, int, float] | None = None
        #: monotonic time by which a command line must be complete once its first octet
        #: arrived (set by readline when command_deadline is on), and the session's end
        self.command_deadline = 0.0
        self.session_deadline: float | None = None
        self._line_deadline: float | None = None
        self._current_timeout = timeout
        sock.settimeout(timeout)

    def start_rate(self, octets_per_second: int, grace: float) -> None:
        """From now until :meth:`stop_rate`, require this average rate (after ``grace`` seconds)."""
        if octets_per_second > 0:
            self._rate = (float(octets_per_second), time.monotonic(), self.received, grace)

    def stop_rate(self) -> None:
        self._rate = None

    def limit_session(self, seconds: float) -> None:
        """End the session (SessionTooLong at the next read) ``seconds`` from now; 0: no limit."""
        self.session_deadline = time.monotonic() + seconds if seconds > 0 else None

    def _read_timeout(self) -> tuple[float, type[Exception]]:
        """How long the next read may block, and what to raise if it times out.

        The idle timeout, shortened by whichever deadline comes first: the
        minimum data rate, the current command line's deadline, the session's.
        A deadline already past raises at once.
        """
        timeout, why = self.timeout, ReadTimeout
        if self._rate is None and self._line_deadline is None and self.session_deadline is None:
            return timeout, why
        now = time.monotonic()
        if self._rate is not None:
            rate, start, received, grace = self._rate
            left = start + grace + (self.received - received) / rate - now
            if left <= 0:
                raise DataTooSlow()
            if left < timeout:
                timeout, why = left, DataTooSlow
        for deadline, exc in ((self._line_deadline, CommandTooSlow), (self.session_deadline, SessionTooLong)):
            if deadline is not None:
                left = deadline - now
                if left <= 0:
                    raise exc()
                if left < timeout:
                    timeout, why = left, exc
        return timeout, why

    def replace_socket(self, sock: socket.socket) -> None:
        """Continue on a new socket (after STARTTLS), forgetting every byte buffered so far.

        Whatever the client sent in plaintext behind STARTTLS must not be
        taken as said inside TLS (CVE-2011-0411).
        """
        self.sock = sock
        self.buf, self.pos = b"", 0
        sock.settimeout(self.timeout)
        self._current_timeout = self.timeout

    def pending(self) -> bool:
        """Whether bytes the client sent are buffered and not yet consumed."""
        return self.pos < len(self.buf)

    def _fill(self) -> None:
        """Flush pending replies, then block for more input (with the idle timeout)."""
        why: type[Exception] = ReadTimeout
        try:
            self.writer.flush()
            timeout, why = self._read_timeout()
            if timeout != self._current_timeout:
                self.sock.settimeout(timeout)
                self._current_timeout = timeout
            if self.check_in is not None:
                self.check_in(self.timeout)
            self.waiting = self.interruptible
            try:
                # A stop signalled before ``waiting`` was set found nothing to interrupt: look again.
                if self.waiting and self.stop_check is not None and self.stop_check():
                    raise StopSession()
                data = self.sock.recv(RECV_SIZE)
            finally:
                self.waiting = False
        except (socket.timeout, TimeoutError):
            raise why() from None
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        if not data:
            raise ClientGone("connection closed by client")
        self.received += len(data)
        if self.pos >= len(self.buf):
            self.buf = data
        else:
            self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def readline(self, limit: int) -> bytes:
        """Return the next line without its line end (CRLF, or a bare LF).

        ``limit`` counts the line end too (RFC 5321: 512 octets for a command
        line).  A longer line is discarded up to and including its LF, then
        :class:`LineTooLong` is raised.  Once the line's first octet is here, the
        whole line must arrive within ``command_deadline`` seconds (when set), so a
        client dripping a byte at a time cannot hold the worker for ``limit`` idle timeouts.
        """
        try:
            while True:
                end = self.pos + limit
                i = self.buf.find(b"\n", self.pos, end)
                if i >= 0:
                    line = self.buf[self.pos:i]
                    self.pos = i + 1
                    self.bare_lf = not line.endswith(b"\r")
                    return line if self.bare_lf else line[:-1]
                if len(self.buf) >= end:
                    self._drain_line()
                    raise LineTooLong()
                if self._line_deadline is None and self.command_deadline and self.pos < len(self.buf):
                    self._line_deadline = time.monotonic() + self.command_deadline
                self._fill()
        finally:
            self._line_deadline = None

    def _drain_line(self) -> None:
        """Discard input up to and including the next LF, holding no more than one buffer."""
        while True:
            i = self.buf.find(b"\n", self.pos)
            if i >= 0:
                self.pos = i + 1
                return
            self.buf, self.pos = b"", 0
            self._fill()

    def read_data(self, decoder: DotDecoder) -> Iterator[bytes]:
        """Yield the unstuffed pieces of a DATA section up to its ``<CRLF>.<CRLF>``."""
        while True:
            if self.pos < len(self.buf):
                pieces, self.pos, ended = decoder.decode(self.buf, self.pos)
                yield from pieces
                if ended:
                    return
            self._fill()

    def read(self, size: int) -> bytes:
        """Return up to ``size`` bytes: what is buffered, else one read's worth."""
        if self.pos >= len(self.buf):
            self._fill()
        data = self.buf[self.pos:self.pos + size]
        self.pos += len(data)
        return data

    def read_exact(self, size: int) -> Iterator[bytes]:
        """Yield exactly ``size`` bytes in the pieces they arrive in (for BDAT)."""
        while size > 0:
            data = self.read(size)
            size -= len(data)
            yield data
