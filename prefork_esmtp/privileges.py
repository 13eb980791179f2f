"""Dropping root in workers: the master binds port 25, workers run as --user/--group."""

from __future__ import annotations

import grp
import os
import pwd


class PrivilegeError(Exception):
    """A user or group that cannot be used; one line for the operator."""


def resolve(user: str | None, group: str | None) -> tuple[int, int] | None:
    """(uid, gid) for the names given, or None when neither is set.  Checked before forking."""
    if not user and not group:
        return None
    try:
        pw = pwd.getpwnam(user) if user and not user.isdigit() else pwd.getpwuid(int(user)) if user else None
    except KeyError:
        raise PrivilegeError(f"no such user: {user}") from None
    try:
        if group:
            gid = grp.getgrnam(group).gr_gid if not group.isdigit() else int(group)
        else:
            gid = pw.pw_gid if pw else os.getgid()
    except KeyError:
        raise PrivilegeError(f"no such group: {group}") from None
    uid = pw.pw_uid if pw else os.getuid()
    if (uid != os.geteuid() or gid != os.getegid()) and os.geteuid() != 0:
        raise PrivilegeError("--user/--group need the server to be started as root")
    return uid, gid


def drop(ids: tuple[int, int] | None) -> None:
    """Become (uid, gid) for good: groups first, then gid, then uid."""
    if ids is None:
        return
    uid, gid = ids
    if os.geteuid() == 0:
        os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
