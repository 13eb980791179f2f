"""A handler's own metrics: counters and histograms that add up across workers, reloads and recycling.

Declare them once (at module level, or in a hook: the same name gives the
same metric back) and update them in hooks::

    from prefork_esmtp import ESMTPHandler, metrics

    VERDICTS = metrics.counter("spam_verdicts_total", "Messages by spam verdict.", ["verdict"])

    class Filter(ESMTPHandler):
        def EOM(self):
            VERDICTS.inc(verdict="ham")          # or self.metrics.counter(...) inside a hook
            return super().EOM()

Names get the ``prefork_esmtp_`` prefix if they lack it.  Values live in the
worker's row of the shared counter table (:mod:`prefork_esmtp.counters`), so
an update costs a few dict look-ups and an addition; the master serves the sums
on ``/metrics``.  Each worker holds at most HANDLER_ENTRIES labelled series
(HANDLER_VALUES values; a histogram takes one per bucket plus two): updates
beyond that are dropped with one warning in the log.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from typing import Any

from prefork_esmtp import counters

log = logging.getLogger("prefork_esmtp.metrics")

PREFIX = "prefork_esmtp_"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_BUILTIN_NAMES = frozenset(s.family.name for s in counters.SERIES) | {
    "prefork_esmtp_workers", "prefork_esmtp_generation", "prefork_esmtp_reloads_total",
    "prefork_esmtp_worker_restarts_total", "prefork_esmtp_start_time_seconds"}

_declared: dict[str, "Metric"] = {}
_warned = False


class Metric:
    """A named family of labelled series; :class:`Counter` and :class:`Histogram` are the kinds."""

    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str], bounds: tuple[float, ...] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labels)
        self.bounds = bounds
        self.width = len(bounds) + 2 if bounds else 1
        self._row: counters.Row | None = None
        self._places: dict[tuple[str, ...], int | None] = {}

    def _place(self, labels: dict[str, Any]) -> int | None:
        """The place of the series with these labels in this process's row (registered on first use)."""
        if len(labels) != len(self.labelnames) or any(n not in labels for n in self.labelnames):
            raise ValueError(f"{self.name}: expected labels {', '.join(self.labelnames) or '(none)'}, "
                             f"got {', '.join(labels) or '(none)'}")
        values = tuple(str(labels[n]) for n in self.labelnames)
        row = counters.current
        if row is not self._row:  # a new process (a worker after the fork): places are per row
            self._row, self._places = row, {}
        try:
            return self._places[values]
        except KeyError:
            pass
        key = json.dumps([self.kind, self.name, self.help, self.labelnames, values, self.bounds],
                         separators=(",", ":")).encode()
        place = row.register(key, self.width)
        if place is None:
            _warn_full(self.name)
        self._places[values] = place
        return place


class Counter(Metric):
    """A count that only goes up."""

    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Add ``amount`` (not negative) to the series with these labels."""
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot go down ({amount})")
        place = self._place(labels)
        if place is not None:
            counters.current.values[place] += amount

    def labels(self, **labels: Any) -> "_BoundCounter":
        """The series with these labels, for repeated updates."""
        return _BoundCounter(self, labels)


class Histogram(Metric):
    """Observations counted in buckets (``le`` upper bounds, +Inf added), with their sum."""

    kind = "histogram"

    def observe(self, value: float, **labels: Any) -> None:
        """Count ``value`` in the series with these labels."""
        place = self._place(labels)
        if place is not None:
            counters.observe(counters.current.values, place, self.bounds, value)

    def labels(self, **labels: Any) -> "_BoundHistogram":
        return _BoundHistogram(self, labels)


class _BoundCounter:
    __slots__ = ("metric", "label_values")

    def __init__(self, metric: Counter, labels: dict[str, Any]) -> None:
        self.metric, self.label_values = metric, labels

    def inc(self, amount: float = 1.0) -> None:
        self.metric.inc(amount, **self.label_values)


class _BoundHistogram:
    __slots__ = ("metric", "label_values")

    def __init__(self, metric: Histogram, labels: dict[str, Any]) -> None:
        self.metric, self.label_values = metric, labels

    def observe(self, value: float) -> None:
        self.metric.observe(value, **self.label_values)


def counter(name: str, help: str, labels: Iterable[str] = ()) -> Counter:
    """The counter ``name`` (declared now, or the one declared before with the same name and labels)."""
    return _declare(Counter, name, help, labels, ())


def histogram(name: str, help: str, labels: Iterable[str] = (),
              buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
    """The histogram ``name`` with these bucket upper bounds (+Inf is added)."""
    bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))
    if not bounds:
        raise ValueError(f"{name}: a histogram needs at least one bucket bound")
    return _declare(Histogram, name, help, labels, bounds)


def _declare(cls: type, name: str, help: str, labels: Iterable[str], bounds: tuple[float, ...]) -> Any:
    full = name if name.startswith(PREFIX) else PREFIX + name
    labels = tuple(labels)
    if not _NAME.fullmatch(full):
        raise ValueError(f"{name!r} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)")
    if full in _BUILTIN_NAMES:
        raise ValueError(f"{full} is one of the server's own metrics")
    for label in labels:
        if not _LABEL.fullmatch(label) or label.startswith("__") or label == "le":
            raise ValueError(f"{full}: {label!r} is not a usable label name")
    known = _declared.get(full)
    if known is not None:
        if type(known) is not cls or known.labelnames != labels or known.bounds != bounds:
            raise ValueError(f"{full} is already declared as a {known.kind} with labels {known.labelnames}")
        return known
    metric = cls(full, help, labels, bounds)
    _declared[full] = metric
    return metric


def _warn_full(name: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("handler metric %s: no room for another series in this worker (at most %d series, "
                    "%d values); its updates are dropped", name, counters.HANDLER_ENTRIES,
                    counters.HANDLER_VALUES)
