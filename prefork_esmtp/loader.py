"""Importing the handler class named by ``module:Class``, and handing it its options."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

from prefork_esmtp.handler import ESMTPHandler, HandlerConfigError


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
        if isinstance(exc, ModuleNotFoundError):
            reason += _unreadable_path_note()
        raise HandlerLoadError(f"cannot import handler module {module_name!r}: {reason}") from None
    try:
        cls = getattr(module, class_name)
    except AttributeError:
        raise HandlerLoadError(f"module {module_name!r} has no class {class_name!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, ESMTPHandler)):
        raise HandlerLoadError(f"{spec} is not a subclass of prefork_esmtp.ESMTPHandler")
    return cls


def configure_handler(cls: type[ESMTPHandler], options: Mapping[str, Any]) -> None:
    """Call ``cls.configure`` with a fresh copy of ``options``; a refusal becomes HandlerLoadError.

    The message is one line naming the handler, so start, configtest and
    reload all report it the way they report an import failure.
    """
    try:
        cls.configure(dict(options))
    except (HandlerConfigError, ValueError) as exc:
        reason = str(exc).strip() or type(exc).__name__
    except Exception as exc:  # a bug in configure: still one line, never a traceback for the operator
        reason = f"configure() failed: {type(exc).__name__}: {exc}".strip()
    else:
        return
    name = f"{cls.__module__}:{cls.__qualname__}"
    raise HandlerLoadError(f"handler {name}: {reason.splitlines()[0]}") from None


def _unreadable_path_note() -> str:
    """Name the import directories this process cannot enter (a worker after a privilege drop).

    Without it an operator sees only "No module named ..." for a handler that
    is plainly on disk, but in a directory the worker's user cannot read.
    """
    blocked = []
    for entry in sys.path:
        path = os.path.abspath(entry or ".")
        try:
            os.stat(path)
        except PermissionError:
            blocked.append(path)
            continue
        except OSError:
            continue
        if os.path.isdir(path) and not os.access(path, os.R_OK | os.X_OK):
            blocked.append(path)
    if not blocked:
        return ""
    return (f" (the worker runs as uid {os.geteuid()}, which cannot read "
            f"{', '.join(blocked[:3])}: make the handler's directory readable by that user)")
