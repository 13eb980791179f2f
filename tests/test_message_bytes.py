"""The message as it came, through the real server: each header's exact bytes and the
header section's (DATA and BDAT), messages whose lines end in bare LF (raw socket and
curl without --crlf), and the cap on header lines against a header bomb.
"""

from __future__ import annotations

import subprocess

import psutil

from conftest import require_tool
from protocol_support import module_server, nothing_arrives, session_hooks, session_messages

plain = module_server("bytes-default")
capped = module_server("bytes-capped", "--max-header-lines", "3", "--error-sleep", "0")

FOLDED = (b"From: Alice <alice@example.org>\r\n"
          b"Subject:  spaced   out \r\n\tand folded\r\n   twice\r\n"
          b"X-Odd \t: value\r\n"
          b"To: bob@example.net\r\n\r\n")


def ehlo(client_for, server):
    c = client_for(server)
    assert c.cmd("EHLO client.example")[0] == 250
    return c


def start_data(c, sender: str = "alice@example.org") -> None:
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354


def enhanced(lines: list[str]) -> str:
    return lines[0].split(" ")[0]


def test_exact_bytes_of_headers_and_section_with_data(plain, client_for):
    body = b"First line.\r\n.leading dot\r\n\r\nLast line.\r\n"
    c = ehlo(client_for, plain)
    start_data(c)
    c.send(FOLDED + body.replace(b"\r\n.", b"\r\n..") + b".\r\n")  # dot-stuffed on the wire
    assert c.reply()[0] == 250
    (message,) = session_messages(plain, c)
    assert message["headers"] == [("From", "Alice <alice@example.org>"),
                                  ("Subject", "spaced   out \tand folded   twice"),
                                  ("X-Odd", "value"), ("To", "bob@example.net")]
    assert message["raws"] == [b"From: Alice <alice@example.org>\r\n",
                               b"Subject:  spaced   out \r\n\tand folded\r\n   twice\r\n",
                               b"X-Odd \t: value\r\n", b"To: bob@example.net\r\n"]
    assert message["section"] == FOLDED
    assert message["section"] + message["body"] == FOLDED + body


def test_exact_bytes_the_same_with_bdat(plain, client_for):
    message_bytes = FOLDED + b"body\r\n"
    c = ehlo(client_for, plain)
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    cut = 40  # inside the folded Subject
    c.send(f"BDAT {cut}\r\n".encode() + message_bytes[:cut])
    assert c.reply()[0] == 250
    c.send(f"BDAT {len(message_bytes) - cut} LAST\r\n".encode() + message_bytes[cut:])
    assert c.reply()[0] == 250
    (message,) = session_messages(plain, c)
    assert message["raws"][1] == b"Subject:  spaced   out \r\n\tand folded\r\n   twice\r\n"
    assert message["section"] + message["body"] == message_bytes


def lf_message(body_lines: int) -> tuple[bytes, bytes]:
    headers = b"From: alice@example.org\nTo: bob@example.net\nSubject: written\n with LF\n\n"
    return headers, b"".join(b"line %d of a message written with LF only\n" % n for n in range(body_lines))


def test_bare_lf_message_keeps_its_structure_and_bytes(plain, client_for):
    """Over 100 KiB of LF-only lines: headers apart, EOH at the empty line, the body in BODY,
    the bytes as sent (no longer one giant header refused with 552)."""
    headers, body = lf_message(4000)
    assert len(headers + body) > 150 * 1024
    c = ehlo(client_for, plain)
    start_data(c)
    c.send(headers + body + b"\r\n.\r\n")  # only CRLF.CRLF ends the data
    code, lines = c.reply()
    assert code == 250, lines
    (message,) = session_messages(plain, c)
    assert message["headers"] == [("From", "alice@example.org"), ("To", "bob@example.net"),
                                  ("Subject", "written with LF")]
    assert message["raws"][2] == b"Subject: written\n with LF\n"
    assert message["section"] == headers
    assert message["body"] == body + b"\r\n"  # the CRLF before the final dot is the body's
    assert message["hooks"][:5] == ["DATA", "HEADER", "HEADER", "HEADER", "EOH"]


def test_curl_without_crlf_sends_lf_lines_that_keep_their_structure(plain, tmp_path):
    curl = require_tool("curl")
    headers, body = lf_message(50)
    path = tmp_path / "message.txt"
    path.write_bytes(headers + body)
    result = subprocess.run(
        [curl, "-sS", "--max-time", "20", f"smtp://127.0.0.1:{plain.port}",
         "--mail-from", "curl-lf@example.org", "--mail-rcpt", "bob@example.net", "--upload-file", str(path)],
        capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    (message,) = [m for m in plain.accepted_messages() if m["sender"] == "curl-lf@example.org"]
    assert message["headers"][2] == ("Subject", "written with LF")
    assert message["section"] == headers
    assert message["body"].startswith(body)


def test_header_lines_up_to_the_cap_are_accepted(capped, client_for):
    c = ehlo(client_for, capped)
    start_data(c)
    c.send(b"A: 1\r\nB: 2\r\n 3\r\n\r\nbody\r\n.\r\n")  # three lines, a continuation among them
    assert c.reply()[0] == 250
    (message,) = session_messages(capped, c)
    assert message["headers"] == [("A", "1"), ("B", "2 3")]


def test_one_header_line_more_is_552_after_end_of_data_and_the_session_goes_on(capped, client_for):
    c = ehlo(client_for, capped)
    start_data(c)
    c.send(b"A: 1\r\nB: 2\r\n 3\r\n 4\r\n\r\nbody\r\n")
    assert nothing_arrives(c, 0.3), "the reply must come after the end of data"
    c.send(b".\r\n")
    code, lines = c.reply()
    assert (code, enhanced(lines)) == (552, "5.3.4"), lines
    assert "many header lines" in lines[0]
    assert "EOM" not in session_hooks(capped, c)
    start_data(c)
    c.send(b"A: 1\r\n\r\nfine\r\n.\r\n")
    assert c.reply()[0] == 250


def test_header_bomb_is_552_cheaply_and_the_server_keeps_serving(plain, client_for):
    """About 5 MB of one-character header lines: 552 5.3.4 after end of data, EOM never
    called, the handler not fed past the cap, little CPU spent, the next message served."""
    c = ehlo(client_for, plain)
    start_data(c)
    worker = psutil.Process(plain.proc.pid)  # -X: the server process serves the session
    before = sum(worker.cpu_times()[:2])
    bomb = b"X:a\r\n" * (1 << 20)  # 5 MiB, 1,048,576 header lines; the default cap is 1000
    for i in range(0, len(bomb), 1 << 18):
        c.send(bomb[i:i + (1 << 18)])
    c.send(b"\r\nbody\r\n.\r\n")
    code, lines = c.reply(timeout=60)
    assert (code, enhanced(lines)) == (552, "5.3.4"), lines
    spent = sum(worker.cpu_times()[:2]) - before
    assert spent < 5.0, f"the header bomb cost {spent:.1f} s of CPU"
    hooks = session_hooks(plain, c)
    assert "EOM" not in hooks and "EOH" not in hooks
    assert hooks.count("HEADER") < 1000
    start_data(c)
    c.send(b"Subject: after the bomb\r\n\r\nfine\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()  # -X serves one session at a time
    other = ehlo(client_for, plain)
    assert other.cmd("NOOP")[0] == 250
