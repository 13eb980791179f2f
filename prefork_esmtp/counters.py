"""Counters in shared memory: one row per worker slot, written only by its worker, summed by the master.

A pre-forked worker counts events by adding to plain doubles in its own row
of an anonymous shared mmap the master makes before the first fork (next to
the scoreboard, indexed by the same slot): ``values[i] += 1`` is the whole
cost of an event, with no lock and no system call.  When the master reaps a
worker it adds the row to its totals of exited workers and zeroes it, so
counts survive recycling and reloads.  Without metrics (and in ``-X``) the
row is private memory nobody reads, so the engine counts the same way
either way.

Built-in series have fixed places (the schema below).  A handler's own
series (:mod:`prefork_esmtp.metrics`) get places in the row's small
directory the first time the worker uses them; the master merges them
across workers by name and labels.
"""

from __future__ import annotations

import bisect
import mmap
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """A metric as Prometheus names it: name, type (counter, histogram), help, label names."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Series:
    """One labelled series of a built-in family and its place in a row.

    A histogram takes ``len(bounds) + 2`` places: one count per bucket (the
    last is +Inf, counts not cumulative), then the sum.  ``always``: exported
    even while zero (a fixed, small label set); otherwise only once non-zero.
    """

    family: Family
    values: tuple[str, ...]
    index: int
    bounds: tuple[float, ...] = ()
    always: bool = True

    @property
    def width(self) -> int:
        return len(self.bounds) + 2 if self.family.kind == "histogram" else 1


#: Every built-in series, in row order.
SERIES: list[Series] = []


def _add(family: Family, *values: str, bounds: tuple[float, ...] = (), always: bool = True) -> int:
    index = SERIES[-1].index + SERIES[-1].width if SERIES else 0
    SERIES.append(Series(family, values, index, bounds, always))
    return index


def _family(name: str, kind: str, help: str, *labels: str) -> Family:
    return Family(f"prefork_esmtp_{name}", kind, help, labels)


# -- the schema: what the engine counts ---------------------------------------------

SESSIONS = _add(_family("sessions_total", "counter", "Sessions started (connections a worker accepted)."))
TRANSACTIONS = _add(_family("transactions_total", "counter", "Mail transactions started (MAIL answered 2xx)."))

_MESSAGES = _family("messages_total", "counter",
                    "Messages received to their end, by the reply to them: accepted (2xx) or refused.",
                    "result", "class")
#: Index by reply class (code // 100) of a message's reply.
MESSAGES_BY_CLASS = (0, 0, _add(_MESSAGES, "accepted", "2xx"), _add(_MESSAGES, "refused", "3xx", always=False),
                     _add(_MESSAGES, "refused", "4xx"), _add(_MESSAGES, "refused", "5xx"))
RECEIVED_OCTETS = _add(_family("received_octets_total", "counter",
                               "Octets received from clients (commands and data, after TLS), counted at session end."))
SIZE_BOUNDS = (1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0)
MESSAGE_SIZE = _add(_family("message_size_octets", "histogram", "Sizes of messages received to their end."),
                    bounds=SIZE_BOUNDS)
#: where MESSAGE_SIZE's sum is (after its buckets, as observe places it)
MESSAGE_SIZE_SUM = MESSAGE_SIZE + len(SIZE_BOUNDS) + 1

_RECIPIENTS = _family("recipients_total", "counter", "RCPT commands by the reply: accepted (2xx) or refused.",
                      "result")
_RCPT_OK, _RCPT_NO = _add(_RECIPIENTS, "accepted"), _add(_RECIPIENTS, "refused")
_AUTH = _family("auth_total", "counter",
                "AUTH commands by the reply: success (2xx), tempfail (4xx), failure (5xx).", "result")
_AUTH_OK, _AUTH_TEMP, _AUTH_FAIL = _add(_AUTH, "success"), _add(_AUTH, "tempfail"), _add(_AUTH, "failure")
#: Final replies counted by verb and reply class (code // 100).
BY_VERB = {
    "RCPT": (_RCPT_NO, _RCPT_NO, _RCPT_OK, _RCPT_NO, _RCPT_NO, _RCPT_NO),
    "AUTH": (_AUTH_FAIL, _AUTH_FAIL, _AUTH_OK, _AUTH_FAIL, _AUTH_TEMP, _AUTH_FAIL),
}

_TLS = _family("tls_handshakes_total", "counter", "TLS handshakes (STARTTLS and implicit TLS) by outcome.",
               "result")
TLS_OK, TLS_FAILED = _add(_TLS, "success"), _add(_TLS, "failure")

_ERRORS = _family("error_replies_total", "counter", "Error replies (4xx and 5xx) sent, by code.", "code")
#: The place of error reply code c (400 to 599) is ERROR_REPLIES + c - 400.
ERROR_REPLIES = _add(_ERRORS, "400", always=False)
for _code in range(401, 600):
    _add(_ERRORS, str(_code), always=False)

_TIMEOUTS = _family("timeouts_total", "counter",
                    "Sessions ended by a time limit: idle (timeout), command (command_deadline), "
                    "data_rate (min_data_rate), session (max_session_time).", "kind")
TIMEOUT_IDLE, TIMEOUT_COMMAND = _add(_TIMEOUTS, "idle"), _add(_TIMEOUTS, "command")
TIMEOUT_DATA_RATE, TIMEOUT_SESSION = _add(_TIMEOUTS, "data_rate"), _add(_TIMEOUTS, "session")

_HOOKS = _family("hook_exceptions_total", "counter",
                 "Handler hooks that raised or returned something that is not a reply, by hook "
                 "(message: HEADER, EOH or BODY; session: the constructor, or a failure outside any hook).",
                 "hook")
HOOK_NAMES = ("CONNECT", "HELO", "EHLO", "MAIL", "RCPT", "DATA", "message", "EOM", "AUTH", "STARTTLS", "RSET",
              "NOOP", "VRFY", "EXPN", "HELP", "QUIT", "UNKNOWN", "DISCONNECT", "session")
HOOK_EXCEPTIONS = {name: _add(_HOOKS, name, always=False) for name in HOOK_NAMES}

_LIMITS = _family("ip_limit_hits_total", "counter",
                  "Refusals by the per-address limits: sessions (max_sessions_per_ip), messages "
                  "(max_messages_per_ip), recipients (max_recipients_per_ip).", "limit")
IP_LIMIT_HITS = {what: _add(_LIMITS, what) for what in ("sessions", "messages", "recipients")}
LIMITS_FAILED_OPEN = _add(_family("limits_failed_open_total", "counter",
                                  "Per-address limits not applied because their shared state failed "
                                  "(Redis unavailable, the rate table full): mail flowed."))
DURATION_BOUNDS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
SESSION_DURATION = _add(_family("session_duration_seconds", "histogram", "Durations of sessions."),
                        bounds=DURATION_BOUNDS)

#: Places of the built-in series in a row.
BUILTIN = SERIES[-1].index + SERIES[-1].width


def observe(values: memoryview, index: int, bounds: tuple[float, ...], value: float) -> None:
    """Count ``value`` in the histogram at ``index`` (its bucket, and its sum)."""
    values[index + bisect.bisect_left(bounds, value)] += 1
    values[index + len(bounds) + 1] += value


def hook_failed(hook: str) -> None:
    """A handler hook raised (or returned garbage): count it for this process."""
    current.values[HOOK_EXCEPTIONS.get(hook, HOOK_EXCEPTIONS["session"])] += 1


# -- a row: the built-in values, the handler's values and their directory ------------

#: Places for a handler's own series in each worker's row, and how many series (entries) at most.
HANDLER_VALUES = 256
HANDLER_ENTRIES = 64
VALUES = BUILTIN + HANDLER_VALUES
#: A handler series' directory entry: its first place among the handler values, its width, its key.
_ENTRY = struct.Struct("<HH508s")
_USED = struct.Struct("<II")  # entries, handler values used: written after the entry they publish
_USED_OFFSET = VALUES * 8
_DIR_OFFSET = _USED_OFFSET + _USED.size
ROW_SIZE = _DIR_OFFSET + HANDLER_ENTRIES * _ENTRY.size
#: Longest key of a handler series (its JSON description), in octets.
MAX_KEY = _ENTRY.size - 4


class Row:
    """One worker's counters: ``values[i] += n`` for a place; :meth:`register` places a handler's series."""

    __slots__ = ("buf", "values")

    def __init__(self, buf: memoryview | bytearray) -> None:
        self.buf = buf
        self.values = memoryview(buf)[:VALUES * 8].cast("d")

    def register(self, key: bytes, width: int) -> int | None:
        """The place (in ``values``) of the handler series ``key``, ``width`` values wide.

        None when the row has no room left (HANDLER_ENTRIES series, HANDLER_VALUES
        values) or the key is too long: the caller then drops its updates.
        """
        if len(key) > MAX_KEY:
            return None
        count, used = _USED.unpack_from(self.buf, _USED_OFFSET)
        for i in range(count):
            base, size, entry = _ENTRY.unpack_from(self.buf, _DIR_OFFSET + i * _ENTRY.size)
            if entry.rstrip(b"\0") == key and size == width:
                return BUILTIN + base
        if count >= HANDLER_ENTRIES or used + width > HANDLER_VALUES:
            return None
        _ENTRY.pack_into(self.buf, _DIR_OFFSET + count * _ENTRY.size, used, width, key)
        _USED.pack_into(self.buf, _USED_OFFSET, count + 1, used + width)  # published once complete
        return BUILTIN + used


def read_row(buf: mmap.mmap | bytearray, offset: int = 0) -> tuple[tuple[float, ...], list[tuple[bytes, tuple[float, ...]]]]:
    """A snapshot of a row: its built-in values, and each handler series' key and values."""
    values = struct.unpack_from(f"<{VALUES}d", buf, offset)
    count, _ = _USED.unpack_from(buf, offset + _USED_OFFSET)
    handler = []
    for i in range(min(count, HANDLER_ENTRIES)):
        base, width, key = _ENTRY.unpack_from(buf, offset + _DIR_OFFSET + i * _ENTRY.size)
        start = BUILTIN + base
        handler.append((key.rstrip(b"\0"), values[start:start + width]))
    return values[:BUILTIN], handler


class CounterTable:
    """The shared rows, one per scoreboard slot; made by the master before any fork.

    Only the master reads whole rows (:meth:`read`) and clears them
    (:meth:`clear`, once the slot's worker is reaped); each worker writes
    only its own :meth:`row`.
    """

    def __init__(self, nslots: int) -> None:
        self.nslots = nslots
        self.mem = mmap.mmap(-1, nslots * ROW_SIZE)

    def row(self, slot: int) -> Row:
        """The row of ``slot``, for the worker that serves in it."""
        return Row(memoryview(self.mem)[slot * ROW_SIZE:(slot + 1) * ROW_SIZE])

    def read(self, slot: int) -> tuple[tuple[float, ...], list[tuple[bytes, tuple[float, ...]]]]:
        return read_row(self.mem, slot * ROW_SIZE)

    def clear(self, slot: int) -> None:
        """Zero the values and the directory of a slot whose worker is gone."""
        offset = slot * ROW_SIZE
        count, _ = _USED.unpack_from(self.mem, offset + _USED_OFFSET)
        end = _DIR_OFFSET + min(count, HANDLER_ENTRIES) * _ENTRY.size
        self.mem[offset:offset + end] = bytes(end)


#: This process's row: private memory until a pre-forked worker takes its slot's row (:func:`use`).
current = Row(bytearray(ROW_SIZE))


def use(row: Row) -> None:
    """Count into ``row`` from now on (a worker, right after the fork)."""
    global current
    current = row
