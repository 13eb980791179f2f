"""Handlers whose reply codes are int subclasses (an enum of codes), for the tests of reply framing.

A handler may name its codes with ``class Code(int, Enum)``; such a code is an
int, so the engine takes it, and the wire must show its number, never the
enum's name, for that reply and for every later one.
"""

from __future__ import annotations

from enum import Enum

from prefork_esmtp import ESMTPHandler


class Code(int, Enum):
    """SMTP codes by name; ``f"{Code.FORWARD}"`` is ``"Code.FORWARD"``, not ``"251"``."""

    FORWARD = 251


class EnumCodes(ESMTPHandler):
    """RCPT answers 251 to every recipient: as ``Code.FORWARD`` for ``enum@...``, as a plain int otherwise."""

    def RCPT(self, env_recipient: str):
        code = Code.FORWARD if env_recipient.startswith("enum@") else 251
        return code, f"forwarding {env_recipient}"
