"""The first thing a user does: start the server and send a message."""

import smtplib

from conftest import HOSTNAME


def test_send_one_message_with_smtplib(start_server):
    srv = start_server()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        code, text = smtp.ehlo("client.example")
        assert code == 250
        assert text.startswith(HOSTNAME.encode())
        refused = smtp.sendmail("alice@example.org", ["bob@example.net"],
                                b"Subject: hello\r\n\r\nHi Bob.\r\n")
        assert refused == {}
    messages = srv.accepted_messages()
    assert len(messages) == 1
    assert messages[0]["headers"] == [("Subject", "hello")]
    assert messages[0]["body"] == b"Hi Bob.\r\n"
    assert messages[0]["sender"] == "alice@example.org"
    assert messages[0]["recipients"] == ["bob@example.net"]
