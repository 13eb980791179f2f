"""The transaction's log line follows the logging level as it is at each message's end, changed at run time.

The engine asks logging's own per-level record before calling ``isEnabledFor``; logging
empties that record at every level change, so a change in the middle of a session (the
level, ``logging.disable``, a disabled logger) counts from the next message on.  A whole
session runs in this process over a scripted socket, the level changing between reads.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from prefork_esmtp import ESMTPHandler
from prefork_esmtp.session import Session
from prefork_esmtp.settings import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from engine_micro import ScriptedSocket  # noqa: E402

LOGGER = logging.getLogger("prefork_esmtp.session")
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n.\r\n"


class SteppedSocket(ScriptedSocket):
    """Runs ``steps[i]`` before it hands out the client's i-th MAIL command."""

    def __init__(self, pieces: list[bytes], steps: list[Callable[[], None]]) -> None:
        super().__init__(pieces)
        self.steps = list(steps)

    def _take(self) -> bytes:
        piece = super()._take()
        if piece.startswith(b"MAIL"):
            self.steps.pop(0)()
        return piece


def run_session(steps: list[Callable[[], None]]) -> list[str]:
    """One session of ``len(steps)`` messages; the results of the message log records, in order."""
    writes = [b"EHLO client.example\r\n"]
    for n in range(len(steps)):
        writes += [f"MAIL FROM:<a{n}@example.org>\r\n".encode(), b"RCPT TO:<b@example.net>\r\n", b"DATA\r\n", MESSAGE]
    writes.append(b"QUIT\r\n")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if " message " in text:
                records.append(text)

    keep = Keep(level=logging.DEBUG)
    LOGGER.addHandler(keep)
    try:
        config = resolve({}, {"hostname": "mx.test.example"}, source="test")
        sock = SteppedSocket(writes, steps)
        Session(sock, ("192.0.2.1", 40000), ESMTPHandler, config).run()
    finally:
        LOGGER.removeHandler(keep)
    assert b"".join(sock.sent).count(b"250 2.0.0 Message accepted") == len(steps)
    return records


@pytest.fixture
def restore_logging():
    level, disabled = LOGGER.level, LOGGER.disabled
    yield
    LOGGER.setLevel(level)
    LOGGER.disabled = disabled
    logging.disable(logging.NOTSET)


def test_level_changes_in_a_session_count_from_the_next_message(restore_logging):
    def level(value: int) -> Callable[[], None]:
        return lambda: LOGGER.setLevel(value)

    records = run_session([level(logging.WARNING), level(logging.WARNING), level(logging.INFO),
                           level(logging.WARNING), level(logging.INFO)])
    assert [r.split(" from=")[1].split()[0] for r in records] == ["<a2@example.org>", "<a4@example.org>"]
    assert all(" result=accepted " in r for r in records)


def test_a_disabled_logger_and_logging_disable_silence_the_line(restore_logging):
    def disabled(value: bool) -> Callable[[], None]:
        def step() -> None:
            LOGGER.disabled = value
        return step

    LOGGER.setLevel(logging.INFO)
    records = run_session([disabled(False), disabled(True), disabled(False),
                           lambda: logging.disable(logging.INFO), lambda: logging.disable(logging.NOTSET)])
    assert [r.split(" from=")[1].split()[0] for r in records] == ["<a0@example.org>", "<a2@example.org>",
                                                                   "<a4@example.org>"]
