"""One session through the engine in the master before the first fork, so workers inherit it warm.

A worker's first session touches code and objects for the first time: the
interpreter specialises the bytecode of every function it runs (writing
into the code objects), fills type and method caches, builds reply bytes
and interns strings.  Done after the fork, each worker copies those pages
and keeps them as private memory; done once in the master before
``gc.freeze()``, they stay shared by all workers.  The session runs the
base handler (which takes and discards the message), never the configured
one, over a ``socketpair`` whose client side has sent its whole script and
shut down writing, so it can neither block nor deliver anything; its log
lines are suppressed, and its counts go to the master's private row.  Its
settings are the configured ones except those that would slow it down or cut
it short (the error sleep, the pipelining check), and it gives up after the
first session that did not go through or after :data:`BUDGET` seconds.

:func:`fill_pools` then fills the free blocks scattered over the master's
memory pools, so that what a worker allocates lands in pools of its own
rather than on pages it shares with the master (each such page it would copy).
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import sys
import threading
import time

from prefork_esmtp.handler import ESMTPHandler
from prefork_esmtp.limits import Limits
from prefork_esmtp.settings import Config

log = logging.getLogger("prefork_esmtp.master")

_BODY = (b"From: warm-up <a@example.org>\r\nTo: <b@example.org>\r\nSubject: warm-up\r\n"
         b"Message-ID: <warm-up@example.org>\r\n\r\n" + b"a line of the body\r\n" * 20 + b"..dot\r\n.\r\n")


def script(config: Config) -> bytes:
    """What the warm-up client sends: greeting, two transactions, a reset, QUIT (LHLO in LMTP mode)."""
    hello = b"LHLO" if config.protocol == "lmtp" else b"EHLO"
    proxy = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n" if config.proxy_protocol else b""
    transaction = (b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
                   b"RCPT TO:<c@example.org>\r\nDATA\r\n" + _BODY)
    return (proxy + hello + b" warm-up.example\r\n" + transaction + transaction
            + b"NOOP\r\nRSET\r\nQUIT\r\n")


#: Sessions run: the interpreter specialises a function's bytecode after 8 calls (3.11), and
#: most of the engine's functions run once or twice per session.
SESSIONS = 10
#: Seconds the warm-up may take at most (about 2 ms is usual).
BUDGET = 0.5
#: Settings the warm-up runs without: a sleep before error replies, and closing on pipelining
#: (its client sends the whole script at once).
_OVERRIDES = {"error_sleep": 0.0, "forbid_unauth_pipelining": False}


def warm_up(config: Config, sessions: int = SESSIONS) -> int:
    """Run ``sessions`` sessions of the base handler in this process; return how many completed.

    A failure is logged at debug level and ends the warm-up: it only costs
    memory, never the start.
    """
    from prefork_esmtp.session import Session

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    done = 0
    deadline = time.monotonic() + BUDGET
    try:
        config = Config({**config.values, **_OVERRIDES})
        data = script(config)
        limits = Limits(config, lambda ip: 0)  # its own: the shared per-address counts stay untouched
        for _ in range(sessions):
            server, client = socket.socketpair()
            try:
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)  # end of input after the script: the session cannot block
                Session(server, ("127.0.0.1", 40000), ESMTPHandler, config, lambda: False,
                        limits=limits).run()
                replies = client.recv(65536)
            finally:
                server.close()
                client.close()
            lines = replies.split(b"\r\n")[:-1]
            if not lines or not lines[-1].startswith(b"221") or any(l[:1] not in (b"2", b"3") for l in lines):
                break  # refused somewhere (a setting this script does not satisfy): no use repeating it
            done += 1
            if time.monotonic() > deadline:
                break
    except Exception as exc:
        logging.disable(previous)
        log.debug("warm-up session failed: %s", exc)
    finally:
        logging.disable(previous)
    return done


#: Calls of each after-fork function: enough for the interpreter to specialise its bytecode.
FORK_CALLS = 10


def warm_fork_callbacks(calls: int = FORK_CALLS) -> bool:
    """Run here first what the interpreter runs in every child right after ``fork()``; whether it ran.

    The standard library registers functions that run in each new child
    (threading resets its thread table, logging its locks, random reseeds).
    Run only in children, that code is cold in each of them: its bytecode is
    specialised and the type cache filled there, and every worker copies the
    pages that writes.  Run here, those writes happen once, in shared memory.
    In a process with one thread, as the master is before its first fork,
    they change nothing: locks nobody holds are made anew, the thread table
    keeps its one thread.  With another thread (a preloaded handler may
    start one) nothing is run, as that thread could hold one of those locks.
    """
    after_fork = getattr(threading, "_after_fork", None)
    reinit_logging = getattr(logging, "_after_at_fork_child_reinit_locks", None)
    if after_fork is None or reinit_logging is None:
        return False
    if threading.enumerate() != [threading.main_thread()] or len(getattr(threading, "_dangling", ())) > 1:
        return False  # another thread, or a Thread made and not started: its state must not be touched
    for _ in range(calls):
        after_fork()
        reinit_logging()
        random.seed()
    return True


#: Objects that fill the free blocks of the master's partly used memory pools (see fill_pools).
_FILLERS: list[object] = []
_STATS_LINE = re.compile(rb"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


def _free_blocks() -> dict[int, int]:
    """Free blocks in pymalloc's partly used pools, by block size, from ``sys._debugmallocstats``.

    That function prints to the C-level stderr, so fd 2 points at an
    in-memory file while it runs.  Empty when the statistics are unavailable or unreadable.
    """
    stats = getattr(sys, "_debugmallocstats", None)
    if stats is None:
        return {}
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is None:
        return {}
    sys.stderr.flush()
    out = memfd_create("prefork-esmtp-mallocstats")
    saved = os.dup(2)
    try:
        os.dup2(out, 2)
        try:
            stats()
        finally:
            os.dup2(saved, 2)
        text = os.pread(out, 1 << 16, 0)
    finally:
        os.close(saved)
        os.close(out)
    free = {}
    for line in text.split(b"\n"):
        m = _STATS_LINE.match(line)
        if m:
            size, avail = int(m.group(2)), int(m.group(5))
            if avail:
                free[size] = avail
        elif free and line.startswith(b"#"):
            break
    return free


def _filler(size: int, i: int) -> object:
    """A new object that pymalloc places in a block of ``size`` bytes."""
    if size <= 16:
        return object()
    if size <= 32:
        return (1 << 40) + i  # a two-digit int: 32 bytes
    return bytes(size - 33)  # a bytes object takes 33 bytes more than its length


def fill_pools() -> int:
    """Fill the free blocks of partly used memory pools with objects kept for the master's life.

    Objects a worker allocates otherwise land in those holes, scattered over
    pages it shares with the master, and each such page is copied into the
    worker (a whole page of private memory for one small object).  Filled,
    a worker's allocations go to pools of its own, packed densely.  Returns
    the blocks filled (0 where the allocator's statistics are unavailable).
    """
    done = 0
    for size, avail in _free_blocks().items():
        held = [None] * avail  # sized once: a list that grows would free its old arrays
        for i in range(avail):
            held[i] = _filler(size, i)
        _FILLERS.append(held)
        done += avail
    return done

