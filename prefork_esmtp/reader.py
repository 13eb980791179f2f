"""The line/chunk reader: one buffer per session, large recv()s, bounded memory.

Command lines are found with ``bytes.find``; a line longer than the limit is
drained to its end and reported, so the session stays in sync and memory stays
bounded.  DATA is decoded on whole buffers by :class:`~prefork_esmtp.dotdata.DotDecoder`.
The bytes come from the session's :class:`~prefork_esmtp.connection.Connection`
(``recv`` and ``settimeout``, as a socket has), which sends the queued replies
before it blocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefork_esmtp.dotdata import DotDecoder, line_dot, unstuff
from prefork_esmtp.writer import ClientGone

RECV_SIZE = 65536

_monotonic = time.monotonic


class ReadTimeout(Exception):
    """The client sent nothing for the idle timeout."""


class DataTooSlow(Exception):
    """During DATA/BDAT the client fell below the minimum data rate."""


class CommandTooSlow(Exception):
    """A command line took longer than the command deadline from its first octet to its end."""


class SessionTooLong(Exception):
    """The session outlived the session deadline (max_session_time)."""


class LineTooLong(Exception):
    """A command line exceeded the limit; it has been drained up to its LF."""


def first_read_timeout(timeout: float, wake_after: float | None = None) -> float:
    """The read timeout a new :class:`Reader` gives the socket at its first read (no deadline nearer).

    ``timeout`` and ``wake_after`` as the reader is given them: :meth:`Reader._fill`'s
    rule (``wake_after``'s whole seconds when shorter, else the idle timeout in whole
    seconds).  A listener set to this value hands it to every connection it accepts,
    so that read needs no system call of its own (see ``socket_timeout``).
    """
    if wake_after is not None and wake_after >= 1.0:
        wake_after = float(int(wake_after)) if wake_after >= 2.0 else wake_after
        if wake_after < timeout:
            return wake_after
    return float(int(timeout)) if timeout >= 2.0 else timeout


class Reader:
    """Reads command lines, DATA sections and exact byte counts from the connection."""

    # What a new reader starts with (class-level, so each session sets only what differs).
    #: whether the last command line ended with a bare LF instead of CRLF
    bare_lf = False
    # the minimum data rate: (octets/s, start time, octets received at start, grace), or None
    _rate: tuple[float, float | None, int, float] | None = None
    #: seconds within which a command line must be complete once its first octet arrived
    #: (``command_deadline``, 0: no deadline); the monotonic time by which the current one must be
    _line_deadline: float | None = None
    _wake_after: float | None = None  # see __init__'s wake_after
    #: what has been read and not yet taken (``buf[pos:]``), and the octets received in all
    buf = b""
    pos = 0
    received = 0

    def __init__(self, sock: Any, timeout: float, wake_after: float | None = None,
                 command_deadline: float = 0.0, session_time: float = 0.0,
                 socket_timeout: float | None = None) -> None:
        """``wake_after``: a shorter timeout for the first read to give the socket, when one will
        be needed anyway (the data rate's grace): a read that times out early is only a wake-up,
        and the timeout then need not be shortened (a system call) at the first message.
        ``command_deadline``: see :meth:`readline`; ``session_time``: see :meth:`limit_session`;
        ``socket_timeout``: the socket's read timeout is known to be at most this already
        (inherited from its listener), so a read needs no timeout set until one owed is shorter."""
        self.sock = sock  # the connection: recv() and settimeout(), as a socket has
        self._recv = sock.recv
        self.timeout = timeout
        self.command_deadline = command_deadline
        #: the socket's read timeout as last set (at most): none yet, unless inherited (the first
        #: read sets it, to ``wake_after``'s whole seconds when that is shorter than the timeout owed)
        self._current_timeout = socket_timeout or math.inf
        if wake_after is not None and wake_after >= 1.0:  # else the class's None
            self._wake_after = float(int(wake_after)) if wake_after >= 2.0 else wake_after
        #: the session's end (monotonic; None: no limit), and before when a read needs no
        #: deadline arithmetic (see _replan): limit_session's and _replan's work, without the calls
        if session_time > 0:
            self.session_deadline: float | None = time.monotonic() + session_time
            self._plain_base = self.session_deadline - timeout
        else:
            self.session_deadline = None
            self._plain_base = math.inf
        self._plain_until = -math.inf if self._current_timeout > timeout else self._plain_base

    def _replan(self) -> None:
        """Until when :meth:`readline` may read at once: no data rate, no command line under way,
        the socket's timeout no longer than the idle timeout, and the session's end more than
        an idle timeout away (so no read can outlast it); -inf: every read takes the long way."""
        if self._rate is not None or self._line_deadline is not None or self._current_timeout > self.timeout:
            self._plain_until = -math.inf
        else:
            self._plain_until = self._plain_base

    def start_rate(self, octets_per_second: int, grace: float, start: float | None = None,
                   received: int | None = None) -> None:
        """From now until :meth:`stop_rate`, require this average rate (after ``grace`` seconds).

        ``start``: when the transfer's clock started; None: at its first read (_read_timeout
        sets it), so the start costs no clock reading, nor does a transfer buffered already.
        ``received``: the octets received before the transfer (default: all so far).
        """
        if octets_per_second > 0:
            self._rate = (float(octets_per_second), start, self.received if received is None else received, grace)
            self._plain_until = -math.inf

    def stop_rate(self) -> None:
        self._rate = None
        self._replan()

    def limit_session(self, seconds: float) -> None:
        """End the session (SessionTooLong at the next read) ``seconds`` from now; 0: no limit."""
        self.session_deadline = time.monotonic() + seconds if seconds > 0 else None
        self._plain_base = self.session_deadline - self.timeout if seconds > 0 else math.inf
        self._replan()

    def _read_timeout(self, now: float, timeout: float) -> float:
        """How long the next read may block; the exception of a deadline already past is raised.

        ``timeout``: what is left of the idle timeout, shortened here by
        whichever deadline comes first: the minimum data rate, the current
        command line's deadline, the session's.
        """
        if timeout <= 0:
            raise ReadTimeout()
        if self._rate is not None:
            rate, start, received, grace = self._rate
            if start is None:
                start = now
                self._rate = (rate, now, received, grace)
            left = start + grace + (self.received - received) / rate - now
            if left <= 0:
                raise DataTooSlow()
            if left < timeout:
                timeout = left
        # each deadline written out (not a loop over pairs): this runs for every read during DATA
        if self._line_deadline is not None:
            left = self._line_deadline - now
            if left <= 0:
                raise CommandTooSlow()
            if left < timeout:
                timeout = left
        if self.session_deadline is not None:
            left = self.session_deadline - now
            if left <= 0:
                raise SessionTooLong()
            if left < timeout:
                timeout = left
        return timeout

    def forget_buffered(self) -> None:
        """Start afresh after STARTTLS: forget every byte buffered so far, back to the idle timeout.

        Whatever the client sent in plaintext behind STARTTLS must not be
        taken as said inside TLS (CVE-2011-0411).
        """
        self.buf, self.pos = b"", 0
        self.sock.settimeout(self.timeout)
        self._current_timeout = self.timeout
        self._replan()

    def timeout_set(self, seconds: float) -> None:
        """Someone else (the PROXY header's read) left the socket's read timeout at most ``seconds``.

        The reader sets its own only when the one it owes is shorter (a longer
        one owed: an early wake-up, as in :meth:`_fill`), not once more per session.
        """
        self._current_timeout = seconds
        self._replan()

    def pending(self) -> bool:
        """Whether bytes the client sent are buffered and not yet consumed."""
        return self.pos < len(self.buf)

    def _fill(self, began: float | None = None) -> None:
        """Block for more input: the idle timeout, shortened by whichever deadline comes first.

        The socket's timeout may be shorter than the one owed (never longer): a
        read that times out early is only a wake-up, the deadlines are checked
        again and the read resumes.  So the timeout is set only when it must
        shrink, rounded down to whole seconds, and a DATA transfer's shorter
        timeout (the minimum data rate) stays for the commands after it while
        they come quickly: no system call per message to put it back.
        ``began``: when the wait began, if a read since then already woke early.
        """
        now = _monotonic()
        woken = began is not None
        idle_end = (now if began is None else began) + self.timeout
        while True:
            timeout = idle_end - now if woken else self.timeout
            session_deadline = self.session_deadline
            if self._rate is not None or self._line_deadline is not None or timeout <= 0 \
                    or (session_deadline is not None and session_deadline - now < timeout):
                timeout = self._read_timeout(now, timeout)  # a deadline comes first, or is past
            try:
                if timeout < self._current_timeout or woken:
                    self._set_timeout(timeout)
                data = self._recv(RECV_SIZE)
                break
            except (TimeoutError, BlockingIOError):  # a Python timeout, or the kernel's (SO_RCVTIMEO)
                woken = True
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            now = _monotonic()
        if not data:
            raise ClientGone("connection closed by client")
        self.received += len(data)
        if self.pos >= len(self.buf):
            self.buf = data
        else:
            self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def _set_timeout(self, timeout: float) -> None:
        """Give the socket the read timeout for a wait owed ``timeout`` seconds: the first
        read's is ``wake_after`` when that is shorter; two seconds or more are rounded down."""
        if self._current_timeout == math.inf and self._wake_after is not None and self._wake_after < timeout:
            timeout = self._wake_after  # the first read: see wake_after
        elif timeout >= 2.0:
            timeout = float(int(timeout))
        self.sock.settimeout(timeout)
        self._current_timeout = timeout
        self._replan()

    def ready(self) -> None:
        """Before the first command: set the read timeout the first read would set, when no
        deadline is within an idle timeout, so that read too may be the session loop's
        common round (see :meth:`Session.run <prefork_esmtp.session.Session.run>`).

        Nothing to do when the timeout is set already (a PROXY header's read, TLS) or a
        deadline is near (then the first read works it out).
        """
        if self._current_timeout == math.inf and _monotonic() < self._plain_base and self._rate is None:
            try:
                self._set_timeout(self.timeout)
            except OSError as exc:
                raise ClientGone(str(exc)) from None

    def readline(self, limit: int) -> bytes:
        """Return the next line without its line end (CRLF, or a bare LF).

        ``limit`` counts the line end too (RFC 5321: 512 octets for a command
        line).  A longer line is discarded up to and including its LF, then
        :class:`LineTooLong` is raised.  Once the line's first octet is here, the
        whole line must arrive within ``command_deadline`` seconds (when set), so a
        client dripping a byte at a time cannot hold the worker for ``limit`` idle timeouts.
        """
        if self.pos >= len(self.buf):  # nothing buffered (the common case): read at once
            now = _monotonic()
            if now < self._plain_until:  # no deadline within an idle timeout: :meth:`_fill`'s work, inline
                try:
                    data = self._recv(RECV_SIZE)
                except (TimeoutError, BlockingIOError):  # woke early: the long way, from when the wait began
                    self._fill(now)
                except OSError as exc:
                    raise ClientGone(str(exc)) from None
                else:
                    if not data:
                        raise ClientGone("connection closed by client")
                    self.received += len(data)
                    self.buf = data
                    self.pos = 0
            else:
                self._fill()
        buf = self.buf
        start = self.pos
        i = buf.find(b"\n", start, start + limit)
        if i < 0:  # not all here yet, or too long
            return self._readline_rest(limit)
        # The same cut as _readline_rest's, written out here: a call per command line is what
        # this path exists to save.
        self.pos = i + 1
        if i > start and buf[i - 1] == 0x0D:  # CRLF
            self.bare_lf = False
            return buf[start:i - 1]
        self.bare_lf = True
        return buf[start:i]

    def _readline_rest(self, limit: int) -> bytes:
        """:meth:`readline` when the buffer holds a line's beginning only: read on, within the command deadline."""
        try:
            while True:
                buf = self.buf
                start = self.pos
                if start < len(buf):
                    end = start + limit
                    i = buf.find(b"\n", start, end)
                    if i >= 0:
                        self.pos = i + 1
                        if i > start and buf[i - 1] == 0x0D:  # CRLF
                            self.bare_lf = False
                            return buf[start:i - 1]
                        self.bare_lf = True
                        return buf[start:i]
                    if len(buf) >= end:
                        self._drain_line()
                        raise LineTooLong()
                    if self._line_deadline is None and self.command_deadline:
                        self._line_deadline = _monotonic() + self.command_deadline
                        self._plain_until = -math.inf
                self._fill()
        finally:
            if self._line_deadline is not None:
                self._line_deadline = None
                self._replan()

    def _drain_line(self) -> None:
        """Discard input up to and including the next LF, holding no more than one buffer."""
        while True:
            i = self.buf.find(b"\n", self.pos)
            if i >= 0:
                self.pos = i + 1
                return
            self.buf, self.pos = b"", 0
            self._fill()

    def read_message(self, octets_per_second: int, grace: float) -> bytes | None:
        """A DATA section at once, when its end-of-data line is in the buffer already or comes with
        the first read: consumed, and returned dot-unstuffed without that line.

        That read goes straight to the socket when no deadline can come before its timeout
        (as :meth:`readline`'s, the data rate's grace included); otherwise, or when a read times
        out early, it takes :meth:`_fill`'s long way.  None: the section is not all here, or its
        first line starts with a dot; the minimum data rate is then on as :meth:`start_rate`
        puts it (its clock started at the first read, if there was one): :meth:`read_data` goes
        on, :meth:`stop_rate` ends it.  Left by an exception, the rate is off.
        """
        buf = self.buf
        pos = self.pos
        if pos >= len(buf):  # the common case: the client waited for the 354
            now = _monotonic()  # the data rate's clock: started by this read
            # No deadline before the socket's timeout: the session's (nor is the timeout longer than
            # the idle one: see _replan; no data rate or command line is under way here), nor the
            # data rate's, its grace from now on (the read's own octets only push it further).
            if not (now < self._plain_until and (octets_per_second <= 0 or self._current_timeout <= grace)):
                return self._data_fill(octets_per_second, grace, now, None)
            try:
                buf = self._recv(RECV_SIZE)
            except (TimeoutError, BlockingIOError):  # woke early: the long way, from when the wait began
                return self._data_fill(octets_per_second, grace, now, now)
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if not buf:
                raise ClientGone("connection closed by client")
            self.received += len(buf)
            self.buf = buf
            self.pos = pos = 0
        else:
            now = None  # all was buffered: no clock reading
        # The common buffer: the message, then its end-of-data line and nothing after it, and no
        # line before that starts with a dot (one search up to it): nothing to unstuff either.
        end = len(buf) - 3
        if buf.endswith(b"\r\n.\r\n") and buf[pos] != 0x2E and line_dot(buf, pos, end) is None:
            self.pos = end + 3
            return buf[pos:end]
        # Else the first line that starts with a dot, in one search (pos is a line's start).
        m = line_dot(buf, pos)
        if m is not None and buf[pos] != 0x2E:  # the first line has no dot (stuffed, or the end)
            end = m.start()
            if buf.startswith(b"\r\n", end + 3):  # the end-of-data line: no stuffed dot before it
                self.pos = end + 5
                return buf[pos:end + 2]
            end = buf.find(b"\r\n.\r\n", end)
            if end >= 0:
                self.pos = end + 5
                # before the first <CRLF>.<CRLF> every <CRLF>. is a stuffed dot (the first line's is not)
                return unstuff(buf[pos:end + 2])
        # the rate from the read above, if there was one (the octets before it as received before)
        self.start_rate(octets_per_second, grace, now, self.received - (len(buf) if now is not None else 0))
        return None

    def _data_fill(self, octets_per_second: int, grace: float, now: float, began: float | None) -> None:
        """:meth:`read_message`'s first read the long way, with the data rate on from ``now``."""
        self.start_rate(octets_per_second, grace, now)
        try:
            self._fill(began)
        except BaseException:
            self.stop_rate()
            raise
        return None

    def read_data(self, decoder: DotDecoder, take: Callable[[bytes], None]) -> None:
        """Pass the unstuffed pieces of a DATA section up to its ``<CRLF>.<CRLF>`` to ``take``, in order."""
        while True:
            if self.pos < len(self.buf):
                pieces, self.pos, ended = decoder.decode(self.buf, self.pos)
                for piece in pieces:
                    take(piece)
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
