"""Importing the handler class named by ``module:Class``."""

from __future__ import annotations

import importlib
import sys

from prefork_esmtp.handler import ESMTPHandler


class HandlerLoadError(Exception):
    """The handler could not be loaded; the message is one line for the operator."""


def load_handler(spec: str, fresh: bool = False) -> type[ESMTPHandler]:
    """Import ``module:Class`` and check it is an ESMTPHandler subclass.

    ``fresh`` drops the module (and its package's cached submodules named in
    ``spec``) from ``sys.modules`` first, so a reload sees changed code.
    """
    module_name, sep, class_name = spec.partition(":")
    if not sep:
        module_name, _, class_name = spec.rpartition(".")
    if fresh:
        sys.modules.pop(module_name, None)
        importlib.invalidate_caches()
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: handlers next to the working directory
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error in the handler's module: import, syntax, runtime
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise HandlerLoadError(f"cannot import handler module {module_name!r}: {reason}") from None
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise HandlerLoadError(f"module {module_name!r} has no class {class_name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, ESMTPHandler)):
        raise HandlerLoadError(f"{spec} is not a subclass of prefork_esmtp.ESMTPHandler")
    return cls
