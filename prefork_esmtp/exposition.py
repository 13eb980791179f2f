"""The master's side of metrics: the counter table, totals of exited workers, and ``/metrics``.

The master makes the shared counter table before the first fork, folds a
reaped worker's row into its totals, and serves Prometheus text (or
OpenMetrics, by the scraper's Accept header) from one thread.  The thread
only reads shared memory and the master's plain attributes, so the
supervision loop never waits for a scraper, and a slow scraper cannot hold
anything: one connection at a time, each bounded to REQUEST_SECONDS and
REQUEST_OCTETS.  It blocks every signal (they go to the loop), writes
nothing to standard error (a lock held at a fork would stay held in the
worker), and the listening socket is closed in every forked worker.

prometheus_client (``pip install prefork-esmtp[metrics]``) renders the
format; it is imported only when metrics are on.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from prefork_esmtp import counters
from prefork_esmtp.scoreboard import BUSY, IDLE, STARTING

log = logging.getLogger("prefork_esmtp.metrics")

#: One scrape may take this long to send its request, and its request may be this big.
REQUEST_SECONDS = 5.0
REQUEST_OCTETS = 8192
#: Why a worker was replaced, as prefork_esmtp_worker_restarts_total counts it.
RESTART_REASONS = ("recycled", "crashed", "boot_failed")
MISSING_CLIENT = "metrics_listen needs prometheus-client: pip install 'prefork-esmtp[metrics]'"


def client_available() -> bool:
    """Whether prometheus_client can be imported (metrics_listen needs it)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


class NoMetrics:
    """Metrics off: the master's calls do nothing, and workers count into private memory."""

    table: counters.CounterTable | None = None

    def start(self, master: Any) -> None:
        """Before the first fork."""

    def worker_exited(self, slot: int, reason: str | None) -> None:
        """A reaped worker's slot; ``reason`` names a restart (None: retired or stopping)."""

    def reload_done(self, ok: bool) -> None:
        """A reload finished: the new generation serves (ok) or the old one goes on."""

    def stop(self) -> None:
        """The master is exiting."""


NO_METRICS = NoMetrics()


class MasterMetrics(NoMetrics):
    """Metrics on: the shared counter table, the totals of exited workers, and the HTTP thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()  # folds vs. snapshots: no count is seen twice or not at all
        self.retired = [0.0] * counters.BUILTIN
        self.retired_handler: dict[bytes, list[float]] = {}
        self.reloads = {"ok": 0, "failed": 0}
        self.restarts = dict.fromkeys(RESTART_REASONS, 0)
        self.master: Any = None
        self.thread: threading.Thread | None = None

    # -- the master's calls -------------------------------------------------------

    def start(self, master: Any) -> None:
        self.master = master
        self.table = counters.CounterTable(master.scoreboard.nslots)
        sock = self.sock
        sock.setblocking(True)
        # Workers must not keep the metrics port open (nor serve it): closed right after each fork.
        os.register_at_fork(after_in_child=sock.close)
        # Created with every signal blocked, the thread keeps them blocked: the kernel then
        # delivers the master's signals to the main thread, whose select() they must wake.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
            self.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        log.info("metrics on http://%s/metrics", _describe(sock))

    def worker_exited(self, slot: int, reason: str | None) -> None:
        table = self.table
        if table is None:
            return
        with self.lock:
            values, handler = table.read(slot)
            retired = self.retired
            for i, value in enumerate(values):
                if value:
                    retired[i] += value
            for key, series in handler:
                total = self.retired_handler.setdefault(key, [0.0] * len(series))
                if len(total) == len(series):
                    for i, value in enumerate(series):
                        total[i] += value
            table.clear(slot)
            if reason in self.restarts:
                self.restarts[reason] += 1

    def reload_done(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's accept()
        except OSError:
            pass
        self.sock.close()

    # -- what is served -----------------------------------------------------------

    def snapshot(self) -> tuple[list[float], dict[bytes, list[float]]]:
        """Totals now: exited workers plus every live row, built-in and handler series."""
        table = self.table
        with self.lock:
            totals = list(self.retired)
            handler = {key: list(values) for key, values in self.retired_handler.items()}
            for slot in range(table.nslots):
                values, series = table.read(slot)
                for i, value in enumerate(values):
                    if value:
                        totals[i] += value
                for key, row_values in series:
                    total = handler.setdefault(key, [0.0] * len(row_values))
                    if len(total) == len(row_values):
                        for i, value in enumerate(row_values):
                            total[i] += value
        return totals, handler

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for a scraper's Accept header: (body, content type)."""
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    # -- the HTTP thread ----------------------------------------------------------

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed: the master is exiting
            try:
                self._answer(conn)
            except Exception:  # never let a scraper end the thread; never print (see the module doc)
                log.debug("metrics request failed", exc_info=True)
            finally:
                conn.close()

    def _answer(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + REQUEST_SECONDS
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or len(data) > REQUEST_OCTETS:
                return
            conn.settimeout(left)
            try:
                chunk = conn.recv(4096)
            except (socket.timeout, OSError):
                return
            if not chunk:
                return
            data += chunk
        head = data.split(b"\n", 1)[0].decode("latin-1").split()
        headers = _headers(data)
        if len(head) != 3 or not head[2].startswith("HTTP/"):
            status, body, content_type = "400 Bad Request", b"bad request\n", "text/plain"
        elif head[0] not in ("GET", "HEAD"):
            status, body, content_type = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        elif head[1].split("?", 1)[0] not in ("/metrics", "/"):
            status, body, content_type = "404 Not Found", b"GET /metrics\n", "text/plain"
        else:
            body, content_type = self.render(headers.get("accept", ""))
            status = "200 OK"
        out = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode("latin-1")
        if head and head[0] != "HEAD":
            out += body
        conn.settimeout(max(deadline - time.monotonic(), 0.5))
        conn.sendall(out)


def _headers(data: bytes) -> dict[str, str]:
    out = {}
    for line in data.decode("latin-1").splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Collector:
    """prometheus_client's view of one snapshot: built-in, master and handler families."""

    def __init__(self, metrics: MasterMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self.metrics
        totals, handler = metrics.snapshot()
        families: dict[str, Any] = {}
        for series in counters.SERIES:
            family = series.family
            values = totals[series.index:series.index + series.width]
            if not series.always and not any(values):
                families.setdefault(family.name, _new_family(family))
                continue
            _add_sample(families.setdefault(family.name, _new_family(family)), series.family.kind,
                        series.values, series.bounds, values)
        yield from families.values()
        yield from _handler_families(handler)

        master = metrics.master
        workers = GaugeMetricFamily("prefork_esmtp_workers", "Worker processes by state (booting, idle, busy).",
                                    labels=["state"])
        states = {STARTING: 0, IDLE: 0, BUSY: 0}
        for slot in master.scoreboard.slots():
            if slot.state in states:
                states[slot.state] += 1
        for state, name in ((STARTING, "booting"), (IDLE, "idle"), (BUSY, "busy")):
            workers.add_metric([name], states[state])
        yield workers
        yield GaugeMetricFamily("prefork_esmtp_generation", "The generation of workers serving now "
                                "(1 at start, one more per reload that got its workers booted).",
                                value=master.generation)
        reloads = CounterMetricFamily("prefork_esmtp_reloads", "Reloads (HUP) by outcome: ok (the new "
                                      "generation serves) or failed (the old one goes on).", labels=["result"])
        for result, count in metrics.reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        restarts = CounterMetricFamily("prefork_esmtp_worker_restarts", "Workers replaced: recycled "
                                       "(max_connections_per_child), crashed (a signal, including stuck workers "
                                       "killed, or a non-zero exit), boot_failed.", labels=["reason"])
        for reason, count in metrics.restarts.items():
            restarts.add_metric([reason], count)
        yield restarts
        yield GaugeMetricFamily("prefork_esmtp_start_time_seconds", "When the master started (Unix time).",
                                value=master.started)


def _new_family(family: counters.Family) -> Any:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    cls = HistogramMetricFamily if family.kind == "histogram" else CounterMetricFamily
    name = family.name[:-6] if family.kind == "counter" and family.name.endswith("_total") else family.name
    return cls(name, family.help, labels=list(family.labels))


def _add_sample(metric: Any, kind: str, labels: tuple[str, ...], bounds: tuple[float, ...],
                values: list[float]) -> None:
    if kind != "histogram":
        metric.add_metric(list(labels), values[0])
        return
    buckets, running = [], 0.0
    for bound, count in zip((*bounds, float("inf")), values[:-1]):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else _bound(bound), running))
    metric.add_metric(list(labels), buckets, values[-1])


def _bound(value: float) -> str:
    from prometheus_client.utils import floatToGoString

    return floatToGoString(value)


def _handler_families(handler: dict[bytes, list[float]]) -> list[Any]:
    """The handler's series, merged by name and labels across workers and generations.

    A name declared differently (kind, label names, buckets) by two
    generations keeps its first shape; the other's series are left out.
    """
    shapes: dict[str, tuple] = {}
    samples: dict[tuple[str, tuple[str, ...]], list[float]] = {}
    for key in sorted(handler):
        try:
            kind, name, help, labelnames, labels, bounds = json.loads(key)
        except (ValueError, TypeError):
            continue
        shape = (kind, help, tuple(labelnames), tuple(bounds))
        known = shapes.setdefault(name, shape)
        values = handler[key]
        if known[0] != kind or known[2:] != shape[2:] or len(values) != (len(bounds) + 2 if kind == "histogram" else 1):
            continue
        total = samples.setdefault((name, tuple(labels)), [0.0] * len(values))
        for i, value in enumerate(values):
            total[i] += value
    families: dict[str, Any] = {}
    for (name, labels), values in samples.items():
        kind, help, labelnames, bounds = shapes[name]
        family = families.get(name)
        if family is None:
            family = families[name] = _new_family(counters.Family(name, kind, help, labelnames))
        _add_sample(family, kind, labels, bounds, values)
    return list(families.values())
