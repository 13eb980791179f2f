"""A pre-forked worker's life after the fork: boot (signals, privileges, handler) and serve.

The master forks and calls :func:`run_worker` in the child with a
:class:`WorkerPlan`, everything the worker needs from it (one plan per
batch of forks, made before them), and the worker's slot; nothing here runs
in the master but the import.  A worker that cannot boot writes one line to
the master's error pipe and exits with :data:`BOOT_ERROR`, so the master
stops (first start) or aborts the reload instead of respawning in a loop.
"""

from __future__ import annotations

import _signal
import logging
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from types import CodeType
from typing import Any, NoReturn

from setproctitle import setproctitle

from prefork_esmtp import counters, logs, privileges
from prefork_esmtp.counters import CounterTable
from prefork_esmtp.loader import HandlerLoadError, configure_handler, load_handler
from prefork_esmtp.limits import Limits, RateTable
from prefork_esmtp.reporter import ScoreboardReporter
from prefork_esmtp.scoreboard import Scoreboard
from prefork_esmtp.settings import Config
from prefork_esmtp.warmup import WARM_UP_OVERRIDES, recorder, script
from prefork_esmtp.handler import ESMTPHandler
from prefork_esmtp.worker import TICK, Worker, _Poller

log = logging.getLogger("prefork_esmtp.worker")

#: A worker exits with this status when it cannot boot (handler import or options refused).
BOOT_ERROR = 3


@dataclass(frozen=True)
class WorkerPlan:
    """What a forked worker gets from its master: generation, config and file descriptors.

    One plan serves every worker of a batch of forks (only the slot differs,
    passed beside it): made once before the forks, it is shared memory rather
    than an object each new worker builds.
    """

    master_pid: int
    generation: int
    config: Config
    #: preloaded and configured by the master, or None: import and configure it here
    handler_class: type | None
    ids: Any  # the uid/gid to drop to, or None
    listeners: list[socket.socket]
    tls_context: Any
    tls_fds: frozenset[int]  # fds of the implicit-TLS listeners
    scoreboard: Scoreboard
    rate_table: RateTable  # the per-address message and recipient counts, shared by all workers
    wake_fd: int  # the master's wake pipe: written once, when booted
    error_fd: int  # the master's boot-error pipe: one line if the boot fails
    master_fds: tuple[int, ...]  # the master's own ends of its pipes, closed at once
    signals: frozenset[int]  # the master's signals: blocked across the fork, reset here
    counters: CounterTable | None = None  # the shared counters (metrics on): this worker counts in its slot's row


def run_worker(plan: WorkerPlan, slot: int) -> NoReturn:
    """In the forked child: boot as the worker of scoreboard ``slot``, serve, and leave with
    ``os._exit`` (never back into the master's code)."""
    status = 1
    try:
        status = _boot_and_serve(plan, slot)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        log.exception("worker crashed")
    finally:
        logging.shutdown()
        os._exit(status)


def _boot_and_serve(plan: WorkerPlan, slot: int) -> int:
    """Boot (privileges, handler import and options) and serve; return the exit status."""
    # The C functions under the signal module: its wrappers turn the handler they replace (here
    # the master's) into an enum, a failed lookup with an exception each time, and code the master
    # never ran, so every new worker would copy the pages it touches.
    setsig = _signal.signal
    for sig in plan.signals:
        setsig(sig, _signal.SIG_DFL)
    # While booting (the handler import may be slow): USR1 must not kill us, and a
    # retire (HUP) must not be lost; TERM, INT and QUIT may end a worker that serves no one.
    retire_early: list[bool] = []
    setsig(signal.SIGUSR1, _signal.SIG_IGN)
    setsig(signal.SIGHUP, lambda s, f: retire_early.append(True))
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, plan.signals)  # blocked by the master across the fork
    for fd in plan.master_fds:
        os.close(fd)
    told = die_with_parent(plan.master_pid)
    random.seed()
    if plan.counters is not None:
        counters.use(plan.counters.row(slot))
    config = plan.config
    setproctitle(f"prefork-esmtp: worker [gen {plan.generation}] starting")
    try:
        privileges.drop(plan.ids)
        if plan.ids is not None:
            told = die_with_parent(plan.master_pid)  # a uid/gid change cleared the parent-death signal
        # The master never imported it (unless preloaded, and then configured it too),
        # so this import is fresh and its options are this generation's.
        handler_class = plan.handler_class
        if handler_class is None:
            handler_class = load_handler(config.handler)
            configure_handler(handler_class, config.handler_options)
    except (HandlerLoadError, OSError) as exc:
        message = str(exc) if isinstance(exc, HandlerLoadError) else f"cannot drop privileges: {exc}"
        log.error("worker cannot boot: %s", message)
        try:
            os.write(plan.error_fd, (message[:500] + "\n").encode())
        except OSError:
            pass
        return BOOT_ERROR
    limit = config.max_connections_per_child
    if limit:
        limit += random.randint(0, limit // 10)
    # Idle, a worker runs no code of its own until a connection or a signal: nothing can get
    # stuck, so it promises no check-in (math.inf) and sleeps without a timeout.  Only where
    # the kernel will not send TERM when the master dies does it wake every TICK to check.
    tick = None if told else TICK
    reporter = ScoreboardReporter(plan.scoreboard, slot, plan.generation, plan.master_pid,
                                  idle_expect=math.inf if tick is None else tick,
                                  busy_expect=config.timeout, wake_fd=plan.wake_fd)
    worker = Worker(plan.listeners, handler_class, config, max_sessions=limit, reporter=reporter,
                    tls_context=plan.tls_context, tls_listeners=plan.tls_fds,
                    limits=Limits(config, reporter.sessions_from, plan.rate_table), idle_tick=tick)
    worker.install_signals()
    setsig(signal.SIGHUP, lambda s, f: worker.stop())  # retire: finish the session, exit
    setsig(signal.SIGUSR1, lambda s, f: logs.reopen())
    if retire_early:
        return 0
    worker.run()
    return 0


#: Seconds a rehearsal session waits at most for its connection and for each read of its replies.
REHEARSAL_TIMEOUT = 1.0
#: Rehearsals of a worker's start-up in the master: enough for the interpreter to specialise its code.
REHEARSALS = 10


def rehearse(plan: WorkerPlan, times: int = REHEARSALS, ran: set[CodeType] | None = None) -> None:
    """In the master before the first fork: build a worker's start-up objects and drop them.

    Every new worker runs the same constructors once (reporter, worker,
    limits, the epoll set), asks for the parent-death signal, looks up a
    handler the master has imported already, makes its first reports, and
    serves sessions (each round serves one through a scratch worker: see
    :func:`serve_rehearsal`).  Run only there, that code is cold in each
    worker: its bytecode specialised and the type cache filled in the child,
    which copies the pages written.  Run here first, it happens once, in
    memory the workers share.  Nothing reaches a client or the real
    scoreboard: a scratch scoreboard, pipes and epoll sets closed at once;
    the real listeners only get TCP_NODELAY, which every worker sets on them
    anyway; prctl is asked a question (PR_GET_DUMPABLE), nothing is set.  Its
    one side effect, the process title, the master sets again just after.
    ``ran``, when given, receives the code of the Python functions the first
    rehearsal calls (see :func:`prefork_esmtp.warmup.relocate`).
    """
    spec = plan.config.handler
    module = spec.partition(":")[0] if ":" in spec else spec.rpartition(".")[0]
    # Without --preload a worker imports the handler; when the master has that module already
    # (the base handler), the worker's import is a lookup this can rehearse.  Never a real import.
    lookup = plan.handler_class is None and module in sys.modules
    serving = True
    board = Scoreboard(1)
    try:
        for i in range(times):
            recording = ran is not None and i == 0 and sys.getprofile() is None  # a profiler: left alone
            if recording:
                sys.setprofile(recorder(ran))
            try:
                if _PRCTL is not None:
                    _PRCTL(_PR_GET_DUMPABLE, 0, 0, 0, 0)
                if lookup:
                    try:
                        load_handler(spec)
                    except HandlerLoadError:  # the worker reports it, as a boot error
                        lookup = False
                reporter = ScoreboardReporter(board, 0, plan.generation, plan.master_pid, idle_expect=math.inf,
                                              busy_expect=plan.config.timeout)
                worker = Worker(plan.listeners, plan.handler_class or ESMTPHandler, plan.config,
                                reporter=reporter, tls_context=plan.tls_context, tls_listeners=plan.tls_fds,
                                limits=Limits(plan.config, reporter.sessions_from, plan.rate_table))
                try:
                    _Poller(worker.listeners, worker._wake_r, plan.config.accept_mode == "exclusive",
                            worker.tls_listeners).close()
                    reporter.idle()
                finally:
                    os.close(worker._wake_r)
                    os.close(worker._wake_w)
                if serving:
                    serving = serve_rehearsal(plan, board)  # once one fails, no more waits
            finally:
                if recording:
                    sys.setprofile(None)
    finally:
        board.close()


def serve_rehearsal(plan: WorkerPlan, board: Scoreboard) -> bool:
    """One warm-up session taken the way a worker takes one: its serve loop; whether it completed.

    What :func:`~prefork_esmtp.warmup.warm_up` leaves out, since it runs the
    session alone: the serve loop's wait for a connection, the accept, the
    worker's serve and the scoreboard reports around it, the session's
    check-ins.  A scratch worker on a scratch listener (127.0.0.1, a port of
    the kernel's choosing), whose client has connected and sent the warm-up
    script before the loop starts; it serves that one session and leaves
    (``max_sessions``), or leaves at :data:`REHEARSAL_TIMEOUT` whatever
    happened.  The base handler, which takes and discards the message; a
    scratch scoreboard slot; the warm-up's settings, its log lines suppressed.
    A failure only costs memory.
    """
    config = Config({**plan.config.values, **WARM_UP_OVERRIDES})
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    listener = client = None
    replies = b""
    try:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        reporter = _RehearsalReporter(board, 0, plan.generation, plan.master_pid, idle_expect=math.inf,
                                      busy_expect=config.timeout)
        worker = Worker([listener], ESMTPHandler, config, max_sessions=1, reporter=reporter,
                        limits=Limits(config, lambda ip: 0), idle_tick=REHEARSAL_TIMEOUT)
        try:
            client = socket.create_connection(listener.getsockname(), timeout=REHEARSAL_TIMEOUT)
            client.sendall(script(config))
            client.shutdown(socket.SHUT_WR)  # end of input after the script: the session cannot block
            reporter.deadline = time.monotonic() + REHEARSAL_TIMEOUT
            worker.run()
            reporter.idle()  # as the serve loop does after each session
            for _ in range(64):  # the replies are a few hundred octets: bounded, never a loop on a trickle
                data = client.recv(65536)
                if not data:
                    break
                replies += data
        finally:
            os.close(worker._wake_r)
            os.close(worker._wake_w)
    except OSError as exc:
        log.debug("rehearsal session failed: %s", exc)
    finally:
        logging.disable(previous)
        for sock in (client, listener):
            if sock is not None:
                sock.close()
    return replies.endswith(b"\r\n") and replies.rsplit(b"\r\n", 2)[-2].startswith(b"221")


class _RehearsalReporter(ScoreboardReporter):
    """The scratch worker's reporter: its master counts as alive until the rehearsal's deadline,
    so the serve loop (which checks its master at every tick) leaves then at the latest."""

    deadline = 0.0

    def master_alive(self) -> bool:
        return time.monotonic() < self.deadline


def _load_prctl() -> Any:
    """libc's prctl, loaded once when the master imports this module, so forked workers share it."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except Exception:  # not Linux, or no libc: the worker's getppid() check still catches it
        return None


_PRCTL = _load_prctl()
_PR_SET_PDEATHSIG = 1
_PR_GET_DUMPABLE = 3


def die_with_parent(master_pid: int) -> bool:
    """Ask Linux to send us TERM if the master dies (no orphans); whether it will.

    False where prctl is unavailable or refused: the serve loop then checks
    the parent itself, once per TICK while idle.
    """
    told = _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    if os.getppid() != master_pid:
        os._exit(0)  # the master died before prctl took effect
    return told
