"""Handlers that take handler options (``[handler]`` table, ``--handler-option``), for the tests.

``Greeter`` says its ``greeting`` option in the 220 line, so a test sees on the
wire which options a worker got.  ``RejectSender`` is a filter mixin that
composes in front of a delivery handler (``FilteredMaildir``) with
cooperative ``super()`` calls: each class takes its keys, the base refuses
the rest.
"""

from __future__ import annotations

from typing import Any

from prefork_esmtp import ESMTPHandler, HandlerConfigError
from prefork_esmtp.handlers.maildir import Maildir


class Greeter(ESMTPHandler):
    """Greets with its ``greeting`` option (one line of text, required)."""

    greeting = "not configured"

    @classmethod
    def configure(cls, options: dict[str, Any]) -> None:
        if "greeting" not in options:
            raise HandlerConfigError("greeting: missing (give --handler-option greeting=TEXT)")
        greeting = options.pop("greeting")
        if not isinstance(greeting, str) or not greeting or "\n" in greeting:
            raise HandlerConfigError(f"greeting: expected one line of text, got {greeting!r}")
        cls.greeting = greeting
        super().configure(options)

    def CONNECT(self):
        return 220, self.greeting


class RejectSender(ESMTPHandler):
    """Filter mixin: refuses MAIL from the ``reject_sender`` option's address; the rest goes on."""

    reject_sender: str | None = None

    @classmethod
    def configure(cls, options: dict[str, Any]) -> None:
        sender = options.pop("reject_sender", None)
        if sender is not None and (not isinstance(sender, str) or "@" not in sender):
            raise HandlerConfigError(f"reject_sender: expected an address, got {sender!r}")
        cls.reject_sender = sender
        super().configure(options)

    def MAIL(self, env_sender: str):
        if self.reject_sender is not None and env_sender.lower() == self.reject_sender.lower():
            return 550, "5.7.1 Sender refused by configuration"
        return super().MAIL(env_sender)


class FilteredMaildir(RejectSender, Maildir):
    """The filter in front of the ready-made Maildir delivery: takes ``reject_sender`` and ``root``."""
