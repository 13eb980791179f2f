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
from typing import Any

from prefork_esmtp import params as P
from prefork_esmtp import replies as R
from prefork_esmtp.addresses import AddressError, parse_path_argument
from prefork_esmtp.connection import Connection
from prefork_esmtp.dotdata import DotDecoder
from prefork_esmtp.intake import MessageIntake
from prefork_esmtp.limits import Limits
from prefork_esmtp.settings import Config
from prefork_esmtp.state import ConnectionState, Envelope, attach

log = logging.getLogger("prefork_esmtp.session")


def bdat_arguments(arg: str) -> tuple[int, bool] | None:
    """``size [LAST]`` of a BDAT command as (size, last), or None when malformed."""
    parts = arg.split()
    if not 1 <= len(parts) <= 2 or not (parts[0].isascii() and parts[0].isdigit()) \
            or len(parts[0]) > 18 or (len(parts) == 2 and parts[1].upper() != "LAST"):
        return None
    return int(parts[0]), len(parts) == 2


class Transaction:
    """The envelope and the message under way for one session."""

    def __init__(self, handler: Any, state: ConnectionState, conn: Connection, config: Config,
                 limits: Limits | None = None) -> None:
        self.handler = handler
        self.limits = limits if limits is not None else Limits(config)
        self.state = state
        self.conn = conn
        self.config = config
        self.envelope = Envelope()
        self.intake: MessageIntake | None = None  # a BDAT message under way
        attach(handler, envelope=self.envelope)

    @property
    def active(self) -> bool:
        """Whether a transaction is under way (MAIL was accepted)."""
        return self.envelope.sender is not None

    def reset(self) -> None:
        """End the transaction: a fresh envelope, no message under way."""
        self.envelope = Envelope()
        attach(self.handler, envelope=self.envelope)
        self.intake = None

    # -- the envelope ---------------------------------------------------------

    def mail(self, arg: str) -> R.Answer:
        """MAIL FROM:<address> [parameters]."""
        env = self.envelope
        if self.state.client is None:
            return R.NEED_HELO
        if self.config.require_auth and self.state.auth_user is None:
            return R.AUTH_REQUIRED
        if env.sender is not None:
            return R.NESTED_MAIL
        try:
            address, params = parse_path_argument(arg, "FROM")
        except AddressError as exc:
            return R.Reply(exc.code, exc.enhanced, exc.text)
        problem = P.check_mail(params, self.config.max_message_size, bdat_offered=True)
        if problem is None and not arg.isascii() and "SMTPUTF8" not in params:
            problem = R.NON_ASCII_ADDRESS
        if problem is not None:
            return problem
        if self.state.peer and self.limits.message(self.state.peer[0]):
            log.info("too many messages from %s", self.state.peer[0])
            return R.RATE_MESSAGES
        env.sender, env.mail_params = address, params
        reply = R.call_hook(self.handler, "MAIL", self.conn.who, address)
        if not 200 <= reply.code < 300:
            self.reset()
        return reply

    def rcpt(self, arg: str) -> R.Answer:
        """RCPT TO:<address> [parameters]."""
        env = self.envelope
        if self.state.client is None:
            return R.NEED_HELO
        if env.sender is None:
            return R.NEED_MAIL
        try:
            address, params = parse_path_argument(arg, "TO")
        except AddressError as exc:
            return R.Reply(exc.code, exc.enhanced, exc.text)
        problem = P.check_rcpt(params)
        if problem is None and not arg.isascii() and "SMTPUTF8" not in env.mail_params:
            problem = R.NON_ASCII_ADDRESS
        if problem is not None:
            return problem
        if len(env.recipients) >= self.config.max_recipients:
            return R.TOO_MANY_RECIPIENTS
        if self.state.peer and self.limits.recipient(self.state.peer[0]):
            log.info("too many recipients from %s", self.state.peer[0])
            return R.RATE_RECIPIENTS
        env.rcpt_params = params
        reply = R.call_hook(self.handler, "RCPT", self.conn.who, address)
        if 200 <= reply.code < 300:
            env.recipients.append(address)
            env.recipients_params.append(params)
        return reply

    def _problem(self) -> R.Reply | None:
        """Why DATA or BDAT cannot start a message now, or None."""
        if self.state.client is None:
            return R.NEED_HELO
        if self.envelope.sender is None:
            return R.NEED_MAIL
        if not self.envelope.recipients:
            return R.NEED_RCPT
        return None

    # -- the message ------------------------------------------------------------

    def _new_intake(self, check_newlines: bool) -> MessageIntake:
        config = self.config
        return MessageIntake(self.handler, config.max_message_size, config.max_header_size,
                             check_newlines and config.bare_newline == "reject", self.conn.who,
                             config.max_header_lines, config.bare_newline == "keep")

    def data(self, arg: str) -> R.Answer:
        """DATA: the DATA hook's 354 (an interim reply), the message up to <CRLF>.<CRLF>, then EOM.

        Returns None when the handler asked to disconnect with its 354.
        """
        if arg:
            return R.SYNTAX_NOARGS.format("DATA")
        problem = self._problem()
        if problem is None and self.intake is not None:  # BDAT chunks already came
            problem = R.DATA_AFTER_BDAT
        if problem is None and (self.envelope.mail_params.get("BODY") or "").upper() == "BINARYMIME":
            problem = R.BINARYMIME_NEEDS_BDAT
        if problem is not None:
            return problem
        reply = R.call_hook(self.handler, "DATA", self.conn.who)
        if reply.code != 354:
            return reply
        conn = self.conn
        conn.writer.write(R.format_reply(354, reply.lines, None))
        if self.handler.disconnect:
            return None
        if conn.pipelined_early(self.state.auth_user is not None):
            return R.PIPELINING_ABUSE.format(self.config.hostname)
        intake = self._new_intake(check_newlines=True)
        reader = conn.reader
        reader.start_rate(self.config.min_data_rate, self.config.min_data_rate_grace)
        try:
            for piece in reader.read_data(DotDecoder()):
                intake.feed(piece)
        finally:
            reader.stop_rate()
        return self._end_message(intake)

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
            # Only the LAST chunk ends the message: one reply per recipient (LMTP) is for it alone.
            return self._end_message(intake, final=last)
        return R.CHUNK_OK.format(size)

    def discard(self, size: int) -> None:
        """Read and drop a BDAT chunk we refuse, so the session stays in sync."""
        for _ in self.conn.reader.read_exact(size):
            pass

    def _end_message(self, intake: MessageIntake, final: bool = True) -> R.Answer:
        """The reply for a complete message: the intake's problem, or EOM's; the transaction ends.

        In LMTP one reply goes out per accepted recipient, in order (RFC 2033
        4.2): all but the last are written here, the last is returned.  A
        BDAT chunk that is not the last (``final`` false) gets its one reply,
        as any command does, even in LMTP.
        """
        problem = intake.finish()
        env = self.envelope
        count = len(env.recipients)
        if problem is not None:
            log.info("message from %s refused: %d %s", self.conn.who, problem.code, problem.text)
            self.reset()
            return self._per_recipient([problem] * count) if self.config.protocol == "lmtp" and final else problem
        replies = self._eom(count)
        codes = [r.code for r in replies]
        if self.config.protocol == "lmtp":
            reply = self._per_recipient(replies)
        else:
            reply, delivered = R.one_for_all(replies)
            if len(replies) > 1 and len(delivered) not in (0, len(replies)):
                log.warning("message from=<%s>: EOM took it for %s only; answering %d so the client retries",
                            env.sender, ", ".join(f"<{env.recipients[i]}>" for i in delivered), reply.code)
        log.info("message from=<%s> nrcpt=%d size=%d peer=%s: %s", env.sender, count, intake.size,
                 self.conn.who, ",".join(str(code) for code in codes) if len(set(codes)) > 1 else reply.code)
        self.reset()
        return reply

    def _eom(self, count: int) -> list[R.HookReply | R.Reply]:
        """Call EOM: one reply (repeated for each recipient) or a list with one per recipient."""
        try:
            result = self.handler.EOM()
            replies = R.per_recipient(result, count)
            return replies if replies is not None else [R.normalize(result)] * count
        except R.BadHookResult as exc:
            log.error("EOM hook returned a bad reply: %s", exc)
        except Exception:
            log.exception("EOM hook raised (client %s)", self.conn.who)
        return [R.HOOK_FAILED] * count

    def _per_recipient(self, replies: list) -> R.Answer:
        """Write all but the last of LMTP's per-recipient replies; return the last for the session."""
        writer = self.conn.writer
        for reply in replies[:-1]:
            writer.write(R.format_reply(reply.code, reply.lines, R.default_enhanced(reply.code, "EOM")))
        return replies[-1]
