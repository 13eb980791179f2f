"""The session's facts, kept by the engine and shown to the handler as read-only views.

:class:`ConnectionState` lives as long as the connection (who the client is,
what it said in HELO/EHLO, TLS, AUTH); :class:`Envelope` lives for one mail
transaction and is replaced, never cleared, when the transaction ends (a
handler may keep a reference to the last one's recipients).  The handler's
``client``, ``env_sender``, ``env_recipients``... properties read these objects.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any


@dataclass
class ConnectionState:
    """What the engine knows about the client and the connection.

    Every field's default is an immutable class attribute (no slots): a session makes
    its one with ``object.__new__`` and sets only what it knows at once (peer, local,
    hostname, session_id), the rest read as those defaults, rather than running the
    generated ten-field ``__init__``.
    """

    peer: tuple[str, int] | None = None  #: the client's (host, port): the real client after a PROXY header
    local: tuple[str, int] | None = None  #: our (host, port)
    hostname: str = ""  #: this server's name
    client: str | None = None  #: the HELO/EHLO domain
    esmtp: bool = False  #: True after EHLO
    tls: dict[str, Any] | None = None  #: TLS facts once TLS is on (see prefork_esmtp.tls.facts)
    auth_user: str | None = None  #: the username AUTH proved
    auth_mechanism: str | None = None  #: the SASL mechanism it used
    proxy: dict[str, Any] | None = None  #: the load balancer's PROXY header (see prefork_esmtp.proxy), or None
    session_id: str = ""  #: the id the log lines of this session carry (queue-id-like, 12 hex digits)

    def forget_greeting(self) -> None:
        """After STARTTLS (RFC 3207 4.2): the client must say EHLO again; AUTH is forgotten."""
        self.client, self.esmtp = None, False
        self.auth_user = self.auth_mechanism = None


#: A session makes its ConnectionState without __init__ (see the class): no field may need a factory.
assert all(f.default is not MISSING for f in fields(ConnectionState))


@dataclass(slots=True)
class Envelope:
    """One mail transaction's envelope; ``sender`` None means no transaction is open."""

    sender: str | None = None  #: '' for the null sender <>
    recipients: list[str] = field(default_factory=list)  #: only those RCPT accepted with 2xx
    mail_params: dict[str, str | None] = field(default_factory=dict)  #: ESMTP parameters of MAIL
    rcpt_params: dict[str, str | None] = field(default_factory=dict)  #: of the RCPT being handled
    recipients_params: list[dict[str, str | None]] = field(default_factory=list)  #: one per recipient

    def __init__(self, sender: str | None = None, recipients: list[str] | None = None,
                 mail_params: dict[str, str | None] | None = None, rcpt_params: dict[str, str | None] | None = None,
                 recipients_params: list[dict[str, str | None]] | None = None) -> None:
        """The fields as the dataclass takes them (None: a new empty list or dict), written out: the
        engine makes one per transaction, and literals cost less than the generated default factories.
        (The engine's blank ones are written out field by field in Transaction._clear: a field added
        here goes there too; a test compares the two.)"""
        self.sender = sender
        self.recipients = [] if recipients is None else recipients
        self.mail_params = {} if mail_params is None else mail_params
        self.rcpt_params = {} if rcpt_params is None else rcpt_params
        self.recipients_params = [] if recipients_params is None else recipients_params


def attach(handler: Any, state: ConnectionState | None = None, envelope: Envelope | None = None) -> None:
    """Let the handler's read-only views (``client``, ``env_sender``, ...) show these objects.

    The engine does this when a session starts and for each new envelope; a
    unit test of a handler's hooks does it by hand, without a server.
    """
    if state is not None:
        handler._esmtp_state = state
    if envelope is not None:
        handler._esmtp_envelope = envelope
