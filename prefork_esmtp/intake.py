"""One message on its way in: size and header limits, bare-newline policy and hook failures, for DATA and BDAT.

Whatever goes wrong, the intake stops feeding the handler but keeps counting
nothing and dropping the rest, so the session can read to the end of the
message and stay in sync; EOM is then never called.
"""

from __future__ import annotations

import logging
from typing import Any

from prefork_esmtp import counters
from prefork_esmtp import replies as R
from prefork_esmtp.dotdata import count_bare_newlines
from prefork_esmtp.handler import DEFAULT_CHUNKSIZE, ESMTPHandler
from prefork_esmtp.message import HeaderTooLong, MessageParser, TooManyHeaderLines, feed_body, plain_section

log = logging.getLogger("prefork_esmtp.session")
_BASE_HEADER = ESMTPHandler.HEADER
_BASE_EOH = ESMTPHandler.EOH
_BASE_BODY = ESMTPHandler.BODY


class MessageIntake:
    """Feeds one message to the handler; ``problem`` is the reply owed instead of EOM's."""

    __slots__ = ("parser", "limit", "size", "reject_bare", "prev_cr", "problem", "who")

    def __init__(self, handler: Any, max_size: int, max_header_size: int, reject_bare: bool,
                 who: str, max_header_lines: int | None = None, lf_ends_lines: bool = False) -> None:
        """``lf_ends_lines``: a bare LF ends a header line for parsing (the bare-newline policy keeps it)."""
        self.parser = MessageParser(handler, max_header_size, max_header_lines, lf_ends_lines)
        self.limit = max_size
        self.size = 0
        self.reject_bare = reject_bare
        self.prev_cr = False
        self.problem: R.Reply | None = None
        self.who = who

    def feed(self, piece: bytes) -> None:
        """Take the next piece of the message (dropped once there is a problem)."""
        if self.problem is not None:
            return
        self.size += len(piece)
        if self.size > self.limit:
            self.problem = R.MESSAGE_TOO_BIG
            return
        if self.reject_bare:
            if count_bare_newlines(piece, self.prev_cr):
                self.problem = R.BARE_NEWLINE
                return
            self.prev_cr = piece.endswith(b"\r")
        try:
            self.parser.feed(piece)
        except Exception as exc:
            self._failed(exc)

    def finish(self) -> R.Reply | None:
        """The message is complete: flush the parser; return the problem, if any.

        The handler is back in line mode afterwards (the parser turned chunk mode on before EOH).
        """
        if self.problem is None:
            if self.reject_bare and self.prev_cr:
                self.problem = R.BARE_NEWLINE
            else:
                try:
                    self.parser.finish()
                except Exception as exc:
                    self._failed(exc)
        self.parser.handler.chunkmode = False
        return self.problem

    def _failed(self, exc: Exception) -> None:
        """A parser step (which calls hooks) failed: the failure becomes the problem."""
        self.problem = _problem(exc, self.who)


def _problem(exc: Exception, who: str) -> R.Reply:
    """The reply owed for a message whose parsing (which calls hooks) raised ``exc``."""
    if isinstance(exc, HeaderTooLong):
        return R.HEADER_TOO_BIG
    if isinstance(exc, TooManyHeaderLines):
        return R.TOO_MANY_HEADER_LINES
    counters.hook_failed("message")
    log.error("message hook raised (client %s)", who, exc_info=exc)
    return R.HOOK_FAILED


def take_message(handler: Any, data: bytes, limits: tuple[int, int, bool, str, int | None, bool]) -> R.Reply | None:
    """A whole message at once (DATA's, unstuffed): what a :class:`MessageIntake` made with ``limits``
    (its arguments after the handler, as one tuple: the session's, passed without a new one per
    message), fed ``data`` in any pieces and finished, would do and return.

    The common case without the intake or the parser: a handler that takes no HEADER calls,
    a header section that is plain (:func:`~prefork_esmtp.message.plain_section`): the section
    at once, EOH, and one BODY for a body within the chunk size (neither call when the handler
    keeps the base EOH and BODY, which do nothing).
    """
    max_size, max_header_size, reject_bare, who, max_header_lines, _ = limits
    if len(data) <= max_size and not (reject_bare and (count_bare_newlines(data, False) or data[-1:] == b"\r")) \
            and (cls := type(handler)).HEADER is _BASE_HEADER and "HEADER" not in handler.__dict__ \
            and (m := plain_section(data, max_header_size, max_header_lines)) is not None:
        end = m.end()
        try:  # as MessageParser ends the section, then its body
            handler.header_raw = data[m.start(1):end - 2]
            handler.header_section = data[:end]
            if cls.EOH is _BASE_EOH and cls.BODY is _BASE_BODY and "EOH" not in handler.__dict__ \
                    and "BODY" not in handler.__dict__:  # the base EOH and BODY do nothing: no calls
                handler.chunkmode = False
                return None
            handler.chunkmode = True
            handler.EOH()
            n = len(data) - end
            if n:  # the common case: one BODY call for a body within the chunk size
                if handler.chunkmode and type(size := getattr(handler, "chunksize", DEFAULT_CHUNKSIZE)) is int \
                        and n <= size:
                    handler.BODY(data[end:])
                else:
                    feed_body(handler, data[end:])
        except Exception as exc:
            handler.chunkmode = False
            return _problem(exc, who)
        handler.chunkmode = False  # as finish does
        return None
    intake = MessageIntake(handler, *limits)
    intake.feed(data)
    return intake.finish()
