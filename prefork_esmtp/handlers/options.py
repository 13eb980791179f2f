"""Reading handler options (the ``[handler]`` table, ``--handler-option KEY=VALUE``) in ``configure``.

Values come as strings from the command line or as TOML values from the file;
each ``take_*`` pops one key, converts it, and raises HandlerConfigError with
one line naming the key when the value is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from prefork_esmtp.handler import HandlerConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def take(options: dict[str, Any], key: str, default: T, convert: Callable[[Any], T]) -> T:
    """Pop ``key`` and convert it; ``default`` when absent; a ValueError becomes one line naming the key."""
    if key not in options:
        return default
    value = options.pop(key)
    try:
        return convert(value)
    except (ValueError, TypeError) as exc:
        raise HandlerConfigError(f"{key}: {exc}") from None


def boolean(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def seconds(value: Any) -> float:
    """A number of seconds greater than zero."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not 0 < number < float("inf"):
        raise ValueError(f"expected a number of seconds greater than 0, got {value!r}")
    return number


def choice(*allowed: str) -> Callable[[Any], str]:
    """A converter to one of ``allowed`` (case-insensitive)."""

    def convert(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {value!r}")
        return text

    return convert


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
