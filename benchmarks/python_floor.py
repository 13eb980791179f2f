#!/usr/bin/env python3
"""The Python floor: the least a Python prefork SMTP server can do per session (a benchmark reference).

    python3 benchmarks/python_floor.py HOST PORT WORKERS

One listening socket, WORKERS forked workers each blocking in ``accept()``;
per session a 220 banner, then per command line a fixed reply chosen by its
first four octets (EHLO multi-line; HELO, MAIL, RCPT, RSET, NOOP 250; DATA
354, then the message is read and dropped until CRLF.CRLF, found across
reads, and answered 250; QUIT 221; anything else 500).  No parsing, no
handler, no limits, no timeouts: blocking sockets and one ``sendall`` per
reply.  It is not an SMTP server anyone should run; ``make bench`` runs it
beside the others so a reader can see how much of the CPU a message costs
is Python's own (interpreter, system calls, process model) rather than the
SMTP engine's.  SIGTERM or SIGINT to the parent ends the workers and it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

BANNER = b"220 python-floor.bench ESMTP\r\n"
REPLIES = {
    b"EHLO": b"250-python-floor.bench\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    b"HELO": b"250 python-floor.bench\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}
UNKNOWN = b"500 5.5.2 Error: command not recognized\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
TAKEN = b"250 2.0.0 Ok: queued\r\n"
BYE = b"221 2.0.0 Bye\r\n"
END = b"\r\n.\r\n"


def skip_message(conn: socket.socket, buf: bytes) -> bytes | None:
    """Read and drop a message up to its CRLF.CRLF: the octets after it, or None when the client left.

    Only the last four octets are kept between reads, enough to find the end
    split across two reads; the CRLF that ended the DATA line counts, so an
    empty message (".\\r\\n" at once) ends too.
    """
    tail = b"\r\n" + buf
    end = tail.find(END)
    while end < 0:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        tail = tail[-4:] + chunk
        end = tail.find(END)
    return tail[end + len(END):]


def serve(conn: socket.socket) -> None:
    """One session: the banner, then a fixed reply per command line until QUIT or the client leaves."""
    conn.sendall(BANNER)
    buf = b""
    while True:
        while b"\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        line, _, buf = buf.partition(b"\r\n")
        verb = line[:4].upper()
        if verb == b"DATA":
            conn.sendall(GO_AHEAD)
            rest = skip_message(conn, buf)
            if rest is None:
                return
            buf = rest
            conn.sendall(TAKEN)
        elif verb == b"QUIT":
            conn.sendall(BYE)
            return
        else:
            conn.sendall(REPLIES.get(verb, UNKNOWN))


def worker(listener: socket.socket) -> None:
    """Accept and serve one connection after another, forever (ended by a signal)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    while True:
        conn, _ = listener.accept()
        try:
            serve(conn)
        except OSError:
            pass  # the client reset the connection: on to the next one
        finally:
            conn.close()


def main(argv: list[str]) -> int:
    """Listen, fork the workers, and wait; on SIGTERM or SIGINT end the workers, then exit."""
    if len(argv) != 3:
        print("usage: python_floor.py HOST PORT WORKERS", file=sys.stderr)
        return 2
    host, port, n = argv[0], int(argv[1]), int(argv[2])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(512)
    pids: list[int] = []

    def stop(signum: int, frame: object) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            try:
                worker(listener)
            finally:
                os._exit(1)
        pids.append(pid)
    for _ in range(n):  # bounded: one wait per worker; a worker is not replaced
        try:
            os.wait()
        except ChildProcessError:
            break
    return 1  # every worker has ended without being told to: the floor no longer serves


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
