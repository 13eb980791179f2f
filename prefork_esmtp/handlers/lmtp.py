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
from prefork_esmtp.smtpclient import Reply

log = logging.getLogger("prefork_esmtp.lmtp")


class LMTP(Relay):
    """Delivers through LMTP; ``upstream`` is ``host:port`` or ``unix:/path``."""

    lmtp = True
    tls_mode = "none"  # a local delivery agent; set tls= to change it
    xforward = False

    def final_reply(self, replies: list[Reply]) -> tuple:
        """One reply for the message from the per-recipient replies (see the module's docstring)."""
        outcomes = list(zip(self.upstream_recipients, replies))
        delivered = [rcpt for rcpt, reply in outcomes if 200 <= reply.code < 300]
        failed = [(rcpt, reply) for rcpt, reply in outcomes if not 200 <= reply.code < 300]
        if not failed:
            return replies[0].hook_result()
        for rcpt, reply in failed:
            log.info("lmtp: <%s> not delivered: %s", rcpt, reply)
        if not delivered and len({reply.code // 100 for _, reply in failed}) == 1:
            return failed[0][1].hook_result()
        log.warning("lmtp: partial delivery from=<%s>: delivered to %s; not to %s; answering 451 "
                    "so the client retries", self.env_sender, ", ".join(f"<{r}>" for r in delivered),
                    ", ".join(f"<{r}>" for r, _ in failed))
        return 451, (f"4.3.0 Delivered to {len(delivered)} of {len(outcomes)} recipients only; "
                     "try again later")
