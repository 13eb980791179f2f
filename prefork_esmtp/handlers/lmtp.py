"""Final delivery to an LMTP server (RFC 2033), such as Dovecot's, over TCP or a Unix socket.

The conversation is the relay's: LHLO, MAIL, each RCPT passed live (an unknown
user is refused at RCPT with the server's own reply), the message streamed.
After end-of-data an LMTP server answers once per accepted recipient; our
client gets one reply for the message, so they are combined:

- every recipient accepted: the first 2xx reply;
- every recipient refused with the same class (all 4xx or all 5xx): the
  first refusal, as the server worded it;
- mixed: ``451 4.3.0`` for the whole message, with a log line naming who was
  already delivered.  The client retries, which may deliver a second copy to
  those; the alternative (a 250) would silently lose the message for the
  others, and a bounce we cannot generate.  Postfix's before-queue proxy
  documentation makes the same choice: a duplicate is better than a loss.
"""

from __future__ import annotations

import logging

from prefork_esmtp.handlers.relay import Relay
from prefork_esmtp.replies import one_for_all
from prefork_esmtp.smtpclient import Reply

log = logging.getLogger("prefork_esmtp.lmtp")


class LMTP(Relay):
    """Delivers through LMTP; ``upstream`` is ``host:port`` or ``unix:/path``."""

    lmtp = True
    tls_mode = "none"  # a local delivery agent; set tls= to change it
    xforward = False

    def final_reply(self, replies: list[Reply]) -> tuple:
        """One reply for the message from the per-recipient replies (see the module's docstring)."""
        reply, delivered = one_for_all(replies)
        for i, (rcpt, each) in enumerate(zip(self.upstream_recipients, replies)):
            if i not in delivered:
                log.info("lmtp: <%s> not delivered: %s", rcpt, each)
        if delivered and len(delivered) < len(replies):
            log.warning("lmtp: partial delivery from=<%s>: delivered to %s; answering %d so the client retries",
                        self.env_sender, ", ".join(f"<{self.upstream_recipients[i]}>" for i in delivered),
                        reply.code)
        return (reply.code, *reply.lines)
