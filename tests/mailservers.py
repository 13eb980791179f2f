"""Real mail software started by the tests: a private Postfix, Postfix's smtp-sink, a private Dovecot LMTP.

Each instance has its own configuration and data under the test's directory,
listens on 127.0.0.1 only, on a free port, and is stopped by its pid at the
end (then every process of the instance is checked gone).  Nothing touches the
system's mail service or /etc/postfix.  Context managers (``running_postfix``,
``running_smtp_sink``, ``running_dovecot``) work anywhere; the pytest fixtures
``postfix_instance``, ``smtp_sink`` and ``dovecot_lmtp`` are factories that
start them in ``tmp_path`` and stop them at teardown.

A program that is missing (or a non-root run, since Postfix's master and
Dovecot need root) skips the test, but fails it in CI
(PREFORK_ESMTP_REQUIRE_TOOLS=1); an instance that does not start fails the
test with one line saying why.

Delivery agents (Postfix's ``virtual``, Dovecot's ``lmtp``) switch to an
unprivileged uid, which cannot traverse pytest's 0700 temporary directories,
so each runs chrooted into a directory of its instance: Postfix's ``virtual``
in its queue directory, Dovecot's ``lmtp`` in its base_dir.  The Maildirs are
therefore ``<queue>/maildirs/<domain>/<user>/`` and ``<base_dir>/mail/<domain>/<user>/``.
"""

from __future__ import annotations

import ctypes
import grp
import json
import os
import pty
import pwd
import re
import secrets
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["MailServerError", "ToolUnavailable", "PostfixInstance", "SmtpSink", "SinkMessage", "DovecotLMTP",
           "running_postfix", "running_smtp_sink", "running_dovecot", "postfix_instance", "smtp_sink",
           "dovecot_lmtp", "split_trace", "crlf_to_lf", "free_port", "alive", "POSTFIX_UNKNOWN_USER",
           "DOVECOT_UNKNOWN_USER"]

POSTFIX_SBIN = Path("/usr/lib/postfix/sbin")
POSTFIX_MASTER = POSTFIX_SBIN / "master"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
SMTP_SINK = "/usr/sbin/smtp-sink"
DOVECOT = "/usr/sbin/dovecot"
DOVECOT_LMTP = Path("/usr/lib/dovecot/lmtp")
UNPRIVILEGED = "nobody"  # the uid/gid that Postfix's virtual and Dovecot's lmtp write Maildirs as

# What the servers answer to RCPT for a user they do not have (checked by tests/test_mailservers.py).
POSTFIX_UNKNOWN_USER = "User unknown in virtual mailbox table"  # 550 5.1.1 <addr>: Recipient address rejected: ...
DOVECOT_UNKNOWN_USER = "User doesn't exist"  # 550 5.1.1 <addr> User doesn't exist: addr

_POSTFIX_EXES = ("/usr/lib/postfix/", "/usr/sbin/post")
_DOVECOT_EXES = ("/usr/lib/dovecot/", "/usr/sbin/dovecot", "/usr/bin/dove")


class MailServerError(Exception):
    """An instance could not start or stop; the message is one line saying why."""


class ToolUnavailable(MailServerError):
    """A program (or the root it needs) is missing here: a skip locally, a failure in CI."""


# ---------------------------------------------------------------- processes and ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the caller retries once if it is taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM if the test process dies, so no instance outlives a killed run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[3])


def alive(pid: int) -> bool:
    """True while process ``pid`` exists and is not a zombie."""
    info = _stat(pid)
    return info is not None and info[0] not in ("Z", "X")


def session_members(sid: int, exe_prefixes: Sequence[str]) -> list[int]:
    """Live (non-zombie) processes of session ``sid`` whose executable starts with one of ``exe_prefixes``.

    Every instance is started in a session of its own, so its session id names
    all its processes; the executable check keeps a recycled id from naming a
    stranger.
    """
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = _stat(int(entry))
        if info is None or info[1] != sid or info[0] in ("Z", "X"):
            continue
        try:
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if exe.startswith(tuple(exe_prefixes)):
            out.append(int(entry))
    return out


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return inodes
    want = f"0100007F:{port:04X}"
    for line in lines:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":  # 0A: LISTEN
            inodes.add(fields[9])
    return inodes


def owns_listener(pid: int, port: int) -> bool:
    """True when process ``pid`` holds the socket listening on 127.0.0.1:``port`` (not some other program)."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def _deadline_loop(condition: Callable[[], object], timeout: float, interval: float = 0.02) -> object:
    """Poll ``condition`` until true (returned) or ``timeout`` passes (returns the last false value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _last_line(*texts: str) -> str:
    for text in texts:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if lines:
            return lines[-1][:300]
    return "no output"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _run_in_pty(cmd: list[str], cwd: Path, timeout: float) -> str:
    """Run ``cmd`` with a terminal as stdout/stderr (some Postfix programs print only to a terminal)."""
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary,
                                cwd=str(cwd), start_new_session=True)
    finally:
        os.close(secondary)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.1)
            if ready:
                try:
                    data = os.read(primary, 4096)
                except OSError:  # EIO: the program and its children closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(primary)
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    return out.decode(errors="replace")


def _need_file(path: str | Path, package: str) -> None:
    if not Path(path).exists():
        raise ToolUnavailable(f"{path} not installed (Debian package {package}; .ci/run installs it)")


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ToolUnavailable(f"{what} needs root to start (running as uid {os.geteuid()})")


class _Processes:
    """A started program in its own session: stop by its pid, then make sure the whole session is gone."""

    name = "process"
    exes: Sequence[str] = ()

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        """The pid of the program we started (the master, for Postfix and Dovecot)."""
        assert self.proc is not None, f"{self.name} not started"
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def processes(self) -> list[int]:
        """Every live process of this instance (its session), the master included."""
        if self.proc is None:
            return []
        return session_members(self.proc.pid, self.exes)

    def _signal(self, pids: Sequence[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the master, wait for every process of the instance to end; SIGKILL what remains."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self._reap(timeout)

    def crash(self) -> None:
        """SIGKILL the master and every process of the instance at once: the abrupt end of a server."""
        if self.proc is None:
            return
        killed = [self.proc.pid, *self.processes()]
        self._signal([self.proc.pid], signal.SIGKILL)
        self._signal(killed[1:], signal.SIGKILL)
        self._reap(5.0)
        # A dying process drops out of processes() (its executable link goes with its memory)
        # a moment before it is gone: wait for every process killed to be dead, not only unlisted.
        if not _deadline_loop(lambda: not any(alive(pid) for pid in killed), 5.0):
            raise MailServerError(f"{self.name} processes still alive after SIGKILL: "
                                  f"{[pid for pid in killed if alive(pid)]}")

    def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if not _deadline_loop(lambda: not self.processes(), timeout):
            self._signal(self.processes(), signal.SIGKILL)
            left = _deadline_loop(lambda: not self.processes(), 5.0)
            if not left:
                raise MailServerError(f"{self.name} processes still alive after SIGKILL: {self.processes()}")

    def _spawn(self, cmd: list[str], output: Path, cwd: Path | None = None) -> None:
        with open(output, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=str(cwd) if cwd else None, start_new_session=True,
                                         preexec_fn=_die_with_parent)

    def _wait_listening(self, port: int, timeout: float, why: Callable[[], str]) -> bool:
        """Wait until our process listens on ``port``; False if it exited first (e.g. the port was taken)."""
        proc = self.proc
        assert proc is not None
        listening = _deadline_loop(lambda: proc.poll() is not None or owns_listener(proc.pid, port), timeout)
        if proc.poll() is not None:
            return False
        if not listening:
            self.stop()
            raise MailServerError(f"{self.name} did not listen on 127.0.0.1:{port} within {timeout:g}s: {why()}")
        return True


def _start_with_retry(instance: _Processes, start: Callable[[], bool], why: Callable[[], str]) -> None:
    """Start on a fresh free port; once more if another program took that port meanwhile; else a one-line error."""
    for _ in range(2):
        if start():
            return
        code = instance.proc.returncode if instance.proc is not None else "?"
        instance.stop()  # whatever the failed start left behind
        if not _listening_inodes(instance.port):
            break  # not a lost race for the port: another try would fail the same way
    raise MailServerError(f"{instance.name} exited with status {code} at start: {why()}")


# ---------------------------------------------------------------- message files


def crlf_to_lf(data: bytes) -> bytes:
    """The message as a Maildir on Unix stores it: CRLF line ends become LF."""
    return data.replace(b"\r\n", b"\n")


_TRACE_NAMES = (b"return-path", b"x-original-to", b"delivered-to")


def split_trace(data: bytes, received: int = 1) -> tuple[list[bytes], bytes]:
    """Split off the header fields a delivering server prepends: ([fields], rest of the message).

    Leading Return-Path, X-Original-To and Delivered-To fields, then ``received``
    Received fields (with their folded lines), are what Postfix's virtual agent
    or Dovecot's LMTP add; ``rest`` is then the message as the client sent it
    (in the store's line ends).
    """
    lines = data.splitlines(keepends=True)
    fields: list[bytes] = []
    i = 0
    left = received
    while i < len(lines):
        name = lines[i].split(b":", 1)[0].strip().lower()
        if name in _TRACE_NAMES or (name == b"received" and left > 0):
            if name == b"received":
                left -= 1
            field = lines[i]
            i += 1
            while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
                field += lines[i]
                i += 1
            fields.append(field)
            continue
        break
    return fields, b"".join(lines[i:])


def _maildir_files(maildir: Path) -> list[Path]:
    files = [p for sub in ("new", "cur") if (maildir / sub).is_dir() for p in (maildir / sub).iterdir()
             if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _wait_maildir(maildir: Path, count: int, timeout: float, what: str) -> list[bytes]:
    found = _deadline_loop(lambda: len(_maildir_files(maildir)) >= count, timeout, 0.05)
    files = _maildir_files(maildir)
    if not found:
        raise AssertionError(f"timed out after {timeout}s waiting for {count} message(s) in {what}; "
                             f"found {len(files)}")
    return [p.read_bytes() for p in files]


# ---------------------------------------------------------------- Postfix


class PostfixInstance(_Processes):
    """A private Postfix: its master (``pid``), smtpd on ``host``:``port``, Maildirs, log and queue.

    Mail for ``users`` at ``domain`` is accepted and delivered by the ``virtual``
    agent to ``maildir(user)``; other recipients at ``domain`` get
    ``550 5.1.1 ... User unknown in virtual mailbox table`` at RCPT, and other
    domains ``554 5.7.1 ... Relay access denied``, loopback clients included.
    Nothing leaves the instance: its own bounces to other domains fail at once
    through the ``error`` transport.  With ``lmtp`` set, every recipient at
    ``domain`` is accepted and handed to that LMTP server instead.
    """

    name = "Postfix"
    exes = _POSTFIX_EXES
    host = "127.0.0.1"

    def __init__(self, directory: Path, users: Sequence[str], domain: str, lmtp: str | None,
                 settings: dict[str, str], start_timeout: float) -> None:
        super().__init__()
        self.directory = directory
        self.config_dir = directory / "conf"
        self.queue_dir = directory / "queue"
        self.maildir_root = self.queue_dir / "maildirs"  # "/maildirs" inside virtual's chroot
        self.log_path = directory / "maillog"
        self.output_path = directory / "master.out"
        self.users = tuple(users)
        self.domain = domain
        self.lmtp = lmtp
        self.settings = dict(settings)
        self.start_timeout = start_timeout
        self.port = 0
        self.banner_token = secrets.token_hex(4)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def address_of(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def maildir(self, user: str) -> Path:
        """The Maildir of ``user`` (a local part of ``domain``)."""
        return self.maildir_root / self.domain / user

    def messages(self, user: str) -> list[bytes]:
        """The messages delivered to ``user`` so far (oldest first), as stored (LF line ends)."""
        return [p.read_bytes() for p in _maildir_files(self.maildir(user))]

    def wait_messages(self, user: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Wait until ``user`` has at least ``count`` messages; all of them, oldest first."""
        return _wait_maildir(self.maildir(user), count, timeout, f"Postfix Maildir of {user}@{self.domain}")

    def log(self) -> str:
        """Postfix's log so far (maillog_file, written by its postlogd)."""
        return _read(self.log_path)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Wait until a log line matches the regular expression ``pattern``; the match."""
        regex = re.compile(pattern, re.M)
        found = _deadline_loop(lambda: regex.search(self.log()), timeout, 0.05)
        if not found:
            raise AssertionError(f"timed out after {timeout}s waiting for /{pattern}/ in Postfix's log:\n"
                                 + "\n".join(self.log().splitlines()[-20:]))
        return found  # type: ignore[return-value]

    def queue(self) -> list[dict]:
        """The queue as ``postqueue -j`` reports it: one dict per message (queue_name, recipients...)."""
        out = subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-j"], capture_output=True, timeout=10)
        if out.returncode != 0:
            raise MailServerError(f"postqueue -j failed: {_last_line(out.stderr.decode(errors='replace'))}")
        return [json.loads(line) for line in out.stdout.decode().splitlines() if line.strip()]

    def flush(self) -> None:
        """Retry deferred mail now (``postqueue -f``)."""
        subprocess.run([POSTQUEUE, "-c", str(self.config_dir), "-f"], capture_output=True, timeout=10,
                       check=True)

    def smtpd_pids(self) -> list[int]:
        return [pid for pid in self.processes() if _read(Path(f"/proc/{pid}/comm")).strip() == "smtpd"]

    def kill_smtpd(self) -> list[int]:
        """SIGKILL the smtpd processes (clients see their connections drop mid-session); their pids."""
        pids = self.smtpd_pids()
        self._signal(pids, signal.SIGKILL)
        return pids

    # -- configuration and start

    def _main_cf(self) -> str:
        nobody = pwd.getpwnam(UNPRIVILEGED)
        if self.lmtp:
            target = self.lmtp
            transport = f"lmtp:unix:{target[5:]}" if target.startswith("unix:") else f"lmtp:inet:{target}"
            mailboxes = "static:lmtp"  # every recipient at the domain: the LMTP server decides
        else:
            transport = "virtual"
            mailboxes = "inline:{ " + ", ".join(f"{u}@{self.domain}={self.domain}/{u}/" for u in self.users) + " }"
        refuse = "error:5.7.1 this test instance delivers nothing outside its domain"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            # Relative to the queue directory: the master opens it as mail_owner, who cannot
            # traverse the test's 0700 parents by an absolute path.
            "data_directory": "data",
            "command_directory": "/usr/sbin",
            "daemon_directory": str(POSTFIX_SBIN),
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.test.example",
            "mydomain": "test.example",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "reject_unauth_destination",  # no relaying, even from mynetworks
            "smtpd_authorized_xforward_hosts": "127.0.0.0/8",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            "smtpd_banner": f"$myhostname ESMTP Postfix (test instance {self.banner_token})",
            "smtpd_error_sleep_time": "0",
            "in_flow_delay": "0",
            "local_header_rewrite_clients": "",  # pass headers through as sent: add no From/Date/Message-ID
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": "/maildirs",  # inside virtual's chroot (the queue directory)
            "virtual_mailbox_maps": mailboxes,
            "virtual_transport": transport,
            "virtual_uid_maps": f"static:{nobody.pw_uid}",
            "virtual_gid_maps": f"static:{nobody.pw_gid}",
            "default_transport": refuse,
            "relay_transport": refuse,
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.directory),
        }
        settings.update(self.settings)
        return "".join(f"{k} = {v}\n" for k, v in settings.items())

    def _master_cf(self) -> str:
        services = [
            f"{self.host}:{self.port} inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "virtual unix - n y - - virtual",  # chrooted in the queue directory: see the module docstring
            "lmtp unix - - n - - lmtp",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "\n".join(services) + "\n"

    def _prepare(self) -> None:
        """Write the configuration and create the queue like ``postfix check`` would (owners, modes)."""
        postfix = pwd.getpwnam("postfix")
        postdrop = grp.getgrnam("postdrop").gr_gid
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.queue_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.queue_dir, 0o755)
        dirs = {name: (postfix.pw_uid, 0, 0o700) for name in
                ("active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private",
                 "saved", "trace", "data")}
        dirs.update({"maildrop": (postfix.pw_uid, postdrop, 0o1730), "public": (postfix.pw_uid, postdrop, 0o710),
                     "pid": (0, 0, 0o755)})
        nobody = pwd.getpwnam(UNPRIVILEGED)
        dirs["maildirs"] = (nobody.pw_uid, nobody.pw_gid, 0o700)
        for name, (uid, gid, mode) in dirs.items():
            path = self.queue_dir / name
            path.mkdir(exist_ok=True)
            os.chown(path, uid, gid)
            os.chmod(path, mode)

    def _write_config(self) -> None:
        past = time.time() - 10
        for name, text in (("main.cf", self._main_cf()), ("master.cf", self._master_cf())):
            (self.config_dir / name).write_text(text)
            # Postfix re-reads a file modified within the last second until it is older
            # (an editor may still be writing it): that costs 1-2 s per program start.
            os.utime(self.config_dir / name, (past, past))
        check = subprocess.run([POSTCONF, "-c", str(self.config_dir), "-n"], capture_output=True, timeout=10)
        warnings = [ln for ln in check.stderr.decode(errors="replace").splitlines() if ln.strip()]
        if check.returncode != 0 or warnings:
            raise MailServerError(f"postconf rejects the test configuration: {_last_line(*warnings)}")

    def _why(self) -> str:
        found = _last_line(self.log(), _read(self.output_path))
        if found != "no output":
            return found
        # Before its postlogd runs, the master has nowhere to log (no syslog here); "postfix
        # check" names most configuration errors, but prints them only to a terminal.
        check = _run_in_pty(["/usr/sbin/postfix", "-c", str(self.config_dir), "check"], self.queue_dir, 10.0)
        fatal = [ln for ln in check.splitlines() if "fatal:" in ln or "error:" in ln]
        return _last_line("\n".join(fatal)) if fatal else f"no diagnostic (127.0.0.1:{self.port} taken?)"

    def _start_once(self, port: int | None) -> bool:
        self.port = port or free_port()
        self._write_config()
        self._spawn([str(POSTFIX_MASTER), "-c", str(self.config_dir), "-d"], self.output_path, self.queue_dir)
        return self._wait_listening(self.port, self.start_timeout, self._why)

    def start(self) -> PostfixInstance:
        """Start (or restart after ``stop``/``crash``, on the same port) the master in the foreground."""
        if self.running():
            return self
        if self.port:  # a restart keeps the port: the client's configuration names it
            if not self._start_once(self.port):
                raise MailServerError(f"Postfix did not restart on port {self.port}: {self._why()}")
            return self
        _start_with_retry(self, lambda: self._start_once(None), self._why)
        return self


@contextmanager
def running_postfix(directory: Path, *, users: Sequence[str] = ("alice", "bob"),
                    domain: str = "mail.test.example", lmtp: str | None = None,
                    settings: dict[str, str] | None = None, start_timeout: float = 20.0
                    ) -> Iterator[PostfixInstance]:
    """A private Postfix in ``directory`` for the ``with`` block: see :class:`PostfixInstance`.

    ``lmtp`` ("127.0.0.1:PORT" or "unix:/path") delivers the domain through that
    LMTP server; ``settings`` adds or overrides main.cf parameters (e.g.
    ``{"message_size_limit": "0"}``).  Raises :class:`ToolUnavailable` or
    :class:`MailServerError` with one line when it cannot start.
    """
    _need_file(POSTFIX_MASTER, "postfix")
    _need_root("Postfix's master")
    for name in ("postfix", UNPRIVILEGED):
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise ToolUnavailable(f"user {name!r} missing (the postfix package creates 'postfix')") from None
    instance = PostfixInstance(directory, users, domain, lmtp, settings or {}, start_timeout)
    instance._prepare()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


# ---------------------------------------------------------------- smtp-sink


@dataclass
class SinkMessage:
    """One transaction smtp-sink dumped: its envelope as received and the message (LF line ends)."""

    path: Path
    client_addr: str
    proto: str
    helo: str | None
    mail_args: str
    rcpt_args: list[str]
    received: bytes  # smtp-sink's own three-line Received field
    data: bytes  # the message as received, dot-unstuffed, CRLF turned into LF


def parse_sink_dump(path: Path, raw: bytes) -> SinkMessage | None:
    """A dump file written with ``smtp-sink -d``; None while it is incomplete (no final empty line)."""
    if not raw.endswith(b"\n\n"):
        return None
    lines = raw.splitlines(keepends=True)
    meta: dict[str, list[str]] = {}
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        name, _, value = lines[i].decode(errors="replace").partition(":")
        meta.setdefault(name, []).append(value.strip())
        i += 1
    if i >= len(lines) or not lines[i].startswith(b"Received:"):
        return None
    received = lines[i]
    i += 1
    while i < len(lines) and lines[i][:1] == b"\t":
        received += lines[i]
        i += 1
    return SinkMessage(path=path, client_addr=meta.get("X-Client-Addr", [""])[0],
                       proto=meta.get("X-Client-Proto", [""])[0], helo=meta.get("X-Helo-Args", [None])[0],
                       mail_args=meta.get("X-Mail-Args", [""])[0], rcpt_args=meta.get("X-Rcpt-Args", []),
                       received=received, data=b"".join(lines[i:])[:-1])


class SmtpSink(_Processes):
    """Postfix's smtp-sink on ``host``:``port``; with a dump directory, every transaction as a file."""

    name = "smtp-sink"
    exes = ("/usr/sbin/smtp-sink",)
    host = "127.0.0.1"

    def __init__(self, directory: Path, dump: bool, lmtp: bool, args: Sequence[str], hostname: str,
                 start_timeout: float) -> None:
        super().__init__()
        self.directory = directory
        self.dump_dir = directory / "dump" if dump else None
        self.output_path = directory / "smtp-sink.out"
        self.lmtp = lmtp
        self.args = list(args)
        self.hostname = hostname
        self.start_timeout = start_timeout
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def messages(self) -> list[SinkMessage]:
        """The complete transactions dumped so far, oldest first."""
        if self.dump_dir is None:
            raise AssertionError("smtp-sink was started without dump=True")
        files = sorted((p for p in self.dump_dir.iterdir() if p.is_file()),
                       key=lambda p: (p.stat().st_mtime_ns, p.name))
        parsed = (parse_sink_dump(p, p.read_bytes()) for p in files)
        return [m for m in parsed if m is not None]

    def wait_messages(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least ``count`` transactions are dumped; all of them."""
        if not _deadline_loop(lambda: len(self.messages()) >= count, timeout, 0.05):
            raise AssertionError(f"timed out after {timeout}s waiting for {count} smtp-sink dump(s); "
                                 f"found {len(self.messages())}")
        return self.messages()

    def output(self) -> str:
        return _read(self.output_path)

    def _start_once(self) -> bool:
        self.port = free_port()
        cmd = [SMTP_SINK, "-4", "-h", self.hostname]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # required when run as root; the dump files stay readable by the test
        if self.lmtp:
            cmd.append("-L")
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["-d", f"{self.dump_dir}/%Y%m%d%H%M%S."]
        cmd += [*self.args, f"{self.host}:{self.port}", "64"]
        self._spawn(cmd, self.output_path)
        return self._wait_listening(self.port, self.start_timeout, lambda: _last_line(self.output()))

    def start(self) -> SmtpSink:
        self.directory.mkdir(parents=True, exist_ok=True)
        _start_with_retry(self, self._start_once, lambda: _last_line(self.output()))
        return self


@contextmanager
def running_smtp_sink(directory: Path, *, dump: bool = True, lmtp: bool = False, args: Sequence[str] = (),
                      hostname: str = "sink.test.example", start_timeout: float = 10.0) -> Iterator[SmtpSink]:
    """smtp-sink for the ``with`` block, dumping to ``directory/dump`` unless ``dump=False``.

    ``lmtp`` speaks LMTP (-L); ``args`` are more smtp-sink options, e.g.
    ``("-Q", "DATA")`` (421 and disconnect after DATA), ``("-f", "RCPT")``
    (refuse RCPT with 5xx), ``("-w", "5")`` (wait 5 s before answering DATA).
    """
    _need_file(SMTP_SINK, "postfix")
    sink = SmtpSink(directory, dump, lmtp, args, hostname, start_timeout)
    try:
        sink.start()
        yield sink
    finally:
        sink.stop()


# ---------------------------------------------------------------- Dovecot LMTP


class DovecotLMTP(_Processes):
    """A private Dovecot serving LMTP on ``host``:``port`` (and the Unix socket ``unix_path``).

    ``users`` at ``domain`` exist (passwd-file); any other recipient gets
    ``550 5.1.1 <addr> User doesn't exist: addr`` at RCPT.  Delivered messages
    land in ``maildir(user)``.
    """

    name = "Dovecot"
    exes = _DOVECOT_EXES
    host = "127.0.0.1"

    def __init__(self, directory: Path, users: Sequence[str], domain: str, start_timeout: float) -> None:
        super().__init__()
        self.directory = directory
        self.base_dir = directory / "run"  # also the lmtp processes' chroot
        self.config_path = directory / "dovecot.conf"
        self.log_path = directory / "dovecot.log"
        self.output_path = directory / "dovecot.out"
        self.users = tuple(users)
        self.domain = domain
        self.start_timeout = start_timeout
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def unix_path(self) -> Path:
        """Dovecot's LMTP Unix socket (mode 0666)."""
        return self.base_dir / "lmtp"

    def address_of(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def maildir(self, user: str) -> Path:
        return self.base_dir / "mail" / self.domain / user

    def messages(self, user: str) -> list[bytes]:
        """The messages delivered to ``user`` so far (oldest first), as stored (LF line ends)."""
        return [p.read_bytes() for p in _maildir_files(self.maildir(user))]

    def wait_messages(self, user: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        return _wait_maildir(self.maildir(user), count, timeout, f"Dovecot Maildir of {user}@{self.domain}")

    def log(self) -> str:
        return _read(self.log_path)

    def _config(self) -> str:
        nobody = pwd.getpwnam(UNPRIVILEGED)
        base = self.base_dir
        return f"""\
base_dir = {base}
state_dir = {self.directory / "state"}
instance_name = dovecot-test-{self.port}
protocols = lmtp
listen = 127.0.0.1
hostname = dovecot.test.example
ssl = no
log_path = {self.log_path}
info_log_path = {self.log_path}
# Internal processes (auth reads the passwd-file below) run as root: the test's
# directory is not reachable by another user.
default_internal_user = root
default_internal_group = root
default_login_user = root
first_valid_uid = 1
first_valid_gid = 1
# Dovecot delivers as an unprivileged uid (never root), which cannot traverse the
# test's 0700 parents: lmtp runs chrooted in base_dir, and mail paths are inside it.
mail_uid = {nobody.pw_uid}
mail_gid = {nobody.pw_gid}
valid_chroot_dirs = {base}
mail_chroot = {base}/.
mail_home = /mail/%d/%n
mail_location = maildir:/mail/%d/%n
passdb {{
  driver = passwd-file
  args = {self.directory / "users"}
}}
userdb {{
  driver = passwd-file
  args = {self.directory / "users"}
}}
service lmtp {{
  chroot = .
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
protocol lmtp {{
  # Inside the chroot, base_dir is "/".
  auth_socket_path = /auth-userdb
  stats_writer_socket_path = /stats-writer
}}
"""

    def _why(self) -> str:
        return _last_line(_read(self.output_path), self.log())

    def _start_once(self) -> bool:
        self.port = free_port()
        self.config_path.write_text(self._config())
        self._spawn([DOVECOT, "-c", str(self.config_path), "-F"], self.output_path)
        return self._wait_listening(self.port, self.start_timeout, self._why)

    def start(self) -> DovecotLMTP:
        nobody = pwd.getpwnam(UNPRIVILEGED)
        (self.directory / "users").write_text(
            "".join(f"{u}@{self.domain}:{{PLAIN}}test:::::\n" for u in self.users))
        self.base_dir.mkdir(parents=True, exist_ok=True)
        mail = self.base_dir / "mail"
        mail.mkdir(exist_ok=True)
        # lmtp returns to base_dir by its absolute path after each session: inside its chroot.
        (self.base_dir / str(self.base_dir).lstrip("/")).mkdir(parents=True, exist_ok=True)
        os.chown(mail, nobody.pw_uid, nobody.pw_gid)
        _start_with_retry(self, self._start_once, self._why)
        return self


@contextmanager
def running_dovecot(directory: Path, *, users: Sequence[str] = ("alice", "bob"), domain: str = "lmtp.test.example",
                    start_timeout: float = 20.0) -> Iterator[DovecotLMTP]:
    """A private Dovecot LMTP server in ``directory`` for the ``with`` block: see :class:`DovecotLMTP`."""
    _need_file(DOVECOT, "dovecot-core")
    _need_file(DOVECOT_LMTP, "dovecot-lmtpd")
    _need_root("Dovecot")
    directory.mkdir(parents=True, exist_ok=True)
    server = DovecotLMTP(directory, users, domain, start_timeout)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- pytest fixtures


def _enter(stack: list, manager, what: str):
    """Enter a context manager for a fixture: a skip/CI failure when unavailable, a failure if it cannot start."""
    try:
        value = manager.__enter__()
    except ToolUnavailable as exc:
        if os.environ.get("PREFORK_ESMTP_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{what}: {exc} (required in CI)", pytrace=False)
        pytest.skip(f"{what}: {exc}")
    except MailServerError as exc:
        pytest.fail(f"{what} could not start: {exc}", pytrace=False)
    stack.append(manager)
    return value


def _factory(tmp_path: Path, prefix: str, running, what: str) -> Iterator[Callable[..., object]]:
    stack: list = []
    count = 0

    def start(**options):
        nonlocal count
        count += 1
        return _enter(stack, running(tmp_path / f"{prefix}{count}", **options), what)

    try:
        yield start
    finally:
        errors = []
        for manager in reversed(stack):
            try:
                manager.__exit__(None, None, None)
            except MailServerError as exc:
                errors.append(str(exc))
        if errors:
            pytest.fail(f"{what} did not stop: {errors[0]}", pytrace=False)


@pytest.fixture
def postfix_instance(tmp_path: Path) -> Iterator[Callable[..., PostfixInstance]]:
    """Start private Postfix instances: ``pf = postfix_instance(users=..., lmtp=..., settings=...)``.

    Each in ``tmp_path/postfix<N>``; all are stopped at teardown.  See :func:`running_postfix`.
    """
    yield from _factory(tmp_path, "postfix", running_postfix, "Postfix")


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[Callable[..., SmtpSink]]:
    """Start smtp-sink servers: ``sink = smtp_sink(dump=True, lmtp=False, args=(...))``; stopped at teardown."""
    yield from _factory(tmp_path, "sink", running_smtp_sink, "smtp-sink")


@pytest.fixture
def dovecot_lmtp(tmp_path: Path) -> Iterator[Callable[..., DovecotLMTP]]:
    """Start private Dovecot LMTP servers: ``dv = dovecot_lmtp(users=..., domain=...)``; stopped at teardown."""
    yield from _factory(tmp_path, "dovecot", running_dovecot, "Dovecot")
