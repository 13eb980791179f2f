"""The conversation: greet, read a command, check it, dispatch it, write its reply; again.

A :class:`Session` serves one accepted connection to its end.  The bytes go
downward: :class:`~prefork_esmtp.connection.Connection` (the socket, TLS, the
close) -> :class:`~prefork_esmtp.reader.Reader` (command lines) -> this loop
-> one method per verb (here; MAIL, RCPT, DATA and BDAT in
:mod:`prefork_esmtp.transaction`, AUTH in :mod:`prefork_esmtp.auth`) -> the
handler's hooks.  Every verb returns its reply and :meth:`Session._answer` is
the one place that writes it.  The session facts live in
:mod:`prefork_esmtp.state` objects, which the handler sees as read-only views.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from prefork_esmtp import counters
from prefork_esmtp import replies as R
from prefork_esmtp.auth import AUTH_KEYWORD, Auth
from prefork_esmtp.connection import Connection, StopSession
from prefork_esmtp.handler import EHLO_KEYWORDS, EHLO_OK, ESMTPHandler
from prefork_esmtp.limits import Limits
from prefork_esmtp.logs import Event, address
from prefork_esmtp.reader import CommandTooSlow, DataTooSlow, LineTooLong, ReadTimeout, SessionTooLong
from prefork_esmtp.reader import RECV_SIZE
from prefork_esmtp.reporter import NO_REPORTER, Reporter
from prefork_esmtp.settings import Config
from prefork_esmtp.state import ConnectionState
from prefork_esmtp.transaction import Transaction, bdat_arguments
from prefork_esmtp.writer import ClientGone

log = logging.getLogger("prefork_esmtp.session")

#: Commands that must end a pipelined group (RFC 2920 3.1), so a client must wait after them.
GROUP_ENDERS = frozenset({"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "QUIT", "NOOP", "STARTTLS", "AUTH"})
#: Commands that move no mail (Postfix's junk commands).
JUNK = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
#: What require_tls still allows before TLS.
BEFORE_TLS = frozenset({"EHLO", "NOOP", "STARTTLS", "QUIT"})
#: A HookReply from all its fields, without the NamedTuple's Python-level __new__.
_new_reply = tuple.__new__
_new_object = object.__new__
_getrandbits = random.getrandbits
_SESSIONS = counters.SESSIONS
_monotonic = time.monotonic


def _no_check_in(expect: float) -> None:
    """The check-in of a connection that reports to nobody."""


class Session:
    """One SMTP session over a connected socket.

    ``stopping()`` says whether the server is stopping (then 421 at the next
    command outside a transaction); ``reporter`` gets a check-in before each
    blocking read and counts this IP's sessions across all workers;
    ``tls_context`` enables STARTTLS (and is used at once when ``implicit_tls``);
    ``local``: our address, when the caller knows it (else the socket is asked);
    ``read_timeout``: the socket's read timeout is known to be at most this
    (inherited from its listener: see :class:`~prefork_esmtp.connection.Connection`).
    """

    # What a new session starts with (class-level, so each session sets only what differs).
    counted_ip: str | None = None  # counted by the per-address session limit: forget at the end
    end = ""  # why the session ended, for its log line (else: quit, or closed by us)
    last_reply: tuple[R.Reply | R.HookReply | R.FramedReply, str] | None = None  # and its verb
    errors = 0
    junk = 0
    closing = False
    quit = False  # close without lingering: the client said QUIT, or TLS failed
    refused = False  # CONNECT answered 554: only QUIT is served
    auth: Auth | None = None  # made at the first AUTH command (most sessions never send one)
    tls_next = False  # STARTTLS answered 220: the handshake follows the reply
    tls_context: ssl.SSLContext | None = None  # STARTTLS offered (and implicit_tls: TLS at once) with it
    implicit_tls = False
    lmtp = False  # protocol = "lmtp"

    def __init__(self, sock: socket.socket, peer: Any, handler_class: type, config: Config,
                 stopping: Callable[[], bool] = lambda: False, reporter: Reporter = NO_REPORTER, *,
                 tls_context: ssl.SSLContext | None = None, implicit_tls: bool = False,
                 limits: Limits | None = None, local: Any = None, read_timeout: float | None = None) -> None:
        self.config = config
        self.hostname = config.hostname
        self.stopping = stopping
        if tls_context is not None:  # else the class's None
            self.tls_context = tls_context
        if implicit_tls:
            self.implicit_tls = True
        self.limits = limits if limits is not None else Limits(config, reporter.sessions_from)
        self.reporter = reporter
        self.counts = counts = counters.current.values
        counts[_SESSIONS] += 1
        self.began = _monotonic()
        check_in = reporter.check_in  # one bound method for the connection and the handler
        self.conn = conn = Connection(sock, peer, config, check_in, stopping, local, read_timeout=read_timeout)
        self.queue = conn.pending.append  # the writer's queue (ReplyWriter.write, without the call)
        # ConnectionState(conn.peer, conn.local, config.hostname, session_id=...) without the generated
        # ten-field __init__: the fields not set here read as their class-level defaults
        self.state = state = _new_object(ConnectionState)
        state.peer, state.local, state.hostname, state.session_id = \
            conn.peer, conn.local, config.hostname, "%012X" % _getrandbits(48)  # as f"{...:012X}", 45 ns less
        if config.protocol == "lmtp":
            self.lmtp = True
        self.reader = reader = conn.reader
        self.reject_bare_lf = config.command_bare_lf == "reject"
        self.require_tls = config.require_tls
        self.forbid_pipelining = config.forbid_unauth_pipelining
        handler = handler_class()
        handler.input_handle = reader
        handler.output_handle = conn.writer
        handler.disconnect = False
        handler.chunkmode = False
        handler._esmtp_check_in = check_in
        handler._esmtp_state = state  # state.attach's work, without the call
        self.handler = handler
        #: the base handler's constant replies for the hooks this handler did not override
        self.fixed = fixed = _FIXED_BY_CLASS.get(handler_class) or R.fixed_replies(handler_class)
        self.transaction = Transaction(handler, state, conn, config, self.limits, fixed)

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve the session until QUIT, disconnect, an error limit, a timeout or EOF.

        The common round is written out here rather than spread over
        :meth:`Reader.readline <prefork_esmtp.reader.Reader.readline>`,
        :meth:`Connection.recv <prefork_esmtp.connection.Connection.recv>` and
        :meth:`~prefork_esmtp.connection.Connection.sendall`: when nothing is
        buffered, no deadline is within an idle timeout and the socket is plain,
        the queued replies go out in one non-blocking send, the worker checks
        in, the read waits (interruptible outside a transaction), and a read
        that is exactly one CRLF-ended line within the limit is the command:
        a plain verb (see ``_PLAIN_COMMANDS``) is called and answered here,
        any other line goes through :meth:`_dispatch`.
        Anything else (a full send window, an early wake-up, a partial,
        pipelined, bare-LF or too long line, TLS, a deadline near) takes those
        methods, from the same point: the same bytes and limits either way.
        """
        conn = self.conn
        reader = conn.reader
        transaction = self.transaction
        limit = self.config.max_line_length
        stopping = self.stopping
        answer = self._answer
        pending = conn.pending  # the writer's queue: the same list for the session's life
        send_pending = conn.send_pending
        check_in = conn.check_in or _no_check_in
        timeout = conn.timeout
        sock = conn.sock  # while kernel_timeouts holds, this plain socket is the session's (TLS clears it first)
        linger = True
        try:
            if self._open():
                self._greet()
                reader.ready()  # the first read's timeout: that read too may be the common round
            # whether the round may call a plain verb itself: a refused session, require_tls and
            # forbid_unauth_pipelining check every command in _dispatch (the greeting set ``refused``)
            plain = not (self.refused or self.require_tls or self.forbid_pipelining)
            while not self.closing:
                idle = transaction.envelope.sender is None
                if conn.kernel_timeouts and reader.pos >= len(reader.buf) and (now := _monotonic()) < reader._plain_until:
                    if pending:
                        send_pending()
                    check_in(timeout)
                    try:
                        if idle:  # a stop may end the wait for a command outside a transaction
                            conn.waiting = True
                            try:
                                if stopping():  # signalled before ``waiting`` was set: nothing was interrupted
                                    raise StopSession()
                                data = sock.recv(RECV_SIZE)
                            finally:
                                conn.waiting = False
                        else:
                            data = sock.recv(RECV_SIZE)
                    except (TimeoutError, BlockingIOError):  # SO_RCVTIMEO woke the read early
                        data = None
                    except OSError as exc:
                        raise ClientGone(str(exc)) from None
                    if data:
                        n = len(data)
                        reader.received += n
                        if data.find(b"\n", 0, limit) == n - 1 and data[n - 2] == 0x0D:  # one line, its CRLF within the limit
                            reader.buf, reader.pos, reader.bare_lf = data, n, False
                            verb, _, arg = data[:-2].partition(b" ")
                            # _dispatch's common case: a verb of the plain table in upper case, its
                            # argument ASCII without NUL or CR, nothing to check first (see _PLAIN_COMMANDS)
                            if plain and (entry := _PLAIN_COMMANDS.get(verb)) and arg.isascii() and 0 not in arg and 13 not in arg:
                                answer(entry[0](transaction if entry[1] else self, arg.decode("ascii").strip(" \t")), entry[2])
                            else:
                                self._dispatch(data[:-2])
                            continue
                        reader.buf, reader.pos = data, 0  # more than one line, or not one whole line: the cut below
                    elif data is None:  # the wait goes on the long way, its idle timeout from when it began
                        conn.interruptible = idle
                        try:
                            reader._fill(now)
                        finally:
                            conn.interruptible = False
                    else:
                        raise ClientGone("connection closed by client")
                elif idle and reader.pos < len(reader.buf) and stopping():
                    # a command buffered already: no wait looks at a stop before it (every wait
                    # for a command outside a transaction does: the round's, Connection.recv's)
                    self.end = "stopping"
                    self._answer(R.SHUTTING_DOWN.format(self.hostname))
                    break
                conn.interruptible = idle  # a stop may end the wait for a command outside a transaction
                try:
                    line = reader.readline(limit)
                except BaseException as exc:
                    conn.interruptible = False
                    if not isinstance(exc, LineTooLong):
                        raise
                    self._answer(R.LINE_TOO_LONG)
                    continue
                conn.interruptible = False
                self._dispatch(line)
            linger = not self.quit
        except StopSession:
            self.end = "stopping"
            self._answer(R.SHUTTING_DOWN.format(self.hostname))
        except ReadTimeout:
            log.info("timeout after %.0fs from %s", self.config.timeout, conn.who)
            self._time_limit("timeout", counters.TIMEOUT_IDLE, R.TIMEOUT)
        except DataTooSlow:
            log.info("data rate below %d octets/s from %s", self.config.min_data_rate, conn.who)
            self._time_limit("data_rate", counters.TIMEOUT_DATA_RATE, R.DATA_TOO_SLOW)
        except CommandTooSlow:
            log.info("command line not complete within %.0fs from %s", self.config.command_deadline, conn.who)
            self._time_limit("command_deadline", counters.TIMEOUT_COMMAND, R.COMMAND_TOO_SLOW)
        except SessionTooLong:
            log.info("session time limit (%.0fs) reached for %s", self.config.max_session_time, conn.who)
            self._time_limit("session_time", counters.TIMEOUT_SESSION, R.SESSION_TOO_LONG)
        except ClientGone as exc:
            linger = False
            self.end = "gone"
            log.debug("client %s gone: %s", conn.who, exc)
        finally:
            conn.shutdown(linger)
            if self.counted_ip is not None:
                self.limits.session_closed(self.counted_ip)
            try:
                self.handler.DISCONNECT()
            except Exception:
                counters.hook_failed("DISCONNECT")
                log.exception("DISCONNECT hook failed for %s", conn.who)
            conn.close()
            self._ended()

    def _time_limit(self, end: str, counter: int, reply: R.Reply) -> None:
        """A time limit ended the session: count it, say why (421)."""
        self.end = end
        self.counts[counter] += 1
        self._answer(reply.format(self.hostname))

    def _ended(self) -> None:
        """The session is over: count it, log an unfinished transaction, then the session's line."""
        duration = _monotonic() - self.began
        counts = self.counts
        counters.observe(counts, counters.SESSION_DURATION, counters.DURATION_BOUNDS, duration)
        counts[counters.RECEIVED_OCTETS] += self.reader.received
        transaction = self.transaction
        if transaction.started is not None:  # a transaction under way: logged as aborted
            transaction.abandon()
        if not log.isEnabledFor(logging.INFO):
            return
        state = self.state
        reply = R.first_line(*self.last_reply) if self.last_reply is not None else None
        log.info(Event(state.session_id, "session", {
            "client": address(state.peer), "helo": state.client,
            "tls": state.tls["version"] if state.tls else None, "auth": state.auth_user,
            "transactions": transaction.number, "accepted": transaction.messages_accepted,
            "refused": transaction.messages_refused, "errors": self.errors,
            "end": self.end or ("quit" if self.quit else "closed"), "reply": reply,
            "duration": round(duration, 6)}))

    def interrupt_if_idle(self) -> None:
        """From a signal handler: if blocked waiting for a command, end the session now.

        The session then answers 421 and closes.  Anywhere else (mid-command,
        inside a transaction) the session goes on and answers 421 at the first
        command after the transaction.
        """
        if self.conn.waiting and self.stopping():
            raise StopSession()

    def _open(self) -> bool:
        """Before the greeting: the PROXY header, implicit TLS, the per-IP limit (a client that talks first: _greet)."""
        if self.config.proxy_protocol and not self._take_proxy_header():
            return False
        if self.implicit_tls and not self._start_tls():
            return False
        peer = self.state.peer
        if self.config.max_sessions_per_ip and peer:
            if self.limits.session_opened(peer[0]):
                log.info("too many sessions from %s", peer[0])
                self.end = "ip_limit"
                self._answer(R.TOO_MANY_FROM_IP.format(self.hostname))
                return False
            self.counted_ip = peer[0]
        return True

    def _take_proxy_header(self) -> bool:
        """The PROXY header: from here on ``peer`` is the real client, also on the scoreboard.

        A missing, bad or untrusted header ends the session without a reply.
        """
        header = self.conn.take_proxy_header()
        self.state.peer, self.state.local = self.conn.peer, self.conn.local
        if header is None:
            self.closing = self.quit = True
            return False
        self.state.proxy = header.facts()
        self.reporter.busy(self.conn.peer)  # what the per-IP limit and status count
        return True

    def _greet(self) -> None:
        """CONNECT's reply with the hostname first: 220, 554 (only QUIT served) or 421 (close)."""
        reply = self.fixed.get("CONNECT")
        if reply is not None and "CONNECT" not in self.handler.__dict__:
            # the base handler's constant reply with the hostname first: one of the engine's
            # constant replies, made and framed once (replies.wire keeps its bytes)
            greeting = _GREETINGS.get((reply, self.hostname))
            if greeting is None:
                greeting = R.Reply(reply.code, "", f"{self.hostname} {reply.line}".rstrip(), counts=False)
                if len(_GREETINGS) < _GREETINGS_MAX:
                    _GREETINGS[(reply, self.hostname)] = greeting
                    R._CONSTANTS.add(greeting)
            if greeting.code < 400 and not self.forbid_pipelining:  # 2xx, nothing more to check
                self._answer(greeting, "CONNECT")
                return
            code, lines = greeting.code, [greeting.text]
        else:
            reply = R.call_hook(self.handler, "CONNECT", self.conn.who)
            code, lines = reply.code, reply.lines or [""]
            if reply is R.HOOK_FAILED:
                code = 421
            lines[0] = f"{self.hostname} {lines[0]}".rstrip()
        if 400 <= code < 500:
            code = 421
        elif code >= 500:
            code, self.refused = 554, True
        elif self.config.forbid_unauth_pipelining and self.conn.client_spoke():
            # checked as late as possible: the whole wait for the greeting (CONNECT included) counts
            log.info("%s talked before the greeting", self.conn.who)
            self._answer(R.PIPELINING_ABUSE.format(self.hostname))
            return
        self._answer(_new_reply(R.HookReply, (code, lines, False)), "CONNECT")

    # -- replies --------------------------------------------------------------

    def _answer(self, reply: R.Answer, verb: str = "") -> None:
        """Write a command's final reply: the one place replies are queued, framed, counted and acted on.

        Adds the default enhanced status code for ``verb`` where a line has
        none (a :class:`~prefork_esmtp.replies.FramedReply` comes framed: its
        bytes are queued as they are); counts errors (sleeping past the soft limit, 421 at the hard
        one); ends the session after a 421, a reply that closes, or when the
        handler set ``disconnect``.  None: the verb's last reply was an
        interim one, only ``disconnect`` applies.
        """
        if type(reply) is _Reply:  # the engine's constant replies: framed once
            self.queue(_WIRED.get((reply, verb)) or R.wire(reply, verb))
        elif type(reply) is _FramedReply:  # made with its bytes (the base MAIL and RCPT replies)
            self.queue(reply[1])
        elif reply is not None and len(lines := reply[1]) == 1 and (line := lines[0]) and line[1:2] != "." and (head := _HEADS.get((verb, reply[0]))):
            self.queue(f"{head}{line}\r\n".encode("utf-8", "surrogateescape"))  # wire's one-line hook reply
        elif reply is not None:
            self.queue(R.wire(reply, verb))
        else:  # the verb's last reply was an interim one
            if self.handler.disconnect:
                self.closing = True
            return
        self.last_reply = (reply, verb)
        if reply[0] >= 400 or reply.closes or verb in _BY_VERB:  # else nothing to count or act on
            if verb in _BY_VERB:  # RCPT and AUTH outcomes
                self.counts[_BY_VERB[verb][reply[0] // 100]] += 1
            if reply[0] >= 400 or reply.closes:
                self._weigh(reply)
        if self.handler.disconnect:
            self.closing = True

    def _weigh(self, reply: R.Reply | R.HookReply) -> None:
        """After an error reply or a reply that closes: count it, act on it."""
        code = reply.code
        if code >= 400:
            self.counts[counters.ERROR_REPLIES + min(code, 599) - 400] += 1
        if code == 421:
            self.closing = True
            return
        if code >= 400 and reply.counts:
            self.errors += 1
            if self.errors >= self.config.max_errors:
                log.info("too many errors (%d) from %s", self.errors, self.conn.who)
                self._answer(R.TOO_MANY_ERRORS.format(self.hostname))
                return
            if self.errors > self.config.soft_error_limit and self.config.error_sleep:
                # A wait like a read's, so promised like one: pipelined errors after a pause
                # would otherwise add up to a worker taken for stuck.
                self.reporter.check_in(max(self.config.timeout, self.config.error_sleep))
                time.sleep(self.config.error_sleep)  # the reply is still queued: it goes out late
        if reply.closes:
            self.closing = True

    # -- dispatch -------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        """Check a command line, run its verb, write the verb's reply.

        The common line (ASCII, no NUL or CR, not refused for a bare LF) takes
        the straight path; any other goes through :meth:`_decode` first.  (A
        plain verb read by the command round is called by :meth:`run` itself.)
        """
        # NUL and CR looked for as octet values: a bytes pattern would first be tried as an
        # integer, and the TypeError it raises and drops costs more than the search.
        if not line.isascii() or 0 in line or 13 in line or self.reject_bare_lf and self.reader.bare_lf:
            text = self._decode(line)
            if text is None:
                return
        else:
            text = line.decode("ascii")
        verb, _, arg = text.rstrip(" \t").partition(" ")
        # a verb in lower or mixed case, or no verb of ours: looked up again in upper case
        entry = _COMMANDS.get(verb) or _COMMANDS.get(verb := verb.upper())
        if self.refused and verb != "QUIT" or self.require_tls and self.state.tls is None and verb not in BEFORE_TLS:
            self._refuse(R.REJECTED_SESSION if self.refused else R.TLS_REQUIRED, line)
            return
        if entry is None:  # the enhanced code then follows UNKNOWN, never the client's word
            verb, reply = "UNKNOWN", R.call_hook(self.handler, "UNKNOWN", self.conn.who, text.rstrip(" \t"))
        elif entry[2] and self._too_much_junk():  # (method, of the transaction, junk): see _COMMANDS
            return
        else:
            reply = entry[0](self.transaction if entry[1] else self, arg.strip(" \t"))
        self._answer(reply, verb)
        if self.tls_next or self.forbid_pipelining:
            self._after_reply(verb)

    def _decode(self, line: bytes) -> str | None:
        """A command line that is not plain ASCII, or holds NUL or CR, or ends in a refused bare LF.

        Its text (UTF-8 for MAIL and RCPT only), or None once it is refused.
        """
        if self.reader.bare_lf and self.reject_bare_lf:
            self._refuse(R.BAD_COMMAND_LF, line)
            return None
        if 0 in line or 13 in line:  # NUL, CR
            self._refuse(R.BAD_CHARACTERS, line)
            return None
        if line.isascii():
            return line.decode("ascii")
        verb = line[:5].upper()
        if verb not in (b"MAIL ", b"RCPT "):
            self._refuse(R.BAD_CHARACTERS, line)
            return None
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            self._answer(R.BAD_UTF8)
            return None

    def _too_much_junk(self) -> bool:
        """Count a command that moves no mail; past max_junk_commands answer 421 (and say True)."""
        self.junk += 1
        if self.junk > self.config.max_junk_commands:
            log.info("too many junk commands from %s", self.conn.who)
            self._answer(R.TOO_MANY_JUNK.format(self.hostname))
            return True
        return False

    def _after_reply(self, verb: str) -> None:
        """Once a reply is written: STARTTLS's handshake; a pipelined group that did not end."""
        if self.tls_next:
            self.tls_next = False
            if not self.closing and self._start_tls():
                self.state.forget_greeting()  # RFC 3207 4.2: forget everything said before TLS
                self.transaction.reset()
        if verb in GROUP_ENDERS and verb != "DATA" and self.forbid_pipelining and not self.closing \
                and self.conn.pipelined_early(self.state.auth_user is not None):
            self._answer(R.PIPELINING_ABUSE.format(self.hostname))

    def _refuse(self, reply: R.Reply, line: bytes) -> None:
        """Refuse a command before its verb runs; a BDAT's chunk is still read and dropped.

        Otherwise the chunk's bytes (third-party message content) would be
        taken as commands.  A BDAT whose size cannot be read ends the session.
        """
        if line[:5].upper() == b"BDAT ":
            chunk = bdat_arguments(line[5:].decode("ascii", "replace"))
            if chunk is not None:
                self.transaction.discard(chunk[0])
            else:
                self.closing = True
        self._answer(reply)

    # -- the verbs: each returns its reply --------------------------------------

    def smtp_HELO(self, arg: str) -> R.Answer:
        return self._hello(arg, "HELO")

    def smtp_LHLO(self, arg: str) -> R.Answer:
        """LMTP's greeting (RFC 2033 4.1): EHLO's, with the EHLO hook; an unknown command in SMTP."""
        if not self.lmtp:
            return R.call_hook(self.handler, "UNKNOWN", self.conn.who, f"LHLO {arg}".rstrip())
        return self._hello(arg, "EHLO", "LHLO")

    def _hello(self, arg: str, verb: str = "EHLO", said: str = "") -> R.Answer:
        """HELO, EHLO (or LMTP's LHLO, ``said``): a new start (no transaction); the reply names this server first.

        EHLO's reply gets the engine's extension keywords the handler did not
        list itself; they depend only on the handler's own keyword lines and on
        what is offered now, so they are worked out once per combination.
        Called as it is for EHLO (``smtp_EHLO``); an LMTP server answers HELO and EHLO
        with LMTP_NEEDS_LHLO.
        """
        if self.lmtp and not said:
            return R.LMTP_NEEDS_LHLO
        if not arg:
            if said:
                return R.Reply(501, "5.5.4", f"Syntax: {said} hostname")
            return R.SYNTAX_HELO if verb == "HELO" else R.SYNTAX_EHLO
        if not arg.isprintable():
            return R.HELO_CONTROL  # ESC, BEL, DEL...: the name ends up in Received lines and logs
        state = self.state
        if self.transaction.envelope.sender is not None:  # else no transaction to end (the envelope is new)
            self.transaction.reset()
        handler = self.handler
        cls = type(handler)
        if verb == "EHLO" and cls.EHLO is _BASE_EHLO and cls.client is _BASE_CLIENT \
                and "EHLO" not in handler.__dict__:
            # the base hook's reply (its client is arg, printable: one line), without the call
            state.client, state.esmtp = arg, True
            code, counts, first, own = 250, True, f"{self.hostname} {EHLO_OK % (arg,)}", EHLO_KEYWORDS
        else:
            previous = (state.client, state.esmtp)
            state.client, state.esmtp = arg, verb == "EHLO"
            reply = R.call_hook(handler, verb, self.conn.who, arg)
            if not 200 <= reply.code < 300:
                state.client, state.esmtp = previous
                return reply
            code, lines, counts = reply.code, reply.lines or [""], reply.counts
            lines[0] = f"{self.hostname} {lines[0]}".rstrip()
            if verb != "EHLO":
                return _new_reply(R.HookReply, (code, lines, counts))
            first, own = lines[0], tuple(lines[1:])
        # AUTH is offered (Auth.offered) when the handler has an AUTH hook, nobody has
        # authenticated yet, and inside TLS unless auth_plaintext.
        key = (own, self.config.max_message_size, bool(getattr(handler, "dsn", False)),
               self.tls_context is not None and state.tls is None,
               cls.AUTH is not _BASE_AUTH and state.auth_user is None
               and (state.tls is not None or self.config.auth_plaintext))
        extra = _EXTENSIONS.get(key)
        if extra is None:
            extra = self._extensions(own, *key[2:])
            if len(_EXTENSIONS) < _EXTENSIONS_MAX:
                _EXTENSIONS[key] = extra
        return _new_reply(R.HookReply, (code, [first, *own, *extra], counts))

    smtp_EHLO = _hello  # EHLO: _hello with its defaults, without a method of its own to call first

    def _extensions(self, own: tuple[str, ...], dsn: bool, starttls: bool, auth: bool) -> tuple[str, ...]:
        """The engine's extension keywords the handler did not list itself (``own``: its keyword lines)."""
        have = {line.split(" ", 1)[0].upper() for line in own}
        extensions = [
            "PIPELINING",
            f"SIZE {self.config.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "BINARYMIME",
        ]
        if dsn:
            extensions.append("DSN")
        if starttls:
            extensions.append("STARTTLS")
        if auth:
            extensions.append(AUTH_KEYWORD)
        extensions.append("HELP")
        return tuple([e for e in extensions if e.split(" ", 1)[0] not in have])

    def smtp_STARTTLS(self, arg: str) -> R.Answer:
        """STARTTLS: the hook's 220, then (in _dispatch, once it is written) the handshake."""
        if arg:
            return R.SYNTAX_STARTTLS
        if self.state.tls is not None:
            return R.TLS_ACTIVE
        if self.tls_context is None:
            return R.TLS_UNAVAILABLE
        reply = R.call_hook(self.handler, "STARTTLS", self.conn.who)
        self.tls_next = reply.code == 220
        return reply

    def _start_tls(self) -> bool:
        """The handshake; on failure the session ends without a word (nothing can be said)."""
        facts = self.conn.start_tls(self.tls_context)
        if facts is None:
            self.counts[counters.TLS_FAILED] += 1
            self.end = "tls_failed"
            self.closing = self.quit = True
            return False
        self.counts[counters.TLS_OK] += 1
        self.state.tls = facts
        return True

    def smtp_AUTH(self, arg: str) -> R.Answer:
        auth = self.auth
        if auth is None:
            auth = self.auth = Auth(self.handler, self.state, self.conn, self.config)
        return auth.command(arg, in_transaction=self.transaction.active)

    def smtp_RSET(self, arg: str) -> R.Answer:
        if arg:
            return R.SYNTAX_NOARGS.format("RSET")
        self.transaction.reset()
        reply = self.fixed.get("RSET")
        if reply is None or "RSET" in self.handler.__dict__:
            reply = R.call_hook(self.handler, "RSET", self.conn.who)
        return reply

    def smtp_NOOP(self, arg: str) -> R.Answer:
        reply = self.fixed.get("NOOP")
        if reply is None or "NOOP" in self.handler.__dict__:
            reply = R.call_hook(self.handler, "NOOP", self.conn.who)
        return reply

    def smtp_QUIT(self, arg: str) -> R.Answer:
        if arg:
            return R.SYNTAX_NOARGS.format("QUIT")
        reply = self.fixed.get("QUIT")
        if reply is None or "QUIT" in self.handler.__dict__:
            reply = R.call_hook(self.handler, "QUIT", self.conn.who)
        self.closing = self.quit = True
        return reply

    def smtp_VRFY(self, arg: str) -> R.Answer:
        return R.call_hook(self.handler, "VRFY", self.conn.who, arg) if arg else R.SYNTAX_VRFY

    def smtp_EXPN(self, arg: str) -> R.Answer:
        return R.call_hook(self.handler, "EXPN", self.conn.who, arg) if arg else R.SYNTAX_EXPN

    def smtp_HELP(self, arg: str) -> R.Answer:
        return R.call_hook(self.handler, "HELP", self.conn.who, arg or None)


#: The base handler's EHLO and AUTH hooks and its ``client`` view, for the checks in _hello.
_BASE_EHLO, _BASE_AUTH, _BASE_CLIENT = ESMTPHandler.EHLO, ESMTPHandler.AUTH, ESMTPHandler.client

#: The greeting (a constant reply, framed once) by (the base handler's constant CONNECT reply, hostname); bounded.
_GREETINGS: dict[tuple[R.Reply, str], R.Reply] = {}
_GREETINGS_MAX = 16

#: fixed_replies' own table by handler class: a session looks its class up there without the call.
_FIXED_BY_CLASS = R._FIXED

#: EHLO's extension lines by (the handler's own keyword lines, SIZE, DSN, STARTTLS, AUTH offered);
#: bounded, as a handler may vary its lines.
_EXTENSIONS: dict[tuple[Any, ...], tuple[str, ...]] = {}
_EXTENSIONS_MAX = 64

#: The dispatch table: verb (upper case) -> (its method, whether a method of the session's
#: Transaction rather than of the Session, whether a junk command); the transaction's verbs go
#: to it without a hop.
_COMMANDS: dict[str, tuple[Callable[[Any, str], R.Answer], bool, bool]] = {
    **{name[5:]: (getattr(Session, name), False, name[5:] in JUNK) for name in dir(Session) if name.startswith("smtp_")},
    "MAIL": (Transaction.mail, True, False),
    "RCPT": (Transaction.rcpt, True, False),
    "DATA": (Transaction.data, True, False),
    "BDAT": (Transaction.bdat, True, False),
}
assert JUNK <= _COMMANDS.keys()
#: The verbs the command round calls itself, without _dispatch, by their octets as sent (upper
#: case): (method, of the transaction, verb).  Not the junk commands (_dispatch counts them), nor
#: STARTTLS (its handshake follows the reply, in _after_reply); a verb sent in lower or mixed
#: case, or an unknown one, goes through _dispatch.
_PLAIN_COMMANDS: dict[bytes, tuple[Callable[[Any, str], R.Answer], bool, str]] = {
    verb.encode("ascii"): (method, of_transaction, verb)
    for verb, (method, of_transaction, junk) in _COMMANDS.items() if not junk and verb != "STARTTLS"
}

#: What _answer reads on every reply, from replies and counters, without the module lookups:
#: the engine's framed constant replies, the heads of one-line replies, the counted verbs.
_Reply, _FramedReply, _WIRED, _HEADS, _BY_VERB = R.Reply, R.FramedReply, R.WIRED, R.HEADS, counters.BY_VERB
