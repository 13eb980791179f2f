"""The trace header a ready-made handler puts on top of a message (RFC 5321 4.4).

One ``Received:`` line naming the client (HELO name and address), this server,
the protocol word of RFC 3848/6531 (ESMTP, ESMTPS, ESMTPA, ESMTPSA, UTF8SMTP...),
the recipient only when there is exactly one (never leak one recipient to the
others), and the date; folded so that no line is longer than 998 octets.
"""

from __future__ import annotations

import email.utils
from typing import Any


def with_protocol(handler: Any) -> str:
    """The ``with`` word of a Received line from what the session used (RFC 3848, RFC 6531)."""
    if not getattr(handler, "esmtp", False):
        return "SMTP"
    utf8 = "SMTPUTF8" in (getattr(handler, "mail_params", None) or {})
    word = "UTF8SMTP" if utf8 else "ESMTP"
    if getattr(handler, "tls", None) is not None:
        word += "S"
    if getattr(handler, "auth_user", None) is not None:
        word += "A"
    return word


def _clip(text: str | None, limit: int = 255) -> str:
    """Client-supplied text for a header: printable, no parentheses games, bounded."""
    text = text or "unknown"
    cleaned = "".join(c if c.isprintable() and c not in "()\\" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 3] + "..."


def received_header(handler: Any, newline: str = "\r\n", queue_id: str | None = None) -> bytes:
    """The Received line for the message ``handler`` is taking, folded, ending with ``newline``."""
    peer = handler.peer[0] if getattr(handler, "peer", None) else "unknown"
    recipients = getattr(handler, "env_recipients", None) or []
    fields = [f"Received: from {_clip(handler.client)} ([{peer}])",
              f"by {_clip(handler.hostname)} (prefork-esmtp)",
              f"with {with_protocol(handler)}" + (f" id {queue_id}" if queue_id else "")]
    if len(recipients) == 1:
        fields.append(f"for <{_clip(recipients[0], 900)}>")
    fields[-1] += ";"
    fields.append(email.utils.formatdate(localtime=True))
    return (f"{newline}\t".join(fields) + newline).encode("utf-8", "surrogateescape")
