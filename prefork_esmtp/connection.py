"""The one client socket: bytes in through the Reader, replies out through the ReplyWriter.

A :class:`Connection` holds the socket for the whole session, so STARTTLS
swaps it in one place.  The :class:`~prefork_esmtp.reader.Reader` and the
:class:`~prefork_esmtp.writer.ReplyWriter` use the connection as their socket;
before every blocking read it sends the replies queued so far (so the replies
to pipelined commands leave in one send, RFC 2920 3.2) and tells the master how
long it may block.  It also ends the connection well: TLS close_notify, then
Apache's lingering close.

A plain socket stays blocking and its read timeout lives in the kernel
(``SO_RCVTIMEO``): a Python socket timeout would cost a ``poll()`` before every
``recv`` and ``send``.  A timed-out read raises ``BlockingIOError``, which the
reader takes as a timeout; a signal still interrupts the read (EINTR runs the
handler, which may raise).  In a pre-forked worker the first read's timeout
comes with the socket: the master gives each listener the one a session sets
first, and only ever lowers it (:func:`~prefork_esmtp.listeners.lower_read_timeout`),
so the reader need not set it.  Replies go out with one non-blocking ``send``; only
when the client's window is full does the rest go out under a Python timeout
(the whole send within the idle timeout, as before).  A TLS socket keeps Python
timeouts: OpenSSL retries a read the kernel timed out, so ``SO_RCVTIMEO`` would
never end it.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from prefork_esmtp import proxy, tls
from prefork_esmtp.reader import Reader, first_read_timeout
from prefork_esmtp.settings import Config
from prefork_esmtp.writer import ClientGone, ReplyWriter

log = logging.getLogger("prefork_esmtp.session")

#: A closing session reads what the client still sends for at most this long in all
#: (Apache: 2 s), each read waiting at most LINGER_READ_SECONDS, and at most this many octets.
LINGER_SECONDS = 2.0
LINGER_READ_SECONDS = 1.0
LINGER_OCTETS = 1 << 20

_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO
_MAX_KERNEL_TIMEOUT = 1e9  # seconds: more would overflow; nobody waits 30 years
_MSG_DONTWAIT = socket.MSG_DONTWAIT


def _timeval(seconds: float) -> bytes:
    """``seconds`` as a struct timeval, at least 1 µs (0 would mean: no timeout at all)."""
    micro = max(1, int(min(seconds, _MAX_KERNEL_TIMEOUT) * 1e6))
    return _TIMEVAL.pack(micro // 1_000_000, micro % 1_000_000)


#: Timevals already packed, by seconds: a session sets the same few (the idle timeout,
#: whole seconds of a shorter deadline) again and again.  Bounded: only so many are kept.
_TIMEVALS: dict[float, bytes] = {}
_TIMEVALS_KEPT = 64


def listener_read_timeout(config: Config) -> float:
    """The read timeout a connection's reader gives its socket first, under ``config``.

    A listener set to at most this (see :func:`prefork_esmtp.listeners.lower_read_timeout`)
    hands it to the connections it accepts: one ``setsockopt`` fewer per session.
    """
    return first_read_timeout(config.timeout, config.min_data_rate_grace if config.min_data_rate > 0 else None)


class StopSession(Exception):
    """The server is stopping and the session, idle between transactions, ends now (421)."""


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return (address[0], address[1])
    return None


class Connection:
    """One accepted client socket and its reader and reply writer.

    ``check_in(seconds)`` is called before each wait for the client (a read, a
    send that may block, the PROXY header, the TLS handshake) with the longest
    it may block (so the master can tell a worker waiting on a slow client from
    a stuck one); ``stopping()`` says whether the server is stopping; ``local``
    is our address when the caller knows it (None: ``getsockname()``);
    ``read_timeout``: the socket's ``SO_RCVTIMEO`` is known to be at most this
    (inherited from the listener), None when unknown.
    """

    #: set by the session while it waits for a command outside a transaction: a stop
    #: may then end the session at once; ``waiting`` is true only inside such a recv().
    interruptible = False
    waiting = False

    def __init__(self, sock: socket.socket, peer: Any, config: Config,
                 check_in: Callable[[float], None] | None = None,
                 stopping: Callable[[], bool] = lambda: False, local: Any = None, *,
                 read_timeout: float | None = None) -> None:
        self.sock = sock
        self.config = config
        self.check_in = check_in
        self.stopping = stopping
        # (host, port) of an address tuple (an IPv6 one has four fields), else None
        self.peer = peer if type(peer) is tuple and len(peer) == 2 else _address(peer)
        #: the socket is blocking and its read timeout is the kernel's (False once TLS is on); an
        #: instance attribute, not a class default: the command round reads it every time
        self.kernel_timeouts = True
        if sock.gettimeout() is not None:
            sock.setblocking(True)
        # Ours: the listener's when it is bound to one address, else the socket's; behind a PROXY
        # header the header's, and the socket is asked only when the header names none (take_proxy_header).
        if local is None and not config.proxy_protocol:
            local = self._own_address()
        #: our address as the client sees it (None until the PROXY header, when it is on and the listener does not say)
        self.local = local if type(local) is tuple and len(local) == 2 else _address(local)
        #: the client, as logs name it
        self.who = f"{self.peer[0]}:{self.peer[1]}" if self.peer else "client"
        self.writer = ReplyWriter(self)
        self.pending = self.writer.pending  # the replies queued (recv sends them)
        self.timeout = config.timeout
        self.reader = Reader(self, config.timeout,  # DATA's rate needs its grace as a timeout at once
                             config.min_data_rate_grace if config.min_data_rate > 0 else None,
                             config.command_deadline, config.max_session_time, read_timeout)

    def _own_address(self) -> tuple[str, int] | None:
        try:
            return _address(self.sock.getsockname())
        except OSError:
            return None

    def _know_local(self) -> None:
        """No address from a PROXY header: ours is the listener's, or else the socket's."""
        if self.local is None:
            self.local = self._own_address()

    # -- the socket, as the reader and the writer see it ------------------------

    def recv(self, size: int) -> bytes:
        """Send the queued replies, check in, then block for the client's next bytes.

        The replies go out here (:meth:`send_pending`) rather than through the writer's flush.
        """
        if self.pending:
            self.send_pending()
        if self.check_in is not None:
            self.check_in(self.timeout)
        if not self.interruptible:
            return self.sock.recv(size)
        self.waiting = True
        try:
            # A stop signalled before ``waiting`` was set found nothing to interrupt: look again.
            if self.stopping():
                raise StopSession()
            return self.sock.recv(size)
        finally:
            self.waiting = False

    def send_pending(self) -> None:
        """Send the queued replies (ClientGone if the client is gone): one non-blocking send, which
        takes them all in the common case; what it did not send (a full window, an error, TLS)
        goes through :meth:`sendall`, which checks in before it may block."""
        data = b"".join(self.pending)  # one reply: the same bytes object, not a copy
        self.pending.clear()
        try:
            sent = self.sock.send(data, _MSG_DONTWAIT) if self.kernel_timeouts else 0
        except OSError:  # a full window (EAGAIN) or a broken connection: sendall says which
            sent = 0
        if sent < len(data):
            try:
                self.sendall(memoryview(data)[sent:] if sent else data)
            except OSError as exc:  # reset, broken pipe, send timeout, TLS error
                raise ClientGone(str(exc)) from None

    def sendall(self, data: bytes) -> None:
        """Send all of ``data`` within the idle timeout (OSError if not).

        A send that may block checks in first, promising the idle timeout: a
        worker waiting for a client that does not read is no stuck worker,
        however long the client waited before it sent the command.
        """
        if not self.kernel_timeouts:
            if self.check_in is not None:  # TLS: any send may wait for the client's window
                self.check_in(self.config.timeout)
            self.sock.sendall(data)
            return
        try:
            sent = self.sock.send(data, _MSG_DONTWAIT) if data else 0
        except (BlockingIOError, InterruptedError):
            sent = 0  # the send buffer is full right now (EAGAIN): not a client gone, wait for room
        if sent < len(data):
            self._send_rest(memoryview(data)[sent:])

    def _send_rest(self, rest: memoryview) -> None:
        """The client's window is full: send the rest under a Python timeout, then back to blocking."""
        sock = self.sock
        if self.check_in is not None:
            self.check_in(self.config.timeout)
        sock.settimeout(self.config.timeout)
        try:
            sock.sendall(rest)
        finally:
            sock.settimeout(None)

    def settimeout(self, seconds: float) -> None:
        """How long the next reads may block: in the kernel for a plain socket, in Python for TLS."""
        if self.kernel_timeouts:
            timeval = _TIMEVALS.get(seconds)
            if timeval is None:
                timeval = _timeval(seconds)
                if len(_TIMEVALS) < _TIMEVALS_KEPT:
                    _TIMEVALS[seconds] = timeval
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        else:
            self.sock.settimeout(seconds)

    def client_spoke(self) -> bool:
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

    def pipelined_early(self, authenticated: bool) -> bool:
        """With forbid_unauth_pipelining: whether an unauthenticated client sent more
        before our reply to a command that must end a pipelined group (RFC 2920 3.1)."""
        if self.config.forbid_unauth_pipelining and not authenticated and self.reader.pending():
            log.info("%s pipelined past a command that ends a group", self.who)
            return True
        return False

    # -- the PROXY header -----------------------------------------------------

    def take_proxy_header(self) -> proxy.ProxyHeader | None:
        """Before anything else: the load balancer's PROXY header, and the client's addresses from it.

        Only a trusted proxy (``proxy_trusted``) may send one; the header must
        be complete within ``proxy_timeout``.  Returns None (logged) when the
        connection must be closed without a word.  Octets after the header stay
        unread, for the reader or the TLS handshake.  ``local`` is known after
        this call (the header's destination, else the socket's own address).
        """
        networks = self.config.proxy_trusted
        if networks and not (self.peer and proxy.trusted(self.peer[0], networks)):
            log.warning("connection from %s, not a trusted PROXY sender: closed", self.who)
            self._know_local()
            return None
        if self.check_in is not None:  # the header may take that long to come (never promise less)
            self.check_in(max(self.config.timeout, self.config.proxy_timeout))
        try:
            header = proxy.receive(self.sock, self.config.proxy_timeout, self.settimeout)
        except proxy.ProxyError as exc:
            log.warning("bad PROXY header from %s: %s; closed", self.who, exc)
            self._know_local()
            return None
        # The reads' timeout is left at most proxy_timeout: the reader keeps it while it owes no less.
        self.reader.timeout_set(self.config.proxy_timeout)
        proxied_by = self.who
        if header.source is not None:
            self.peer, self.local = header.source, header.destination
            self.who = f"{self.peer[0]}:{self.peer[1]}"
        else:  # LOCAL or UNKNOWN: the connection's own addresses stand
            self._know_local()
        log.debug("PROXY v%d %s %s from %s: client %s", header.version, header.command,
                  header.protocol, proxied_by, self.who)
        return header

    # -- TLS --------------------------------------------------------------------

    def start_tls(self, context: ssl.SSLContext) -> dict[str, Any] | None:
        """Send what is queued, then the TLS handshake (bounded by tls_handshake_timeout).

        Returns the TLS facts for the handler, or None when the handshake
        failed (the session must then end).  Bytes the client sent before the
        handshake are forgotten.
        """
        self.writer.flush()
        self.kernel_timeouts = False  # from here on Python timeouts (see the module's docstring)
        if self.check_in is not None:  # the handshake may wait for the client that long (never promise less)
            self.check_in(max(self.config.timeout, self.config.tls_handshake_timeout))
        try:
            self.sock.settimeout(self.config.tls_handshake_timeout)
            wrapped = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            # The plain socket is detached now: from here on, closing means closing this one.
            self.sock = wrapped
            wrapped.do_handshake()
        except (ssl.SSLError, OSError, ValueError) as exc:
            log.info("TLS handshake with %s failed: %s", self.who, exc)
            return None
        self.reader.forget_buffered()
        facts = tls.facts(wrapped)
        log.debug("TLS %s %s with %s", facts["version"], facts["cipher"], self.who)
        return facts

    # -- the end ----------------------------------------------------------------

    def shutdown(self, linger: bool) -> None:
        """Send what is pending, TLS close_notify, FIN; then, if ``linger``, drain the client's bytes.

        When we close while the client may still be sending, a plain close
        would reset the connection and could destroy our last reply in
        flight; so we half-close and read what comes for a moment first
        (Apache's lingering close), bounded in time and octets.  Without
        lingering (after QUIT, or the client is gone) the close itself sends
        the FIN: a half-close first would change nothing on the wire.
        """
        try:
            if self.pending:  # the last reply (QUIT's) is queued
                self.send_pending()
            if isinstance(self.sock, ssl.SSLSocket):
                self._tls_close_notify()
            if not linger:
                self.sock.close()
                return
            self.sock.shutdown(socket.SHUT_WR)
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

    def close(self) -> None:
        """Close the socket, unless :meth:`shutdown` already did; let go of the reader and the writer.

        They point back at the connection: kept, the three would make a cycle
        that only the garbage collector frees (with the last buffer read), so
        the session's memory would not be reused at once by the next session.
        """
        if self.sock.fileno() >= 0:
            self.sock.close()
        self.reader = self.writer = None  # type: ignore[assignment]
