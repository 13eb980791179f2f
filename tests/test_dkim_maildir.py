"""A DKIM-signed message survives the server and the Maildir handler.

The sender's key is made at test time (openssl); dkimpy signs the message
(simple/simple and relaxed/relaxed), it goes through the real server to the
Maildir handler, and the stored copy's signature verifies (LF turned back into
CRLF, our unsigned trace lines left on top: DKIM ignores them), with the public
key served by a stub in place of DNS.  A control shows the check can fail: the
stored copy with its headers unfolded, as the handler used to store it, no
longer verifies under simple canonicalization.
"""

from __future__ import annotations

import base64
import re
import smtplib
import subprocess

import dkim
import pytest

from conftest import require_tool
from protocol_support import split_maildir_trace

SELECTOR, DOMAIN = b"test", b"example.org"

MESSAGE = (b"From: Alice Example <alice@example.org>\r\n"
           b"To: Bob <bob@example.net>,\r\n"
           b"\tCarol <carol@example.net>\r\n"
           b"Subject: A signed message whose subject is folded\r\n"
           b"  over   three lines\r\n"
           b"\twith odd   spacing \r\n"
           b"Date: Tue, 1 Dec 2026 10:00:00 +0000\r\n"
           b"Message-ID: <signed.1@example.org>\r\n"
           b"X-Long: " + b"\r\n ".join(b"token%03d " % n * 6 for n in range(60)) + b"\r\n"
           b"X-Wide: " + b"w" * 900 + b"\r\n"
           b"\r\n"
           b"Hello Bob,\r\n"
           b".this line starts with a dot\r\n"
           b"trailing spaces stay   \r\n"
           b"\r\n"
           b"\ttabbed line\r\n"
           b"-- \r\n"
           b"Alice\r\n")
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"x-long", b"x-wide"]


@pytest.fixture(scope="module")
def dkim_key(tmp_path_factory) -> tuple[bytes, bytes]:
    """(private key PEM, the DNS TXT record with the public key)."""
    openssl = require_tool("openssl")
    d = tmp_path_factory.mktemp("dkim")
    key = d / "key.pem"
    subprocess.run([openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(key)], check=True, capture_output=True, timeout=120)
    der = subprocess.run([openssl, "pkey", "-in", str(key), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True, timeout=60).stdout
    return key.read_bytes(), b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def verify(message: bytes, record: bytes) -> bool:
    def dnsfunc(name, timeout=5):
        assert name == SELECTOR + b"._domainkey." + DOMAIN + b"."
        return record

    return dkim.verify(message, dnsfunc=dnsfunc)


def unfold_headers(message: bytes) -> bytes:
    """The header section rewritten as the Maildir handler used to store it: unfolded."""
    head, sep, body = message.partition(b"\r\n\r\n")
    return re.sub(rb"\r\n([ \t])", rb"\1", head) + sep + body


@pytest.mark.parametrize("canon", [(b"simple", b"simple"), (b"relaxed", b"relaxed")], ids=lambda c: c[0].decode())
@pytest.mark.parametrize("line_ends", ["crlf", "bare-lf"])
def test_signature_verifies_on_the_stored_copy(start_server, tmp_path, dkim_key, canon, line_ends):
    private, record = dkim_key
    signature = dkim.sign(MESSAGE, SELECTOR, DOMAIN, private, canonicalize=canon,
                          include_headers=SIGNED_HEADERS)
    signed = signature + MESSAGE
    assert verify(signed, record)
    maildir = tmp_path / "mail"
    srv = start_server(handler="prefork_esmtp.handlers.maildir:Maildir", env={"PREFORK_ESMTP_MAILDIR": str(maildir)})
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        if line_ends == "crlf":
            assert smtp.sendmail("alice@example.org", ["bob@example.net"], signed) == {}
            expected = signed.replace(b"\r\n", b"\n")
        else:  # written by a script: LF line ends, nothing dot-stuffed, only CRLF.CRLF ends the data
            smtp.ehlo()
            smtp.mail("alice@example.org")
            smtp.rcpt("bob@example.net")
            assert smtp.docmd("DATA")[0] == 354
            smtp.send(signed.replace(b"\r\n", b"\n") + b"\r\n.\r\n")
            assert smtp.getreply()[0] == 250
            expected = signed.replace(b"\r\n", b"\n") + b"\n"  # the CRLF before the dot is content
    (path,) = (maildir / "new").iterdir()
    stored = path.read_bytes()
    trace, rest = split_maildir_trace(stored)
    assert rest == expected, "the stored copy is not the message as received"
    as_crlf = stored.replace(b"\n", b"\r\n")
    assert verify(as_crlf, record), "the signature does not verify on the stored copy"
    assert verify(rest.replace(b"\n", b"\r\n"), record)  # also without our trace lines
    if canon[0] == b"simple":
        assert not verify(unfold_headers(as_crlf), record), "control: unfolded headers break simple"
