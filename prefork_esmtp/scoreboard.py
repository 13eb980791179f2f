"""The scoreboard: shared memory where workers say what they do and the master reads it.

A header (master pid, start time, generation, listeners, reload outcome) and
one fixed-size slot per worker (pid, generation, state, sessions served,
current peer, last check-in).  It lives in an mmap made before fork; with a
pidfile it is backed by ``<pidfile>.scoreboard`` so ``prefork-esmtp status``
can read it from another process (Apache's ScoreBoardFile).
"""

from __future__ import annotations

import heapq
import mmap
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FREE, STARTING, IDLE, BUSY, EXITING = range(5)
STATE_NAMES = {FREE: "free", STARTING: "starting", IDLE: "idle", BUSY: "busy", EXITING: "exiting"}

# master pid, generation, started, reloads (completed or failed), nslots, listeners, last error
_HEADER = struct.Struct("<iidII256s256s")
# pid, generation, state, sessions, started, seen, expect (seconds the worker may stay silent), peer
_SLOT = struct.Struct("<iiB3xQddd64s")
_SEEN_OFFSET = struct.calcsize("<iiB3xQd")  # where 'seen' and 'expect' start in a slot
# After the fork the master writes only the pid and the worker only its own fields (state,
# sessions, seen, expect, peer), so neither can overwrite the other's news.
_STATE_OFFSET = struct.calcsize("<ii")
_STATE = struct.Struct("<B3xQ")  # state, sessions
_SEEN = struct.Struct("<dd64s")  # seen, expect, peer
_CHECK_IN = struct.Struct("<dd")  # seen, expect
_MAGIC = b"PFESMTP1"


@dataclass
class Slot:
    """One worker's row, as read from the scoreboard."""

    index: int
    pid: int
    generation: int
    state: int
    sessions: int
    started: float
    seen: float
    expect: float
    peer: str

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "?")


class Scoreboard:
    """Fixed-size shared memory; one writer per slot (its worker), the master for the header."""

    def __init__(self, nslots: int, path: str | None = None) -> None:
        self.nslots = nslots
        self.size = len(_MAGIC) + _HEADER.size + nslots * _SLOT.size
        self.path = path
        if path:
            # Never through a planted symlink or into someone else's file: remove what is
            # there (a stale board, or the link itself, never its target), then create anew.
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.ftruncate(fd, self.size)
                self.mem = mmap.mmap(fd, self.size)
            finally:
                os.close(fd)
        else:
            self.mem = mmap.mmap(-1, self.size)
        self.mem[: len(_MAGIC)] = _MAGIC
        # The master's own account of free slots (it alone claims and releases them): finding
        # one is then O(log n), not a scan of every slot per fork, which made starting a pool
        # of 1,000 workers quadratic.  Lowest index first, as the scan gave.
        self._free = set(range(nslots))
        self._free_heap = list(range(nslots))

    @classmethod
    def open(cls, path: str) -> "Scoreboard":
        """Attach to another master's scoreboard file, read-only."""
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(_MAGIC):
            raise ValueError(f"{path} is not a prefork-esmtp scoreboard")
        board = cls.__new__(cls)
        board.path = path
        board.mem = bytearray(data)  # a snapshot is all status needs
        header = board.header()
        board.nslots = header["nslots"]
        board.size = len(data)
        return board

    def close(self) -> None:
        if isinstance(self.mem, mmap.mmap):
            self.mem.close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    # -- header (master writes) ----------------------------------------------

    def set_header(self, pid: int, generation: int, started: float, reloads: int,
                   listeners: str, error: str = "") -> None:
        _HEADER.pack_into(self.mem, len(_MAGIC), pid, generation, started, reloads, self.nslots,
                          listeners.encode()[:255], error.encode("utf-8", "replace")[:255])

    def header(self) -> dict[str, Any]:
        pid, generation, started, reloads, nslots, listeners, error = _HEADER.unpack_from(self.mem, len(_MAGIC))
        return {"pid": pid, "generation": generation, "started": started, "reloads": reloads,
                "nslots": nslots, "listeners": listeners.rstrip(b"\0").decode(),
                "error": error.rstrip(b"\0").decode("utf-8", "replace")}

    # -- slots ----------------------------------------------------------------

    def _offset(self, index: int) -> int:
        return len(_MAGIC) + _HEADER.size + index * _SLOT.size

    def claim(self, index: int, pid: int, generation: int) -> None:
        """Master, before the fork: reserve the slot for a worker (its pid follows with set_pid)."""
        now = time.time()
        _SLOT.pack_into(self.mem, self._offset(index), pid, generation, STARTING, 0, now, now, 0.0, b"")
        self._free.discard(index)

    def set_pid(self, index: int, pid: int) -> None:
        """Master, after the fork: the slot's worker pid (the worker may have reported already)."""
        struct.pack_into("<i", self.mem, self._offset(index), pid)

    def release(self, index: int) -> None:
        """Master: the slot's worker is gone."""
        _SLOT.pack_into(self.mem, self._offset(index), 0, 0, FREE, 0, 0.0, 0.0, 0.0, b"")
        if index not in self._free:
            self._free.add(index)
            heapq.heappush(self._free_heap, index)

    def free_slot(self) -> int | None:
        """Master: the lowest slot not claimed (None when all are), without claiming it."""
        heap = self._free_heap
        while heap and heap[0] not in self._free:
            heapq.heappop(heap)  # claimed since it was pushed
        return heap[0] if heap else None

    def update(self, index: int, state: int, sessions: int, peer: str, expect: float) -> None:
        """Worker: record state, sessions served and the peer; check in now."""
        off = len(_MAGIC) + _HEADER.size + index * _SLOT.size
        _STATE.pack_into(self.mem, off + _STATE_OFFSET, state, sessions)
        _SEEN.pack_into(self.mem, off + _SEEN_OFFSET, time.time(), expect, peer.encode()[:63])

    def check_in(self, index: int, expect: float) -> None:
        """Worker: 'alive, and may stay silent for ``expect`` seconds' (before a blocking wait)."""
        _CHECK_IN.pack_into(self.mem, self._offset(index) + _SEEN_OFFSET, time.time(), expect)

    def checker(self, index: int) -> Callable[[float], None]:
        """Worker: :meth:`check_in` for slot ``index`` as one function with everything bound.

        A session checks in before every blocking read; this does it in one
        Python call (the slot's place is found once, not on every call).
        """
        pack, mem, offset, now = _CHECK_IN.pack_into, self.mem, self._offset(index) + _SEEN_OFFSET, time.time

        def check_in(expect: float) -> None:
            pack(mem, offset, now(), expect)

        return check_in

    def slot(self, index: int) -> Slot:
        *fields, peer = _SLOT.unpack_from(self.mem, self._offset(index))
        return Slot(index, *fields, peer.rstrip(b"\0").decode())

    def sessions_from(self, ip: str) -> int:
        """How many busy workers serve a client at ``ip`` (the per-IP session limit)."""
        count = 0
        for index in range(self.nslots):
            slot = self.slot(index)
            if slot.state == BUSY and slot.peer.rpartition(":")[0] == ip:
                count += 1
        return count

    def slots(self) -> list[Slot]:
        """Every slot in use (not one claimed for a fork that has not returned yet)."""
        return [s for s in (self.slot(i) for i in range(self.nslots)) if s.state != FREE and s.pid]
