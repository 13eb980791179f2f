"""The Maildir handler stores the message as received, and per recipient on request.

Through the real server: the stored file is our two trace lines, then the message
sent with CRLF turned into LF and nothing else changed (folding, spacing, long
headers, bare-LF lines); the per-recipient layout puts one copy in each
``<root>/<domain>/<local>/`` Maildir.  In-process: mailbox names can never leave
the root, a half-failed store takes back its copies, no trace line passes 998 octets.
"""

from __future__ import annotations

import os
import smtplib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefork_esmtp.handlers import maildir as M
from prefork_esmtp.state import ConnectionState, Envelope, attach
from protocol_support import split_maildir_trace

MAILDIR = "prefork_esmtp.handlers.maildir:Maildir"


def stored_files(maildir: Path) -> list[Path]:
    assert list((maildir / "tmp").iterdir()) == [], "a copy was left in tmp/"
    return sorted((maildir / "new").iterdir())


MESSAGE = (b"From: Alice <alice@example.org>\r\n"
           b"To: Bob <bob@example.net>,\r\n\tCarol <carol@example.net>\r\n"
           b"Subject:   several   spaces and\r\n  a fold \r\n"
           b"X-Long: " + b" ".join([b"word%d" % n for n in range(400)]).replace(b" word1", b"\r\n word1") + b"\r\n"
           b"X-Unfolded-Long: " + b"u" * 980 + b"\r\n"
           b"x-lower-case :  kept\r\n"
           b"\r\n"
           b"Body line one\r\n"
           b".a line with a leading dot\r\n"
           b"trailing spaces   \r\n"
           b"\r\n"
           b"last line\r\n")


@pytest.mark.parametrize("variant", ["crlf", "bare-lf"])
def test_stored_copy_is_the_message_as_received(start_server, tmp_path, variant):
    maildir = tmp_path / "mail"
    srv = start_server(handler=MAILDIR, env={"PREFORK_ESMTP_MAILDIR": str(maildir)})
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        if variant == "crlf":
            assert smtp.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
            expected = MESSAGE.replace(b"\r\n", b"\n")
        else:  # as a script writes it: LF lines, nothing dot-stuffed (only CRLF.CRLF ends the data)
            smtp.ehlo()
            smtp.mail("alice@example.org")
            smtp.rcpt("bob@example.net")
            assert smtp.docmd("DATA")[0] == 354
            smtp.send(MESSAGE.replace(b"\r\n", b"\n") + b"\r\n.\r\n")
            assert smtp.getreply()[0] == 250
            expected = MESSAGE.replace(b"\r\n", b"\n") + b"\n"  # the CRLF before the dot is content
    (path,) = stored_files(maildir)
    trace, rest = split_maildir_trace(path.read_bytes())
    assert rest == expected
    assert all(len(line) <= 998 for line in trace)
    assert trace[0] == b"Return-Path: <alice@example.org>"


def test_per_recipient_layout_one_copy_per_mailbox(start_server, tmp_path):
    root = tmp_path / "mail"
    srv = start_server(handler=MAILDIR, env={"PREFORK_ESMTP_MAILDIR": str(root),
                                             "PREFORK_ESMTP_MAILDIR_LAYOUT": "per-recipient"})
    message = b"Subject: for three\r\n\r\nhello\r\n"
    recipients = ["bob@example.net", "Carol@Example.ORG", "carol@example.org", '"../../x"@example.org',
                  "postmaster"]
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        assert smtp.sendmail("alice@example.org", recipients, message) == {}
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["mail"], "nothing outside the root"
    boxes = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    assert boxes == ["example.net/bob", "example.org/%22..%2F..%2Fx%22", "example.org/carol",
                     "mx.test.example/postmaster"]
    contents = set()
    for box in boxes:
        (path,) = stored_files(root / box)
        contents.add(path.read_bytes())
    (content,) = contents  # the same copy everywhere
    trace, rest = split_maildir_trace(content)
    assert rest == message.replace(b"\r\n", b"\n")
    assert not any(line.startswith(b"\tfor") for line in trace), "no recipient named when there are several"
    assert not any(r.encode().lower() in b"\n".join(trace).lower() for r in recipients)


def test_per_recipient_single_recipient_is_named(start_server, tmp_path):
    root = tmp_path / "mail"
    srv = start_server(handler=MAILDIR, env={"PREFORK_ESMTP_MAILDIR": str(root),
                                             "PREFORK_ESMTP_MAILDIR_LAYOUT": "per-recipient"})
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.sendmail("alice@example.org", ["bob@example.net"], b"Subject: one\r\n\r\nhi\r\n")
    (path,) = stored_files(root / "example.net" / "bob")
    assert b"\tfor <bob@example.net>;" in path.read_bytes()


def test_unknown_layout_is_451_at_data(start_server, tmp_path):
    srv = start_server(handler=MAILDIR, env={"PREFORK_ESMTP_MAILDIR": str(tmp_path / "mail"),
                                             "PREFORK_ESMTP_MAILDIR_LAYOUT": "sideways"})
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail("a@example.org")
        smtp.rcpt("b@example.org")
        code, text = smtp.docmd("DATA")
    assert code == 451
    assert "maildir layout must be one of single, per-recipient, not 'sideways'" in srv.log()


def test_long_helo_name_never_makes_a_line_over_998_octets(start_server, tmp_path):
    maildir = tmp_path / "mail"
    srv = start_server("--max-line-length", "4000", handler=MAILDIR,
                       env={"PREFORK_ESMTP_MAILDIR": str(maildir)})
    name = "h" * 1500 + ".example"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        assert smtp.ehlo(name)[0] == 250
        smtp.sendmail("a" * 60 + "@" + "d" * 180 + ".example", ["b" * 60 + "@" + "e" * 180 + ".example"],
                      b"Subject: x\r\n\r\nhi\r\n")
    (path,) = stored_files(maildir)
    trace, _ = split_maildir_trace(path.read_bytes())
    assert max(len(line) for line in trace) <= 998, [len(line) for line in trace]
    assert b"hhh..." in trace[1]


# --- in-process ---------------------------------------------------------------------------


def handler_for(root: Path, monkeypatch, recipients: list[str], layout: str = "per-recipient") -> M.Maildir:
    monkeypatch.setenv("PREFORK_ESMTP_MAILDIR", str(root))
    monkeypatch.delenv("PREFORK_ESMTP_MAILDIR_LAYOUT", raising=False)
    h = M.Maildir()
    h.layout = layout
    attach(h, ConnectionState(peer=("192.0.2.1", 25), client="client.example", hostname="mx.example", esmtp=True),
           Envelope(sender="a@example.org", recipients=recipients))
    h.header_section = b"Subject: x\r\n\r\n"
    return h


def deliver(h: M.Maildir) -> tuple:
    assert h.DATA()[0] == 354
    h.EOH()
    h.BODY(b"hello\r\n")
    return h.EOM()


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_a_failed_rename_takes_back_the_copies_already_in_new(tmp_path, monkeypatch):
    h = handler_for(tmp_path, monkeypatch, ["a@x.example", "b@x.example", "c@x.example"])
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise PermissionError(13, "Permission denied", dst)
        real_rename(src, dst)

    monkeypatch.setattr(M.os, "rename", rename)
    with pytest.raises(PermissionError):  # the engine answers 451 4.3.0: the client retries
        deliver(h)
    assert all_files(tmp_path) == [], "no copy left in tmp/ or new/"
    monkeypatch.setattr(M.os, "rename", real_rename)
    assert deliver(h)[0] == 250  # the retry delivers once to each
    assert len(all_files(tmp_path)) == 3


def test_copies_without_hard_links_are_full_copies(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(M.os, "link", no_link)
    h = handler_for(tmp_path, monkeypatch, ["a@x.example", "b@y.example"])
    assert deliver(h)[0] == 250
    files = [tmp_path / f for f in all_files(tmp_path)]
    assert [f.parent.parent.parent.name for f in files] == ["x.example", "y.example"]
    assert files[0].read_bytes() == files[1].read_bytes()
    assert files[0].read_bytes().endswith(b"\nSubject: x\n\nhello\n")
    assert os.stat(files[0]).st_ino != os.stat(files[1]).st_ino


def test_disconnect_before_eom_leaves_nothing_in_any_mailbox(tmp_path, monkeypatch):
    h = handler_for(tmp_path, monkeypatch, ["a@x.example", "b@y.example"])
    assert h.DATA()[0] == 354
    h.BODY(b"half")
    h.DISCONNECT()
    assert all_files(tmp_path) == []


def test_unknown_layout_raises():
    h = M.Maildir()
    h.layout = "sideways"
    with pytest.raises(ValueError, match="single, per-recipient"):
        M.maildir_settings(h)


@pytest.mark.parametrize("recipient, expected", [
    ("bob@example.net", "example.net/bob"),
    ("Bob.Smith+tag@EXAMPLE.net", "example.net/bob.smith+tag"),
    ("../../etc/passwd@example.net", "example.net/%2E.%2F..%2Fetc%2Fpasswd"),
    ("x@..", "%2E./x"),
    (".@.", "%2E/%2E"),
    ("a/b@c/d", "c%2Fd/a%2Fb"),
    ("nul\x00@example.net", "example.net/nul%00"),
    ("a%41@example.net", "example.net/a%2541"),
    ("j\u00f6rg@\u00e9x.example", "%C3%A9x.example/j%C3%B6rg"),
    ('"a b"@[192.0.2.1]', "%5B192.0.2.1%5D/%22a%20b%22"),
    ("postmaster", "mx.example/postmaster"),
])
def test_mailbox_names_are_sanitized(tmp_path, recipient, expected):
    root = str(tmp_path)
    assert M.mailbox_dir(root, recipient, "mx.example") == os.path.join(root, *expected.split("/"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20).filter(lambda d: "@" not in d))
def test_mailbox_dir_never_leaves_the_root_and_keeps_addresses_apart(local, domain):
    root = "/srv/mail"
    address = f"{local}@{domain}"
    try:
        path = M.mailbox_dir(root, address, "mx.example")
    except ValueError:  # an empty name: no mailbox at all
        assert not domain or not local
        return
    rel = os.path.relpath(path, root).split(os.sep)
    assert len(rel) == 2 and os.path.dirname(os.path.dirname(path)) == root
    assert all(part not in ("", ".", "..") and not part.startswith(".") and "\x00" not in part for part in rel)
    other = M.mailbox_dir(root, f"{local}x@{domain}", "mx.example")
    assert other != path
