"""The ready-made handlers, through the real server."""

import smtplib


def test_maildir_stores_each_message_once_renamed_into_new(start_server, tmp_path):
    maildir = tmp_path / "mail"
    srv = start_server(handler="prefork_esmtp.handlers.maildir:Maildir",
                       env={"PREFORK_ESMTP_MAILDIR": str(maildir)})
    message = b"Subject: stored\r\nX-Folded: a\r\n b\r\n\r\nline one\r\n.dot line\r\n"
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.sendmail("from@example.org", ["to@example.net"], message)
        code, text = smtp.docmd("NOOP")
        assert code == 250
    stored = list((maildir / "new").iterdir())
    assert len(stored) == 1
    assert list((maildir / "tmp").iterdir()) == []
    content = stored[0].read_bytes()
    assert content.startswith(b"Return-Path: <from@example.org>\nReceived: from ")
    # the message as received, folding kept, after our trace lines; CRLF -> LF only
    assert content.endswith(b"\nSubject: stored\nX-Folded: a\n b\n\nline one\n.dot line\n")
    assert b"\r" not in content


def test_maildir_leaves_nothing_for_an_abandoned_message(start_server, tmp_path, client_for):
    maildir = tmp_path / "mail"
    srv = start_server(handler="prefork_esmtp.handlers.maildir:Maildir",
                       env={"PREFORK_ESMTP_MAILDIR": str(maildir)})
    c = client_for(srv)
    assert c.cmd("EHLO c.example")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<b@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: never finished\r\n\r\nhalf a body")
    c.close()
    # A new session is served only after the old one ended (one process in -X mode).
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        assert smtp.noop()[0] == 250
    assert not (maildir / "new").exists() or list((maildir / "new").iterdir()) == []
    assert list((maildir / "tmp").iterdir()) == []


def test_sink_accepts_and_logs(start_server):
    srv = start_server(handler="prefork_esmtp.handlers.sink:Sink")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        assert smtp.sendmail("a@example.org", ["b@example.org"], b"Subject: hi\r\n\r\nbody\r\n") == {}
    assert "sink: from=<a@example.org> to=<b@example.org> body=6 octets subject='hi'" in srv.log()
