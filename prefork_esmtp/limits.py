"""Limits per client address across workers and hosts: sessions, messages and recipients.

``max_sessions_per_ip`` counts concurrent sessions; ``max_messages_per_ip`` and
``max_recipients_per_ip`` count MAIL and RCPT commands per ``limits_window``
seconds (fixed windows, like Postfix's anvil).  On one host the workers share
the counts with no extra component: sessions on the scoreboard, rates in a
small shared-memory table.  With ``limits_backend = "redis://..."`` every
count lives in Redis, so a fleet of hosts behind a load balancer enforces one
limit together (Haraka and rspamd use Redis the same way).  Whatever goes
wrong with the shared state (Redis down, a full table, a lock not had in
time) fails open: the limit is not applied, a warning is logged, and mail flows.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import logging
import mmap
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

from prefork_esmtp import counters

log = logging.getLogger("prefork_esmtp.limits")

#: Seconds between two warnings about limits that cannot be applied (per process).
WARN_EVERY = 10.0
#: After a Redis failure, seconds during which Redis is not asked again (fail open at once).
REDIS_PAUSE = 5.0
#: Seconds each Redis command (and connection) may take before the limit fails open.
REDIS_TIMEOUT = 0.5


def _ip_key(ip: str) -> bytes:
    """16 octets for an address (IPv4 mapped into IPv6), or a hash of anything else."""
    try:
        return ipaddress.ip_address(ip.split("%")[0]).packed.rjust(16, b"\0")
    except ValueError:
        return zlib.crc32(ip.encode()).to_bytes(16, "big")


class RateTable:
    """Per-address counts of messages and recipients in the current window, in shared memory.

    An open-addressed table in an anonymous shared file (``memfd``), made before
    the workers fork.  A POSIX record lock on that file guards each update; the
    kernel releases it if its holder dies, so a killed worker never wedges the others.
    """

    ENTRY = struct.Struct("<16sdII")  # address, window start, messages, recipients
    PROBES = 8

    def __init__(self, entries: int = 4096) -> None:
        self.entries = entries
        size = entries * self.ENTRY.size
        self.fd = os.memfd_create("prefork-esmtp-limits", os.MFD_CLOEXEC) if hasattr(os, "memfd_create") \
            else _unlinked_tempfile()
        os.ftruncate(self.fd, size)
        self.mem = mmap.mmap(self.fd, size)

    def add(self, ip: str, window: float, messages: int, recipients: int) -> tuple[int, int] | None:
        """Count for ``ip`` in the window now; return its (messages, recipients) so far, or None (no room)."""
        key = _ip_key(ip)
        now = time.time()
        start = now - now % window
        first = zlib.crc32(key) % self.entries
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except OSError:
            return None
        try:
            reuse = None
            for probe in range(self.PROBES):
                index = (first + probe) % self.entries
                offset = index * self.ENTRY.size
                found, began, m, r = self.ENTRY.unpack_from(self.mem, offset)
                if found == key:
                    if began != start:
                        m = r = 0
                    m, r = m + messages, r + recipients
                    self.ENTRY.pack_into(self.mem, offset, key, start, m, r)
                    return m, r
                if reuse is None and (began != start or found == bytes(16)):
                    reuse = offset  # empty, or left over from an older window
            if reuse is None:
                return None
            self.ENTRY.pack_into(self.mem, reuse, key, start, messages, recipients)
            return messages, recipients
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)


def _unlinked_tempfile() -> int:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="prefork-esmtp-limits-")
    os.unlink(path)
    return fd


class Limits:
    """What the session asks before serving a client, a MAIL and a RCPT; True means over the limit."""

    def __init__(self, config: Any, sessions_from: Callable[[str], int] = lambda ip: 0,
                 rates: RateTable | None = None) -> None:
        self.config = config
        self.sessions_from = sessions_from
        self.rates = rates
        self.redis: RedisCounts | None = None
        backend = getattr(config, "limits_backend", "local")
        if backend != "local":
            self.redis = RedisCounts(backend, config)
        self._warned = 0.0

    def _warn(self, message: str, *args: Any) -> None:
        """A limit not applied (fail open): counted every time, logged at most every WARN_EVERY seconds."""
        counters.current.values[counters.LIMITS_FAILED_OPEN] += 1
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("limits not applied: " + message, *args)

    # -- sessions ---------------------------------------------------------------

    def session_opened(self, ip: str) -> bool:
        """A session with ``ip`` starts: whether that makes one too many (then it is not counted)."""
        limit = self.config.max_sessions_per_ip
        if self.redis is not None:
            count = self.redis.session_opened(ip, limit)
            if count is None:
                self._warn("Redis unavailable (%s)", self.redis.last_error)
                return False
            return _over("sessions", bool(limit) and count > limit)
        return _over("sessions", bool(limit) and self.sessions_from(ip) > limit)

    def session_closed(self, ip: str) -> None:
        """The session with ``ip`` has ended (Redis forgets it; the scoreboard forgets by itself)."""
        if self.redis is not None:
            self.redis.session_closed(ip)

    # -- rates ------------------------------------------------------------------

    def message(self, ip: str) -> bool:
        """A MAIL from ``ip``: whether it is over ``max_messages_per_ip`` in this window."""
        limit = self.config.max_messages_per_ip
        return bool(limit) and self._rate(ip, "messages", limit, 1, 0)  # no limit: nothing to count

    def recipient(self, ip: str) -> bool:
        """A RCPT from ``ip``: whether it is over ``max_recipients_per_ip`` in this window."""
        limit = self.config.max_recipients_per_ip
        return bool(limit) and self._rate(ip, "recipients", limit, 0, 1)

    def _rate(self, ip: str, what: str, limit: int, messages: int, recipients: int) -> bool:
        window = self.config.limits_window
        if self.redis is not None:
            count = self.redis.count(ip, what, window)
            if count is None:
                self._warn("Redis unavailable (%s)", self.redis.last_error)
                return False
            return _over(what, count > limit)
        if self.rates is None:
            return False
        counts = self.rates.add(ip, window, messages, recipients)
        if counts is None:
            self._warn("the shared rate table has no room for %s", ip)
            return False
        return _over(what, (counts[0] if messages else counts[1]) > limit)


def _over(what: str, over: bool) -> bool:
    """Count a refusal by the ``what`` limit (sessions, messages, recipients); return ``over``."""
    if over:
        counters.current.values[counters.IP_LIMIT_HITS[what]] += 1
    return over


class RedisCounts:
    """The counts in Redis: one key per address and window for rates, a sorted set per address for sessions.

    Sessions are members of ``<prefix>sessions:<ip>`` scored by their start time,
    removed at their end; a member older than the longest session (a worker
    killed before it could remove it) is dropped when the address is next counted.
    """

    def __init__(self, url: str, config: Any) -> None:
        try:
            import redis
        except ImportError:
            raise RuntimeError("limits_backend = redis needs the redis package: "
                               "pip install 'prefork-esmtp[redis]'") from None
        self.client = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT,
                                           socket_connect_timeout=REDIS_TIMEOUT, retry_on_timeout=False)
        self.errors = (redis.RedisError, OSError)
        self.prefix = "prefork-esmtp:"
        self.stale = (config.max_session_time or 3600.0) + 60.0
        self.paused_until = 0.0
        self.last_error = ""
        self.member = f"{socket.gethostname()}:{os.getpid()}:"
        self.sessions: dict[str, str] = {}  # ip -> our member for the session under way
        self._ids = itertools.count()

    def _run(self, build: Callable[[Any], None]) -> list | None:
        """Run a pipeline; None (and a pause) if Redis cannot answer."""
        if time.monotonic() < self.paused_until:
            return None
        try:
            pipe = self.client.pipeline(transaction=False)
            build(pipe)
            return pipe.execute()
        except self.errors as exc:
            self.last_error = str(exc) or type(exc).__name__
            self.paused_until = time.monotonic() + REDIS_PAUSE
            return None

    def session_opened(self, ip: str, limit: int) -> int | None:
        if not limit:
            return 0
        key = f"{self.prefix}sessions:{ip}"
        member = f"{self.member}{next(self._ids)}"
        now = time.time()

        def build(pipe: Any) -> None:
            pipe.zremrangebyscore(key, "-inf", now - self.stale)
            pipe.zadd(key, {member: now})
            pipe.zcard(key)
            pipe.expire(key, int(self.stale) + 1)

        result = self._run(build)
        if result is None:
            return None
        count = int(result[2])
        if count > limit:
            self._run(lambda pipe: pipe.zrem(key, member))
        else:
            self.sessions[ip] = member
        return count

    def session_closed(self, ip: str) -> None:
        member = self.sessions.pop(ip, None)
        if member is not None:
            self._run(lambda pipe: pipe.zrem(f"{self.prefix}sessions:{ip}", member))

    def count(self, ip: str, what: str, window: float) -> int | None:
        index = int(time.time() // window)
        key = f"{self.prefix}{what}:{ip}:{index}"

        def build(pipe: Any) -> None:
            pipe.incr(key)
            pipe.expire(key, int(window) + 1)

        result = self._run(build)
        return None if result is None else int(result[0])
