"""What a worker tells about itself, in one object: idle, busy, sessions served, check-ins.

The serve loop and the session call one :class:`Reporter`; they never learn
where the news goes.  A pre-forked worker's :class:`ScoreboardReporter` writes
its scoreboard slot (read by the master's supervision and by ``status``) and
its process title; ``start -X`` uses the base class, which reports nothing.
"""

from __future__ import annotations

import math
import os
from typing import Any

from setproctitle import setproctitle

from prefork_esmtp.logs import address
from prefork_esmtp.scoreboard import BUSY, IDLE, Scoreboard

class Reporter:
    """Reports nothing: one process in the foreground (``-X``) has no master to tell."""

    def idle(self) -> None:
        """Waiting for a connection."""

    def busy(self, peer: Any) -> None:
        """Serving a session with ``peer`` (an address tuple, or anything else for none)."""

    def accepted(self) -> None:
        """Serving a connection whose client a PROXY header will name (then :meth:`busy`)."""

    def served(self) -> None:
        """One session more has ended."""

    def check_in(self, expect: float) -> None:
        """Alive, and may stay silent up to ``expect`` seconds (before a blocking read)."""

    def master_alive(self) -> bool:
        """Whether the master that started this worker is still its parent."""
        return True

    def sessions_from(self, ip: str) -> int:
        """Sessions with a client at ``ip`` across all workers (the per-IP limit); none known here."""
        return 0


#: The reporter of ``-X`` and of sessions run without a worker (the dialog tests): stateless, shared.
NO_REPORTER = Reporter()


class ScoreboardReporter(Reporter):
    """A pre-forked worker's reports: its scoreboard slot and its process title.

    The first report after boot also writes to ``wake_fd`` (the master's wake
    pipe), so the master sees the worker booted at once rather than at its
    next tick.  Slot and title are written when the state changes (busy,
    then idle with one session more), not when the serve loop comes round
    again with nothing new (a connection another worker took, a signal).
    """

    def __init__(self, board: Scoreboard, slot: int, generation: int, master_pid: int, *,
                 idle_expect: float, busy_expect: float, wake_fd: int | None = None) -> None:
        self.board = board
        self.slot = slot
        self.generation = generation
        self.master_pid = master_pid
        # how long the worker may stay silent: idle, its serve loop's tick; busy, the client read timeout
        self.idle_expect = idle_expect
        self.busy_expect = busy_expect
        self.wake_fd = wake_fd
        # check_in runs before every blocking read of a session: one bound function, which
        # writes the slot's check-in with no lookups on the way (it replaces the method).
        self.check_in = board.checker(slot)  # type: ignore[method-assign]
        self._update = board.updater(slot)  # board.update for this slot, in one call
        self.sessions = 0
        self.title = f"prefork-esmtp: worker [gen {generation}] "
        self.idle_at: int | None = None  # sessions served when idle was last written; None: not idle

    def idle(self) -> None:
        sessions = self.sessions
        if self.idle_at == sessions:  # nothing new since idle was written (another worker took it, a signal)
            if self.idle_expect != math.inf:
                self.check_in(self.idle_expect)  # the fallback's tick: still alive
            return
        self.idle_at = sessions
        self._update(IDLE, sessions, "", self.idle_expect)
        setproctitle(f"{self.title}idle, {sessions} sessions")
        if self.wake_fd is not None:
            self._booted()

    def busy(self, peer: Any) -> None:
        self.idle_at = None
        if isinstance(peer, tuple):
            peer_text = address(peer)
            title = f"{self.title}busy {peer_text}, {self.sessions} sessions"
        else:
            peer_text, title = "", f"{self.title}busy, {self.sessions} sessions"
        self._update(BUSY, self.sessions, peer_text, self.busy_expect)
        setproctitle(title)
        if self.wake_fd is not None:
            self._booted()

    def accepted(self) -> None:
        # The slot says busy at once (the master must not take this worker for an idle one);
        # the title waits for busy() with the client: one title per session, not two.
        self.idle_at = None
        self._update(BUSY, self.sessions, "", self.busy_expect)
        if self.wake_fd is not None:
            self._booted()

    def served(self) -> None:
        self.sessions += 1

    def check_in(self, expect: float) -> None:
        """Alive, and may stay silent up to ``expect`` seconds (each instance binds a faster one)."""
        self.board.check_in(self.slot, expect)

    def master_alive(self) -> bool:
        return os.getppid() == self.master_pid

    def sessions_from(self, ip: str) -> int:
        return self.board.sessions_from(ip)

    def _booted(self) -> None:
        """The first report after boot: tell the master now, through its wake pipe (once)."""
        fd, self.wake_fd = self.wake_fd, None
        try:
            os.write(fd, b"b")  # type: ignore[arg-type]
        except OSError:
            pass
