"""The testing kit for handler authors: prefork_esmtp.testing, used as a user would."""

from __future__ import annotations

import smtplib

import pytest

from prefork_esmtp import ESMTPHandler
from prefork_esmtp.testing import ServerFailed, running_server


class OnlyExampleOrg(ESMTPHandler):
    """A handler under test: refuses recipients outside example.org, counts body octets."""

    def RCPT(self, env_recipient):
        if not env_recipient.endswith("@example.org"):
            return 550, "5.1.1 No such user here"
        return super().RCPT(env_recipient)

    def DATA(self):
        self.size = 0
        return super().DATA()

    def BODY(self, chunk):
        self.size += len(chunk)

    def EOM(self):
        return 250, f"2.0.0 Queued ({self.size} octets)"


def test_fixture_from_the_plugin_serves_the_handler(esmtp_server):
    server = esmtp_server(OnlyExampleOrg)
    assert server.host == "127.0.0.1" and server.port > 0
    with server.smtp() as client:
        client.ehlo("client.example")
        assert client.mail("a@example.net") == (250, b"2.1.0 <a@example.net>, sender ok")
        assert client.rcpt("b@example.com")[0] == 550
        assert client.rcpt("b@example.org")[0] == 250
        code, text = client.data(b"Subject: hi\r\n\r\nhello\r\n")
        assert (code, text) == (250, b"2.0.0 Queued (7 octets)")
    assert "message from=<a@example.net> nrcpt=1" in server.log()


def test_context_manager_with_a_pool_and_options(tmp_path):
    with running_server(OnlyExampleOrg, "--max-recipients", "100", workers=2,
                        directory=tmp_path) as server:
        with server.smtp() as client:
            refused = client.sendmail("a@example.net", ["x@example.org", "y@example.com"],
                                      b"Subject: pool\r\n\r\nhi\r\n")
            assert set(refused) == {"y@example.com"}
        pid = server.pid
    assert server.proc.poll() is not None, f"server {pid} still running after the block"
    with pytest.raises((ConnectionRefusedError, smtplib.SMTPServerDisconnected, OSError)):
        smtplib.SMTP(server.host, server.port, timeout=2)


def test_a_server_that_cannot_start_says_why(tmp_path):
    with pytest.raises(ServerFailed) as failure:
        with running_server("no_such_module_here:Nope", directory=tmp_path):
            pass
    assert "no_such_module_here" in str(failure.value)


def test_local_classes_are_refused_with_a_reason():
    class Local(ESMTPHandler):
        pass

    with pytest.raises(ValueError, match="top level"):
        with running_server(Local):
            pass
