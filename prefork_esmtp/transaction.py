"""The mail transaction: MAIL, RCPT, then the message by DATA or BDAT, then EOM.

State follows the replies: a transaction starts only when MAIL's hook answers
2xx, a recipient counts only when RCPT's hook answers 2xx, and the envelope is
replaced by a fresh one when the transaction ends.  The message goes through
:class:`~prefork_esmtp.intake.MessageIntake` to the handler's HEADER, EOH and
BODY hooks, the same for DATA and BDAT.  Every verb returns its final reply;
the session writes it.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import Any

from prefork_esmtp import counters
from prefork_esmtp import params as P
from prefork_esmtp import replies as R
from prefork_esmtp.addresses import AddressError, common_sender, parse_path_argument, plain_recipient
from prefork_esmtp.connection import Connection
from prefork_esmtp.dotdata import DotDecoder
from prefork_esmtp.handler import RECIPIENT_OK, SENDER_OK, ESMTPHandler
from prefork_esmtp.intake import MessageIntake, take_message
from prefork_esmtp.logs import Event
from prefork_esmtp.logs import address as peer_text
from prefork_esmtp.limits import Limits
from prefork_esmtp.settings import Config
from prefork_esmtp.state import ConnectionState, Envelope

log = logging.getLogger("prefork_esmtp.session")
_INFO = logging.INFO
#: logging's own record of the levels this logger is enabled for (logging empties it whenever a level
#: changes, logging.disable too): a level it holds as False is off, no isEnabledFor call needed;
#: an empty dict where logging keeps no such record (then isEnabledFor is always asked)
_log_levels: dict[int, bool] = getattr(log, "_cache", {})
#: MAIL's BODY parameter as most clients send it (or none): nothing for DATA to check
_TEXT_BODIES = (None, "8BITMIME", "7BIT")

_new_reply = tuple.__new__  # a HookReply without the Python-level __new__ of a NamedTuple
_HookReply = R.HookReply
_new_envelope = Envelope.__new__  # an Envelope with no field set yet: see Transaction._clear
#: The base handler's MAIL and RCPT hooks: a handler that keeps them gets their reply without the call.
_BASE_MAIL = ESMTPHandler.MAIL
_BASE_RCPT = ESMTPHandler.RCPT
#: Their replies as they go on the wire, before and after the address: f"{head}{address}{tail}", encoded,
#: is R.wire(HookReply(250, [SENDER_OK % address]), "MAIL") (RECIPIENT_OK's for RCPT), framed once here
#: (code, default enhanced code); the hook's text starts at the offset after them.
_MAIL_HEAD, _MAIL_TAIL = R.wire(_HookReply(250, [SENDER_OK % "\0"]), "MAIL").decode().split("\0")
_RCPT_HEAD, _RCPT_TAIL = R.wire(_HookReply(250, [RECIPIENT_OK % "\0"]), "RCPT").decode().split("\0")
_MAIL_TEXT = len(_MAIL_HEAD) - SENDER_OK.index("%s")
_RCPT_TEXT = len(_RCPT_HEAD) - RECIPIENT_OK.index("%s")
_FramedReply = R.FramedReply
#: The base handler's 354 as it goes on the wire (the same for every class that keeps the base DATA).
_BASE_354 = R.wire(R.fixed_replies(ESMTPHandler)["DATA"], "DATA")
_monotonic = time.monotonic
_TRANSACTIONS = counters.TRANSACTIONS
# the message counters' places (constants of the counters module), for _received
_MESSAGES_BY_CLASS = counters.MESSAGES_BY_CLASS
_MESSAGE_SIZE, _SIZE_BOUNDS, _MESSAGE_SIZE_SUM = counters.MESSAGE_SIZE, counters.SIZE_BOUNDS, counters.MESSAGE_SIZE_SUM


def bdat_arguments(arg: str) -> tuple[int, bool] | None:
    """``size [LAST]`` of a BDAT command as (size, last), or None when malformed."""
    parts = arg.split()
    if not 1 <= len(parts) <= 2 or not (parts[0].isascii() and parts[0].isdigit()) \
            or len(parts[0]) > 18 or (len(parts) == 2 and parts[1].upper() != "LAST"):
        return None
    return int(parts[0]), len(parts) == 2


class Transaction:
    """The envelope and the message under way for one session."""

    # What a new session starts with (class-level, so each session sets only what differs).
    intake: MessageIntake | None = None  # a BDAT message under way
    started: float | None = None  # when MAIL was accepted; None: no transaction to log
    limits_data: tuple[int, int, bool, str, int, bool] | None = None  # see _limits_data
    number = messages_accepted = messages_refused = 0  # this session's transactions, messages

    def __init__(self, handler: Any, state: ConnectionState, conn: Connection, config: Config,
                 limits: Limits | None = None, fixed: dict[str, R.Reply] | None = None) -> None:
        self.handler = handler
        #: the base handler's constant replies for the hooks this handler did not override
        #: (the session's, worked out once per handler class)
        self.fixed = fixed = fixed if fixed is not None else R.fixed_replies(type(handler))
        #: the base EOM's reply when the handler class keeps the base EOM, outside LMTP: what _end
        #: answers for a message without the call (see _eom)
        self.base_eom = fixed.get("EOM") if config.protocol != "lmtp" else None
        self.limits = limits if limits is not None else Limits(config)
        self.state = state
        self.conn = conn
        self.config = config
        self.envelope = handler._esmtp_envelope = Envelope()  # state.attach's work, without the call
        #: the recipients RCPT accepted, as the engine counts them: the handler may change
        #: the list behind env_recipients, the number of replies owed must not follow it
        self.accepted: list[str] = []
        self.counts = counters.current.values

    @property
    def active(self) -> bool:
        """Whether a transaction is under way (MAIL was accepted)."""
        return self.envelope.sender is not None

    def reset(self) -> None:
        """End the transaction (RSET, HELO, STARTTLS); one under way is logged as aborted."""
        if self.started is not None:
            self._log("aborted", None, self.intake.size if self.intake is not None else None)
        self._clear()

    def abandon(self) -> None:
        """The session is over: log a transaction under way as aborted (its envelope stays for the handler)."""
        if self.started is not None:
            self._log("aborted", None, self.intake.size if self.intake is not None else None)
            self.started = None

    def _clear(self) -> None:
        """A fresh envelope, no message under way."""
        # Envelope() written out, without the call to its __init__ (each of its fields as a blank one has
        # it: a test holds the two together), and state.attach's work, without the call
        env = self.envelope = self.handler._esmtp_envelope = _new_envelope(Envelope)
        env.sender = None
        env.recipients = []
        env.mail_params = {}
        env.rcpt_params = {}
        env.recipients_params = []
        self.intake = self.started = None
        self.accepted = []

    def _log(self, result: str, reply: str | None, size: int | None) -> None:
        """The transaction's one log line: envelope, outcome, client, duration."""
        if not log.isEnabledFor(logging.INFO):
            return
        env, state = self.envelope, self.state
        log.info(Event(state.session_id, "message", {
            "from": f"<{env.sender}>", "nrcpt": len(self.accepted), "size": size, "result": result,
            "reply": reply, "client": peer_text(state.peer), "helo": state.client,
            "tls": state.tls["version"] if state.tls else None, "auth": state.auth_user, "tx": self.number,
            "duration": round(time.monotonic() - self.started, 6) if self.started is not None else None}))

    # -- the envelope ---------------------------------------------------------

    def mail(self, arg: str) -> R.Answer:
        """MAIL FROM:<address> [parameters]."""
        env, state, config = self.envelope, self.state, self.config
        if state.client is None or config.require_auth and state.auth_user is None or env.sender is not None:
            return self._mail_refused()
        m = common_sender(arg)
        if m is not None and (size := m[2]) is None:  # the commonest argument: a plain address, no parameters
            address, params = m[1], {}
        elif m is not None and int(size) <= config.max_message_size:
            # the common ESMTP client's: a plain address, SIZE within the limit, maybe a valid BODY
            address, body = m[1], m[3]
            params = {"SIZE": size} if body is None else {"SIZE": size, "BODY": body}
        else:
            m = None  # an address the full parser took: the base hook's reply below checks it is printable
            try:
                address, params = parse_path_argument(arg, "FROM")
            except AddressError as exc:
                return R.Reply(exc.code, exc.enhanced, exc.text)
            problem = P.check_mail(params, config.max_message_size, bdat_offered=True) if params else None
            if problem is None and not arg.isascii() and "SMTPUTF8" not in params:
                problem = R.NON_ASCII_ADDRESS
            if problem is not None:
                return problem
        if config.max_messages_per_ip and state.peer and self.limits.message(state.peer[0]):
            log.info("too many messages from %s", state.peer[0])
            return R.RATE_MESSAGES
        env.sender, env.mail_params = address, params
        handler = self.handler
        # The base hook's reply, when it would print the address as it is: always for an address a
        # plain match took (m, a Match, is true: printable ASCII), else when the address is printable.
        if type(handler).MAIL is _BASE_MAIL and "MAIL" not in handler.__dict__ and (m or address.isprintable()):
            # (a printable address holds no surrogate: plain encode() is wire's "surrogateescape" encode)
            reply = _new_reply(_FramedReply, (250, f"{_MAIL_HEAD}{address}{_MAIL_TAIL}".encode(), _MAIL_TEXT))
        else:
            reply = R.call_hook(handler, "MAIL", self.conn.who, address)
            if not 200 <= reply.code < 300:
                self._clear()
                return reply
        self.started = _monotonic()
        self.number += 1
        self.counts[_TRANSACTIONS] += 1
        return reply

    def _mail_refused(self) -> R.Reply:
        """Why MAIL cannot start a transaction now: no HELO/EHLO, no AUTH when it is required, or one is open."""
        if self.state.client is None:
            return R.NEED_HELO
        if self.config.require_auth and self.state.auth_user is None:
            return R.AUTH_REQUIRED
        return R.NESTED_MAIL

    def rcpt(self, arg: str) -> R.Answer:
        """RCPT TO:<address> [parameters]."""
        env, state = self.envelope, self.state
        if state.client is None or env.sender is None:
            return R.NEED_HELO if state.client is None else R.NEED_MAIL
        m = plain_recipient(arg)
        if m is not None:  # the commonest argument: a plain address, no parameters, nothing more to check
            address, params = m[1], {}
        else:
            try:
                address, params = parse_path_argument(arg, "TO")
            except AddressError as exc:
                return R.Reply(exc.code, exc.enhanced, exc.text)
            problem = P.check_rcpt(params) if params else None
            if problem is None and not arg.isascii() and "SMTPUTF8" not in env.mail_params:
                problem = R.NON_ASCII_ADDRESS
            if problem is not None:
                return problem
        config = self.config
        if len(self.accepted) >= config.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        if config.max_recipients_per_ip and state.peer and self.limits.recipient(state.peer[0]):
            log.info("too many recipients from %s", state.peer[0])
            return R.RATE_RECIPIENTS
        env.rcpt_params = params
        handler = self.handler
        # The base hook's reply, when it would print the address as it is (see mail).
        if type(handler).RCPT is _BASE_RCPT and "RCPT" not in handler.__dict__ and (m or address.isprintable()):
            reply = _new_reply(_FramedReply, (250, f"{_RCPT_HEAD}{address}{_RCPT_TAIL}".encode(), _RCPT_TEXT))
        else:
            reply = R.call_hook(handler, "RCPT", self.conn.who, address)
            if not 200 <= reply.code < 300:
                return reply
        env.recipients.append(address)
        env.recipients_params.append(params)
        self.accepted.append(address)
        return reply

    def _problem(self) -> R.Reply | None:
        """Why DATA or BDAT cannot start a message now, or None."""
        if self.state.client is None:
            return R.NEED_HELO
        if self.envelope.sender is None:
            return R.NEED_MAIL
        if not self.accepted:
            return R.NEED_RCPT
        return None

    # -- the message ------------------------------------------------------------

    def _new_intake(self, check_newlines: bool) -> MessageIntake:
        if check_newlines:
            return MessageIntake(self.handler, *(self.limits_data or self._limits_data()))
        config = self.config
        return MessageIntake(self.handler, config.max_message_size, config.max_header_size, False,
                             self.conn.who, config.max_header_lines, config.bare_newline == "keep")

    def _limits_data(self) -> tuple[int, int, bool, str, int, bool]:
        """A DATA message's intake arguments after the handler (the same for each of the session's
        messages): sizes, bare-newline policy, client, header lines, whether a bare LF ends lines."""
        config = self.config
        self.limits_data = (config.max_message_size, config.max_header_size, config.bare_newline == "reject",
                            self.conn.who, config.max_header_lines, config.bare_newline == "keep")
        return self.limits_data

    def data(self, arg: str) -> R.Answer:
        """DATA: the DATA hook's 354 (an interim reply), the message up to <CRLF>.<CRLF>, then EOM.

        Returns None when the handler asked to disconnect with its 354.
        """
        env = self.envelope
        if arg or self.state.client is None or env.sender is None or not self.accepted \
                or self.intake is not None or env.mail_params.get("BODY") not in _TEXT_BODIES:
            problem = self._data_problem(arg)
            if problem is not None:
                return problem
        handler = self.handler
        if "DATA" in self.fixed and "DATA" not in handler.__dict__:
            wire = _BASE_354  # the base handler's: framed once
        else:
            reply = R.call_hook(handler, "DATA", self.conn.who)
            if reply.code != 354:
                return reply
            wire = R.wire(reply, "DATA")
        conn = self.conn
        conn.pending.append(wire)
        config = self.config
        if handler.disconnect:
            return None
        if config.forbid_unauth_pipelining and conn.pipelined_early(self.state.auth_user is not None):
            return R.PIPELINING_ABUSE.format(config.hostname)
        try:
            data = conn.reader.read_message(config.min_data_rate, config.min_data_rate_grace)
        except BaseException:  # no earlier message's header bytes from here on (once read, take_message
            handler.header_raw = handler.header_section = b""  # or MessageParser sets them before any hook)
            raise
        if data is not None:  # all of it at once (the common case)
            return self._end(take_message(handler, data, self.limits_data or self._limits_data()), len(data))
        intake = self._new_intake(check_newlines=True)
        reader = conn.reader
        try:  # the data rate is on (read_message started it)
            reader.read_data(DotDecoder(), intake.feed)
        finally:
            reader.stop_rate()
        return self._end_message(intake)

    def _data_problem(self, arg: str) -> R.Reply | None:
        """Why DATA cannot start a message now, or None."""
        if arg:
            return R.SYNTAX_NOARGS.format("DATA")
        problem = self._problem()
        if problem is None and self.intake is not None:  # BDAT chunks already came
            problem = R.DATA_AFTER_BDAT
        if problem is None and (self.envelope.mail_params.get("BODY") or "").upper() == "BINARYMIME":
            problem = R.BINARYMIME_NEEDS_BDAT
        return problem

    def bdat(self, arg: str) -> R.Answer:
        """BDAT size [LAST]: one chunk of the message (RFC 3030); the last one ends it with EOM."""
        chunk = bdat_arguments(arg)
        if chunk is None:
            return R.SYNTAX_BDAT
        size, last = chunk
        if self.intake is None:
            problem = self._problem()
            if problem is not None:
                self.discard(size)
                return problem
            reply = R.call_hook(self.handler, "DATA", self.conn.who)
            if reply.code != 354:
                self.discard(size)
                if reply.code < 400:  # no chunk was taken: never a success reply
                    return R.HookReply(554, reply.lines, counts=False)
                return reply
            self.intake = self._new_intake(check_newlines=False)
        intake = self.intake
        reader = self.conn.reader
        reader.start_rate(self.config.min_data_rate, self.config.min_data_rate_grace)
        try:
            for piece in reader.read_exact(size):
                intake.feed(piece)
        finally:
            reader.stop_rate()
        if last or intake.problem is not None:
            # After a failed chunk (RFC 3030 4.2) the transaction is over: later chunks get 503.
            # Only the message's end gets LMTP's per-recipient replies; any other chunk gets one.
            return self._end_message(intake, last)
        return R.CHUNK_OK.format(size)

    def discard(self, size: int) -> None:
        """Read and drop a BDAT chunk we refuse, so the session stays in sync.

        At the minimum data rate, as a chunk we take: otherwise a refused chunk of
        any size, dripped, would hold the worker until the session's deadline.
        """
        reader = self.conn.reader
        reader.start_rate(self.config.min_data_rate, self.config.min_data_rate_grace)
        try:
            for _ in reader.read_exact(size):
                pass
        finally:
            reader.stop_rate()

    def _end_message(self, intake: MessageIntake, complete: bool = True) -> R.Answer:
        """The reply for a message that ended or failed (see :meth:`_end`); the intake is finished here."""
        return self._end(intake.finish(), intake.size, complete)

    def _end(self, problem: R.Reply | None, size: int, complete: bool = True) -> R.Answer:
        """The reply for a message of ``size`` octets that ended or failed: ``problem``, or EOM's;
        the transaction ends.

        In LMTP one reply goes out per accepted recipient, in order (RFC 2033
        4.2): all but the last are written here, the last is returned.  Not
        ``complete`` (a BDAT chunk before the last failed): its one reply only.
        """
        if problem is None and (reply := self.base_eom) is not None and "EOM" not in self.handler.__dict__:
            self._received(reply, size)  # the base EOM's one reply (see _eom), without the call
            return reply
        accepted = self.accepted  # _received ends the transaction: a new list then
        lmtp = self.config.protocol == "lmtp"
        if problem is not None:
            self._received(problem, size)
            return self._per_recipient([problem] * len(accepted)) if lmtp and complete else problem
        replies = self._eom()
        if type(replies) is not list:  # one reply for the message
            if not lmtp:
                self._received(replies, size)
                return replies
            replies = [replies] * len(accepted)
        verdict, delivered = R.one_for_all(replies)
        if lmtp:
            reply = self._per_recipient(replies)
        else:
            reply = verdict
            if len(replies) > 1 and len(delivered) not in (0, len(replies)):
                log.warning("message from=<%s>: EOM took it for %s only; answering %d so the client retries",
                            self.envelope.sender, ", ".join(f"<{accepted[i]}>" for i in delivered), reply.code)
        codes = [r.code for r in replies]
        mixed = lmtp and len(set(codes)) > 1
        self._received(verdict, size, ",".join(str(code) for code in codes) if mixed else None)
        return reply

    def _received(self, verdict: R.Reply | R.HookReply, size: int, text: str | None = None) -> None:
        """A message received to its end: count it by its reply, log it, end the transaction.

        ``text``: the reply as the log line shows it; None for the verdict's first line.
        """
        counts = self.counts
        cls = verdict.code // 100
        counts[_MESSAGES_BY_CLASS[cls]] += 1
        counts[_MESSAGE_SIZE + bisect_left(_SIZE_BOUNDS, size)] += 1  # counters.observe's work
        counts[_MESSAGE_SIZE_SUM] += size
        if cls == 2:
            self.messages_accepted += 1
        else:
            self.messages_refused += 1
        if _log_levels.get(_INFO) is not False and log.isEnabledFor(_INFO):  # INFO off: no call
            self._log("accepted" if cls == 2 else "refused",
                      text if text is not None else R.first_line(verdict, "EOM"), size)
        self._clear()

    def _eom(self) -> R.HookReply | R.Reply | list[R.HookReply]:
        """Call EOM: one reply for the message, or a list with one per accepted recipient."""
        reply = self.fixed.get("EOM")
        if reply is not None and "EOM" not in self.handler.__dict__:
            return reply
        try:
            result = self.handler.EOM()
            if isinstance(result, list):
                replies = R.per_recipient(result, len(self.accepted))
                if replies is not None:
                    return replies
            return R.normalize(result)
        except R.BadHookResult as exc:
            log.error("EOM hook returned a bad reply: %s", exc)
        except Exception:
            log.exception("EOM hook raised (client %s)", self.conn.who)
        counters.hook_failed("EOM")
        return R.HOOK_FAILED

    def _per_recipient(self, replies: list) -> R.Answer:
        """Write all but the last of LMTP's per-recipient replies; return the last for the session."""
        writer = self.conn.writer
        for reply in replies[:-1]:
            writer.write(R.wire(reply, "EOM"))
            if reply.code >= 400:  # the last one is counted where the session writes it
                self.counts[counters.ERROR_REPLIES + min(reply.code, 599) - 400] += 1
        return replies[-1]
