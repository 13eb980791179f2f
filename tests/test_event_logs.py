"""One log line per transaction and per session end, as key=value text and as JSON lines, from a real server."""

from __future__ import annotations

import json
import logging
import random
import re

import pytest

from conftest import wait_for
from master_support import pool_mode, strays  # noqa: F401
from prefork_esmtp.logs import FORMAT, Event, TextFormatter

JUDGE = "metrics_handlers:Judge"
_EVENT = re.compile(r": ([0-9A-F]{12}): (message|session) (.*)$")
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def text_events(log: str) -> list[dict]:
    """The event lines of a text log, each as {"sid", "event", key: value (str, quotes undone)}."""
    out = []
    for line in log.splitlines():
        m = _EVENT.search(line)
        if m:
            fields = {"sid": m.group(1), "event": m.group(2)}
            for key, value in _PAIR.findall(m.group(3)):
                fields[key] = json.loads(value) if value.startswith('"') else value
            out.append(fields)
    return out


def converse(client_for, srv) -> tuple[str, int]:
    """One session: a message accepted, one refused, one aborted by RSET; returns (session id, client port)."""
    c = client_for(srv)
    port = c.sock.getsockname()[1]
    assert c.cmd("EHLO odd name")[0] == 250  # a HELO name with a space: quoted in text
    for subject, expect in (("hi", 250), ("refuse", 554)):
        assert c.cmd("MAIL FROM:<a@example.net>")[0] == 250
        assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<nobody@example.org>")[0] == 550
        assert c.cmd("DATA")[0] == 354
        code, lines = c.cmd(f"Subject: {subject}\r\n\r\nbody\r\n.")
        assert code == expect
        if code == 250:
            sid = re.fullmatch(r"2\.0\.0 Queued as ([0-9A-F]{12})", lines[0]).group(1)
    assert c.cmd("MAIL FROM:<>")[0] == 250
    assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    assert c.closed()
    return sid, port


def check_events(events: list[dict], sid: str, port: int) -> None:
    mine = [e for e in events if e["sid"] == sid]
    assert [e["event"] for e in mine] == ["message", "message", "message", "session"]
    accepted, refused, aborted, session = mine
    size = len(b"Subject: hi\r\n\r\nbody\r\n")
    assert {k: accepted[k] for k in ("from", "nrcpt", "size", "result", "reply", "tx")} == {
        "from": "<a@example.net>", "nrcpt": "1", "size": str(size), "result": "accepted",
        "reply": f"250 2.0.0 Queued as {sid}", "tx": "1"}
    assert {k: refused[k] for k in ("result", "reply", "size", "tx")} == {
        "result": "refused", "reply": "554 5.7.1 Refused by the judge", "size": str(size + 4), "tx": "2"}
    assert {k: aborted[k] for k in ("from", "nrcpt", "size", "result", "reply", "tx")} == {
        "from": "<>", "nrcpt": "1", "size": "-", "result": "aborted", "reply": "-", "tx": "3"}
    for event in mine:
        assert event["client"] == f"127.0.0.1:{port}"
        assert event["helo"] == "odd name"
        assert event["tls"] == "-" and event["auth"] == "-"
        assert float(event["duration"]) >= 0
    assert {k: session[k] for k in ("transactions", "accepted", "refused", "errors", "end", "reply")} == {
        "transactions": "3", "accepted": "1", "refused": "1", "errors": "3", "end": "quit",
        "reply": "221 2.0.0 Closing connection"}


def test_text_lines_per_transaction_and_session(start_server, client_for):
    srv = start_server(handler=JUDGE)
    sid, port = converse(client_for, srv)
    wait_for(lambda: f"{sid}: session " in srv.log(), 10, message="the session's log line")
    log = srv.log()
    assert re.search(rf"{sid}: message from=<a@example\.net> nrcpt=1 size=\d+ result=accepted ", log)
    assert 'helo="odd name"' in log
    check_events(text_events(log), sid, port)


def test_json_lines_carry_the_same_fields(start_server, client_for, tmp_path, strays):
    log_file = tmp_path / "server.jsonl"
    srv = start_server("--log-format", "json", handler=JUDGE, log_file=log_file,
                       mode=pool_mode(tmp_path, "--workers", "1"))
    strays.add_tree(srv.proc.pid)
    messages = [json.loads(line)["message"] for line in srv.log().splitlines()]
    srv.port = int(next(re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)", m).group(1)
                        for m in messages if m.startswith("listening on")))
    sid, port = converse(client_for, srv)
    wait_for(lambda: f'"sid": "{sid}", "event": "session"' in srv.log(), 10, message="the session's log line")
    records = [json.loads(line) for line in srv.log().splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "pid", "message"} <= r.keys() for r in records)
    assert any(r["message"].startswith("ready: generation 1") for r in records)  # not only events
    events = [r for r in records if "event" in r]
    for event in events:
        assert event["message"] == str(Event(event["sid"], event["event"],
                                             {k: event[k] for k in _fields(event)}))
    # the same fields, as JSON types: compare through the text rendering of each value
    as_text = [{k: ("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
                for k, v in e.items() if k not in ("time", "level", "logger", "pid", "message")}
               for e in events]
    check_events(as_text, sid, port)
    accepted = next(e for e in events if e["sid"] == sid and e.get("result") == "accepted")
    assert accepted["nrcpt"] == 1 and accepted["tls"] is None and accepted["helo"] == "odd name"


def _fields(event: dict) -> list[str]:
    return [k for k in event if k not in ("time", "level", "logger", "pid", "message", "sid", "event")]


@pytest.mark.parametrize("value, text", [
    (None, "-"), (3, "3"), (0.12345, "0.123"), ("<a@b>", "<a@b>"), ("", '""'), ("odd name", '"odd name"'),
    ('say "hi"', r'"say \"hi\""'), ("a=b", '"a=b"'), ("back\\slash", r'"back\\slash"'),
    ("line\r\nbreak\x1b", r'"line\r\nbreak\x1b"'), ("née", "née"),
    (True, "True"), (-7, "-7"), ("250 2.0.0 Message accepted", '"250 2.0.0 Message accepted"'),
    ("no\u00a0break space", r'"no\xa0break space"'), ("tab\there", r'"tab\there"'), ("nul\x00", r'"nul\x00"'),
])
def test_text_values_are_quoted_when_they_would_break_the_line(value, text):
    assert str(Event("0123456789AB", "message", {"k": value})) == f"0123456789AB: message k={text}"


def _reference_text(value):
    """The documented quoting, written the plain way (one character at a time), to compare against."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if re.fullmatch(r'[^\s"\\=]+', text) and text.isprintable():
        return text
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
    return '"' + "".join(escapes.get(c) or (c if c.isprintable() else f"\\x{ord(c):02x}") for c in text) + '"'


def test_text_values_match_the_documented_quoting_for_mixed_strings():
    rng = random.Random(11)
    pool = 'ab Z09<>@.:-_=\\"\t\r\n\x00\x1b\x7f\u00a0\u00e9\u2028\u200b\U0001F600'
    values = ["".join(rng.choice(pool) for _ in range(rng.randrange(0, 12))) for _ in range(3000)]
    values += [0, 1, -1, 10**20, 1.5, False, None]
    for value in values:
        assert str(Event("0123456789AB", "message", {"k": value})) == \
            f"0123456789AB: message k={_reference_text(value)}", repr(value)


def test_text_records_read_as_the_standard_formatter_writes_them():
    """The time to the second is formatted once per second; every record's text stays the standard one."""
    ours, standard = TextFormatter(FORMAT), logging.Formatter(FORMAT)
    rng = random.Random(5)
    created = 1_764_763_200.0
    for _ in range(2000):
        created += rng.choice((0.0004, 0.013, 0.25, 0.999, 1.0, 3.7, 86_399.5))
        record = logging.LogRecord("prefork_esmtp.session", logging.INFO, __file__, 1, "x=%s", ("y",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert ours.format(record) == standard.format(record)
