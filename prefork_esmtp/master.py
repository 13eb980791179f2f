"""The master: binds nothing itself (the CLI hands it the listeners), forks and supervises workers.

Like gunicorn's arbiter, signal handlers only queue the signal and write to a
wake pipe; one main loop drains the queue (one ``handle_<signal>`` method per
signal), reaps children, replaces the dead, kills the stuck, sizes the pool
(fixed, or adaptive like Apache's prefork with its doubling spawn rate) and
carries reloads through: a new generation is started, and only once it has
booted is the old one retired.  The master never reads a client byte.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType
from typing import Any

from setproctitle import setproctitle

from prefork_esmtp import logs, pidfile, privileges, tls
# Not a handler: the option readers handlers use in configure().  Loaded here once, every new
# worker (and every reload's generation) finds them loaded instead of importing them itself.
import prefork_esmtp.handlers.options  # noqa: F401
from prefork_esmtp.boot import BOOT_ERROR, WorkerPlan, rehearse, run_worker
from prefork_esmtp.exposition import NO_METRICS, NoMetrics
from prefork_esmtp.connection import listener_read_timeout
from prefork_esmtp.listeners import describe, lower_read_timeout
from prefork_esmtp.loader import configure_handler, load_handler
from prefork_esmtp.pool import adaptive_step, max_spare_default
from prefork_esmtp.limits import RateTable
from prefork_esmtp.scoreboard import BUSY, IDLE, STARTING, Scoreboard
from prefork_esmtp.sdnotify import Notifier
from prefork_esmtp.warmup import fill_pools, relocate, warm_fork_callbacks, warm_up
from prefork_esmtp.settings import Config

log = logging.getLogger("prefork_esmtp.master")

#: Seconds INT/QUIT give workers before SIGKILL.
FAST_STOP_SECONDS = 2.0
#: Longest pause of new workers after repeated boot failures (the pause doubles up to it).
BOOT_BACKOFF_MAX = 60.0

SIGNALS = {signal.SIGHUP: "hup", signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
           signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou", signal.SIGUSR1: "usr1", signal.SIGCHLD: "chld"}
#: Signals whose every delivery counts; the others coalesce while one of their kind waits.
COUNTED_SIGNALS = frozenset({signal.SIGTTIN, signal.SIGTTOU})
#: Signals that stop the master: they interrupt a reload's handler import under way in it.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})


class StopDuringImport(Exception):
    """A stop signal arrived while the master imported the handler for a reload (--preload)."""


@dataclass
class Child:
    """What the master knows of one worker."""

    pid: int
    slot: int
    generation: int
    started: float
    retiring: bool = False


class Master:
    """Supervises the worker pool until stopped; ``run()`` returns the exit status."""

    #: True while a reload's handler import runs in the master (--preload): a stop signal interrupts it
    importing = False

    def __init__(self, config: Config, listeners: list[socket.socket],
                 reload_config: Callable[[], Config], handler_class: type | None = None,
                 on_ready: Callable[[str], None] = lambda error: None, *,
                 tls_listeners: list[socket.socket] = (), tls_context: Any = None,
                 notifier: Notifier | None = None, inherited: bool = False,
                 metrics: NoMetrics = NO_METRICS) -> None:
        self.config = config
        self.metrics = metrics  # the shared counters and /metrics (exposition.py), or nothing
        self.notifier = notifier or Notifier()
        # Listeners from systemd's socket activation: systemd keeps them for the next start,
        # so a stop closes our copies but never shuts them down, and `listen` is not ours.
        self.inherited = inherited
        self.tls_context = tls_context
        self.tls_fds = frozenset(sock.fileno() for sock in tls_listeners)
        listeners = list(listeners) + list(tls_listeners)
        self.on_ready = on_ready
        self.listeners = listeners
        self._lower_read_timeouts(config)
        # Described once: the sockets are closed when a stop begins, their names are still wanted.
        self.listener_text = ", ".join(describe(s) for s in listeners)
        # Respawn back-off after workers fail to boot once the server is up (a handler
        # broken on disk after start): no fork loop, and TTIN/reload still work later.
        self.boot_failures = 0
        self.spawn_paused_until = 0.0
        self.reload_config = reload_config
        self.handler_class = handler_class  # set when preloaded, else workers import it
        self.ids = privileges.resolve(config.user, config.group)
        self.pid = os.getpid()
        self.started = time.time()
        self.generation = 1
        self.reloads = 0
        self.last_error = ""
        self.children: dict[int, Child] = {}
        self.queue: list[int] = []
        self.adaptive = config.min_spare is not None or config.max_spare is not None
        self.target = config.workers
        self.max_workers = config.max_workers
        if self.adaptive:
            self.target = max(config.min_spare or 1, 1)
        self.spawn_rate = 1
        self.last_adapt = 0.0
        self.booted = False  # some worker of the first generation has booted
        # while a reload is under way: what to go back to if the new generation cannot boot
        self.reloading: tuple[int, Config, Any, Any, Any] | None = None  # generation, config, handler, TLS, ids
        self.stop_deadline: float | None = None
        self.exit_status: int | None = None
        self.fatal = ""
        nslots = 2 * max(self.target, self.max_workers if self.adaptive else config.workers) + 8
        board_path = f"{config.pidfile}.scoreboard" if config.pidfile else None
        self.scoreboard = Scoreboard(nslots, board_path)
        self.rate_table = RateTable()  # made before any fork: every generation shares the counts
        self.wake_r, self.wake_w = os.pipe()
        self.error_r, self.error_w = os.pipe()
        for fd in (self.wake_r, self.wake_w, self.error_r):
            os.set_blocking(fd, False)

    # -- signals: queue and wake, nothing else -----------------------------------

    def init_signals(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self._queue_signal)

    def _queue_signal(self, signum: int, frame: Any) -> None:
        # Coalesced: a signal already waiting is not queued twice, and no kind is ever
        # dropped (a burst of CHLD from recycling workers must not hide a TERM).
        # TTIN/TTOU each count (two TTINs: two workers more), up to a bound.
        if signum not in self.queue or (signum in COUNTED_SIGNALS and self.queue.count(signum) < 64):
            self.queue.append(signum)
        try:
            os.write(self.wake_w, b".")
        except OSError:
            pass
        if self.importing and signum in STOP_SIGNALS:
            # The import may hang until worker_timeout: give it up, the loop then stops (queued above).
            self.importing = False
            raise StopDuringImport("interrupted by a stop")

    def handle_hup(self) -> None:
        """Graceful reload: new config, new generation; the old one retires once the new one is up."""
        if self.stop_deadline is not None or self.reloading is not None:
            log.info("reload ignored: %s", "stopping" if self.stop_deadline else "a reload is in progress")
            return
        log.info("reloading (generation %d)", self.generation)
        self.notifier.reloading()
        try:
            config = self.reload_config()
            handler_class = None  # without --preload each new worker imports and configures it
            if config.preload:
                self.importing = True  # set and cleared inside this try: what a stop raises is caught below
                try:
                    handler_class = _preload_within(config.handler, config.worker_timeout)
                    configure_handler(handler_class, config.handler_options)
                finally:
                    self.importing = False
            ids = privileges.resolve(config.user, config.group)
            tls_context = tls.make_context(config.tls_cert, config.tls_key, config.tls_client_ca)
        except Exception as exc:  # SettingError, Fatal, HandlerLoadError, PrivilegeError
            self._reload_failed(str(exc))
            return
        if not self.inherited and [str(a) for a in config.listen + config.tls_listen] != \
                [str(a) for a in self.config.listen + self.config.tls_listen]:
            log.warning("reload: listen addresses changed; keeping %s until a restart",
                        self.listener_text)
            config.set("listen", self.config.listen)
            config.set("tls_listen", self.config.tls_listen)
        if self.tls_fds and tls_context is None:
            log.warning("reload: no TLS certificate any more; TLS listeners keep the old one")
            tls_context = self.tls_context
        if config.metrics_listen != self.config.metrics_listen:
            log.warning("reload: metrics_listen changed; keeping the old one until a restart")
            config.set("metrics_listen", self.config.metrics_listen)
        logs.setup(config.log_level, config.log_file, config.log_format)
        self.reloading = (self.generation, self.config, self.handler_class, self.tls_context, self.ids)
        self.config, self.handler_class, self.tls_context, self.ids = config, handler_class, tls_context, ids
        self.generation += 1
        self._lower_read_timeouts(config)  # before the new generation's first accept
        self.boot_failures, self.spawn_paused_until = 0, 0.0  # an operator's reload: try at once
        if not self.adaptive:
            self.target = self._capped(config.workers)
        self.spawn_missing()

    def _lower_read_timeouts(self, config: Config) -> None:
        """The listeners hand their connections ``config``'s first read timeout, or a shorter one
        an earlier generation (still serving) needs: a worker's first read then sets none."""
        seconds = listener_read_timeout(config)
        for sock in self.listeners:
            lower_read_timeout(sock, seconds)

    def _capped(self, workers: int) -> int:
        """At most half the scoreboard: room for the old generation while a new one boots."""
        limit = self.scoreboard.nslots // 2
        if workers > limit:
            log.warning("workers = %d: this master has room for %d (restart to grow beyond it)",
                        workers, limit)
        return min(workers, limit)

    def handle_term(self) -> None:
        """Graceful stop: workers finish the current transaction, 421 at the next command."""
        self._begin_stop(signal.SIGTERM, self.config.graceful_timeout, "graceful stop")

    def handle_int(self) -> None:
        """Fast stop."""
        self._begin_stop(signal.SIGQUIT, FAST_STOP_SECONDS, "fast stop")

    handle_quit = handle_int

    def handle_ttin(self) -> None:
        """One worker more."""
        if self.adaptive:
            self.max_workers = self._capped(self.max_workers + 1)
            log.info("TTIN: max workers now %d", self.max_workers)
        else:
            self.target = self._capped(self.target + 1)
            log.info("TTIN: workers now %d", self.target)

    def handle_ttou(self) -> None:
        """One worker fewer (never fewer than one)."""
        if self.adaptive:
            self.max_workers = max(self.max_workers - 1, 1)
            log.info("TTOU: max workers now %d", self.max_workers)
        else:
            self.target = max(self.target - 1, 1)
            log.info("TTOU: workers now %d", self.target)

    def handle_usr1(self) -> None:
        """Reopen log files, here and in every worker."""
        logs.reopen()
        self._signal_all(signal.SIGUSR1)

    def handle_chld(self) -> None:
        """Reaping happens on every turn of the loop; the signal only wakes it."""

    # -- the loop -------------------------------------------------------------

    def run(self) -> int:
        """Start the pool and supervise it; return the process exit status."""
        self.init_signals()
        if self.config.pidfile:
            pidfile.write(self.config.pidfile, self.pid)
        # OpenSSL sets up its global tables on the first context: do it here, once, so workers
        # that make a TLS client context (the relay's STARTTLS upstream) share them.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # What a worker runs at start-up and in a session, recorded once, is given packed copies;
        # then it runs in earnest here (specialising those copies) before the first fork.
        plan = self._plan()
        ran: set[CodeType] = set()
        warm_up(self.config, sessions=1, ran=ran)
        rehearse(plan, times=1, ran=ran)
        gc.collect()
        fill_pools()  # so that the copies land on pages of their own, not in holes among others
        relocate(ran)
        warm_up(self.config)
        rehearse(plan)
        warm_fork_callbacks()  # before any thread of the master's own (metrics) starts
        gc.collect()
        # After the collection (it frees objects, leaving holes) and before the first fork.
        fill_pools()
        gc.freeze()  # what the master has built so far stays shared with the workers
        self._publish()
        self.metrics.start(self)
        log.info("master pid %d: %s workers, listening on %s", self.pid,
                 f"adaptive {self.target}..{self.max_workers}" if self.adaptive else self.target,
                 self.listener_text)
        try:
            self.spawn_missing()
            while self.exit_status is None:
                self._sleep()
                while self.queue:
                    name = SIGNALS[self.queue.pop(0)]
                    getattr(self, f"handle_{name}")()
                self.reap()
                self.notifier.watchdog()  # this loop turns: signals handled, children reaped
                if self.stop_deadline is not None:
                    self._continue_stop()
                    continue
                self._check_booted()
                self._check_reload()
                self.murder_stale()
                self.manage()
                self._publish()
        finally:
            self._shutdown()
        return self.exit_status

    def _sleep(self) -> None:
        try:
            ready, _, _ = select.select([self.wake_r], [], [], self.notifier.wait_limit(1.0))
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self.wake_r, 512):
                    pass
            except OSError:
                pass

    def _publish(self) -> None:
        listeners = self.listener_text
        self.scoreboard.set_header(self.pid, self.generation, self.started, self.reloads, listeners,
                                   self.last_error)
        current = sum(1 for c in self.children.values() if c.generation == self.generation)
        setproctitle(f"prefork-esmtp: master [gen {self.generation}] {current} workers, "
                     f"listening on {listeners}")
        if self.booted and self.reloading is None and self.stop_deadline is None:
            self.notifier.status(self._status_text())

    def _status_text(self) -> str:
        """One line for systemd's STATUS=: the serving generation, its workers busy and idle."""
        states = [self.scoreboard.slot(c.slot).state for c in self.children.values()
                  if c.generation == self.generation and not c.retiring]
        busy, idle = states.count(BUSY), states.count(IDLE)
        text = (f"generation {self.generation}: {len(states)} worker{'' if len(states) == 1 else 's'}, "
                f"{busy} busy, {idle} idle")
        retiring = len(self.children) - len(states)
        if retiring:
            text += f", {retiring} retiring"
        if self.last_error:
            text += f"; last reload failed: {self.last_error}"
        return text

    def _shutdown(self) -> None:
        for child in list(self.children.values()):
            try:
                os.kill(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in list(self.children.values()):
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
        if self.config.pidfile:
            pidfile.remove(self.config.pidfile, self.pid)
        self.metrics.stop()
        self.scoreboard.close()
        log.info("master pid %d exiting", self.pid)

    # -- children -------------------------------------------------------------

    def spawn_missing(self) -> None:
        """Fixed pool: fork until the current generation has ``target`` workers."""
        current = [c for c in self.children.values() if c.generation == self.generation and not c.retiring]
        self.spawn(self.target - len(current))

    def spawn(self, count: int = 1) -> None:
        """Fork ``count`` workers of the current generation (fewer if stopping, paused, full, or fork fails).

        The forks run back to back with as little of the master's own work
        between them as possible: every page the master writes after a fork
        stays behind as private memory of the worker forked just before, so
        the bookkeeping (slots claimed, signals blocked) is done once for the
        batch, before and after it.
        """
        if count <= 0 or self.stop_deadline is not None or time.monotonic() < self.spawn_paused_until:
            return
        slots = []
        for _ in range(count):
            slot = self.scoreboard.free_slot()
            if slot is None:
                log.error("scoreboard full; not starting another worker")
                break
            # Claimed before the fork: a worker that boots fast must not have its first report
            # overwritten by the master's bookkeeping (status showed busy workers as "starting").
            self.scoreboard.claim(slot, 0, self.generation)
            slots.append(slot)
        pids = [0] * len(slots)
        forked = 0
        fork = os.fork
        plan = self._plan()
        # Signals stay blocked across the forks until each child has its own handlers: a TERM
        # that lands in between is then delivered to the worker's handler, not lost in a
        # copy of the master's queue.  The master handles what arrived after the batch.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            while forked < len(slots):
                pid = fork()
                if pid == 0:
                    run_worker(plan, slots[forked])  # never returns
                pids[forked] = pid
                forked += 1
        except OSError as exc:  # EAGAIN (process limit), ENOMEM: keep serving, retry after a pause
            log.error("cannot fork a worker: %s", exc)
            self.spawn_paused_until = time.monotonic() + 1.0
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        now = time.time()
        for slot, pid in zip(slots, pids):
            if pid:
                self.scoreboard.set_pid(slot, pid)
                self.children[pid] = Child(pid, slot, self.generation, now)
            else:
                self.scoreboard.release(slot)

    def _plan(self) -> WorkerPlan:
        """What the workers of the next batch of forks get: one plan for all of them."""
        return WorkerPlan(
            master_pid=self.pid, generation=self.generation, config=self.config,
            handler_class=self.handler_class, ids=self.ids, listeners=self.listeners,
            tls_context=self.tls_context, tls_fds=self.tls_fds, scoreboard=self.scoreboard,
            rate_table=self.rate_table,
            wake_fd=self.wake_w, error_fd=self.error_w, master_fds=(self.wake_r, self.error_r),
            signals=frozenset(SIGNALS), counters=self.metrics.table)

    def reap(self) -> None:
        """Collect exited workers; a boot failure on first start stops the master."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            # Its counts join the totals before the slot can serve another worker.
            retired = child.retiring or self.stop_deadline is not None
            self.metrics.worker_exited(child.slot, _restart_reason(code, retired))
            self.scoreboard.release(child.slot)
            if code == BOOT_ERROR:
                self._boot_failed(child)
            elif code != 0 and self.stop_deadline is None and not child.retiring:
                log.warning("worker %d (generation %d) exited with %s; replacing it", pid, child.generation,
                            f"signal {-code}" if code < 0 else f"status {code}")

    def _boot_error_message(self) -> str:
        try:
            data = os.read(self.error_r, 65536).decode(errors="replace")
        except OSError:
            data = ""
        lines = [line for line in data.splitlines() if line.strip()]
        return lines[-1] if lines else "a worker could not boot"

    def _boot_failed(self, child: Child, message: str = "") -> None:
        """A worker that could not boot (its error, or ``message``): fail the start, abort the
        reload it belongs to, or pause respawns with a back-off."""
        message = message or self._boot_error_message()
        if self.fatal:
            return  # the start has already failed and is stopping: one report, not one per worker
        if child.generation > self.generation:
            return  # a worker of a reload already aborted: not a respawn failure, nothing to pause
        if not self.booted and self.reloading is None:
            self.fatal = message
            log.error("cannot start: %s", message)
            self.on_ready(message)
            self._begin_stop(signal.SIGQUIT, FAST_STOP_SECONDS, "start failed")
            self.exit_status_on_stop = 1
        elif self.reloading is not None and child.generation == self.generation:
            self._abort_reload(message)
        else:
            pause = self._pause_spawns()
            log.error("worker %d could not boot: %s; no new workers for %.0fs (fix the handler, then reload)",
                      child.pid, message, pause)

    def _pause_spawns(self) -> float:
        """One boot failure more: no new workers for 2, 4, 8 ... up to BOOT_BACKOFF_MAX seconds."""
        self.boot_failures += 1
        pause = min(2.0 ** self.boot_failures, BOOT_BACKOFF_MAX)
        self.spawn_paused_until = time.monotonic() + pause
        return pause

    def murder_stale(self) -> None:
        """Kill workers that missed their check-in by more than the worker timeout."""
        now = time.monotonic()
        timeout = self.config.worker_timeout
        for child in list(self.children.values()):
            slot = self.scoreboard.slot(child.slot)
            if slot.pid != child.pid:
                continue
            if slot.state == STARTING and child.generation > self.generation:
                continue  # booting in a reload already aborted: killed then, waiting to be reaped
            if slot.overdue(now, timeout):
                # Defence in depth (a worker stores each field whole, so a read shows it old or
                # new): read again, and a check-in time from before the worker was born is no
                # proof of a stuck worker; the next turn decides.
                slot = self.scoreboard.slot(child.slot)
                if slot.pid != child.pid or not slot.overdue(now, timeout):
                    continue
                if slot.seen < slot.started:  # the master's claim wrote both; a worker only moves seen on
                    log.warning("worker %d: scoreboard slot %d reads a check-in older than the worker "
                                "(%r); not killing it on that", child.pid, child.slot, slot)
                    continue
                log.error("worker %d is stuck (silent %.0fs, state %s); killing it", child.pid,
                          time.time() - slot.seen, slot.state_name)
                try:
                    os.kill(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if slot.state == STARTING:
                    # A hanging handler import is a boot failure like a broken one: no retry loop.
                    child.retiring = True
                    self._boot_failed(child, f"the handler import did not finish within {timeout:.0f}s")

    def manage(self) -> None:
        """Size the pool: replace the dead, then grow or shrink (fixed or adaptive)."""
        if self.reloading is not None:
            self.spawn_missing()
            return
        current = [c for c in self.children.values() if c.generation == self.generation and not c.retiring]
        if not self.adaptive:
            if len(current) < self.target:
                self.spawn_missing()
            for child in self._pick_idle(current, len(current) - self.target):
                self._retire(child)
            return
        now = time.monotonic()
        if now - self.last_adapt < 1.0:
            if len(current) < self.target:
                self.spawn_missing()
            return
        self.last_adapt = now
        idle = sum(1 for c in current if self.scoreboard.slot(c.slot).state in (IDLE, STARTING))
        step = adaptive_step(len(current), idle, self.config.min_spare or 0,
                             max_spare_default(self.config.min_spare, self.config.max_spare),
                             self.max_workers, self.spawn_rate)
        self.spawn(step.spawn)
        self.spawn_rate = step.spawn_rate
        for child in self._pick_idle(current, step.retire):  # Apache: one spare per second
            self._retire(child)
        self.target = max(1, len([c for c in self.children.values()
                                  if c.generation == self.generation and not c.retiring]))

    def _pick_idle(self, children: list[Child], count: int) -> list[Child]:
        if count <= 0:
            return []
        ranked = sorted(children, key=lambda c: (self.scoreboard.slot(c.slot).state == BUSY, -c.started))
        return ranked[:count]

    def _retire(self, child: Child) -> None:
        child.retiring = True
        try:
            os.kill(child.pid, signal.SIGHUP)
        except ProcessLookupError:
            pass

    def _signal_all(self, sig: int) -> None:
        for child in list(self.children.values()):
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                pass

    # -- reload -----------------------------------------------------------------

    def _check_booted(self) -> None:
        """The first time a worker is up: the start has succeeded."""
        if self.booted:
            return
        for child in self.children.values():
            if self.scoreboard.slot(child.slot).state in (IDLE, BUSY):
                self.booted = True
                log.info("ready: generation %d serving", self.generation)
                self.on_ready("")
                self.notifier.ready(self._status_text())
                return

    def _check_reload(self) -> None:
        """Once every worker of the new generation has booted, retire the old ones."""
        if self.reloading is None:
            return
        new = [c for c in self.children.values() if c.generation == self.generation]
        booted = [c for c in new if self.scoreboard.slot(c.slot).state in (IDLE, BUSY)]
        if len(booted) < min(self.target, 1) or len(booted) < len(new):
            return
        old_generation = self.reloading[0]
        for child in list(self.children.values()):
            if child.generation < self.generation and not child.retiring:
                self._retire(child)
        self.reloading = None
        self.reloads += 1
        self.last_error = ""
        self.metrics.reload_done(True)
        log.info("reloaded: generation %d serving, generation %d retiring", self.generation, old_generation)
        self.notifier.ready(self._status_text())

    def _reload_failed(self, message: str) -> None:
        log.error("reload failed, generation %d keeps serving: %s", self.generation, message)
        self.reloads += 1
        self.metrics.reload_done(False)
        self.last_error = message
        self.notifier.ready(self._status_text())  # the reload is over; the status says it failed
        self._publish()

    def _abort_reload(self, message: str) -> None:
        old_generation, old_config, old_handler, self.tls_context, self.ids = self.reloading
        for child in list(self.children.values()):
            if child.generation == self.generation and not child.retiring:
                # Those already serving finish their session like any retiring worker (no
                # connection is cut); only those still booting are killed.
                booting = self.scoreboard.slot(child.slot).state == STARTING
                child.retiring = True
                try:
                    os.kill(child.pid, signal.SIGKILL if booting else signal.SIGHUP)
                except ProcessLookupError:
                    pass
        self.generation, self.config, self.handler_class = old_generation, old_config, old_handler
        self.reloading = None
        self._reload_failed(message)

    # -- stopping ---------------------------------------------------------------

    exit_status_on_stop = 0

    def _begin_stop(self, sig: int, seconds: float, why: str) -> None:
        if self.stop_deadline is not None and sig == signal.SIGTERM:
            return
        log.info("%s: signalling %d workers", why, len(self.children))
        self.notifier.stopping(f"{why}: {self.fatal}" if self.fatal else why)
        self.stop_deadline = time.monotonic() + seconds
        for sock in self.listeners:
            # Workers still in a session hold copies of the listener; closing ours alone would
            # leave it accepting into a backlog nobody serves.  Shutting it down stops listening
            # in every process: new clients are refused at once (and can try another MX).
            # Not so with socket activation: the socket is systemd's, shared with its copy, and
            # must keep listening; clients queue in its backlog for the next start.
            if not self.inherited:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            sock.close()
        self._signal_all(sig)

    def _continue_stop(self) -> None:
        if not self.children:
            self.exit_status = self.exit_status_on_stop
            return
        if time.monotonic() > self.stop_deadline:
            log.warning("stop timeout: killing %d workers", len(self.children))
            self._signal_all(signal.SIGKILL)
            self.stop_deadline = time.monotonic() + 5.0


def _restart_reason(code: int, retired: bool) -> str | None:
    """Why a reaped worker is replaced, for the metrics: None when it was retired (or the server stops)."""
    if code == BOOT_ERROR:
        return "boot_failed"
    if retired:
        return None
    return "recycled" if code == 0 else "crashed"


def _preload_within(spec: str, seconds: float) -> type:
    """Re-import the handler in the master (a reload with preload), giving up after ``seconds``.

    A hanging import must not stall the master (no reaping, no stop): SIGALRM raises
    inside it, and load_handler reports that as a failed import, so the reload fails.
    """
    def expired(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the import did not finish within {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return load_handler(spec, fresh=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
