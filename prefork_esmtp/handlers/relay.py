"""A streaming SMTP relay: every command passes upstream as it comes, the message while it arrives.

The client gets the upstream's own reply to MAIL, to each RCPT, to DATA and to
end-of-data, so a 250 after the message means the upstream said 250 and
nothing else does.  The message is never held whole: its header section as
received (byte for byte, after our ``Received:`` line) and then each BODY
chunk go upstream at once, dot-stuffed on the way.  Anything wrong with the
upstream becomes a 4xx naming it (451 4.4.1 cannot connect, 4.4.2 timed out or
lost, 4.3.0 garbage) and the worker goes on; a client that vanishes mid-message
closes the upstream connection before end-of-data, so nothing half-sent is
delivered.

Handler options: ``upstream`` (``host:port``, ``[ipv6]:port`` or, for LMTP,
``unix:/path``; a list or comma-separated string is tried in order),
``connect_at`` (``mail`` or ``connect``), ``timeout``, ``connect_timeout``,
``data_timeout``, ``tls`` (``none``, ``opportunistic``, ``required``),
``tls_ca``, ``tls_name``, ``ehlo_name``, ``xforward``, ``xclient``.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from prefork_esmtp.handler import ESMTPHandler, HandlerConfigError
from prefork_esmtp.handlers import options as O
from prefork_esmtp.handlers.trace import received_header
from prefork_esmtp.smtpclient import Reply, SMTPClient, UpstreamError, parse_address

log = logging.getLogger("prefork_esmtp.relay")

#: MAIL parameters passed upstream, each only when the upstream announced the extension.
MAIL_PARAMETER_EXTENSIONS = {"SIZE": "SIZE", "SMTPUTF8": "SMTPUTF8", "RET": "DSN", "ENVID": "DSN"}
RCPT_PARAMETER_EXTENSIONS = {"NOTIFY": "DSN", "ORCPT": "DSN"}


def _addresses(value: Any) -> list[str]:
    items = O.text_list(value)
    for item in items:
        parse_address(item)  # ValueError: one line naming the bad item
    return items


class Relay(ESMTPHandler):
    """Passes each transaction to an upstream SMTP server as it happens (an SMTP proxy).

    Override :meth:`choose_upstreams` to pick the upstream per message, and any
    hook to filter before the upstream sees a command (refuse a recipient,
    add headers by overriding :meth:`extra_headers`).
    """

    lmtp = False
    upstream: tuple[str, ...] = ()  # the upstream option (required), or a subclass's own
    connect_at = "mail"
    timeout = 60.0
    connect_timeout = 30.0
    data_timeout = 300.0
    tls_mode = "opportunistic"
    tls_ca: str | None = None
    tls_name: str | None = None
    ehlo_name: str | None = None
    xforward = True
    xclient = False
    _tls_context: ssl.SSLContext | None = None

    @classmethod
    def configure(cls, options: dict[str, Any]) -> None:
        """Take the relay's options (see the module's docstring); the rest goes up the MRO."""
        cls.upstream = tuple(O.take(options, "upstream", cls.upstream, _addresses))
        if not cls.upstream:
            raise HandlerConfigError("upstream: missing (give --handler-option upstream=HOST:PORT)")
        cls.connect_at = O.take(options, "connect_at", cls.connect_at, O.choice("mail", "connect"))
        cls.timeout = O.take(options, "timeout", cls.timeout, O.seconds)
        cls.connect_timeout = O.take(options, "connect_timeout", cls.connect_timeout, O.seconds)
        cls.data_timeout = O.take(options, "data_timeout", cls.data_timeout, O.seconds)
        cls.tls_mode = O.take(options, "tls", cls.tls_mode, O.choice("none", "opportunistic", "required"))
        cls.tls_ca = O.take(options, "tls_ca", cls.tls_ca, O.text)
        cls.tls_name = O.take(options, "tls_name", cls.tls_name, O.text)
        cls.ehlo_name = O.take(options, "ehlo_name", cls.ehlo_name, O.text)
        cls.xforward = O.take(options, "xforward", cls.xforward, O.boolean)
        cls.xclient = O.take(options, "xclient", cls.xclient, O.boolean)
        cls._tls_context = cls._make_tls_context()
        super().configure(options)

    @classmethod
    def _make_tls_context(cls) -> ssl.SSLContext | None:
        """The client context for STARTTLS upstream; the system CA store is loaded only when it is used."""
        if cls.tls_mode == "none":
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if cls.tls_mode == "opportunistic":
            # Better than plaintext against a passive listener; no identity to check (RFC 7435),
            # so no CA store either (loading it costs each worker megabytes).
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            if cls.tls_ca:
                context.load_verify_locations(cafile=cls.tls_ca)
            else:
                context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise HandlerConfigError(f"tls_ca: cannot load {cls.tls_ca or 'the system CAs'}: {exc}") from None
        return context

    # -- the upstream session ---------------------------------------------------------

    conn: SMTPClient | None = None  # the upstream connection of this session, if open
    in_data = False  # the upstream is inside DATA (or BDAT): only end-of-data or a close ends it
    in_transaction = False  # MAIL was accepted upstream and no message or RSET ended it
    failure: UpstreamError | None = None  # what went wrong while streaming, owed at EOM
    bdat = False  # this message goes upstream with BDAT (the client's BODY=BINARYMIME)
    upstream_recipients: tuple[str, ...] = ()  # accepted upstream in this transaction (a list from MAIL on)

    def choose_upstreams(self) -> list[str]:
        """The upstreams to try, in order, for the transaction starting now (called at MAIL).

        Override to route per sender or per client; the default is the
        ``upstream`` option.  A connection already open to one of them is reused.
        """
        return list(self.upstream)

    def _open(self, addresses: list[str]) -> Reply:
        """Connect to the first upstream that greets us with 2xx; the last refusal or error otherwise."""
        refusal: Reply | None = None
        error: UpstreamError | None = None
        for text in addresses:
            conn = SMTPClient(parse_address(text), timeout=self.timeout, connect_timeout=self.connect_timeout,
                              data_timeout=self.data_timeout, lmtp=self.lmtp, name=text,
                              check_in=self.may_block)
            try:
                greeting = conn.connect()
                if not 200 <= greeting.code < 300:
                    log.warning("upstream %s refused the connection: %s", text, greeting)
                    conn.quit()
                    refusal = greeting
                    continue
                self._hello(conn)
            except UpstreamError as exc:
                log.warning("upstream %s: %s", text, exc.text)
                error = exc
                continue
            self.conn = conn
            return greeting
        if refusal is not None:
            return refusal
        raise error if error is not None else UpstreamError(451, "4.4.1", "no upstream configured")

    def _hello(self, conn: SMTPClient) -> None:
        """EHLO, STARTTLS as configured, EHLO again inside TLS."""
        name = self.ehlo_name or self.hostname
        reply = conn.ehlo(name)
        if not reply.ok:
            conn.quit()
            raise UpstreamError(451, "4.4.1", f"upstream {conn.name} refused our EHLO: {reply}")
        if self.tls_mode == "none":
            return
        if not conn.has("STARTTLS"):
            if self.tls_mode == "required":
                conn.quit()
                raise UpstreamError(451, "4.7.5", f"upstream {conn.name} does not offer STARTTLS")
            return
        host = conn.address[0] if isinstance(conn.address, tuple) else None
        reply = conn.starttls(self._tls_context, self.tls_name or host if self.tls_mode == "required" else None)
        if reply.code != 220:
            if self.tls_mode == "required":
                conn.quit()
                raise UpstreamError(451, "4.7.5", f"upstream {conn.name} refused STARTTLS: {reply}")
            return
        if not conn.ehlo(name).ok:
            conn.quit()
            raise UpstreamError(451, "4.4.1", f"upstream {conn.name} refused our EHLO inside TLS")

    def _close(self) -> None:
        """Drop the upstream connection at once: an unfinished message is not delivered."""
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.in_data = self.in_transaction = False

    def _fail(self, exc: UpstreamError) -> tuple:
        log.warning("relay from %s: %s", self.peer[0] if self.peer else "client", exc.text)
        self._close()
        return exc.reply.hook_result()

    def _client_attributes(self) -> dict[str, str | None]:
        """What XFORWARD and XCLIENT tell the upstream about our client."""
        addr = self.peer[0] if self.peer else None
        if addr and ":" in addr:
            addr = "IPV6:" + addr
        return {"NAME": None, "ADDR": addr, "PORT": str(self.peer[1]) if self.peer else None,
                "PROTO": "ESMTP" if self.esmtp else "SMTP", "HELO": self.client,
                "LOGIN": self.auth_user, "SOURCE": "REMOTE"}

    # -- hooks --------------------------------------------------------------------------

    def CONNECT(self):
        if self.connect_at != "connect":
            return super().CONNECT()
        try:
            greeting = self._open(self.choose_upstreams())
        except UpstreamError as exc:
            self._fail(exc)
            return 421, exc.reply.lines[0]
        if not 200 <= greeting.code < 300:
            return (421 if greeting.code < 500 else 554), *greeting.lines
        return super().CONNECT()

    def MAIL(self, env_sender: str):
        self.upstream_recipients = []
        try:
            addresses = self.choose_upstreams()
            if self.conn is not None and (self.conn.name not in addresses or self.in_data):
                self._close()  # another upstream for this message, or a message cut short
            reused = self.conn is not None
            if not reused:
                greeting = self._open(addresses)
                if not 200 <= greeting.code < 300:
                    return (451 if greeting.code < 500 else 554), *greeting.lines
            reply = None
            try:
                reply = self._start_transaction(env_sender)
            except UpstreamError:
                if not reused:
                    raise
            if reused and (reply is None or reply.code == 421):
                # The upstream closed the idle connection (Postfix says 421 first, maybe
                # just as our MAIL went out): one fresh try.
                self._close()
                greeting = self._open(addresses)
                if not 200 <= greeting.code < 300:
                    return (451 if greeting.code < 500 else 554), *greeting.lines
                reply = self._start_transaction(env_sender)
        except UpstreamError as exc:
            return self._fail(exc)
        self.in_transaction = 200 <= reply.code < 300
        self.bdat = (self.mail_params.get("BODY") or "").upper() == "BINARYMIME"
        return reply.hook_result()

    def _start_transaction(self, env_sender: str) -> Reply:
        """RSET if a transaction is open upstream, the client's facts (XCLIENT or XFORWARD), then MAIL."""
        conn = self.conn
        commands = ["RSET"] if self.in_transaction else []
        self.in_transaction = False
        if self.xclient and conn.has("XCLIENT"):
            for reply in self._send(commands + conn.xclient_commands(self._client_attributes()))[len(commands):]:
                if reply.code != 220:
                    log.warning("upstream %s refused XCLIENT: %s", conn.name, reply)
            commands = []
            if not conn.ehlo(self.ehlo_name or self.hostname).ok:
                raise UpstreamError(451, "4.4.1", f"upstream {conn.name} refused EHLO after XCLIENT")
        elif self.xforward and conn.has("XFORWARD"):
            commands += conn.xforward_commands(self._client_attributes())
        mail = f"MAIL FROM:<{env_sender}>{self._parameters(self.mail_params, MAIL_PARAMETER_EXTENSIONS)}"
        replies = self._send(commands + [mail])
        for command, reply in zip(commands, replies):
            if not reply.ok:
                log.warning("upstream %s refused %s: %s", conn.name, command.split()[0], reply)
        return replies[-1]

    def _parameters(self, params: dict[str, str | None], extensions: dict[str, str]) -> str:
        """The ESMTP parameters the upstream announced the extension of, as they came."""
        out = []
        conn = self.conn
        for name, value in params.items():
            key = name.upper()
            if key == "BODY":
                if value and value.upper() == "8BITMIME" and conn.has("8BITMIME"):
                    out.append(f"BODY={value}")
                elif value and value.upper() == "BINARYMIME":
                    if not (conn.has("BINARYMIME") and conn.has("CHUNKING")):
                        raise UpstreamError(554, "5.6.3", f"upstream {conn.name} cannot take BODY=BINARYMIME")
                    out.append(f"BODY={value}")
                continue
            needed = extensions.get(key)
            if needed is None or not conn.has(needed):
                continue
            out.append(key if value is None else f"{key}={value}")
        return "".join(" " + p for p in out)

    def _send(self, commands: list[str]) -> list[Reply]:
        if len(commands) > 1 and self.conn.has("PIPELINING"):
            return self.conn.pipeline(commands)
        return [self.conn.command(c) for c in commands]

    def RCPT(self, env_recipient: str):
        if self.conn is None or not self.in_transaction:
            return 451, "4.3.0 No upstream transaction; send MAIL again"
        try:
            reply = self.conn.command(f"RCPT TO:<{env_recipient}>"
                                      f"{self._parameters(self.rcpt_params, RCPT_PARAMETER_EXTENSIONS)}")
        except UpstreamError as exc:
            return self._fail(exc)
        if 200 <= reply.code < 300:
            self.upstream_recipients.append(env_recipient)
        return reply.hook_result()

    def DATA(self):
        if self.conn is None or not self.in_transaction:
            return 451, "4.3.0 No upstream transaction; send MAIL again"
        self.failure = None
        if self.bdat:
            self.in_data = True  # BDAT has no 354 step: the upstream judges the chunks
            return super().DATA()
        try:
            reply = self.conn.data()
        except UpstreamError as exc:
            return self._fail(exc)
        if reply.code != 354:
            return reply.hook_result()
        self.in_data = True
        return reply.hook_result()

    def extra_headers(self) -> bytes:
        """Header lines to put on top of the message, after our Received line (CRLF ends); none by default."""
        return b""

    def _stream(self, data: bytes) -> None:
        """Send the next piece of the message upstream; a failure is kept for EOM."""
        if self.failure is not None or not data:
            return
        try:
            if self.bdat:
                self._check_chunk(self.conn.bdat(data))
            else:
                self.conn.data_chunk(data)
        except UpstreamError as exc:
            self.failure = exc
            self._close()

    def _check_chunk(self, replies: list[Reply]) -> None:
        reply = replies[-1]
        if not 200 <= reply.code < 300:
            code = reply.code if reply.code >= 400 else 451
            raise UpstreamError(code, f"{code // 100}.3.0", f"upstream refused a chunk: {reply}")

    def EOH(self) -> None:
        self._stream(received_header(self) + self.extra_headers() + self.header_section)

    def BODY(self, chunk: bytes) -> None:
        self._stream(chunk)

    def EOM(self):
        if self.failure is not None:
            failure, self.failure = self.failure, None
            return self._fail(failure)
        if self.conn is None or not self.in_data:
            return 451, "4.3.0 The upstream connection was lost; try again later"
        expected = len(self.upstream_recipients) if self.lmtp else 1
        try:
            if self.bdat:
                replies = self.conn.bdat(b"", last=True, replies=expected)
            else:
                replies = self.conn.end_data(expected)
        except UpstreamError as exc:
            return self._fail(exc)
        finally:
            self.in_data = False
        self.in_transaction = False
        reply = self.final_reply(replies)
        self.upstream_recipients = []
        log.info("relayed from=<%s> nrcpt=%d via %s: %s", self.env_sender, len(self.env_recipients),
                 self.conn.name if self.conn else "?", reply[0])
        return reply

    def final_reply(self, replies: list[Reply]) -> tuple:
        """The one reply our client gets for the message: the upstream's own."""
        return replies[-1].hook_result()

    def RSET(self):
        if self.in_data:
            self._close()  # a message cut short: never let the upstream finish it
        return super().RSET()

    def QUIT(self):
        if self.conn is not None:
            if self.in_data:
                self._close()
            else:
                self.conn.quit()
                self.conn = None
        return super().QUIT()

    def DISCONNECT(self) -> None:
        """The client is gone: close the upstream; a message not ended with end-of-data is not delivered."""
        if self.conn is not None and not self.in_data:
            self.conn.quit()
        self._close()
        super().DISCONNECT()
