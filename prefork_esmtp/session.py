"""The conversation: one method per SMTP verb, state that follows the replies.

A :class:`Session` owns one client socket for its whole life: it greets,
reads command lines, calls the handler's hooks, writes their replies, and
takes messages in through :class:`~prefork_esmtp.intake.MessageIntake` (DATA
and BDAT alike).  Every engine reply comes from :mod:`prefork_esmtp.replies`.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from prefork_esmtp import params as P
from prefork_esmtp import replies as R
from prefork_esmtp import sasl, tls
from prefork_esmtp.addresses import AddressError, parse_path_argument
from prefork_esmtp.dotdata import DotDecoder
from prefork_esmtp.handler import ESMTPHandler
from prefork_esmtp.intake import MessageIntake
from prefork_esmtp.reader import (CommandTooSlow, DataTooSlow, LineTooLong, Reader, ReadTimeout,
                                  SessionTooLong, StopSession)
from prefork_esmtp.reporter import NO_REPORTER, Reporter
from prefork_esmtp.settings import Config
from prefork_esmtp.writer import ClientGone, ReplyWriter

log = logging.getLogger("prefork_esmtp.session")

#: A closing session reads what the client still sends for at most this long in all
#: (Apache: 2 s), each read waiting at most LINGER_READ_SECONDS, and at most this many octets.
LINGER_SECONDS = 2.0
LINGER_READ_SECONDS = 1.0
LINGER_OCTETS = 1 << 20
#: RFC 4954: an AUTH line (command or response) may be 12288 octets long.
AUTH_LINE_LIMIT = 12288
#: Commands that must end a pipelined group (RFC 2920 3.1), so a client must wait after them.
GROUP_ENDERS = frozenset({"EHLO", "HELO", "DATA", "VRFY", "EXPN", "QUIT", "NOOP", "STARTTLS", "AUTH"})
#: Commands that move no mail (Postfix's junk commands).
JUNK = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
#: What require_tls still allows before TLS.
BEFORE_TLS = frozenset({"EHLO", "NOOP", "STARTTLS", "QUIT"})


class AuthCancelled(Exception):
    """The client answered an AUTH challenge with ``*``."""


def _bdat_arguments(arg: str) -> tuple[int, bool] | None:
    """``size [LAST]`` of a BDAT command as (size, last), or None when malformed."""
    parts = arg.split()
    if not 1 <= len(parts) <= 2 or not (parts[0].isascii() and parts[0].isdigit()) \
            or len(parts[0]) > 18 or (len(parts) == 2 and parts[1].upper() != "LAST"):
        return None
    return int(parts[0]), len(parts) == 2


def _peer_tuple(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return (address[0], address[1])
    return None


class Session:
    """One SMTP session over a connected socket.

    ``tls_context`` enables STARTTLS (and is used at once when ``implicit_tls``);
    ``reporter`` gets the check-ins and counts this IP's sessions across all workers.
    """

    def __init__(self, sock: socket.socket, peer: Any, handler_class: type, config: Config,
                 stopping: Callable[[], bool] = lambda: False, reporter: Reporter = NO_REPORTER, *,
                 tls_context: ssl.SSLContext | None = None, implicit_tls: bool = False) -> None:
        self.sock = sock
        self.config = config
        self.hostname = config.hostname
        self.stopping = stopping
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.ip_sessions = reporter.sessions_from
        self.writer = ReplyWriter(sock)
        self.reader = Reader(sock, self.writer, config.timeout, reporter.check_in)
        self.reader.stop_check = self._stop_now
        self.reader.command_deadline = config.command_deadline
        self.reader.limit_session(config.max_session_time)
        self.errors = 0
        self.junk = 0
        self.closing = False
        self.quit = False
        self.refused = False  # CONNECT answered 554: only QUIT is served
        self.intake: MessageIntake | None = None  # a BDAT message under way
        self.peer = _peer_tuple(peer)
        try:
            local = sock.getsockname()
        except OSError:
            local = None
        handler = handler_class()
        handler.input_handle = self.reader
        handler.output_handle = self.writer
        handler.peer = self.peer
        handler.local = _peer_tuple(local)
        handler.hostname = self.hostname
        handler.client = None
        handler.esmtp = False
        handler.disconnect = False
        handler.chunkmode = False
        handler.tls = None
        handler.auth_user = None
        handler.auth_mechanism = None
        self.handler = handler
        self._reset_transaction()

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve the session until QUIT, disconnect, an error limit, a timeout or EOF."""
        linger = True
        try:
            if self._open():
                self._greet()
            while not self.closing:
                if self._stop_now():
                    self._send(R.SHUTTING_DOWN.format(self.hostname), count=False)
                    break
                try:
                    self.reader.interruptible = True
                    try:
                        line = self.reader.readline(self.config.max_line_length)
                    finally:
                        self.reader.interruptible = False
                except LineTooLong:
                    self._send(R.LINE_TOO_LONG)
                else:
                    self._dispatch(line)
            linger = not self.quit
        except StopSession:
            self._send(R.SHUTTING_DOWN.format(self.hostname), count=False)
        except ReadTimeout:
            log.info("timeout after %.0fs from %s", self.config.timeout, self._who())
            self._send(R.TIMEOUT.format(self.hostname), count=False)
        except DataTooSlow:
            log.info("data rate below %d octets/s from %s", self.config.min_data_rate, self._who())
            self._send(R.DATA_TOO_SLOW.format(self.hostname), count=False)
        except CommandTooSlow:
            log.info("command line not complete within %.0fs from %s", self.config.command_deadline, self._who())
            self._send(R.COMMAND_TOO_SLOW.format(self.hostname), count=False)
        except SessionTooLong:
            log.info("session time limit (%.0fs) reached for %s", self.config.max_session_time, self._who())
            self._send(R.SESSION_TOO_LONG.format(self.hostname), count=False)
        except ClientGone as exc:
            linger = False
            log.debug("client %s gone: %s", self._who(), exc)
        finally:
            self._close(linger)

    def interrupt_if_idle(self) -> None:
        """From a signal handler: if blocked waiting for a command, end the session now.

        The session then answers 421 and closes.  Anywhere else (mid-command,
        inside a transaction) the session goes on and answers 421 at the first
        command after the transaction.
        """
        if self.reader.waiting and self._stop_now():
            raise StopSession()

    def _stop_now(self) -> bool:
        """The server is stopping and no transaction is open: end with 421."""
        return self.stopping() and self.handler.env_sender is None

    def _close(self, linger: bool) -> None:
        """Send what is pending, tell the handler, close the socket.

        When we close while the client may still be sending, a plain close
        would reset the connection and could destroy our last reply in
        flight; so we half-close and read what comes for a moment first
        (Apache's lingering close), bounded in time and octets.
        """
        try:
            self.writer.flush()
            if isinstance(self.sock, ssl.SSLSocket):
                self._tls_close_notify()
            self.sock.shutdown(socket.SHUT_WR)
            if linger:
                deadline = time.monotonic() + LINGER_SECONDS
                drained = 0
                while drained < LINGER_OCTETS:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break  # a client dripping bytes must not hold the worker
                    self.sock.settimeout(min(left, LINGER_READ_SECONDS))
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    drained += len(data)
        except (OSError, ValueError, ClientGone):
            pass
        try:
            self.handler.DISCONNECT()
        except Exception:
            log.exception("DISCONNECT hook failed for %s", self._who())
        self.sock.close()

    def _tls_close_notify(self) -> None:
        """Send TLS close_notify before the FIN, without waiting for the client's.

        Without it a client cannot tell our close from a truncation (OpenSSL 3
        reports "unexpected eof"); waiting for the client's close_notify could block.
        """
        try:
            self.sock.setblocking(False)
            self.sock.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass  # SSLWantReadError: ours is sent, the client's has not come

    def _who(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else "client"

    # -- replies --------------------------------------------------------------

    def _write(self, code: int, lines: list[str], verb: str) -> None:
        if verb in ("CONNECT", "HELO", "EHLO") or 300 <= code < 400:
            enhanced = None
        else:
            enhanced = R.default_enhanced(code, verb)
        self.writer.write(R.format_reply(code, lines, enhanced))

    def _send(self, reply: R.Reply, verb: str = "", count: bool = True) -> None:
        """Send one of the engine's own replies."""
        self._write(reply.code, [reply.line], verb)
        self._after_reply(reply.code, count)

    def _after_reply(self, code: int, count: bool = True) -> None:
        """Count errors (sleeping past the soft limit), honour ``disconnect``; may end the session."""
        if code == 421:
            self.closing = True
            return
        if count and code >= 400:
            self.errors += 1
            if self.errors >= self.config.max_errors:
                log.info("too many errors (%d) from %s", self.errors, self._who())
                self._send(R.TOO_MANY_ERRORS.format(self.hostname), count=False)
                return
            if self.errors > self.config.soft_error_limit and self.config.error_sleep:
                time.sleep(self.config.error_sleep)  # the reply is still queued: it goes out late
        if self.handler.disconnect:
            self.closing = True

    def _call(self, hook: str, *args: Any) -> tuple[int, list[str], bool]:
        """Call a reply hook: (code, lines, failed).

        A hook that raises, or returns something that is not a reply, gets
        451 4.3.0 (transient: the client retries, nothing is lost); the
        traceback is logged and the session goes on.
        """
        try:
            return (*R.normalize(getattr(self.handler, hook)(*args)), False)
        except R.BadHookResult as exc:
            log.error("%s hook returned a bad reply: %s", hook, exc)
        except Exception:
            log.exception("%s hook raised (client %s)", hook, self._who())
        return R.HOOK_FAILED.code, [R.HOOK_FAILED.line], True

    def _reply_hook(self, hook: str, *args: Any) -> int:
        """Call a hook, send its reply, return its code.

        A failure of ours (451 from a raising hook) does not count against
        the client's error limit.
        """
        code, lines, failed = self._call(hook, *args)
        self._write(code, lines, hook)
        self._after_reply(code, count=not failed)
        return code

    # -- state ----------------------------------------------------------------

    def _reset_transaction(self) -> None:
        h = self.handler
        h.env_sender = None
        h.env_recipients = []
        h.mail_params = {}
        h.rcpt_params = {}
        h.recipients_params = []
        self.intake = None

    def _open(self) -> bool:
        """Before the greeting: implicit TLS, the per-IP limit (a client that talks first: _greet)."""
        if self.implicit_tls and not self._start_tls():
            return False
        if self.ip_sessions is not None and self.config.max_sessions_per_ip and self.peer:
            if self.ip_sessions(self.peer[0]) > self.config.max_sessions_per_ip:
                log.info("too many sessions from %s", self.peer[0])
                self._send(R.TOO_MANY_FROM_IP.format(self.hostname), count=False)
                return False
        return True

    def _client_spoke(self) -> bool:
        """Whether the client has sent anything we have not read (without waiting)."""
        if self.reader.pending():
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def _greet(self) -> None:
        code, lines, failed = self._call("CONNECT")
        if failed:
            code = 421
        lines = lines or [""]
        lines[0] = f"{self.hostname} {lines[0]}".rstrip()
        if 400 <= code < 500:
            code, self.closing = 421, True
        elif code >= 500:
            code, self.refused = 554, True
        elif self.config.forbid_unauth_pipelining and self._client_spoke():
            # checked as late as possible: the whole wait for the greeting (CONNECT included) counts
            log.info("%s talked before the greeting", self._who())
            self._send(R.PIPELINING_ABUSE.format(self.hostname), count=False)
            self.closing = True
            return
        self._write(code, lines, "CONNECT")
        if self.handler.disconnect:
            self.closing = True

    # -- dispatch -------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        if self.reader.bare_lf and self.config.command_bare_lf == "reject":
            self._refuse(R.BAD_COMMAND_LF, line)
            return
        if b"\0" in line or b"\r" in line:
            self._refuse(R.BAD_CHARACTERS, line)
            return
        if line.isascii():
            text = line.decode("ascii")
        else:
            verb = line[:5].upper()
            if verb not in (b"MAIL ", b"RCPT "):
                self._refuse(R.BAD_CHARACTERS, line)
                return
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                self._send(R.BAD_UTF8)
                return
        text = text.rstrip(" \t")
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if self.refused and verb != "QUIT":
            self._refuse(R.REJECTED_SESSION, line)
            return
        if self.config.require_tls and self.handler.tls is None and verb not in BEFORE_TLS:
            self._refuse(R.TLS_REQUIRED, line)
            return
        if verb in JUNK:
            self.junk += 1
            if self.junk > self.config.max_junk_commands:
                log.info("too many junk commands from %s", self._who())
                self._send(R.TOO_MANY_JUNK.format(self.hostname), count=False)
                return
        method = _COMMANDS.get(verb)
        if method is None:
            self._reply_hook("UNKNOWN", text)
        else:
            method(self, arg.strip(" \t"))
        if verb in GROUP_ENDERS and verb != "DATA":
            self._check_pipelining()

    def _refuse(self, reply: R.Reply, line: bytes) -> None:
        """Refuse a command before its verb runs; a BDAT's chunk is still read and dropped.

        Otherwise the chunk's bytes (third-party message content) would be
        taken as commands.  A BDAT whose size cannot be read ends the session.
        """
        if line[:5].upper() == b"BDAT ":
            chunk = _bdat_arguments(line[5:].decode("ascii", "replace"))
            if chunk is not None:
                self._discard(chunk[0])
            else:
                self.closing = True
        self._send(reply, line[:4].decode("ascii", "replace").upper())

    def _check_pipelining(self) -> bool:
        """With forbid_unauth_pipelining: a client that did not wait for our reply is cut off."""
        if (self.config.forbid_unauth_pipelining and not self.closing and self.handler.auth_user is None
                and self.reader.pending()):
            log.info("%s pipelined past a command that ends a group", self._who())
            self._send(R.PIPELINING_ABUSE.format(self.hostname), count=False)
            self.closing = True
            return True
        return False

    def _no_args(self, verb: str, arg: str) -> bool:
        """Answer 501 and return False if a command that takes no argument got one."""
        if arg:
            self._send(R.SYNTAX_NOARGS.format(verb))
            return False
        return True

    # -- HELO, EHLO, STARTTLS, AUTH ---------------------------------------------

    def smtp_HELO(self, arg: str) -> None:
        self._greeting("HELO", arg)

    def smtp_EHLO(self, arg: str) -> None:
        self._greeting("EHLO", arg)

    def _greeting(self, verb: str, arg: str) -> None:
        if not arg:
            self._send(R.SYNTAX_HELO if verb == "HELO" else R.SYNTAX_EHLO, verb)
            return
        if not arg.isprintable():
            # ESC, BEL, DEL...: the name ends up in Received lines and logs
            self._send(R.HELO_CONTROL, verb)
            return
        h = self.handler
        previous = (h.client, h.esmtp)
        self._reset_transaction()
        h.client, h.esmtp = arg, verb == "EHLO"
        code, lines, failed = self._call(verb, arg)
        if 200 <= code < 300:
            lines = lines or [""]
            lines[0] = f"{self.hostname} {lines[0]}".rstrip()
            if verb == "EHLO":
                lines = self._with_extensions(lines)
        else:
            h.client, h.esmtp = previous
        self._write(code, lines, verb)
        self._after_reply(code, count=not failed)

    def _auth_enabled(self) -> bool:
        return type(self.handler).AUTH is not ESMTPHandler.AUTH

    def _with_extensions(self, lines: list[str]) -> list[str]:
        """Append the engine's extension keywords the handler did not list itself."""
        have = {line.split(" ", 1)[0].upper() for line in lines[1:]}
        extensions = [
            "PIPELINING",
            f"SIZE {self.config.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
            "BINARYMIME",
        ]
        if getattr(self.handler, "dsn", False):
            extensions.append("DSN")
        if self.tls_context is not None and self.handler.tls is None:
            extensions.append("STARTTLS")
        if self._auth_enabled() and self.handler.auth_user is None and (
                self.handler.tls is not None or self.config.auth_plaintext):
            extensions.append("AUTH " + " ".join(sasl.MECHANISMS))
        extensions.append("HELP")
        return lines + [e for e in extensions if e.split(" ", 1)[0] not in have]

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self._send(R.SYNTAX_STARTTLS, "STARTTLS")
        elif self.handler.tls is not None:
            self._send(R.TLS_ACTIVE, "STARTTLS")
        elif self.tls_context is None:
            self._send(R.TLS_UNAVAILABLE, "STARTTLS")
        elif self._reply_hook("STARTTLS") == 220 and not self.closing:
            self.writer.flush()
            if not self._start_tls():
                return
            h = self.handler  # RFC 3207 4.2: forget everything said before TLS
            h.client, h.esmtp = None, False
            h.auth_user = h.auth_mechanism = None
            self._reset_transaction()

    def _start_tls(self) -> bool:
        """Handshake (bounded by tls_handshake_timeout); on failure the session ends."""
        try:
            self.sock.settimeout(self.config.tls_handshake_timeout)
            wrapped = self.tls_context.wrap_socket(self.sock, server_side=True,
                                                   do_handshake_on_connect=False)
            # The plain socket is detached now: from here on, closing means closing this one.
            self.sock = self.writer.sock = wrapped
            wrapped.do_handshake()
        except (ssl.SSLError, OSError, ValueError) as exc:
            log.info("TLS handshake with %s failed: %s", self._who(), exc)
            self.closing = True
            self.quit = True  # nothing left to say: close without lingering
            return False
        self.reader.replace_socket(wrapped)
        self.handler.tls = tls.facts(wrapped)
        log.debug("TLS %s %s with %s", self.handler.tls["version"], self.handler.tls["cipher"], self._who())
        return True

    def smtp_AUTH(self, arg: str) -> None:
        h = self.handler
        if not self._auth_enabled():
            self._send(R.AUTH_NOT_ENABLED, "AUTH")
            return
        if h.tls is None and not self.config.auth_plaintext:
            self._send(R.AUTH_NEEDS_TLS, "AUTH")
            return
        if h.client is None:
            self._send(R.NEED_HELO, "AUTH")
            return
        if h.auth_user is not None:
            self._send(R.AUTH_TWICE, "AUTH")
            return
        if h.env_sender is not None:
            self._send(R.AUTH_IN_TRANSACTION, "AUTH")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if not mechanism:
            self._send(R.SYNTAX_AUTH, "AUTH")
            return
        if mechanism not in sasl.MECHANISMS:
            self._send(R.AUTH_MECHANISM, "AUTH")
            return
        try:
            if mechanism == "PLAIN":
                response = initial or self._challenge("")
                credentials = sasl.parse_plain(sasl.b64decode(response))
            else:
                username = sasl.b64decode(initial or self._challenge(sasl.LOGIN_USERNAME))
                password = sasl.b64decode(self._challenge(sasl.LOGIN_PASSWORD))
                credentials = sasl.parse_login(username, password)
        except AuthCancelled:
            self._send(R.AUTH_CANCELLED, "AUTH")
            return
        except sasl.SASLError as exc:
            self._send(R.AUTH_BAD_RESPONSE.format(exc), "AUTH")
            return
        self._check_credentials(credentials)

    def _challenge(self, text: str) -> str:
        """Send ``334 text`` and return the client's response line (never logged)."""
        self.writer.write(f"334 {text}\r\n".encode())
        try:
            line = self.reader.readline(AUTH_LINE_LIMIT)
        except LineTooLong:
            raise sasl.SASLError("response too long") from None
        if line.strip() == b"*":
            raise AuthCancelled()
        try:
            return line.decode("ascii").strip()
        except UnicodeDecodeError:
            raise sasl.SASLError("response is not base64") from None

    def _check_credentials(self, c: sasl.Credentials) -> None:
        try:
            result = self.handler.AUTH(c.mechanism, c.username, c.password, c.authzid)
        except Exception:
            log.exception("AUTH hook raised (client %s)", self._who())
            self._send(R.AUTH_TEMPFAIL, "AUTH", count=False)
            return
        if result is True:
            code, lines = R.AUTH_OK.code, [R.AUTH_OK.line]
        elif result is False or result is None:
            code, lines = R.AUTH_FAILED.code, [R.AUTH_FAILED.line]
        else:
            try:
                code, lines = R.normalize(result)
            except R.BadHookResult as exc:
                log.error("AUTH hook returned a bad reply: %s", exc)
                self._send(R.AUTH_TEMPFAIL, "AUTH", count=False)
                return
        if 200 <= code < 300:
            self.handler.auth_user, self.handler.auth_mechanism = c.username, c.mechanism
            log.info("authenticated %s as %r (%s)", self._who(), c.username, c.mechanism)
        else:
            log.info("authentication failed for %r from %s", c.username, self._who())
        self._write(code, lines, "AUTH")
        self._after_reply(code)

    # -- the transaction --------------------------------------------------------

    def smtp_MAIL(self, arg: str) -> None:
        h = self.handler
        if h.client is None:
            self._send(R.NEED_HELO, "MAIL")
            return
        if self.config.require_auth and h.auth_user is None:
            self._send(R.AUTH_REQUIRED, "MAIL")
            return
        if h.env_sender is not None:
            self._send(R.NESTED_MAIL, "MAIL")
            return
        try:
            address, params = parse_path_argument(arg, "FROM")
        except AddressError as exc:
            self._send(R.Reply(exc.code, exc.enhanced, exc.text), "MAIL")
            return
        problem = P.check_mail(params, self.config.max_message_size, bdat_offered=True)
        if problem is None and not arg.isascii() and "SMTPUTF8" not in params:
            problem = R.NON_ASCII_ADDRESS
        if problem is not None:
            self._send(problem, "MAIL")
            return
        h.env_sender, h.mail_params = address, params
        code = self._reply_hook("MAIL", address)
        if not 200 <= code < 300:
            self._reset_transaction()

    def smtp_RCPT(self, arg: str) -> None:
        h = self.handler
        if h.client is None:
            self._send(R.NEED_HELO, "RCPT")
            return
        if h.env_sender is None:
            self._send(R.NEED_MAIL, "RCPT")
            return
        try:
            address, params = parse_path_argument(arg, "TO")
        except AddressError as exc:
            self._send(R.Reply(exc.code, exc.enhanced, exc.text), "RCPT")
            return
        problem = P.check_rcpt(params)
        if problem is None and not arg.isascii() and "SMTPUTF8" not in h.mail_params:
            problem = R.NON_ASCII_ADDRESS
        if problem is not None:
            self._send(problem, "RCPT")
            return
        if len(h.env_recipients) >= self.config.max_recipients:
            self._send(R.TOO_MANY_RECIPIENTS, "RCPT", count=False)
            return
        h.rcpt_params = params
        code = self._reply_hook("RCPT", address)
        if 200 <= code < 300:
            h.env_recipients.append(address)
            h.recipients_params.append(params)

    def _transaction_problem(self) -> R.Reply | None:
        """Why DATA or BDAT cannot start a message now, or None."""
        h = self.handler
        if h.client is None:
            return R.NEED_HELO
        if h.env_sender is None:
            return R.NEED_MAIL
        if not h.env_recipients:
            return R.NEED_RCPT
        return None

    def _new_intake(self, check_newlines: bool) -> MessageIntake:
        config = self.config
        return MessageIntake(self.handler, config.max_message_size, config.max_header_size,
                             check_newlines and config.bare_newline == "reject", self._who(),
                             config.max_header_lines, config.bare_newline == "keep")

    def smtp_DATA(self, arg: str) -> None:
        if not self._no_args("DATA", arg):
            return
        problem = self._transaction_problem()
        if problem is None and self.intake is not None:  # BDAT chunks already came
            problem = R.DATA_AFTER_BDAT
        if problem is None and (self.handler.mail_params.get("BODY") or "").upper() == "BINARYMIME":
            problem = R.BINARYMIME_NEEDS_BDAT
        if problem is not None:
            self._send(problem, "DATA")
            return
        code = self._reply_hook("DATA")
        if code != 354 or self.closing or self._check_pipelining():
            return
        intake = self._new_intake(check_newlines=True)
        self.reader.start_rate(self.config.min_data_rate, self.config.min_data_rate_grace)
        try:
            for piece in self.reader.read_data(DotDecoder()):
                intake.feed(piece)
        finally:
            self.reader.stop_rate()
        self._end_message(intake)

    def smtp_BDAT(self, arg: str) -> None:
        chunk = _bdat_arguments(arg)
        if chunk is None:
            self._send(R.SYNTAX_BDAT, "BDAT")
            self.closing = True  # the chunk's size is unknown: we cannot stay in sync
            return
        size, last = chunk
        problem = None
        if self.intake is None:
            problem = self._transaction_problem()
            if problem is None:
                code, lines, failed = self._call("DATA")
                if code != 354:
                    self._discard(size)
                    self._write(code if code >= 400 else 554, lines, "BDAT")
                    self._after_reply(code, count=not failed)
                    return
                self.intake = self._new_intake(check_newlines=False)
        if problem is not None:
            self._discard(size)
            self._send(problem, "BDAT")
            return
        intake = self.intake
        self.reader.start_rate(self.config.min_data_rate, self.config.min_data_rate_grace)
        try:
            for piece in self.reader.read_exact(size):
                intake.feed(piece)
        finally:
            self.reader.stop_rate()
        if last or intake.problem is not None:
            # After a failed chunk (RFC 3030 4.2) the transaction is over: later chunks get 503.
            self._end_message(intake)
        else:
            self._send(R.CHUNK_OK.format(size), "BDAT")

    def _discard(self, size: int) -> None:
        """Read and drop a BDAT chunk we refuse, so the session stays in sync."""
        for _ in self.reader.read_exact(size):
            pass

    def _end_message(self, intake: MessageIntake) -> None:
        """Answer for a complete message: the problem's reply, or EOM's."""
        h = self.handler
        problem = intake.finish()
        h.chunkmode = False
        if problem is not None:
            log.info("message from %s refused: %d %s", self._who(), problem.code, problem.text)
            self._reset_transaction()
            self._send(problem, "EOM", count=problem is not R.HOOK_FAILED)
            return
        code = self._reply_hook("EOM")
        log.info("message from=<%s> nrcpt=%d size=%d peer=%s: %d",
                 h.env_sender, len(h.env_recipients), intake.size, self._who(), code)
        self._reset_transaction()

    # -- the rest ---------------------------------------------------------------

    def smtp_RSET(self, arg: str) -> None:
        if self._no_args("RSET", arg):
            self._reset_transaction()
            self._reply_hook("RSET")

    def smtp_NOOP(self, arg: str) -> None:
        self._reply_hook("NOOP")

    def smtp_QUIT(self, arg: str) -> None:
        if self._no_args("QUIT", arg):
            self._reply_hook("QUIT")
            self.closing = self.quit = True

    def smtp_VRFY(self, arg: str) -> None:
        if not arg:
            self._send(R.SYNTAX_VRFY, "VRFY")
        else:
            self._reply_hook("VRFY", arg)

    def smtp_EXPN(self, arg: str) -> None:
        if not arg:
            self._send(R.SYNTAX_EXPN, "EXPN")
        else:
            self._reply_hook("EXPN", arg)

    def smtp_HELP(self, arg: str) -> None:
        self._reply_hook("HELP", arg or None)


_COMMANDS: dict[str, Callable[[Session, str], None]] = {
    name[5:]: getattr(Session, name) for name in dir(Session) if name.startswith("smtp_")
}
