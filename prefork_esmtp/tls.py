"""TLS for STARTTLS (RFC 3207) and implicit-TLS listeners (RFC 8314): context and session facts.

The context is built in the master from ``tls_cert``/``tls_key`` (so a bad
file is one clear error at start, and HUP builds a new one for the new
generation) and inherited by the workers.
"""

from __future__ import annotations

import ssl
from typing import Any


class TLSConfigError(Exception):
    """The certificate, key or CA file cannot be used; one line for the operator."""


def make_context(cert: str | None, key: str | None, client_ca: str | None = None) -> ssl.SSLContext | None:
    """A server context with modern defaults (TLS 1.2+), or None when no certificate is set."""
    if not cert and not key:
        if client_ca:
            raise TLSConfigError("tls_client_ca needs tls_cert and tls_key")
        return None
    if not cert or not key:
        raise TLSConfigError("tls_cert and tls_key must be given together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise TLSConfigError(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"cannot load TLS certificate {cert} with key {key}: {_reason(exc)}") from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"cannot load TLS client CA file {client_ca}: {_reason(exc)}") from None
        context.verify_mode = ssl.CERT_OPTIONAL  # ask for a client certificate, do not require one
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)


def facts(sock: ssl.SSLSocket) -> dict[str, Any]:
    """What a handler may want to know about the TLS session (``self.tls``)."""
    cipher = sock.cipher() or (None, None, None)
    return {
        "version": sock.version(),
        "cipher": cipher[0],
        "bits": cipher[2],
        "peer_cert": sock.getpeercert() or None,
        "peer_cert_der": sock.getpeercert(binary_form=True),
    }
