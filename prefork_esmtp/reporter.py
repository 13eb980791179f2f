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
        self.sessions = 0
        self.title = f"prefork-esmtp: worker [gen {generation}] "
        self.reported: tuple[int, int] | None = None  # (state, sessions) last written

    def idle(self) -> None:
        if self.reported == (IDLE, self.sessions):
            if self.idle_expect != math.inf:
                self.board.check_in(self.slot, self.idle_expect)  # the fallback's tick: still alive
            return
        self._report(IDLE, "idle", "", self.idle_expect)

    def busy(self, peer: Any) -> None:
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else ""
        self._report(BUSY, "busy", peer_text, self.busy_expect)

    def accepted(self) -> None:
        # The slot says busy at once (the master must not take this worker for an idle one);
        # the title waits for busy() with the client: one title per session, not two.
        self._report(BUSY, "busy", "", self.busy_expect, title=False)

    def served(self) -> None:
        self.sessions += 1

    def check_in(self, expect: float) -> None:
        self.board.check_in(self.slot, expect)

    def master_alive(self) -> bool:
        return os.getppid() == self.master_pid

    def sessions_from(self, ip: str) -> int:
        return self.board.sessions_from(ip)

    def _report(self, state: int, name: str, peer_text: str, expect: float, title: bool = True) -> None:
        self.board.update(self.slot, state, self.sessions, peer_text, expect)
        self.reported = (state, self.sessions)
        if title:
            setproctitle(f"{self.title}{name}{' ' + peer_text if peer_text else ''}, {self.sessions} sessions")
        if self.wake_fd is not None:  # booted: tell the master now
            fd, self.wake_fd = self.wake_fd, None
            try:
                os.write(fd, b"b")
            except OSError:
                pass
