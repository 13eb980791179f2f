"""ESMTPHandler: the hooks of Apache2::Protocol::ESMTP and their defaults.

Subclass it and override the hooks you care about.  One instance serves one
connection, so instance attributes are the session.  Every hook but HEADER,
EOH and BODY returns ``(code, *messages)``; several messages make a
multi-line reply.  The engine adds the framing, the server's hostname where
RFC 5321 wants it, and default enhanced status codes.
"""

from __future__ import annotations

from typing import Any

from prefork_esmtp import metrics as _metrics
from prefork_esmtp.state import ConnectionState, Envelope

Reply = tuple[Any, ...]

#: Largest BODY chunk in chunk mode unless a handler sets ``chunksize``.
DEFAULT_CHUNKSIZE = 65536

#: The texts of the base MAIL and RCPT hooks' 250 replies, ``%`` the address.  For a handler
#: that keeps those hooks the engine makes the same reply itself, without the call.
SENDER_OK = "<%s>, sender ok"
RECIPIENT_OK = "<%s>, recipient ok"
#: The base EHLO hook's greeting line (``%`` the client's name) and its keyword lines; the
#: engine makes the same reply itself for a handler that keeps that hook.
EHLO_OK = "%s, pleased to meet you"
EHLO_KEYWORDS = ("HELP",)


class HandlerConfigError(ValueError):
    """A handler option is wrong; ``configure`` raises it and its message is shown to the operator.

    One line, naming the option: ``root: expected a directory name, got 5``.
    A plain ``ValueError`` from ``configure`` is reported the same way.
    """


class ESMTPHandler:
    """The base class: carries on a whole ESMTP conversation, accepts and discards mail.

    Properties (those of Apache2::Protocol::ESMTP), plain attributes a hook may set:
    ``input_handle`` and ``output_handle`` (the session's reader and reply
    writer), ``chunkmode`` (line mode first, chunk mode after EOH, line mode
    again after EOM), ``chunksize`` (largest BODY chunk in chunk mode),
    ``disconnect`` (close once the current reply is sent).

    Session facts, read-only views of the engine's state
    (:mod:`prefork_esmtp.state`): ``client`` (HELO/EHLO domain), ``esmtp``
    (True after EHLO), ``env_sender``, ``env_recipients`` (only those RCPT
    accepted with 2xx), ``mail_params``, ``rcpt_params`` (of the RCPT being
    handled), ``recipients_params`` (one dict per accepted recipient), ``peer``
    and ``local`` ((host, port) tuples; the real client's after a PROXY
    header), ``proxy`` (that header, or None), ``hostname`` (this server's), ``tls``,
    ``auth_user``, ``auth_mechanism``, ``session_id`` (as the log lines show it).
    Outside a session (a unit test) they
    show the defaults, or what :func:`prefork_esmtp.state.attach` gave.

    The message as it came (not in Apache2::Protocol::ESMTP): ``header_raw``
    while HEADER runs, and ``header_section`` from EOH on, so a handler can
    keep the message byte for byte.
    """

    #: Largest BODY chunk in chunk mode, in bytes.
    chunksize: int = DEFAULT_CHUNKSIZE
    #: Read the body in chunks (True) or line by line (False).  The engine turns
    #: it on just before EOH and off after EOM; set it in EOH to change that.
    chunkmode: bool = False
    #: Set to True in any hook to close the connection after that hook's reply.
    disconnect: bool = False
    #: The session's reader (``readline(limit)``, ``read(n)``) and reply writer (``write``, ``flush``).
    input_handle: Any = None
    output_handle: Any = None
    #: While HEADER runs: that header's exact bytes as received, folding, spacing and
    #: line ends (CRLF, or a bare LF the bare-newline policy keeps) included.
    header_raw: bytes = b""
    #: From EOH until the next message starts: the exact bytes of the header section
    #: as received, with the empty line that ended it if there was one.
    #: ``header_section`` followed by the BODY chunks is the message, byte for byte.
    header_section: bytes = b""
    #: Set True if your handler acts on DSN requests (RFC 3461): the engine then
    #: advertises DSN.  RET, ENVID, NOTIFY and ORCPT are validated and handed over
    #: in mail_params / rcpt_params either way.
    dsn: bool = False
    #: Declare and update the handler's own Prometheus metrics: ``self.metrics.counter(name,
    #: help, labels).inc(...)`` (see :mod:`prefork_esmtp.metrics`).
    metrics = _metrics

    # -- configuration (once per worker process, before any connection) -------

    @classmethod
    def configure(cls, options: dict[str, Any]) -> None:
        """Take the handler options: the ``[handler]`` table and ``--handler-option KEY=VALUE``.

        Called on the handler class once per worker (again in each new worker
        after a reload; in the master with ``--preload``; in-process with
        ``-X``; and by ``configtest``) before any connection.  ``options`` is a
        fresh dict the engine owns: values are strings from the command line,
        or any TOML value from the file.  Each class pops the keys it knows,
        stores what it needs on ``cls`` (so a subclass's values never touch its
        parent or a sibling), and passes the rest to ``super().configure``; this
        base refuses whatever nobody took.  Raise :class:`HandlerConfigError`
        (or ``ValueError``) with one line to refuse a value: start, configtest
        and reload then fail with that line.
        """
        if options:
            names = ", ".join(repr(k) for k in sorted(options))
            raise HandlerConfigError(f"unknown handler option{'s' if len(options) > 1 else ''} {names}")

    # The engine's state objects behind the session facts; set by the engine
    # (state.attach), or made on first use for a handler outside a session.
    _esmtp_state: ConnectionState | None = None
    _esmtp_envelope: Envelope | None = None
    # The worker's check-in (the session sets it in a pre-forked worker); see may_block.
    _esmtp_check_in: Any = None

    def _blank_state(self) -> ConnectionState:
        self._esmtp_state = ConnectionState()
        return self._esmtp_state

    def _blank_envelope(self) -> Envelope:
        self._esmtp_envelope = Envelope()
        return self._esmtp_envelope

    # -- session facts: read-only views ----------------------------------------

    @property
    def client(self) -> str | None:
        """The HELO/EHLO domain, or None before HELO/EHLO."""
        return (self._esmtp_state or self._blank_state()).client

    @property
    def esmtp(self) -> bool:
        """True after EHLO."""
        return (self._esmtp_state or self._blank_state()).esmtp

    @property
    def peer(self) -> tuple[str, int] | None:
        """The client's (host, port): the real client after a PROXY header."""
        return (self._esmtp_state or self._blank_state()).peer

    @property
    def local(self) -> tuple[str, int] | None:
        """Our (host, port)."""
        return (self._esmtp_state or self._blank_state()).local

    @property
    def hostname(self) -> str:
        """This server's name (``--hostname``)."""
        return (self._esmtp_state or self._blank_state()).hostname

    @property
    def tls(self) -> dict[str, Any] | None:
        """None, or facts about the TLS session: version, cipher, bits, peer_cert, peer_cert_der."""
        return (self._esmtp_state or self._blank_state()).tls

    @property
    def proxy(self) -> dict[str, Any] | None:
        """None without ``proxy_protocol``; else the load balancer's PROXY header.

        Keys: version (1/2), command (PROXY/LOCAL), protocol (TCP4, TCP6,
        UNKNOWN, UNSPEC...), source and destination ((host, port) as the header
        gave them, or None), alpn and unique_id (bytes), authority and netns
        (str), ssl (client, verify, version, cn, cipher, sig_alg, key_alg, as
        the proxy saw the client's TLS), tlvs (every v2 TLV as (type, bytes)).
        """
        return (self._esmtp_state or self._blank_state()).proxy

    @property
    def auth_user(self) -> str | None:
        """The identity AUTH proved (the username), or None."""
        return (self._esmtp_state or self._blank_state()).auth_user

    @property
    def auth_mechanism(self) -> str | None:
        """The SASL mechanism AUTH used, or None."""
        return (self._esmtp_state or self._blank_state()).auth_mechanism

    @property
    def session_id(self) -> str:
        """The id of this session in the server's log lines (12 hex digits), '' outside a session."""
        return (self._esmtp_state or self._blank_state()).session_id

    @property
    def env_sender(self) -> str | None:
        """MAIL FROM's address ('' for the null sender), or None outside a transaction."""
        return (self._esmtp_envelope or self._blank_envelope()).sender

    @property
    def env_recipients(self) -> list[str]:
        """The recipients RCPT accepted with 2xx, in order."""
        return (self._esmtp_envelope or self._blank_envelope()).recipients

    @property
    def mail_params(self) -> dict[str, str | None]:
        """The ESMTP parameters of MAIL."""
        return (self._esmtp_envelope or self._blank_envelope()).mail_params

    @property
    def rcpt_params(self) -> dict[str, str | None]:
        """The ESMTP parameters of the RCPT being handled."""
        return (self._esmtp_envelope or self._blank_envelope()).rcpt_params

    @property
    def recipients_params(self) -> list[dict[str, str | None]]:
        """The ESMTP parameters of each accepted recipient, in the order of env_recipients."""
        return (self._esmtp_envelope or self._blank_envelope()).recipients_params

    # -- for hooks that wait ----------------------------------------------------

    def may_block(self, seconds: float) -> None:
        """Say that this worker may now wait up to ``seconds`` without a word (on another server).

        Before every wait on the client the engine tells the master how long
        the worker may stay silent; a worker silent ``worker_timeout`` seconds
        past that is killed as stuck.  A hook that waits longer than that on
        something else (an upstream server, a slow lookup) calls this first,
        with its own bound.  A no-op outside a pre-forked worker.
        """
        if self._esmtp_check_in is not None:
            self._esmtp_check_in(seconds)

    # -- connection -----------------------------------------------------------

    def CONNECT(self) -> Reply:
        """Client connected.  The engine puts the hostname first: ``220 <hostname> ...``.

        Return 554 to refuse the session (then only QUIT is served) or 421 to
        close at once.
        """
        return 220, "ESMTP Mail Server"

    def UNKNOWN(self, line: str) -> Reply:
        """A command the engine does not know; ``line`` is the whole command line."""
        return 500, f"Command unrecognized: {line}"

    def HELO(self, domain: str) -> Reply:
        """HELO; ``self.client`` is already set.  The engine puts the hostname first."""
        return 250, "OK"

    def EHLO(self, domain: str) -> Reply:
        """EHLO; the first message is the greeting, further ones are extra keywords.

        The engine puts its hostname first and appends the extensions it serves.
        """
        return 250, EHLO_OK % (self.client,), *EHLO_KEYWORDS

    # -- transaction ----------------------------------------------------------

    def MAIL(self, env_sender: str) -> Reply:
        """MAIL FROM; ``env_sender`` is '' for the null sender ``<>``.

        ``self.env_sender`` and ``self.mail_params`` are set; a non-2xx reply
        starts no transaction.
        """
        return 250, SENDER_OK % (env_sender,)

    def RCPT(self, env_recipient: str) -> Reply:
        """RCPT TO; only a 2xx reply adds ``env_recipient`` to ``self.env_recipients``."""
        return 250, RECIPIENT_OK % (env_recipient,)

    def DATA(self) -> Reply:
        """DATA, with at least one accepted recipient.  354 lets the message come."""
        return 354, 'Enter mail, end with "." on a line by itself'

    def HEADER(self, name: str, value: str) -> None:
        """One header of the message, unfolded.  No reply.

        ``self.header_raw`` holds its exact bytes as received (all its lines, line ends included).
        """

    def EOH(self) -> None:
        """End of the header section.  No reply.

        ``self.header_section`` holds the exact bytes of the header section as
        received, with the empty line that ended it if there was one.
        """

    def BODY(self, chunk: bytes) -> None:
        """A piece of the body, dot-unstuffed.  No reply."""

    def EOM(self) -> Reply:
        """End of message.  A 2xx reply means the handler has taken the message."""
        return 250, "Message accepted for delivery"

    # -- other commands -------------------------------------------------------

    def EXPN(self, address: str) -> Reply:
        """EXPN."""
        return 502, "Sorry we don't allow this operation"

    def VRFY(self, address: str) -> Reply:
        """VRFY."""
        return 252, "Cannot VRFY user; try RCPT to attempt delivery"

    def NOOP(self) -> Reply:
        """NOOP."""
        return 250, "OK"

    def RSET(self) -> Reply:
        """RSET; the engine has already ended any transaction."""
        return 250, "OK"

    def HELP(self, command: str | None) -> Reply:
        """HELP, with the command asked about or None."""
        from prefork_esmtp import __version__

        return 214, f"This is prefork-esmtp {__version__}"

    def QUIT(self) -> Reply:
        """QUIT; the connection closes after the reply."""
        return 221, "Closing connection"

    def STARTTLS(self) -> Reply:
        """STARTTLS, when TLS is configured (not in Apache2::Protocol::ESMTP).

        220 starts the handshake; any other reply refuses it.  After the
        handshake ``self.tls`` holds the TLS facts and the session starts
        over (a new EHLO is needed).
        """
        return 220, "Ready to start TLS"

    def AUTH(self, mechanism: str, username: str, password: str, authzid: str) -> Any:
        """Check credentials from AUTH PLAIN or LOGIN (not in Apache2::Protocol::ESMTP).

        Return True to accept (235), False to refuse (535 5.7.8), or a reply
        ``(code, *messages)`` (2xx accepts).  The engine offers AUTH only
        when a subclass overrides this method, and only inside TLS unless
        ``auth_plaintext`` is set; the default accepts no one.
        """
        return False

    def DISCONNECT(self) -> None:
        """The connection is gone, whatever the reason (not in Apache2::Protocol::ESMTP): clean up here."""
