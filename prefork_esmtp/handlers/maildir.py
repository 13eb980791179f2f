"""Store each message in a Maildir: the ``root`` handler option, else ``$PREFORK_ESMTP_MAILDIR``, else ``./maildir``.

The message is streamed to ``tmp/`` while it arrives and renamed into
``new/`` only at EOM, after fsync, so a 250 means the file is on disk and a
broken session leaves nothing behind (the Maildir delivery protocol); the
directory is fsynced after the rename too.
Headers are written as HEADER received them: unfolded.  Lines end in LF.
"""

from __future__ import annotations

import email.utils
import logging
import os
import socket
import time

from prefork_esmtp import ESMTPHandler, HandlerConfigError

log = logging.getLogger("prefork_esmtp.maildir")

_seq = 0
#: Maildir convention: a file in tmp/ this old is left over from a crash and may go.
STALE_TMP_SECONDS = 36 * 3600
_cleaned: set[str] = set()  # roots whose tmp/ this process has swept


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
    """The Maildir directory, absolute: ``root`` (the handler option), else the environment's, else ./maildir."""
    return os.path.abspath(root or os.environ.get("PREFORK_ESMTP_MAILDIR") or "maildir")


def with_protocol(handler: ESMTPHandler) -> str:
    """The ``with`` word of a Received line: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848),
    UTF8SMTP... (RFC 6531) from what the session used."""
    if not getattr(handler, "esmtp", False):
        return "SMTP"
    utf8 = "SMTPUTF8" in (getattr(handler, "mail_params", None) or {})
    word = "UTF8SMTP" if utf8 else "ESMTP"
    if getattr(handler, "tls", None) is not None:
        word += "S"
    if getattr(handler, "auth_user", None) is not None:
        word += "A"
    return word


class Maildir(ESMTPHandler):
    """Delivers every accepted message into one Maildir."""

    file = None
    tmp_path = ""
    #: The ``root`` handler option (set by configure on the class in use), or None for the default.
    root: str | None = None

    @classmethod
    def configure(cls, options: dict) -> None:
        """``root``: the Maildir directory (default ``$PREFORK_ESMTP_MAILDIR``, else ``./maildir``)."""
        root = options.pop("root", None)
        if root is not None and (not isinstance(root, str) or not root.strip()):
            raise HandlerConfigError(f"root: expected a directory name, got {root!r}")
        cls.root = maildir_path(root) if root is not None else None
        super().configure(options)

    def _discard(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass

    def DATA(self):
        global _seq
        self._discard()
        root = maildir_path(self.root)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        if root not in _cleaned:
            _cleaned.add(root)
            clean_stale_tmp(root)
        _seq += 1
        self.name = f"{time.time():.6f}.P{os.getpid()}Q{_seq}.{socket.gethostname()}"
        self.tmp_path = os.path.join(root, "tmp", self.name)
        self.file = open(self.tmp_path, "wb")
        self.cr = False
        peer = self.peer[0] if self.peer else "unknown"
        self.file.write(f"Return-Path: <{self.env_sender}>\n".encode("utf-8", "surrogateescape"))
        # RFC 5321 4.4: name the recipient only when there is exactly one, never leak the others.
        recipient = f"\n\tfor <{self.env_recipients[0]}>" if len(self.env_recipients) == 1 else ""
        self.file.write(
            f"Received: from {self.client} ([{peer}])\n\tby {self.hostname} (prefork-esmtp)"
            f" with {with_protocol(self)}{recipient};"
            f" {email.utils.formatdate(localtime=True)}\n".encode("utf-8", "surrogateescape"))
        return super().DATA()

    def HEADER(self, name: str, value: str) -> None:
        self.file.write(f"{name}: {value}\n".encode("utf-8", "surrogateescape"))

    def EOH(self) -> None:
        self.file.write(b"\n")

    def BODY(self, chunk: bytes) -> None:
        # CRLF -> LF, including a CRLF split across two chunks.
        if self.cr and chunk[:1] != b"\n":
            self.file.write(b"\r")
        self.cr = chunk.endswith(b"\r")
        if self.cr:
            chunk = chunk[:-1]
        self.file.write(chunk.replace(b"\r\n", b"\n"))

    def EOM(self):
        try:
            self._store()
        except BaseException:
            self._discard()  # no copy left in tmp/ per failed try (the engine answers 451)
            raise
        log.info("maildir: from=<%s> to=%s stored as new/%s", self.env_sender,
                 ",".join(f"<{r}>" for r in self.env_recipients), self.name)
        return 250, f"2.0.0 Stored as {self.name}"

    def _store(self) -> None:
        """Flush and fsync the file, rename it into new/, fsync the directory."""
        if self.cr:
            self.file.write(b"\r")
        self.file.flush()
        os.fsync(self.file.fileno())
        new_dir = os.path.join(maildir_path(self.root), "new")
        os.rename(self.tmp_path, os.path.join(new_dir, self.name))
        self.file.close()
        self.file = None
        fd = os.open(new_dir, os.O_RDONLY)  # the rename itself must be on disk before the 250
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def MAIL(self, env_sender: str):
        self._discard()
        return super().MAIL(env_sender)

    def DISCONNECT(self) -> None:
        self._discard()
