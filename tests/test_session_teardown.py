"""A finished session leaves nothing for the garbage collector.

The connection, its reader and its writer point at each other while the
session runs; at its end the connection lets go of them, so everything the
session made is freed as soon as it is dropped (its memory reused at once by
the next session, not held until a collection).  Real sessions over a
socketpair, the collector off while they run.
"""

from __future__ import annotations

import gc
import socket
import weakref

import pytest

from prefork_esmtp import ESMTPHandler
from prefork_esmtp.session import Session
from prefork_esmtp.settings import resolve


@pytest.mark.parametrize("script", [
    b"QUIT\r\n",
    b"EHLO client.example\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\n",  # then the client is gone
    b"EHLO client.example\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
])
def test_a_finished_session_is_freed_without_the_collector(script):
    config = resolve({"hostname": "mx.test.example"}, {})
    ours, theirs = socket.socketpair()
    theirs.sendall(script)
    theirs.shutdown(socket.SHUT_WR)
    gc.collect()
    gc.disable()
    try:
        session = Session(ours, ("192.0.2.1", 4000), ESMTPHandler, config)
        session.run()
        made = [weakref.ref(obj) for obj in (session, session.conn, session.reader, session.handler,
                                            session.transaction)]
        del session
        assert [ref() for ref in made] == [None] * len(made)
    finally:
        gc.enable()
        theirs.close()
    assert theirs.fileno() == -1
