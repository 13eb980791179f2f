"""The conversation: one method per SMTP verb, state that follows the replies.

A :class:`Session` owns one client socket for its whole life: it greets,
reads command lines, calls the handler's hooks, writes their replies, and
receives messages through :class:`~prefork_esmtp.message.MessageParser`.
Every engine reply comes from :mod:`prefork_esmtp.replies`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

from prefork_esmtp import replies as R
from prefork_esmtp.addresses import AddressError, parse_path_argument
from prefork_esmtp.dotdata import DotDecoder, count_bare_newlines
from prefork_esmtp.message import HeaderTooLong, MessageParser
from prefork_esmtp.reader import ClientGone, LineTooLong, Reader, ReadTimeout
from prefork_esmtp.settings import Config
from prefork_esmtp.writer import ReplyWriter

log = logging.getLogger("prefork_esmtp.session")

#: Seconds and octets a closing session waits for the client to go (lingering close).
LINGER_SECONDS = 1.0
LINGER_OCTETS = 1 << 20


class StopSession(Exception):
    """Raised into a session waiting for a command when the server stops."""


def _peer_tuple(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return (address[0], address[1])
    return None


class Session:
    """One SMTP session over a connected socket."""

    def __init__(self, sock: socket.socket, peer: Any, handler_class: type, config: Config,
                 stopping: Callable[[], bool] = lambda: False,
                 check_in: Callable[[float], None] | None = None) -> None:
        self.sock = sock
        self.config = config
        self.hostname = config.hostname
        self.stopping = stopping
        self.writer = ReplyWriter(sock)
        self.reader = Reader(sock, self.writer, config.timeout, check_in)
        self.errors = 0
        self.closing = False
        self.quit = False
        self.refused = False  # CONNECT answered 554: only QUIT is served
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
        self.handler = handler
        self._reset_transaction()

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve the session until QUIT, disconnect, an error limit, a timeout or EOF."""
        linger = True
        try:
            self._greet()
            while not self.closing:
                if self.stopping():
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
        except ClientGone as exc:
            linger = False
            log.debug("client %s gone: %s", self._who(), exc)
        finally:
            self._close(linger)

    def interrupt_if_idle(self) -> None:
        """From a signal handler: if blocked waiting for a command, end the session now.

        The session then answers 421 and closes.  Anywhere else (mid-command,
        mid-DATA) the session goes on and answers 421 at the next command.
        """
        if self.reader.waiting:
            raise StopSession()

    def _close(self, linger: bool) -> None:
        """Send what is pending, tell the handler, close the socket.

        When we close while the client may still be sending, a plain close
        would reset the connection and could destroy our last reply in
        flight; so we half-close and read what comes for a moment first
        (Apache's lingering close), bounded in time and octets.
        """
        try:
            self.writer.flush()
            self.sock.shutdown(socket.SHUT_WR)
            if linger:
                self.sock.settimeout(LINGER_SECONDS)
                drained = 0
                while drained < LINGER_OCTETS:
                    data = self.sock.recv(65536)
                    if not data:
                        break
                    drained += len(data)
        except OSError:
            pass
        try:
            self.handler.DISCONNECT()
        except Exception:
            log.exception("DISCONNECT hook failed for %s", self._who())
        self.sock.close()

    def _who(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if self.peer else "client"

    # -- replies --------------------------------------------------------------

    def _write(self, code: int, lines: list[str], verb: str) -> None:
        if verb in ("CONNECT", "HELO", "EHLO") or code < 400 and code >= 300:
            enhanced = None
        else:
            enhanced = R.default_enhanced(code, verb)
        self.writer.write(R.format_reply(code, lines, enhanced))

    def _send(self, reply: R.Reply, verb: str = "", count: bool = True) -> None:
        """Send one of the engine's own replies."""
        line = f"{reply.enhanced} {reply.text}" if reply.enhanced else reply.text
        self._write(reply.code, [line], verb)
        self._after_reply(reply.code, count)

    def _after_reply(self, code: int, count: bool = True) -> None:
        """Count errors, honour ``disconnect``; may end the session."""
        if code == 421:
            self.closing = True
            return
        if count and code >= 400:
            self.errors += 1
            if self.errors >= self.config.max_errors:
                log.info("too many errors (%d) from %s", self.errors, self._who())
                self._send(R.TOO_MANY_ERRORS.format(self.hostname), count=False)
                return
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
        failed = R.HOOK_FAILED
        return failed.code, [f"{failed.enhanced} {failed.text}"], True

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
        self._write(code, lines, "CONNECT")
        if self.handler.disconnect:
            self.closing = True

    # -- dispatch -------------------------------------------------------------

    def _dispatch(self, line: bytes) -> None:
        if b"\0" in line or b"\r" in line:
            self._send(R.BAD_CHARACTERS)
            return
        if line.isascii():
            text = line.decode("ascii")
        else:
            verb = line[:5].upper()
            if verb not in (b"MAIL ", b"RCPT "):
                self._send(R.BAD_CHARACTERS)
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
            self._send(R.REJECTED_SESSION)
            return
        method = _COMMANDS.get(verb)
        if method is None:
            self._reply_hook("UNKNOWN", text)
            return
        method(self, arg.strip(" \t"))

    def _no_args(self, verb: str, arg: str) -> bool:
        """Answer 501 and return False if a command that takes no argument got one."""
        if arg:
            self._send(R.SYNTAX_NOARGS.format(verb))
            return False
        return True

    def smtp_HELO(self, arg: str) -> None:
        self._greeting("HELO", arg)

    def smtp_EHLO(self, arg: str) -> None:
        self._greeting("EHLO", arg)

    def _greeting(self, verb: str, arg: str) -> None:
        if not arg:
            self._send(R.SYNTAX_HELO if verb == "HELO" else R.SYNTAX_EHLO, verb)
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

    def _with_extensions(self, lines: list[str]) -> list[str]:
        """Append the engine's extension keywords the handler did not list itself."""
        have = {line.split(" ", 1)[0].upper() for line in lines[1:]}
        extensions = [
            "PIPELINING",
            f"SIZE {self.config.max_message_size}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "HELP",
        ]
        return lines + [e for e in extensions if e.split(" ", 1)[0] not in have]

    def smtp_MAIL(self, arg: str) -> None:
        h = self.handler
        if h.client is None:
            self._send(R.NEED_HELO, "MAIL")
            return
        if h.env_sender is not None:
            self._send(R.NESTED_MAIL, "MAIL")
            return
        try:
            address, params = parse_path_argument(arg, "FROM")
        except AddressError as exc:
            self._send(R.Reply(exc.code, exc.enhanced, exc.text), "MAIL")
            return
        problem = self._check_mail_params(params)
        if problem is None and not arg.isascii() and "SMTPUTF8" not in params:
            problem = R.NON_ASCII_ADDRESS
        if problem is not None:
            self._send(problem, "MAIL")
            return
        h.env_sender, h.mail_params = address, params
        code = self._reply_hook("MAIL", address)
        if not 200 <= code < 300:
            self._reset_transaction()

    def _check_mail_params(self, params: dict[str, str | None]) -> R.Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    return R.BAD_SIZE.format(value)
                if int(value) > self.config.max_message_size:
                    return R.SIZE_EXCEEDED.format(self.config.max_message_size)
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return R.BAD_BODY.format(value)
            elif key == "SMTPUTF8":
                if value is not None:
                    return R.BAD_SMTPUTF8
            else:
                return R.UNSUPPORTED_PARAMETER.format(key)
        return None

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
        if params:
            self._send(R.UNSUPPORTED_PARAMETER.format(next(iter(params))), "RCPT")
            return
        if not arg.isascii() and "SMTPUTF8" not in h.mail_params:
            self._send(R.NON_ASCII_ADDRESS, "RCPT")
            return
        if len(h.env_recipients) >= self.config.max_recipients:
            self._send(R.TOO_MANY_RECIPIENTS, "RCPT", count=False)
            return
        h.rcpt_params = params
        code = self._reply_hook("RCPT", address)
        if 200 <= code < 300:
            h.env_recipients.append(address)
            h.recipients_params.append(params)

    def smtp_DATA(self, arg: str) -> None:
        h = self.handler
        if not self._no_args("DATA", arg):
            return
        if h.client is None:
            self._send(R.NEED_HELO, "DATA")
            return
        if h.env_sender is None:
            self._send(R.NEED_MAIL, "DATA")
            return
        if not h.env_recipients:
            self._send(R.NEED_RCPT, "DATA")
            return
        code = self._reply_hook("DATA")
        if code == 354 and not self.closing:
            self._receive(self.reader.read_data(DotDecoder()), check_newlines=True)

    def _receive(self, pieces: Any, check_newlines: bool) -> None:
        """Feed one message to the handler and answer for it after its last byte.

        Whatever goes wrong (size, a header too long, bare newlines, a hook
        that raises), the rest of the message is read and dropped so the
        session stays in sync, and EOM is not called: no 250 for a message
        the handler did not take.
        """
        h = self.handler
        config = self.config
        parser = MessageParser(h, config.max_header_size)
        reject_bare = check_newlines and config.bare_newline == "reject"
        limit = config.max_message_size
        size = 0
        prev_cr = False
        problem: R.Reply | None = None
        try:
            for piece in pieces:
                if problem is not None:
                    continue
                size += len(piece)
                if size > limit:
                    problem = R.MESSAGE_TOO_BIG
                    continue
                if reject_bare:
                    if count_bare_newlines(piece, prev_cr):
                        problem = R.BARE_NEWLINE
                        continue
                    prev_cr = piece.endswith(b"\r")
                try:
                    parser.feed(piece)
                except HeaderTooLong:
                    problem = R.HEADER_TOO_BIG
                except Exception:
                    log.exception("message hook raised (client %s)", self._who())
                    problem = R.HOOK_FAILED
            if problem is None:
                if reject_bare and prev_cr:
                    problem = R.BARE_NEWLINE
                else:
                    try:
                        parser.finish()
                    except Exception:
                        log.exception("message hook raised (client %s)", self._who())
                        problem = R.HOOK_FAILED
        finally:
            h.chunkmode = False
        if problem is not None:
            log.info("message from %s refused: %d %s", self._who(), problem.code, problem.text)
            self._reset_transaction()
            self._send(problem, "EOM", count=problem is not R.HOOK_FAILED)
            return
        code = self._reply_hook("EOM")
        log.info("message from=<%s> nrcpt=%d size=%d peer=%s: %d",
                 h.env_sender, len(h.env_recipients), size, self._who(), code)
        self._reset_transaction()

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
