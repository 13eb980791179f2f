"""An SMTP and LMTP client on blocking sockets, for handlers that pass mail on.

Unlike ``smtplib`` it streams a message while it arrives (``data_chunk`` per
BODY piece, dot-stuffed on the fly) and hands back every reply as it came, so
a relay can give its client the upstream's own code and text.  Every wait is
bounded by a timeout, and whatever goes wrong with the upstream (refused,
timed out, closed, garbage) raises :class:`UpstreamError` carrying the
transient reply the relay owes its own client.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from typing import NamedTuple

#: Longest reply line we read (RFC 5321 4.5.3.1.5: 512 octets; be generous) and most lines per reply.
MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 200
RECV_SIZE = 65536
#: A reply line: the code, then a space, a hyphen (more lines follow) or nothing at all.
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?")


class Reply(NamedTuple):
    """An upstream reply: its code and its text lines (enhanced codes kept as sent)."""

    code: int
    lines: list[str]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def hook_result(self) -> tuple:
        """The reply as a hook returns it, ``(code, *lines)``: the client gets it unchanged."""
        return (self.code, *self.lines) if self.lines else (self.code, "")

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}"


class UpstreamError(Exception):
    """The upstream cannot be used; ``reply`` is what our client should get instead (4xx)."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.reply = Reply(code, [f"{enhanced} {text}"])
        self.text = text


class DotStuffer:
    """Turns message bytes into the DATA stream (RFC 5321 4.5.2), piece by piece.

    Every line end goes out as CRLF (a bare LF or CR becomes CRLF, so no
    upstream can read a line end we did not mean: the message cannot end early
    or smuggle a second one), and a line that starts with a dot gets a second.
    """

    __slots__ = ("bol", "cr")

    def __init__(self) -> None:
        self.bol = True  # the next octet starts a line
        self.cr = False  # the last piece ended with a CR whose LF may come next

    def stuff(self, data: bytes) -> bytes:
        """The wire bytes for the next piece of the message."""
        if not data:
            return b""
        if self.cr:
            if data[:1] == b"\n":
                data = data[1:]  # the LF of a CRLF split between two pieces: already sent
            self.cr = False
            if not data:
                return b""
        if b"\r" in data or b"\n" in data:
            self.cr = data.endswith(b"\r")
            # CRLF, then bare CR and bare LF, all to CRLF
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if self.bol and data[:1] == b".":
            data = b"." + data
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        self.bol = data.endswith(b"\n")
        return data

    def end(self) -> bytes:
        """The end-of-data line, after a CRLF if the message did not end with one."""
        return b".\r\n" if self.bol else b"\r\n.\r\n"


def parse_address(text: str) -> tuple[str, int] | str:
    """``host:port``, ``[ipv6]:port``, or ``unix:/path`` (returned as the path)."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path")
        return path
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s]+):(\d+)", text)
    if not m:
        raise ValueError(f"expected host:port, [ipv6]:port or unix:/path, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise ValueError(f"port must be 1 to 65535, got {port}")
    return host, port


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and anything outside printable ASCII as +XX."""
    out = []
    for octet in value.encode("utf-8", "surrogateescape"):
        if 33 <= octet <= 126 and octet not in (0x2B, 0x3D):
            out.append(chr(octet))
        else:
            out.append(f"+{octet:02X}")
    return "".join(out)


class SMTPClient:
    """One connection to an SMTP or LMTP server.

    ``address`` is (host, port) or a Unix socket path.  ``timeout`` bounds each
    reply as a whole (an upstream trickling it octet by octet gains nothing) and
    each send; ``data_timeout`` the wait for the reply to end-of-data (all of
    them, for LMTP).  Keep both below what our own client waits for us (RFC 5321
    4.5.3.2), so it never gives up first and sends the message again.

    Replies are taken in turn only: bytes the upstream sent before we asked
    (a reply out of turn, a stray second reply, the 421 of a server that
    closed an idle session) make the next command fail with UpstreamError
    instead of being read as that command's reply.

    ``check_in(seconds)``, when given, is called before every blocking wait
    with its bound (a pre-forked worker's check-in, so the master does not
    take a worker waiting on a slow upstream for a stuck one).
    """

    def __init__(self, address: tuple[str, int] | str, *, timeout: float = 60.0,
                 connect_timeout: float = 30.0, data_timeout: float = 300.0,
                 lmtp: bool = False, name: str = "",
                 check_in: Callable[[float], None] | None = None) -> None:
        self.address = address
        self.check_in = check_in
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.data_timeout = data_timeout
        self.lmtp = lmtp
        self.name = name or (f"unix:{address}" if isinstance(address, str) else f"{address[0]}:{address[1]}")
        self.sock: socket.socket | None = None
        self.buf = b""
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = False
        self.stuffer: DotStuffer | None = None

    # -- connection -------------------------------------------------------------

    def _will_wait(self, seconds: float) -> None:
        if self.check_in is not None:
            self.check_in(seconds)

    def connect(self) -> Reply:
        """Open the connection and read the greeting (any code: the caller judges it)."""
        self._will_wait(self.connect_timeout)
        try:
            if isinstance(self.address, str):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                try:
                    sock.connect(self.address)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self.address, timeout=self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (socket.timeout, TimeoutError):
            raise UpstreamError(451, "4.4.1", f"upstream {self.name} did not answer the connection in time") from None
        except OSError as exc:
            raise UpstreamError(451, "4.4.1", f"cannot connect to upstream {self.name}: "
                                              f"{exc.strerror or exc}") from None
        sock.settimeout(self.timeout)
        self.sock = sock
        return self.read_reply(self.connect_timeout)  # the greeting, within the connect timeout

    def close(self) -> None:
        """Close the connection at once (nothing half-sent is delivered: no end-of-data went out)."""
        sock, self.sock = self.sock, None
        self.buf = b""
        self.stuffer = None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def quit(self) -> None:
        """QUIT politely, then close; errors are ignored (we are leaving anyway)."""
        if self.sock is None:
            return
        try:
            self.send(b"QUIT\r\n")
            self.read_reply(min(self.timeout, 5.0))
        except UpstreamError:
            pass
        self.close()

    # -- reading and writing ------------------------------------------------------

    def _fail(self, what: str, exc: BaseException | None = None) -> UpstreamError:
        self.close()
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return UpstreamError(451, "4.4.2", f"upstream {self.name} timed out {what}")
        detail = f": {exc}" if exc is not None and str(exc) else ""
        return UpstreamError(451, "4.4.2", f"connection to upstream {self.name} lost {what}{detail}")

    def send(self, data: bytes) -> None:
        """Send bytes (a command or a piece of the message), or raise UpstreamError."""
        if self.sock is None:
            raise UpstreamError(451, "4.4.2", f"no connection to upstream {self.name}")
        self._will_wait(self.timeout)
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._fail("while sending", exc) from None

    def _line(self, deadline: float) -> bytes:
        while True:
            i = self.buf.find(b"\n", 0, MAX_REPLY_LINE)
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 1:]
                return line.rstrip(b"\r")
            if len(self.buf) >= MAX_REPLY_LINE:
                raise self._garbage("a reply line too long")
            try:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError()
                self.sock.settimeout(left)
                self._will_wait(left)
                data = self.sock.recv(RECV_SIZE)
            except OSError as exc:
                raise self._fail("waiting for a reply", exc) from None
            if not data:
                raise self._fail("waiting for a reply (closed by the upstream)")
            self.buf += data

    def _expect_quiet(self) -> None:
        """Before a command: the upstream must have said nothing since its last reply.

        Anything it did say (or its close) would be taken for the reply to what
        we send next, and every later reply would be off by one.
        """
        sock = self.sock
        if sock is None:
            raise UpstreamError(451, "4.4.2", f"no connection to upstream {self.name}")
        if not self.buf:
            try:
                readable = select.select([sock], [], [], 0)[0] or (isinstance(sock, ssl.SSLSocket) and sock.pending())
                if not readable:
                    return
                sock.settimeout(0)
                try:
                    data = sock.recv(RECV_SIZE)
                finally:
                    sock.settimeout(self.timeout)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return  # only TLS housekeeping (a session ticket), no reply
            except (OSError, ValueError) as exc:
                raise self._fail("while idle", exc) from None
            if not data:
                raise self._fail("while idle (closed by the upstream)")
            self.buf += data
        raise self._garbage(f"out of turn ({self.buf[:80]!r})")

    def _garbage(self, what: str) -> UpstreamError:
        self.close()
        return UpstreamError(451, "4.3.0", f"upstream {self.name} answered {what}")

    def read_reply(self, timeout: float | None = None, deadline: float | None = None) -> Reply:
        """Read one (possibly multi-line) reply, whole within ``timeout`` (default: ours) or by ``deadline``.

        Anything that is not a reply, or not all of it in time, raises UpstreamError.
        """
        if self.sock is None:
            raise UpstreamError(451, "4.4.2", f"no connection to upstream {self.name}")
        if deadline is None:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            code, lines = None, []
            while True:
                m = _REPLY_LINE.fullmatch(self._line(deadline))
                if m is None or (code is not None and int(m.group(1)) != code):
                    raise self._garbage("something that is not an SMTP reply")
                code = int(m.group(1))
                lines.append((m.group(3) or b"").decode("utf-8", "replace").strip())
                if m.group(2) != b"-":
                    return Reply(code, lines)
                if len(lines) >= MAX_REPLY_LINES:
                    raise self._garbage("a reply with too many lines")
        finally:
            if self.sock is not None:
                self.sock.settimeout(self.timeout)

    def command(self, line: str) -> Reply:
        """Send one command line and read its reply."""
        self._expect_quiet()
        self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return self.read_reply()

    def pipeline(self, lines: list[str]) -> list[Reply]:
        """Send several commands in one write and read their replies in order (RFC 2920)."""
        self._expect_quiet()
        self.send(b"".join(line.encode("utf-8", "surrogateescape") + b"\r\n" for line in lines))
        return [self.read_reply() for _ in lines]

    # -- the conversation -----------------------------------------------------------

    def ehlo(self, name: str) -> Reply:
        """EHLO (LHLO for LMTP), falling back to HELO if refused; records the extensions."""
        reply = self.command(f"{'LHLO' if self.lmtp else 'EHLO'} {name}")
        self.extensions = {}
        if reply.ok:
            self.esmtp = True
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                self.extensions[keyword.upper()] = params.strip()
            return reply
        if self.lmtp or reply.code == 421:
            return reply
        self.esmtp = False
        return self.command(f"HELO {name}")

    def has(self, extension: str) -> bool:
        return extension.upper() in self.extensions

    def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> Reply:
        """STARTTLS and the handshake; returns the 220 (or the refusal, leaving plaintext)."""
        reply = self.command("STARTTLS")
        if reply.code != 220:
            return reply
        self._will_wait(self.timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        except (ssl.SSLError, ssl.CertificateError, OSError) as exc:
            self.close()
            raise UpstreamError(451, "4.7.5" if isinstance(exc, ssl.SSLCertVerificationError) else "4.4.2",
                                f"TLS with upstream {self.name} failed: {getattr(exc, 'reason', None) or exc}") from None
        self.buf = b""  # nothing said before TLS counts after it
        self.tls = True
        self.extensions = {}
        return reply

    def data(self) -> Reply:
        """DATA; after a 354 the message goes out with :meth:`data_chunk` and :meth:`end_data`.

        Any other success reply (a 250 to DATA) is not SMTP: UpstreamError, never a reply to pass on.
        """
        reply = self.command("DATA")
        if reply.code == 354:
            self.stuffer = DotStuffer()
        elif reply.code < 400:
            raise self._garbage(f"DATA with {reply.code} instead of 354")
        return reply

    def data_chunk(self, data: bytes) -> None:
        """Send the next piece of the message, dot-stuffed."""
        self.send(self.stuffer.stuff(data))

    def end_data(self, replies: int = 1) -> list[Reply]:
        """End the message and read the reply to it (LMTP: one per accepted recipient, in order).

        A reply that came before the end (out of turn) fails the message; all
        the replies must come within ``data_timeout``.
        """
        end, self.stuffer = self.stuffer.end(), None
        self._expect_quiet()
        self.send(end)
        deadline = time.monotonic() + self.data_timeout
        return [self.read_reply(deadline=deadline) for _ in range(max(replies, 1))]

    def bdat(self, data: bytes, last: bool = False, replies: int = 1) -> list[Reply]:
        """One BDAT chunk (RFC 3030), sent as it is; the LAST one gets LMTP's per-recipient replies."""
        self._expect_quiet()
        self.send(f"BDAT {len(data)}{' LAST' if last else ''}\r\n".encode() + data)
        count = max(replies, 1) if last else 1
        deadline = time.monotonic() + (self.data_timeout if last else self.timeout)
        return [self.read_reply(deadline=deadline) for _ in range(count)]

    def xforward_commands(self, attributes: dict[str, str | None]) -> list[str]:
        """XFORWARD (Postfix) lines with the attributes the upstream announced, each at most 512 octets."""
        return self._attribute_commands("XFORWARD", attributes)

    def xclient_commands(self, attributes: dict[str, str | None]) -> list[str]:
        """XCLIENT (Postfix) lines; the upstream answers each with a new greeting, so EHLO again after them."""
        return self._attribute_commands("XCLIENT", attributes)

    def _attribute_commands(self, verb: str, attributes: dict[str, str | None]) -> list[str]:
        allowed = set(self.extensions.get(verb, "").upper().split())
        words = [f"{name}={xtext(value) if value else '[UNAVAILABLE]'}"
                 for name, value in attributes.items() if name in allowed]
        commands, current = [], verb
        for word in words:
            if len(current) + 1 + len(word) > 510 and current != verb:
                commands.append(current)
                current = verb
            current += " " + word
        if current != verb:
            commands.append(current)
        return commands
