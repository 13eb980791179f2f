"""Handlers for the LMTP server-mode tests: EOM with one reply per recipient."""

from __future__ import annotations

from prefork_esmtp import ESMTPHandler


class PerRecipient(ESMTPHandler):
    """RCPT refuses nobody@; EOM delivers to everyone but local parts starting with "full" (452) or "gone" (550)."""

    def RCPT(self, env_recipient: str):
        if env_recipient.startswith("nobody@"):
            return 550, "5.1.1 No such user"
        return super().RCPT(env_recipient)

    def EOM(self):
        replies = []
        for recipient in self.env_recipients:
            if recipient.startswith("full"):
                replies.append((452, f"4.2.2 <{recipient}> mailbox full"))
            elif recipient.startswith("gone"):
                replies.append((550, f"5.2.1 <{recipient}> mailbox disabled"))
            else:
                replies.append((250, f"2.0.0 <{recipient}> delivered"))
        return replies


class DropsRecipients(ESMTPHandler):
    """Changes the list behind ``env_recipients`` in DATA (drops every recipient whose local part
    starts with "drop"); the engine's count of accepted recipients must not follow it."""

    def DATA(self):
        self.env_recipients[:] = [r for r in self.env_recipients if not r.startswith("drop")]
        return super().DATA()


class WrongCount(ESMTPHandler):
    """EOM answers one reply too many: a handler bug the engine must not pass on as replies."""

    def EOM(self):
        return [(250, "2.0.0 delivered")] * (len(self.env_recipients) + 1)


class Raising(ESMTPHandler):
    """EOM raises: every recipient must get a transient refusal, in step."""

    def EOM(self):
        raise RuntimeError("the mailbox store fell over")
