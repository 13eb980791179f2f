"""Unit tests of the shared counter rows and of the handler's metrics API (no server)."""

from __future__ import annotations

import json

import pytest

from prefork_esmtp import counters, metrics
from prefork_esmtp.exposition import _handler_families


@pytest.fixture
def table():
    """A two-slot table; this process counts in slot 0 during the test."""
    before = counters.current
    table = counters.CounterTable(2)
    counters.use(table.row(0))
    yield table
    counters.use(before)


def test_built_in_places_do_not_overlap_and_histograms_fill_their_buckets(table):
    places = [i for s in counters.SERIES for i in range(s.index, s.index + s.width)]
    assert places == list(range(counters.BUILTIN))
    values = counters.current.values
    for size in (10, 1024, 1025, 10 ** 9):
        counters.observe(values, counters.MESSAGE_SIZE, counters.SIZE_BOUNDS, size)
    builtin, _ = table.read(0)
    hist = builtin[counters.MESSAGE_SIZE:counters.MESSAGE_SIZE + len(counters.SIZE_BOUNDS) + 2]
    assert hist[0] == 2  # le=1024: 10 and 1024 (upper bounds are inclusive)
    assert hist[1] == 1  # le=4096: 1025
    assert hist[-2] == 1  # +Inf
    assert hist[-1] == 10 + 1024 + 1025 + 10 ** 9


def test_handler_series_are_registered_per_row_and_read_back(table):
    verdicts = metrics.counter("unit_verdicts_total", "help", ["verdict"])
    verdicts.inc(verdict="ham")
    verdicts.labels(verdict="ham").inc(2)
    verdicts.inc(verdict="spam")
    _, handler = table.read(0)
    by_labels = {tuple(json.loads(key)[4]): values for key, values in handler}
    assert by_labels == {("ham",): (3.0,), ("spam",): (1.0,)}
    # another worker's row: the same metric object registers afresh there
    counters.use(table.row(1))
    verdicts.inc(verdict="spam")
    assert [v for _, v in table.read(1)[1]] == [(1.0,)]
    table.clear(0)
    assert table.read(0) == ((0.0,) * counters.BUILTIN, [])


def test_a_full_row_drops_updates_instead_of_failing(table, caplog):
    many = metrics.counter("unit_many_total", "help", ["n"])
    for n in range(counters.HANDLER_ENTRIES + 5):
        many.inc(n=n)
    _, handler = table.read(0)
    assert len(handler) == counters.HANDLER_ENTRIES
    assert "no room for another series" in caplog.text


def test_declarations_are_checked_and_idempotent():
    first = metrics.counter("unit_same_total", "help", ["a"])
    assert metrics.counter("prefork_esmtp_unit_same_total", "other help", ["a"]) is first
    assert first.name == "prefork_esmtp_unit_same_total"
    with pytest.raises(ValueError, match="already declared"):
        metrics.counter("unit_same_total", "help", ["b"])
    with pytest.raises(ValueError, match="server's own"):
        metrics.counter("messages_total", "help")
    with pytest.raises(ValueError, match="label"):
        metrics.counter("unit_bad_label_total", "help", ["le"])
    with pytest.raises(ValueError, match="metric name"):
        metrics.counter("has space", "help")
    with pytest.raises(ValueError, match="expected labels"):
        first.inc(b="x")
    with pytest.raises(ValueError, match="cannot go down"):
        first.inc(-1, a="x")


def test_handler_series_merge_across_workers_and_a_changed_shape_keeps_the_first():
    def key(kind, name, labelnames, labels, bounds=(), help="h"):
        return json.dumps([kind, name, help, labelnames, labels, bounds], separators=(",", ":")).encode()

    handler = {
        key("counter", "prefork_esmtp_x_total", ["v"], ["a"]): [2.0],
        key("counter", "prefork_esmtp_x_total", ["v"], ["a"], help="new help"): [3.0],  # a reload changed help
        key("counter", "prefork_esmtp_x_total", ["w"], ["b"]): [7.0],  # a reload changed the labels
        key("histogram", "prefork_esmtp_y", [], [], [1.0]): [1.0, 2.0, 5.5],
    }
    families = {f.name: f for f in _handler_families(handler)}
    x = [(s.name, s.labels, s.value) for s in families["prefork_esmtp_x"].samples]
    assert x == [("prefork_esmtp_x_total", {"v": "a"}, 5.0)]
    y = {(s.name, s.labels.get("le")): s.value for s in families["prefork_esmtp_y"].samples}
    assert y[("prefork_esmtp_y_bucket", "1.0")] == 1.0
    assert y[("prefork_esmtp_y_bucket", "+Inf")] == 3.0
    assert y[("prefork_esmtp_y_count", None)] == 3.0 and y[("prefork_esmtp_y_sum", None)] == 5.5
