"""A sink that accepts every message, logs one line about it, and discards it."""

from __future__ import annotations

import logging

from prefork_esmtp import ESMTPHandler

log = logging.getLogger("prefork_esmtp.sink")


class Sink(ESMTPHandler):
    """Accepts and discards mail; logs sender, recipients, size and Subject."""

    def DATA(self):
        self.size = 0
        self.subject = ""
        return super().DATA()

    def HEADER(self, name: str, value: str) -> None:
        if name.lower() == "subject" and not self.subject:
            self.subject = value[:200]

    def BODY(self, chunk: bytes) -> None:
        self.size += len(chunk)

    def EOM(self):
        log.info("sink: from=<%s> to=%s body=%d octets subject=%r", self.env_sender,
                 ",".join(f"<{r}>" for r in self.env_recipients), self.size, self.subject)
        return 250, "2.0.0 Message accepted and discarded"
