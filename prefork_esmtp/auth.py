"""AUTH (RFC 4954): the SASL exchange with the client and the handler's credentials check.

Decoding lives in :mod:`prefork_esmtp.sasl`; here the engine sends the 334
challenges, reads the responses (never logged), hands the credentials to the
handler's AUTH hook and turns its verdict into the reply.
"""

from __future__ import annotations

import logging
from typing import Any

from prefork_esmtp import counters
from prefork_esmtp import replies as R
from prefork_esmtp import sasl
from prefork_esmtp.connection import Connection
from prefork_esmtp.handler import ESMTPHandler
from prefork_esmtp.reader import LineTooLong
from prefork_esmtp.settings import Config
from prefork_esmtp.state import ConnectionState

log = logging.getLogger("prefork_esmtp.session")

#: RFC 4954: an AUTH line (command or response) may be 12288 octets long.
AUTH_LINE_LIMIT = 12288
#: What EHLO advertises.
AUTH_KEYWORD = "AUTH " + " ".join(sasl.MECHANISMS)


class AuthCancelled(Exception):
    """The client answered an AUTH challenge with ``*``."""


class Auth:
    """Serves AUTH for one session; enabled when the handler overrides its AUTH hook."""

    def __init__(self, handler: Any, state: ConnectionState, conn: Connection, config: Config) -> None:
        self.handler = handler
        self.state = state
        self.conn = conn
        self.config = config
        self.enabled = type(handler).AUTH is not ESMTPHandler.AUTH

    def offered(self) -> bool:
        """Whether EHLO advertises AUTH now: enabled, not yet done, inside TLS unless auth_plaintext."""
        return self.enabled and self.state.auth_user is None and (
            self.state.tls is not None or self.config.auth_plaintext)

    def command(self, arg: str, in_transaction: bool) -> R.Reply | R.HookReply:
        """AUTH mechanism [initial-response]: run the exchange, return the final reply."""
        state = self.state
        if not self.enabled:
            return R.AUTH_NOT_ENABLED
        if state.tls is None and not self.config.auth_plaintext:
            return R.AUTH_NEEDS_TLS
        if state.client is None:
            return R.NEED_HELO
        if state.auth_user is not None:
            return R.AUTH_TWICE
        if in_transaction:
            return R.AUTH_IN_TRANSACTION
        mechanism, _, initial = arg.partition(" ")
        mechanism, initial = mechanism.upper(), initial.strip()
        if not mechanism:
            return R.SYNTAX_AUTH
        if mechanism not in sasl.MECHANISMS:
            return R.AUTH_MECHANISM
        try:
            if mechanism == "PLAIN":
                response = initial or self._challenge("")
                credentials = sasl.parse_plain(sasl.b64decode(response))
            else:
                username = sasl.b64decode(initial or self._challenge(sasl.LOGIN_USERNAME))
                password = sasl.b64decode(self._challenge(sasl.LOGIN_PASSWORD))
                credentials = sasl.parse_login(username, password)
        except AuthCancelled:
            return R.AUTH_CANCELLED
        except sasl.SASLError as exc:
            return R.AUTH_BAD_RESPONSE.format(exc)
        return self._check(credentials)

    def _challenge(self, text: str) -> str:
        """Send ``334 text`` (an interim reply) and return the client's response line."""
        self.conn.writer.write(f"334 {text}\r\n".encode())
        try:
            line = self.conn.reader.readline(AUTH_LINE_LIMIT)
        except LineTooLong:
            raise sasl.SASLError("response too long") from None
        if line.strip() == b"*":
            raise AuthCancelled()
        try:
            return line.decode("ascii").strip()
        except UnicodeDecodeError:
            raise sasl.SASLError("response is not base64") from None

    def _check(self, c: sasl.Credentials) -> R.Reply | R.HookReply:
        """The handler's verdict on the credentials, as the reply; a 2xx records the identity."""
        who = self.conn.who
        try:
            result = self.handler.AUTH(c.mechanism, c.username, c.password, c.authzid)
        except Exception:
            counters.hook_failed("AUTH")
            log.exception("AUTH hook raised (client %s)", who)
            return R.AUTH_TEMPFAIL
        reply: R.Reply | R.HookReply
        if result is True:
            reply = R.AUTH_OK
        elif result is False or result is None:
            reply = R.AUTH_FAILED
        else:
            try:
                reply = R.normalize(result)
            except R.BadHookResult as exc:
                counters.hook_failed("AUTH")
                log.error("AUTH hook returned a bad reply: %s", exc)
                return R.AUTH_TEMPFAIL
        if 200 <= reply.code < 300:
            self.state.auth_user, self.state.auth_mechanism = c.username, c.mechanism
            log.info("authenticated %s as %r (%s)", who, c.username, c.mechanism)
        else:
            log.info("authentication failed for %r from %s", c.username, who)
        return reply
