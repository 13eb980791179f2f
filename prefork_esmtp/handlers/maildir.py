"""Store each message in a Maildir, exactly as it was received.

The stored file is the message byte for byte (the header section as received,
folding and spacing kept, then the body, after dot-unstuffing), with CRLF
turned into LF as Maildir readers expect, under our own ``Return-Path`` and
``Received`` trace lines.  A DKIM signature of the sender still verifies on it.

Handler options (:meth:`Maildir.configure`): ``root``, the directory (default
``$PREFORK_ESMTP_MAILDIR``, else ``./maildir``); ``layout``, ``single`` (one
Maildir there) or ``per-recipient`` (one Maildir per accepted recipient at
``<root>/<domain>/<local>/``, one copy each; default
``$PREFORK_ESMTP_MAILDIR_LAYOUT``, else ``single``).

The message is streamed to ``tmp/`` while it arrives and renamed into
``new/`` only at EOM, after fsync, so a 250 means every copy is on disk
(the directories are fsynced after the renames too) and a broken session
or a failed store leaves nothing behind in ``tmp/`` (the Maildir delivery
protocol); a store that fails half-way takes back the copies it already
put into ``new/``, so the client's retry makes no duplicates.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time

from prefork_esmtp import ESMTPHandler, HandlerConfigError
from prefork_esmtp.handlers.trace import received_header, with_protocol

log = logging.getLogger("prefork_esmtp.maildir")

__all__ = ["Maildir", "clean_stale_tmp", "maildir_path", "maildir_settings", "mailbox_dir", "trace_lines",
           "with_protocol"]

_seq = 0
#: Maildir convention: a file in tmp/ this old is left over from a crash and may go.
STALE_TMP_SECONDS = 36 * 3600
_cleaned: set[str] = set()  # Maildirs whose tmp/ this process has swept

LAYOUTS = ("single", "per-recipient")
#: Octets kept in a mailbox directory name as they are; every other octet is written %XX.
_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_+=.")


def clean_stale_tmp(root: str, now: float | None = None) -> int:
    """Remove tmp/ files older than 36 hours (workers killed mid-message); return how many."""
    tmp = os.path.join(root, "tmp")
    limit = (time.time() if now is None else now) - STALE_TMP_SECONDS
    removed = 0
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < limit:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
    if removed:
        log.info("maildir: removed %d stale files from %s", removed, tmp)
    return removed


def maildir_path(root: str | None = None) -> str:
    """The Maildir root, absolute: ``root`` (the handler option), else ``$PREFORK_ESMTP_MAILDIR``, else ./maildir."""
    return os.path.abspath(root or os.environ.get("PREFORK_ESMTP_MAILDIR") or "maildir")


def maildir_settings(handler: ESMTPHandler) -> tuple[str, str]:
    """Where and how to store: (root directory, layout).  The one place that looks them up."""
    layout = getattr(handler, "layout", None) or os.environ.get("PREFORK_ESMTP_MAILDIR_LAYOUT") or "single"
    if layout not in LAYOUTS:
        raise ValueError(f"maildir layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    return maildir_path(getattr(handler, "root", None)), layout


def _component(text: str) -> str:
    """A safe directory name for a domain or local part: lower case, octets outside
    ``a-z 0-9 - _ + = .`` as %XX, no leading dot; never empty, '.', '..', or holding '/' or NUL."""
    out = "".join(chr(b) if b in _SAFE else f"%{b:02X}"
                  for b in text.lower().encode("utf-8", "surrogateescape"))
    if out.startswith("."):
        out = "%2E" + out[1:]
    if not out:
        raise ValueError("empty mailbox name")
    return out


def mailbox_dir(root: str, recipient: str, default_domain: str) -> str:
    """The per-recipient Maildir of ``recipient``: ``<root>/<domain>/<local>``, always inside ``root``.

    An address without a domain (``<postmaster>``) belongs to ``default_domain``.
    Case is folded (final delivery may: RFC 5321 2.4), so ``Bob@Example.org`` and
    ``bob@example.org`` share a mailbox.
    """
    local, at, domain = recipient.rpartition("@")
    if not at:
        local, domain = recipient, default_domain
    path = os.path.join(root, _component(domain), _component(local))
    if os.path.commonpath([root, path]) != root or os.path.dirname(os.path.dirname(path)) != root:
        raise ValueError(f"mailbox of {recipient!r} would leave the Maildir root")
    return path


def trace_lines(handler: ESMTPHandler) -> bytes:
    """Our ``Return-Path`` and ``Received`` lines (LF line ends), folded so no line passes 998 octets.

    The Received line names the recipient only when there is exactly one
    (RFC 5321 4.4: never leak one recipient to the others).
    """
    return_path = f"Return-Path: <{handler.env_sender}>\n".encode("utf-8", "surrogateescape")
    return return_path + received_header(handler, newline="\n")


class Maildir(ESMTPHandler):
    """Delivers every accepted message into a Maildir (or one per recipient), byte for byte."""

    #: The ``root`` option (None: $PREFORK_ESMTP_MAILDIR, else ./maildir) and the ``layout`` option:
    #: "single" (one Maildir at the root) or "per-recipient" (<root>/<domain>/<local>/);
    #: None: $PREFORK_ESMTP_MAILDIR_LAYOUT, else "single".
    root: str | None = None
    layout: str | None = None

    @classmethod
    def configure(cls, options: dict) -> None:
        """``root`` (a directory) and ``layout`` (single or per-recipient); the rest goes up the MRO."""
        root = options.pop("root", None)
        if root is not None and (not isinstance(root, str) or not root.strip()):
            raise HandlerConfigError(f"root: expected a directory name, got {root!r}")
        layout = options.pop("layout", None)
        if layout is not None and layout not in LAYOUTS:
            raise HandlerConfigError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
        cls.root = maildir_path(root) if root is not None else None
        cls.layout = layout
        super().configure(options)

    file = None  # the first copy, in tmp/, while the message arrives
    name = ""
    cr = False  # the last chunk written ended with CR: maybe half of a CRLF
    targets: tuple[str, ...] = ()  # the Maildirs of this message
    tmp_paths: tuple[str, ...] = ()  # copies in tmp/ (removed on failure)
    delivered: tuple[str, ...] = ()  # copies already renamed into new/ by a store under way

    def _discard(self) -> None:
        """Close and remove every copy of an unfinished message: in tmp/, and in new/ if the store failed half-way."""
        if self.file is not None:
            self.file.close()
            self.file = None
        for path in self.tmp_paths + self.delivered:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.tmp_paths = self.delivered = ()

    def DATA(self):
        global _seq
        self._discard()
        root, layout = maildir_settings(self)
        if layout == "single":
            targets = [root]
        else:
            targets = list(dict.fromkeys(mailbox_dir(root, r, self.hostname) for r in self.env_recipients))
        for target in targets:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(target, sub), exist_ok=True)
            if target not in _cleaned:
                _cleaned.add(target)
                clean_stale_tmp(target)
        _seq += 1
        self.targets = tuple(targets)
        self.name = f"{time.time():.6f}.P{os.getpid()}Q{_seq}.{socket.gethostname()}"
        first = os.path.join(targets[0], "tmp", self.name)
        self.file = open(first, "wb")
        self.tmp_paths = (first,)
        self.cr = False
        self.file.write(trace_lines(self))
        return super().DATA()

    def _write(self, data: bytes) -> None:
        """Write message bytes with CRLF turned into LF, a CRLF split across two writes included."""
        if self.cr and data[:1] != b"\n":
            self.file.write(b"\r")
        self.cr = data.endswith(b"\r")
        if self.cr:
            data = data[:-1]
        self.file.write(data.replace(b"\r\n", b"\n"))

    def EOH(self) -> None:
        # The header section as received, not rebuilt from HEADER's unfolded values.
        self._write(self.header_section)

    def BODY(self, chunk: bytes) -> None:
        self._write(chunk)

    def EOM(self):
        try:
            self._store()
        except BaseException:
            self._discard()  # no copy left in tmp/ or half-delivered (the engine answers 451)
            raise
        log.info("maildir: from=<%s> to=%s stored as %s in %d maildir(s)", self.env_sender,
                 ",".join(f"<{r}>" for r in self.env_recipients), self.name, len(self.targets))
        return 250, f"2.0.0 Stored as {self.name}"

    def _store(self) -> None:
        """fsync the first copy, make the others in tmp/, rename them all into new/, fsync new/."""
        if self.cr:
            self.file.write(b"\r")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        first = self.tmp_paths[0]
        for target in self.targets[1:]:
            path = os.path.join(target, "tmp", self.name)
            self.tmp_paths += (path,)
            _copy(first, path)
        for target, path in zip(self.targets, list(self.tmp_paths)):
            final = os.path.join(target, "new", self.name)
            os.rename(path, final)
            self.tmp_paths = tuple(p for p in self.tmp_paths if p != path)
            self.delivered += (final,)
        for target in self.targets:  # the renames themselves must be on disk before the 250
            fd = os.open(os.path.join(target, "new"), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.delivered = ()

    def MAIL(self, env_sender: str):
        self._discard()
        return super().MAIL(env_sender)

    def DISCONNECT(self) -> None:
        self._discard()


def _copy(source: str, path: str) -> None:
    """Another copy of a stored file: a hard link, or (across file systems) a copy fsynced."""
    try:
        os.link(source, path)
    except OSError:
        with open(source, "rb") as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
