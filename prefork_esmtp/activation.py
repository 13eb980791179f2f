"""systemd socket activation (sd_listen_fds(3)): listeners inherited from fd 3 on, instead of bound.

systemd (or ``systemd-socket-activate``) opens the sockets, keeps its own copy,
and starts us with ``LISTEN_PID`` (our pid), ``LISTEN_FDS`` (how many) and
optionally ``LISTEN_FDNAMES`` (colon-separated names, ``FileDescriptorName=``).
A socket is an implicit-TLS listener when its name, split at ``-``, ``_`` and
``.``, has a part ``smtps``, ``submissions`` or ``tls`` (``smtps``,
``submissions``, ``smtp-tls``); every other name (``smtp``, ``submission``,
systemd's default ``prefork-esmtp.socket``) is a plain listener.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass, field

#: The first inherited descriptor (SD_LISTEN_FDS_START).
FIRST_FD = 3
#: Name parts that make an inherited socket an implicit-TLS listener.
TLS_NAME_PARTS = frozenset({"smtps", "submissions", "tls"})
ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(Exception):
    """The inherited descriptors are not what we can serve; one line for the operator."""


@dataclass
class Inherited:
    """The listeners systemd passed: plain and implicit-TLS, each with its name."""

    plain: list[socket.socket] = field(default_factory=list)
    tls: list[socket.socket] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # fd -> name from LISTEN_FDNAMES

    def origin(self, sock: socket.socket) -> str:
        """Where a listener came from, for the log: ``fd 3 'smtp', socket activation``."""
        name = self.names.get(sock.fileno())
        return f"fd {sock.fileno()}{f' {name!r}' if name else ''}, socket activation"


def is_tls_name(name: str) -> bool:
    """Whether a ``FileDescriptorName`` marks an implicit-TLS listener (see the module docstring)."""
    return any(part in TLS_NAME_PARTS for part in re.split(r"[-_.]", name.lower()))


def inherit(environ: MutableMapping[str, str] = os.environ, pid: int | None = None) -> Inherited | None:
    """The listeners passed to this process, or None when it was not socket-activated.

    The ``LISTEN_*`` variables are removed from ``environ`` either way (the
    workers and whatever a handler runs must not take them as theirs).
    """
    listen_pid, count_text, names_text = (environ.pop(name, None) for name in ENVIRONMENT)
    if listen_pid is None or count_text is None:
        return None
    if listen_pid.strip() != str(os.getpid() if pid is None else pid):
        return None  # meant for another process (a parent that did not clear them)
    try:
        count = int(count_text)
    except ValueError:
        raise ActivationError(f"LISTEN_FDS={count_text!r} is not a number") from None
    if count <= 0:
        return None
    names = names_text.split(":") if names_text else []
    if names and len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES has {len(names)} names for {count} descriptors")
    inherited = Inherited()
    for index in range(count):
        fd = FIRST_FD + index
        name = names[index] if names else ""
        sock = _listener(fd, name)
        inherited.names[fd] = name
        (inherited.tls if is_tls_name(name) else inherited.plain).append(sock)
    return inherited


def _listener(fd: int, name: str) -> socket.socket:
    """Wrap one inherited descriptor, checking it is a listening TCP socket."""
    what = f"fd {fd}{f' ({name})' if name else ''} from systemd"
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # ENOTSOCK (a file, a pipe) or EBADF (not open)
        raise ActivationError(f"{what} is not a socket") from None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ActivationError(f"{what} is not a TCP socket (use ListenStream=PORT or ADDRESS:PORT)")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ActivationError(f"{what} is not listening (Accept=no is needed)")
    os.set_inheritable(fd, False)  # like the sockets we bind: no leak into programs a handler runs
    sock.setblocking(False)
    return sock
