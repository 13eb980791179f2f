"""SASL mechanisms for AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN.

Only decoding lives here; the session runs the exchange and the handler's
AUTH hook checks the credentials.  Nothing here logs, so passwords never
reach a log.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

MECHANISMS = ("PLAIN", "LOGIN")

#: Server challenges of LOGIN (base64 of "Username:" and "Password:").
LOGIN_USERNAME = "VXNlcm5hbWU6"
LOGIN_PASSWORD = "UGFzc3dvcmQ6"


#: RFC 4954 section 4: groups of four base64 characters, padding only in the last group.
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


class SASLError(ValueError):
    """A client response that is not valid for the mechanism."""


def b64decode(text: str) -> bytes:
    """Strict base64 (RFC 4954: ``=`` alone is an empty response).

    The standard library accepts surplus padding after a complete group
    (``QUJD==``); the RFC's grammar does not, so neither do we.
    """
    if text == "=":
        return b""
    if not _BASE64.fullmatch(text):
        raise SASLError("bad base64")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SASLError("bad base64") from None


@dataclass
class Credentials:
    """What the client proved it knows: the handler's AUTH hook decides."""

    mechanism: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("credentials are not UTF-8") from None


def parse_plain(response: bytes) -> Credentials:
    """``authzid NUL authcid NUL passwd`` (RFC 4616)."""
    parts = response.split(b"\0")
    if len(parts) != 3 or not parts[1]:
        raise SASLError("PLAIN response must be authzid NUL authcid NUL password")
    authzid, authcid, password = (_text(p) for p in parts)
    return Credentials("PLAIN", authcid, password, authzid)


def parse_login(username: bytes, password: bytes) -> Credentials:
    """LOGIN: the two responses to the Username: and Password: challenges."""
    if not username:
        raise SASLError("empty LOGIN username")
    return Credentials("LOGIN", _text(username), _text(password))
