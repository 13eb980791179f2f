"""Reading handler options (the ``[handler]`` table, ``--handler-option KEY=VALUE``) in ``configure``.

Values come as strings from the command line or as TOML values from the file;
:func:`take` pops one key, converts it (with the settings' own parsers where
they fit), and raises HandlerConfigError with one line naming the key when the
value is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefork_esmtp.handler import HandlerConfigError
from prefork_esmtp.settings import choice as settings_choice
from prefork_esmtp.settings import parse_bool, parse_seconds

T = TypeVar("T")

def take(options: dict[str, Any], key: str, default: T, convert: Callable[[Any], T]) -> T:
    """Pop ``key`` and convert it; ``default`` when absent; a ValueError becomes one line naming the key."""
    if key not in options:
        return default
    value = options.pop(key)
    try:
        return convert(value)
    except (ValueError, TypeError) as exc:
        raise HandlerConfigError(f"{key}: {exc}") from None


#: true/false, yes/no, on/off, 1/0 (the settings' own parser: one spelling for every switch).
boolean = parse_bool
#: A number of seconds greater than zero (the settings' own parser).
seconds = parse_seconds
#: A converter to one of the given words, case-insensitive (the settings' own).
choice = settings_choice


def text(value: Any) -> str:
    """A non-empty string on one line."""
    if not isinstance(value, str) or not value.strip() or "\n" in value or "\r" in value:
        raise ValueError(f"expected one line of text, got {value!r}")
    return value.strip()


def text_list(value: Any) -> list[str]:
    """A TOML list of strings, or one string with comma-separated items."""
    items = value if isinstance(value, list) else str(value).split(",")
    out = [text(item) for item in items if not isinstance(item, str) or item.strip()]
    if not out:
        raise ValueError("expected at least one value")
    return out
