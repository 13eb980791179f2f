"""A worker told to retire must not swallow a wake-up: what its wait reported is accepted.

With ``accept_mode = exclusive`` (EPOLLEXCLUSIVE) the kernel wakes one idle worker per
connection.  If that worker is told to retire (HUP, TTOU, max-spare) just as its wait
returns and leaves without accepting, the client gets no greeting until the next
connection wakes someone else.
"""

from __future__ import annotations

import signal
import socket
import threading


from prefork_esmtp import ESMTPHandler
from prefork_esmtp import worker as worker_module
from prefork_esmtp.settings import resolve
from prefork_esmtp.worker import Worker


def _config():
    return resolve({"hostname": "mx.test.example", "accept_mode": "exclusive"}, {})


def test_retire_right_after_the_wait_still_serves_the_connection(listener, monkeypatch):
    worker = Worker([listener], ESMTPHandler, _config())
    client = socket.create_connection(listener.getsockname(), timeout=5)  # waiting in the backlog

    class RetiringPoller(worker_module._Poller):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            real_poll = self.poll  # what the serve loop waits with

            def poll_then_retire(timeout):
                ready = real_poll(timeout)
                worker.stop()  # the retire signal's handler runs just after the wait returned
                return ready

            self.poll = poll_then_retire

    monkeypatch.setattr(worker_module, "_Poller", RetiringPoller)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert client.recv(512).startswith(b"220 mx.test.example"), "the client was stranded"
        client.sendall(b"QUIT\r\n")
        assert client.recv(512).startswith(b"221")
    finally:
        client.close()
        thread.join(10)
    assert not thread.is_alive(), "the retiring worker left after that session"
    assert worker.served == 1


def test_retire_with_nothing_pending_leaves_at_once(listener):
    worker = Worker([listener], ESMTPHandler, _config())
    worker.stop()
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert worker.served == 0


def test_a_signal_before_the_wait_wakes_it_at_once(listener):
    """set_wakeup_fd: a signal that lands before the wait starts is seen without waiting a tick."""
    worker = Worker([listener], ESMTPHandler, _config())
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGQUIT)
    try:
        worker.install_signals()
        signal.signal(signal.SIGUSR2, lambda s, f: None)
        signal.raise_signal(signal.SIGUSR2)  # a signal whose handler does not itself write the pipe
        poller = worker_module._Poller([listener], worker._wake_r, True)
        try:
            assert poller.wait(5) == [worker._wake_r]
        finally:
            poller.close()
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        for sig, handler in zip((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT), old):
            signal.signal(sig, handler)


def test_accepted_sockets_have_tcp_nodelay(listener):
    """Set once on the listener by the worker; Linux hands it to every accepted socket."""
    Worker([listener], ESMTPHandler, _config())
    client = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        listener.setblocking(True)
        conn, _ = listener.accept()
        with conn:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        client.close()
