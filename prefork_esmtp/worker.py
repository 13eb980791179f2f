"""The worker's serve loop: wait on the listeners, accept, serve one session at a time.

The same loop runs alone in the foreground (``start -X``) and in every
pre-forked worker (booted by :mod:`prefork_esmtp.boot`), which hands it a
reporter that tells the scoreboard its state (idle/busy, sessions served,
check-ins); ``-X`` uses the base :class:`~prefork_esmtp.reporter.Reporter`,
which reports nothing.
"""

from __future__ import annotations

import _signal
import _socket
import errno
import functools
import logging
import os
import select
import selectors
import signal
import socket
import time
from typing import Any

from prefork_esmtp import counters
from prefork_esmtp.reporter import NO_REPORTER, Reporter
from prefork_esmtp.limits import Limits
from prefork_esmtp.listeners import read_timeout
from prefork_esmtp.session import Session
from prefork_esmtp.settings import Config

log = logging.getLogger("prefork_esmtp.worker")

#: Seconds between checks that the master is alive while idle, where the kernel cannot tell
#: (no PR_SET_PDEATHSIG); with it an idle worker sleeps until a connection or a signal.
TICK = 1.0
#: After TERM a worker exits by itself this long past graceful_timeout (its master may be gone).
ORPHAN_GRACE = 2.0
#: Out of descriptors or memory at accept(): the connection stays queued and the listener
#: ready, so the worker pauses this long between tries instead of spinning on the poll.
ACCEPT_PAUSE = 0.1
#: The errors of accept() that name a shortage of this process or the system, not of the client.
_SHORTAGES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

class Worker:
    """Serves sessions from shared listeners until told to stop or ``max_sessions`` is reached."""

    def __init__(self, listeners: list[socket.socket], handler_class: type, config: Config,
                 max_sessions: int = 0, reporter: Reporter = NO_REPORTER, *,
                 tls_context: Any = None, tls_listeners: frozenset[int] = frozenset(),
                 limits: Limits | None = None, idle_tick: float | None = None) -> None:
        self.listeners = listeners
        for sock in listeners:
            # Replies go out at once (a client waits for each); set once here, Linux gives it
            # to every accepted socket, rather than one setsockopt per connection.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        # None: wait for a connection or a signal without a timeout (the master's death arrives
        # as TERM); a number: also wake that often to check the master (no parent-death signal).
        self.idle_tick = idle_tick
        self.limits = limits if limits is not None else Limits(config, reporter.sessions_from)
        self.tls_context = tls_context
        self.tls_listeners = tls_listeners  # fds of implicit-TLS listeners
        self.handler_class = handler_class
        self.config = config
        self.max_sessions = max_sessions
        self.reporter = reporter
        self.alive = True
        self.shutting_down = False
        self.served = 0
        self.session: Session | None = None
        # What the session calls as stopping() (before each command and each wait for one):
        # the same answer as the method, read with no Python frame of its own.
        self._stopping = functools.partial(getattr, self, "shutting_down")
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- signals --------------------------------------------------------------

    def install_signals(self) -> None:
        """TERM: finish the current transaction, 421 at the next command, exit.  INT/QUIT: exit now."""
        # The signal module's C function: its wrapper would make enums of the handlers replaced.
        _signal.signal(signal.SIGTERM, self.handle_term)
        _signal.signal(signal.SIGINT, self.handle_int)
        _signal.signal(signal.SIGQUIT, self.handle_int)
        # A signal that lands just before the wait starts wakes it at once (the C-level
        # handler writes to the wake pipe), instead of only at the next tick.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def handle_term(self, signum: int, frame: Any) -> None:
        """Graceful stop, also what PR_SET_PDEATHSIG sends when the master dies.

        Our copies of the listeners close at once, so the port is free for a
        new master even while this session finishes; and the session gets
        ``graceful_timeout`` seconds (plus ORPHAN_GRACE) at most, as the master would allow.
        """
        first = not self.shutting_down
        self.shutting_down = True
        self.stop()
        if first:
            for sock in self.listeners:
                try:
                    sock.close()
                except OSError:
                    pass
            # A live master kills what is left at graceful_timeout (and says so in its log);
            # this bound is for an orphan, whose master cannot.
            signal.signal(signal.SIGALRM, lambda s, f: os._exit(0))
            signal.setitimer(signal.ITIMER_REAL, self.config.graceful_timeout + ORPHAN_GRACE)
        session = self.session
        if session is not None:
            session.interrupt_if_idle()

    def handle_int(self, signum: int, frame: Any) -> None:
        raise SystemExit(0)

    def stop(self) -> None:
        """Stop accepting; exit once the current session has ended (a retire on reload).

        Only a shutdown (TERM) also cuts the session short: 421 at its next command.
        """
        self.alive = False
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def stopping(self) -> bool:
        """Whether the session should answer 421 at its next command (TERM received)."""
        return self.shutting_down

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Wait on the listeners and the wake pipe; serve whoever connects.

        With ``accept_mode = exclusive`` the listeners are registered with
        EPOLLEXCLUSIVE, so a new connection wakes one idle worker instead of
        all of them (the accept thundering herd).
        """
        poller = _Poller(self.listeners, self._wake_r, self.config.accept_mode == "exclusive", self.tls_listeners)
        tick = self.idle_tick
        # With the parent-death signal the master's end arrives as TERM (shutting_down), so
        # asking the kernel for our parent after every wait would tell nothing new.
        check_parent = tick is not None
        by_fd = poller.by_fd
        poll = poller.poll
        try:
            while self.alive:
                self.reporter.idle()
                ready = poll(tick)
                if self.shutting_down or (check_parent and not self.reporter.master_alive()):
                    break
                # Told to retire (HUP, TTOU, max-spare) while the wait returned: still accept
                # what it reported.  With EPOLLEXCLUSIVE the kernel woke only this worker for
                # that connection; leaving without it would strand the client until the next one.
                for fd, _ in ready:
                    listener = by_fd.get(fd)
                    if listener is None:  # the wake pipe
                        self._drain_wake()
                        continue
                    # socket.accept() without its wrapper's Python work (the family and type looked
                    # up and converted to enums on every call): the listener's are known once.
                    try:
                        conn_fd, peer = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue  # another worker took it
                    except OSError as exc:
                        if exc.errno in _SHORTAGES:
                            self._short_of_resources(exc)
                        continue
                    # The C socket object, without socket.socket's Python layer (its __init__
                    # and close): the session uses only the C methods.
                    self.serve(_socket.socket(listener.family, listener.type, listener.proto, conn_fd), peer,
                               listener.implicit_tls, listener.local, listener.read_timeout)
                    break  # back to waiting: fair to the other listeners and workers
                if self.max_sessions and self.served >= self.max_sessions:
                    log.info("served %d sessions; recycling", self.served)
                    break
        finally:
            poller.close()

    #: when the next "accept failed" may be logged (once a second while the shortage lasts)
    _next_shortage_log = 0.0

    def _short_of_resources(self, exc: OSError) -> None:
        """accept() found no descriptor or memory: log it (at most once a second) and pause.

        The client stays in the listen queue and the listener stays ready, so
        going straight back to the poll would spin a core and flood the log.
        """
        now = time.monotonic()
        if now >= self._next_shortage_log:
            log.error("accept failed: %s (pausing %.1fs between tries)", exc, ACCEPT_PAUSE)
            self._next_shortage_log = now + 1.0
        time.sleep(ACCEPT_PAUSE)

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def serve(self, conn: socket.socket, peer: Any, implicit_tls: bool = False, local: Any = None,
              read_timeout: float | None = None) -> None:
        """Run one session to its end; nothing a session does kills the worker.

        ``local``: our address on the connection when the listener already says it (bound
        to one address), so the session need not ask the kernel; None: the session asks.
        ``read_timeout``: the connection's read timeout is at most this (the listener's).
        """
        # Behind a load balancer the socket's peer is the balancer: the session reports the
        # client once the PROXY header has named it; until then no address is counted.
        if self.config.proxy_protocol:
            self.reporter.accepted()
        else:
            self.reporter.busy(peer)
        try:
            self.session = Session(conn, peer, self.handler_class, self.config, self._stopping,
                                   self.reporter, tls_context=self.tls_context, implicit_tls=implicit_tls,
                                   limits=self.limits, local=local, read_timeout=read_timeout)
        except Exception:
            counters.hook_failed("session")
            log.exception("cannot start a session for %s (handler constructor failed?)", peer)
            try:
                conn.sendall(f"421 {self.config.hostname} Service not available, try again later\r\n".encode())
            except OSError:
                pass
            conn.close()
            return
        try:
            self.session.run()
        except Exception:
            counters.hook_failed("session")
            log.exception("session with %s failed", peer)
            conn.close()
        finally:
            self.session = None
            self.served += 1
            self.reporter.served()


class _Listener:
    """A listener and what every connection accepted from it shares, looked up once.

    ``local`` is the address of a listener bound to one address (every connection's
    own address, then); None for a wildcard listener, whose connections differ.
    ``read_timeout``: the ``SO_RCVTIMEO`` its connections inherit, read once: only the
    master sets it, and only ever lower (:func:`~prefork_esmtp.listeners.lower_read_timeout`),
    so it stays an upper bound for this worker's life; None: none set.
    """

    __slots__ = ("sock", "accept", "family", "type", "proto", "implicit_tls", "local", "read_timeout")

    def __init__(self, sock: socket.socket, implicit_tls: bool) -> None:
        self.sock = sock
        self.accept = sock._accept  # (fd, peer): the C accept, without socket.accept's wrapper
        self.family, self.type, self.proto = int(sock.family), int(sock.type), sock.proto
        self.implicit_tls = implicit_tls
        self.local = _bound_address(sock)
        self.read_timeout = read_timeout(sock)


#: IP_TRANSPARENT and IPV6_TRANSPARENT (Linux): a listener that takes connections for other addresses.
_TRANSPARENT = {socket.AF_INET: (socket.IPPROTO_IP, getattr(socket, "IP_TRANSPARENT", 19)),
                socket.AF_INET6: (socket.IPPROTO_IPV6, getattr(socket, "IPV6_TRANSPARENT", 75))}


def _bound_address(sock: socket.socket) -> tuple[str, int] | None:
    """(host, port) of a TCP listener bound to one address; None for a wildcard or anything else.

    A transparent listener (systemd's ``Transparent=yes``, behind a TPROXY rule)
    is bound to one address but accepts connections made to others: None too.
    """
    try:
        address = sock.getsockname()
    except OSError:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(address, tuple):
        return None
    host = address[0]
    if host in ("0.0.0.0", "::") or host.startswith("::ffff:0.0.0.0"):
        return None
    try:
        if sock.getsockopt(*_TRANSPARENT[sock.family]):
            return None
    except OSError:
        pass  # not Linux: no such option, no such listener
    return (host, address[1])


class _Poller:
    """Waits for listeners and the wake pipe: raw epoll (with EPOLLEXCLUSIVE) or a selector."""

    def __init__(self, listeners: list[socket.socket], wake_fd: int, exclusive: bool,
                 tls_listeners: frozenset[int] = frozenset()) -> None:
        self.by_fd = {sock.fileno(): _Listener(sock, sock.fileno() in tls_listeners) for sock in listeners}
        self.epoll = getattr(select, "epoll", None)
        if self.epoll is not None:
            self.ep = select.epoll()
            flags = select.EPOLLIN | (getattr(select, "EPOLLEXCLUSIVE", 0) if exclusive else 0)
            for fd in self.by_fd:
                self.ep.register(fd, flags)
            self.ep.register(wake_fd, select.EPOLLIN)
            #: (fd, events) pairs once one is ready (timeout None: block); epoll's own method
            self.poll = self.ep.poll
        else:
            self.sel = selectors.DefaultSelector()
            for fd in self.by_fd:
                self.sel.register(fd, selectors.EVENT_READ)
            self.sel.register(wake_fd, selectors.EVENT_READ)
            self.poll = self._select

    def _select(self, timeout: float | None) -> list[tuple[int, int]]:
        return [(key.fd, events) for key, events in self.sel.select(timeout)]

    def wait(self, timeout: float | None) -> list[int]:
        """The ready fds; ``timeout`` None blocks until one is ready (or a signal's handler raises).

        ``by_fd`` maps a ready listener's fd to its :class:`_Listener`; any other fd is the wake pipe.
        """
        if self.epoll is not None:
            return [fd for fd, _ in self.ep.poll(-1 if timeout is None else timeout)]
        return [key.fd for key, _ in self.sel.select(timeout)]

    def close(self) -> None:
        if self.epoll is not None:
            self.ep.close()
        else:
            self.sel.close()
