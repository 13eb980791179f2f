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
# pid, generation, state, sessions, started, seen, expect (seconds the worker may stay silent),
# due (the monotonic time by which it promised to check in again: seen + expect), peer.
# Native order and alignment: every 8-byte field sits on an 8-byte boundary of the mmap (the
# header ends on one and a slot is a multiple of 8), so a worker writes each number with one
# aligned store and the master, reading without a lock, sees each field old or new, never half.
_SLOT = struct.Struct("@iiB7xQdddd64s")
_PID, _STATE, _SESSIONS, _SEEN, _PEER = 0, 8, 16, 32, 56  # byte offsets in a slot (expect, due: after seen)
_PEER_SIZE = 64
_MAGIC = b"PFESMTP2"
_BASE = len(_MAGIC) + _HEADER.size  # where slot 0 starts
assert _BASE % 8 == 0 and _SLOT.size % 8 == 0 and struct.calcsize("@iiB7xQd") == _SEEN


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
    due: float
    peer: str

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "?")

    def overdue(self, now: float, grace: float) -> bool:
        """Whether the worker is more than ``grace`` seconds past its promised check-in.

        ``now`` is ``time.monotonic()``.  One field decides: a reader that took
        ``seen`` from one check-in and ``expect`` from the next (a worker long
        idle, promising nothing, now busy with a read timeout) would compute a
        deadline neither check-in promised; and a step of the wall clock moves
        no deadline.
        """
        return now > self.due + grace


class Scoreboard:
    """Fixed-size shared memory; one writer per slot (its worker), the master for the header.

    Who writes a slot: the master claims a free one before the fork (the whole
    record) and, after the fork, writes only its pid; the worker then writes
    only its own fields (state, sessions, seen, expect, due, peer), each with one
    store, so neither overwrites the other's news and a reader without a lock
    sees each field old or new.  The master releases the slot once it has
    reaped the worker, when nobody writes it any more.
    """

    def __init__(self, nslots: int, path: str | None = None) -> None:
        self.nslots = nslots
        self.size = _BASE + nslots * _SLOT.size
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
        self._views()
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
        if board.size < _BASE + board.nslots * _SLOT.size:
            raise ValueError(f"{path} is not a whole prefork-esmtp scoreboard")
        return board

    def _views(self) -> None:
        """Word views of the shared memory: a store through one is a single aligned write.

        (CPython stores a memoryview item with one fixed-size memcpy, which compiles
        to one aligned 8-byte move on 64-bit platforms, atomic on x86-64 and arm64.)

        ``struct.pack_into`` is not: it zeroes the whole record first, then
        converts and writes each field, so a reader in between sees zeros the
        worker never meant (a check-in at time 0: a busy worker taken for stuck).
        """
        self._bytes = memoryview(self.mem)
        self._i32 = self._bytes.cast("i")
        self._u64 = self._bytes.cast("Q")
        self._f64 = self._bytes.cast("d")

    def close(self) -> None:
        if isinstance(self.mem, mmap.mmap):
            for view in (self._i32, self._u64, self._f64, self._bytes):
                view.release()  # an mmap with live views cannot be closed
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
        return _BASE + index * _SLOT.size

    def claim(self, index: int, pid: int, generation: int) -> None:
        """Master, before the fork: reserve the slot for a worker (its pid follows with set_pid).

        The slot is free, so no worker writes it: one pack of the whole record is safe.
        """
        now = time.time()
        # due now: a worker must boot (its first report) within the master's grace
        _SLOT.pack_into(self.mem, self._offset(index), pid, generation, STARTING, 0, now, now, 0.0,
                        time.monotonic(), b"")
        self._free.discard(index)

    def set_pid(self, index: int, pid: int) -> None:
        """Master, after the fork: the slot's worker pid (the worker may have reported already)."""
        self._i32[(self._offset(index) + _PID) // 4] = pid  # one store: the worker may be writing its fields

    def release(self, index: int) -> None:
        """Master: the slot's worker is gone (reaped), so nobody writes the slot any more."""
        _SLOT.pack_into(self.mem, self._offset(index), 0, 0, FREE, 0, 0.0, 0.0, 0.0, 0.0, b"")
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
        """Worker: record state, sessions served and the peer; check in now.

        Field by field, each in one store, the state last: on x86-64, whose
        stores are seen in program order, a reader that sees the new state
        sees the peer and counts that go with it; anywhere, each field reads
        old or new.
        """
        off = _BASE + index * _SLOT.size
        self.mem[off + _PEER:off + _PEER + _PEER_SIZE] = peer.encode()[:_PEER_SIZE - 1].ljust(_PEER_SIZE, b"\0")
        self._u64[(off + _SESSIONS) >> 3] = sessions
        self.check_in(index, expect)
        self.mem[off + _STATE] = state

    def check_in(self, index: int, expect: float) -> None:
        """Worker: 'alive, and may stay silent for ``expect`` seconds' (before a blocking wait)."""
        word = (_BASE + index * _SLOT.size + _SEEN) >> 3  # seen, expect and due follow each other
        words = self._f64
        words[word] = time.time()
        words[word + 1] = expect
        words[word + 2] = time.monotonic() + expect

    def checker(self, index: int) -> Callable[[float], None]:
        """Worker: :meth:`check_in` for slot ``index`` as one function with everything bound.

        A session checks in before every blocking read; this does it in one
        Python call (the slot's word and the clocks are looked up once, not on
        every call), with the same three stores as :meth:`check_in`.
        """
        words, wall, monotonic = self._f64, time.time, time.monotonic
        seen = (_BASE + index * _SLOT.size + _SEEN) >> 3
        expect_at, due_at = seen + 1, seen + 2  # the words that follow seen's

        def check_in(expect: float) -> None:
            words[seen] = wall()
            words[expect_at] = expect
            words[due_at] = monotonic() + expect

        return check_in

    def updater(self, index: int) -> Callable[[int, int, str, float], None]:
        """Worker: :meth:`update` for slot ``index`` as one function with everything bound.

        The same stores in the same order as :meth:`update` (its check-in
        included, the state last), in one Python call instead of two; no peer
        (idle) is written as the zeros its encoding would make, made once.
        """
        mem, u64, f64, wall, monotonic = self.mem, self._u64, self._f64, time.time, time.monotonic
        off = _BASE + index * _SLOT.size
        peer_at, peer_end, sessions_at, word, state_at = \
            off + _PEER, off + _PEER + _PEER_SIZE, (off + _SESSIONS) >> 3, (off + _SEEN) >> 3, off + _STATE
        no_peer = bytes(_PEER_SIZE)  # "".encode()[:_PEER_SIZE - 1].ljust(_PEER_SIZE, b"\0")

        def update(state: int, sessions: int, peer: str, expect: float) -> None:
            mem[peer_at:peer_end] = peer.encode()[:_PEER_SIZE - 1].ljust(_PEER_SIZE, b"\0") if peer else no_peer
            u64[sessions_at] = sessions
            f64[word] = wall()
            f64[word + 1] = expect
            f64[word + 2] = monotonic() + expect
            mem[state_at] = state

        return update

    def slot(self, index: int) -> Slot:
        *fields, peer = _SLOT.unpack_from(self.mem, self._offset(index))
        return Slot(index, *fields, peer.rstrip(b"\0").decode())

    def sessions_from(self, ip: str) -> int:
        """How many busy workers serve a client at ``ip`` (the per-IP session limit)."""
        prefix = f"[{ip}]:" if ":" in ip else f"{ip}:"  # as the worker wrote it (logs.address)
        count = 0
        for index in range(self.nslots):
            slot = self.slot(index)
            if slot.state == BUSY and slot.peer.startswith(prefix):
                count += 1
        return count

    def slots(self) -> list[Slot]:
        """Every slot in use (not one claimed for a fork that has not returned yet)."""
        return [s for s in (self.slot(i) for i in range(self.nslots)) if s.state != FREE and s.pid]
