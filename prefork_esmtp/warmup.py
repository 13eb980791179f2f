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

import gc
import logging
import os
import random
import re
import socket
import sys
import threading
import time
from types import CodeType, FunctionType

from collections.abc import Callable
from typing import Any

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
WARM_UP_OVERRIDES = {"error_sleep": 0.0, "forbid_unauth_pipelining": False}


def warm_up(config: Config, sessions: int = SESSIONS, ran: set[CodeType] | None = None) -> int:
    """Run ``sessions`` sessions of the base handler in this process; return how many completed.

    ``ran``, when given, receives the code of every Python function the first
    session calls (see :func:`relocate`).  A failure is logged at debug level
    and ends the warm-up: it only costs memory, never the start.
    """
    from prefork_esmtp.session import Session

    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    done = 0
    deadline = time.monotonic() + BUDGET
    try:
        config = Config({**config.values, **WARM_UP_OVERRIDES})
        data = script(config)
        limits = Limits(config, lambda ip: 0)  # its own: the shared per-address counts stay untouched
        for _ in range(sessions):
            server, client = socket.socketpair()
            try:
                client.sendall(data)
                client.shutdown(socket.SHUT_WR)  # end of input after the script: the session cannot block
                if ran is not None and not done:
                    sys.setprofile(recorder(ran))
                try:
                    Session(server, ("127.0.0.1", 40000), ESMTPHandler, config, lambda: False,
                            limits=limits).run()
                finally:
                    sys.setprofile(None)
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


def recorder(ran: set[CodeType]) -> Callable[[Any, str, Any], None]:
    """A ``sys.setprofile`` function that adds the code of each Python call to ``ran``."""
    def record(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            ran.add(frame.f_code)
    return record


def relocate(ran: set[CodeType]) -> int:
    """Give the functions whose code is in ``ran`` fresh copies of it, made one after another;
    return how many functions now run a copy.

    Every session writes to the code it runs (a call counts a reference to it)
    and to the constants that code loads, and each write makes the worker copy
    the whole page holding the object.  Where the modules were compiled, the
    code a session runs lies scattered among code it never runs, on a hundred
    pages or so; copied here in one go, before the first fork, it lies packed
    on a few.  Constants (strings, bytes, numbers, tuples of them) are copied
    with their code, and so is the code of the functions made inside it
    (comprehensions, closures).  The copies behave as the originals: same
    bytecode, names and constants by value.  Run before the warm-up sessions
    that specialise the bytecode, which a copy starts without.
    """
    made: dict[int, CodeType] = {}

    def copy(code: CodeType) -> CodeType:
        new = made.get(id(code))
        if new is None:
            new = code.replace(co_consts=tuple(_fresh(k, ran, copy) for k in code.co_consts))
            made[id(code)] = new
        return new

    done = 0
    for obj in gc.get_objects():
        if type(obj) is FunctionType and obj.__code__ in ran:
            obj.__code__ = copy(obj.__code__)
            done += 1
    return done


def _fresh(value: Any, ran: set[CodeType], copy: Callable[[CodeType], CodeType]) -> Any:
    """A new object equal to the constant ``value`` (``value`` itself where none can be made or
    none is worth making: None, booleans, the interpreter's cached small ints and characters)."""
    kind = type(value)
    if kind is CodeType:
        return copy(value) if value in ran else value
    if kind is str:
        # A long one is a docstring or a message for a rare error: no use moving it.  One made of
        # name characters only the code constructor interns, which hands back the original.
        if len(value) < 2 or len(value) > 80 or (value.isascii() and value.replace("_", "a").isalnum()):
            return value
        return value[:1] + value[1:]
    if kind is bytes:
        return value if len(value) < 2 else value[:1] + value[1:]
    if kind is int:
        return value if -5 <= value <= 256 else int.__add__(value, 1) - 1
    if kind is float:
        return float.__add__(value, 0.0) if value == value and value != 0.0 else value
    if kind is tuple:
        return tuple([_fresh(k, ran, copy) for k in value])
    if kind is frozenset:
        return frozenset([_fresh(k, ran, copy) for k in value])
    return value


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

