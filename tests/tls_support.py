"""Helpers for the TLS, AUTH, BDAT, DSN and abuse tests: certificates made with
openssl at test time, a server launcher for module-scoped fixtures (any
handler, TLS listeners, pre-forked mode), TLS client contexts and small SMTP
helpers over raw sockets.
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Client, HOSTNAME, Server, launch, messages_from, require_tool, wait_for

__all__ = ["PKI", "make_pki", "make_leaf", "launch", "client_context", "starttls_client",
           "ehlo_keywords", "sid_of", "records_of", "messages_of"]


@dataclass
class PKI:
    """A test CA and what it signed: the server's certificate and a client certificate."""

    directory: Path
    ca: Path
    ca_key: Path
    cert: Path  # CN=mx.test.example, O=First; SAN mx.test.example and 127.0.0.1
    key: Path
    client_cert: Path  # CN=client.example
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run([require_tool("openssl"), *args], cwd=str(cwd), capture_output=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def _key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path),
             cwd=path.parent)


def make_leaf(pki: PKI, name: str, subject: str, server: bool = True) -> tuple[Path, Path]:
    """A certificate signed by the test CA: (cert, key) named ``name``.pem / ``name``.key."""
    d = pki.directory
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    _key(key)
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", subject, cwd=d)
    usage = "serverAuth" if server else "clientAuth"
    san = f"subjectAltName=DNS:{HOSTNAME},IP:127.0.0.1\n" if server else ""
    ext.write_text(f"{san}basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage={usage}\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(pki.ca), "-CAkey", str(pki.ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext), cwd=d)
    return cert, key


def make_pki(directory: Path) -> PKI:
    """Make a CA, a server certificate for mx.test.example/127.0.0.1 and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _key(ca_key)
    _openssl("req", "-x509", "-new", "-key", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", "/CN=prefork-esmtp test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    pki = PKI(directory, ca, ca_key, directory / "cert.pem", directory / "cert.key",
              directory / "client.pem", directory / "client.key")
    make_leaf(pki, "cert", f"/CN={HOSTNAME}/O=First")
    make_leaf(pki, "client", "/CN=client.example/O=Client", server=False)
    return pki



@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    """Certificates for one test module (import this fixture from tls_support)."""
    return make_pki(tmp_path_factory.mktemp("pki"))

def client_context(pki: PKI, client_cert: bool = False) -> ssl.SSLContext:
    """A verifying client context that trusts only the test CA."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client_cert:
        context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


def starttls_client(pki: PKI, srv: Server, client_cert: bool = False) -> Client:
    """A raw Client after EHLO, STARTTLS and the handshake (no EHLO inside TLS yet)."""
    c = Client(srv.connect())
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example")[0] == 250
    code, lines = c.cmd("STARTTLS")
    assert code == 220, (code, lines)
    assert c.buf == b""
    c.sock = client_context(pki, client_cert).wrap_socket(c.sock, server_hostname=HOSTNAME)
    return c


def ehlo_keywords(lines: list[str]) -> set[str]:
    """The extension keywords of an EHLO reply (its lines after the first)."""
    return {line.split(" ", 1)[0].upper() for line in lines[1:]}


def sid_of(srv: Server, client: Client) -> str:
    """The recorder's session id for ``client`` (found by the client's own port)."""
    port = getattr(client, "local_port", None)
    if port is None:
        sock = client.sock
        port = client.local_port = sock.getsockname()[1]

    def find() -> str | None:
        for r in srv.records():
            if r["hook"] == "CONNECT" and r["args"] and r["args"][0][1:2] == [port]:
                return r["sid"]
        return None

    return wait_for(find, 5, message="the session's CONNECT record")


def records_of(srv: Server, client: Client) -> list[dict]:
    sid = sid_of(srv, client)
    return [r for r in srv.records() if r["sid"] == sid]


def messages_of(srv: Server, client: Client) -> list[dict]:
    """Messages whose EOM was called in ``client``'s session (see conftest.messages_from)."""
    return messages_from(records_of(srv, client))
