"""Handlers for the metrics and log tests: refusals, a failing hook, AUTH, and the handler's own metrics.

``Judge`` refuses at RCPT any recipient whose local part is ``nobody``
(550), raises in RCPT for ``crash@`` (451 from the engine), refuses at EOM
any message whose Subject is ``refuse`` (554), and otherwise accepts with its
session id in the reply, so a test can match the log lines to what the
client saw.  It counts its verdicts in its own metric (a counter with a
label) and the recipients per message in a histogram of its own.  AUTH takes
``user``/``secret``.
"""

from __future__ import annotations

from prefork_esmtp import ESMTPHandler, metrics

VERDICTS = metrics.counter("judge_verdicts_total", "Messages by the judge's verdict.", ["verdict"])


class Judge(ESMTPHandler):
    def RCPT(self, env_recipient):
        if env_recipient.startswith("crash@"):
            raise RuntimeError("a bug in RCPT")
        if env_recipient.startswith("nobody@"):
            return 550, "5.1.1 No such user"
        return super().RCPT(env_recipient)

    def DATA(self):
        self.subject = ""
        return super().DATA()

    def HEADER(self, name, value):
        if name.lower() == "subject":
            self.subject = value.strip()

    def EOM(self):
        self.metrics.histogram("judge_recipients", "Recipients per judged message.",
                               buckets=[1, 2, 5]).observe(len(self.env_recipients))
        if self.subject == "refuse":
            VERDICTS.inc(verdict="refused")
            return 554, "5.7.1 Refused by the judge"
        VERDICTS.labels(verdict="accepted").inc()
        return 250, f"2.0.0 Queued as {self.session_id}"

    def AUTH(self, mechanism, username, password, authzid):
        return username == "user" and password == "secret"
