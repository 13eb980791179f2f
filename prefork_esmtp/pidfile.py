"""The master's pidfile: written atomically, never over a live master, removed at exit."""

from __future__ import annotations

import os

import psutil


class PidfileError(Exception):
    """The pidfile cannot be used; the message is one line for the operator."""


def read(path: str) -> int | None:
    """The pid in ``path``, or None if there is no readable pid there."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie we could reap)."""
    if pid <= 0:
        return False  # 0 and -1 name process groups, never one master
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # there, but we may not look: count it as alive
        return True


def is_master(pid: int) -> bool:
    """Whether ``pid`` is a prefork-esmtp master, by its process title or command line.

    A pidfile left by a crash may name a pid the kernel has since given to an
    unrelated process: that one must never be signalled, nor block a start.
    """
    try:
        words = psutil.Process(pid).cmdline()
    except psutil.AccessDenied:
        return True  # cannot tell: the careful answer for start (refuse) and stop (the kill fails anyway)
    except psutil.Error:
        return False
    line = " ".join(words)
    if line.startswith("prefork-esmtp: master"):
        return True
    return any(w.endswith(("prefork-esmtp", "prefork_esmtp")) for w in words) and "start" in words


def check(path: str) -> None:
    """Refuse a pidfile naming a live master; a stale one (gone, or someone else) will be replaced."""
    pid = read(path)
    if pid is not None and pid != os.getpid() and alive(pid) and is_master(pid):
        raise PidfileError(f"pidfile {path} names a running process (pid {pid}); is the server already running?")


def write(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically (temporary file, then rename)."""
    check(path)
    tmp = f"{path}.{pid}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{pid}\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PidfileError(f"cannot write pidfile {path}: {exc.strerror}") from None


def remove(path: str, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` (a successor may have replaced it)."""
    if read(path) == pid:
        try:
            os.unlink(path)
        except OSError:
            pass
