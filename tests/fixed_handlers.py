"""Handlers whose objects carry their own hooks, for the tests of the base handler's fixed replies.

The engine answers some hooks a handler takes unchanged from the base class
without calling them; a hook set on the handler object itself (in ``__init__``,
or by another hook during the session) must still be the one that answers.
"""

from __future__ import annotations

from prefork_esmtp import ESMTPHandler


class OwnOnInstance(ESMTPHandler):
    """QUIT and NOOP set on the object when it is made; DATA and EOM set by MAIL."""

    def __init__(self) -> None:
        self.QUIT = lambda: (221, "instance says bye")
        self.NOOP = lambda: (250, "instance noop")

    def MAIL(self, env_sender: str):
        self.DATA = lambda: (354, "instance: go ahead")
        self.EOM = lambda: (250, "instance took it")
        return super().MAIL(env_sender)


class OwnMailRcptOnInstance(ESMTPHandler):
    """MAIL and RCPT set on the object when it is made (the engine answers the class's own without a call)."""

    def __init__(self) -> None:
        self.MAIL = lambda env_sender: (250, f"instance sender {env_sender}")
        self.RCPT = lambda env_recipient: (550, f"instance refuses {env_recipient}")


class EhloBySuper(ESMTPHandler):
    """EHLO of its own that calls the base hook: the engine must call it, with the same reply."""

    def EHLO(self, domain: str):
        return super().EHLO(domain)


class OwnEhloOnInstance(ESMTPHandler):
    """EHLO set on the object when it is made (the engine answers the class's own without a call)."""

    def __init__(self) -> None:
        self.EHLO = lambda domain: (250, f"instance hello {domain}", "X-OWN")


class OwnHeaderOnInstance(ESMTPHandler):
    """HEADER set on the object when it is made (the class keeps the base's); EOM names the headers it got."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.HEADER = lambda name, value: self.names.append(name)

    def EOM(self):
        names, self.names = ",".join(self.names) or "none", []
        return 250, f"headers {names}"
