"""A test handler that records every hook call and misbehaves on request.

Records go to the JSON-lines file named by PREFORK_TEST_RECORD, one line per
hook call: {"pid", "sid" (session id), "hook", "args", "chunkmode"}; bytes
arguments are base64 in "b64", and the exact bytes (header_raw of HEADER,
header_section of EOH) base64 in "raw".  Magic addresses pick behaviours:

MAIL/RCPT local part  raise  -> the hook raises
                      reject -> 550 5.7.1
                      multi  -> a three-line 250 reply
                      disconnect -> 250 then the engine closes
                      bad    -> the hook returns a malformed reply
MAIL local part       eomraise / eomreject -> EOM raises / answers 554
                      linemode -> EOH turns chunk mode off
                      headerraise -> HEADER raises on the 2nd header
                      bodyraise -> BODY raises
                      bodydisconnect -> BODY sets disconnect
Environment           PREFORK_TEST_CONNECT=421|554 -> CONNECT answers that
                      PREFORK_TEST_CHUNKSIZE=n -> chunksize
                      PREFORK_TEST_TAG=x -> recorded as "tag" (reload tests)
                      PREFORK_TEST_EOM_DELAY=s -> EOM sleeps s seconds (load tests)
                      PREFORK_TEST_CONNECT_DELAY=s -> CONNECT sleeps s seconds first
Records of EHLO and EOM also carry "tls" (None, or version, cipher, bits and
the peer certificate's subject) and "auth_user"/"auth_mechanism"; STARTTLS is
recorded too.  Subclasses: AuthRecorder (AUTH accepts alice/s3cret; any other
user is refused, user "tempfail" gets a 454 reply, user "raise" raises; each
call recorded with mechanism, username, authzid, never the password) and
DSNRecorder (dsn = True, so the engine advertises DSN).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time

from prefork_esmtp import ESMTPHandler

_counter = itertools.count()
TAG = os.environ.get("PREFORK_TEST_TAG", "")
EOM_DELAY = float(os.environ.get("PREFORK_TEST_EOM_DELAY") or 0)


def _local(address: str | None) -> str:
    return (address or "").split("@", 1)[0].lower()


class Recorder(ESMTPHandler):
    if os.environ.get("PREFORK_TEST_CHUNKSIZE"):
        chunksize = int(os.environ["PREFORK_TEST_CHUNKSIZE"])

    def __init__(self) -> None:
        self.sid = f"{os.getpid()}-{next(_counter)}"
        self.nheaders = 0

    def _record(self, hook: str, *args: object, raw: bytes | None = None) -> None:
        entry: dict[str, object] = {"pid": os.getpid(), "sid": self.sid, "hook": hook,
                                    "chunkmode": bool(self.chunkmode), "tag": TAG}
        if raw is not None:  # header_raw of HEADER, header_section of EOH
            entry["raw"] = base64.b64encode(raw).decode()
        plain = []
        for arg in args:
            if isinstance(arg, bytes):
                entry["b64"] = base64.b64encode(arg).decode()
            else:
                plain.append(arg)
        entry["args"] = plain
        if hook == "EOM":
            entry["sender"] = self.env_sender
            entry["recipients"] = list(self.env_recipients)
            entry["mail_params"] = dict(self.mail_params)
            entry["recipients_params"] = [dict(p) for p in self.recipients_params]
        if hook in ("EHLO", "EOM"):
            entry["tls"] = _tls_facts(self.tls)
            entry["auth_user"] = self.auth_user
            entry["auth_mechanism"] = self.auth_mechanism
        line = (json.dumps(entry) + "\n").encode()
        path = os.environ.get("PREFORK_TEST_RECORD")
        if path:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def _magic(self, address: str, default):
        local = _local(address)
        if local == "raise":
            raise RuntimeError("handler raised on purpose")
        if local == "reject":
            return 550, "5.7.1 Rejected by the test handler"
        if local == "multi":
            return 250, "first line", "second line", "third line"
        if local == "disconnect":
            self.disconnect = True
        if local == "bad":
            return "not a reply"
        return default

    def CONNECT(self):
        self._record("CONNECT", list(self.peer or ()), list(self.local or ()))
        delay = os.environ.get("PREFORK_TEST_CONNECT_DELAY")
        if delay:
            time.sleep(float(delay))
        code = os.environ.get("PREFORK_TEST_CONNECT")
        if code:
            return int(code), "Go away"
        return super().CONNECT()

    def HELO(self, domain):
        self._record("HELO", domain)
        return super().HELO(domain)

    def EHLO(self, domain):
        self._record("EHLO", domain)
        return super().EHLO(domain)

    def MAIL(self, env_sender):
        self._record("MAIL", env_sender, dict(self.mail_params))
        self.nheaders = 0
        return self._magic(env_sender, super().MAIL(env_sender))

    def RCPT(self, env_recipient):
        self._record("RCPT", env_recipient, dict(self.rcpt_params))
        return self._magic(env_recipient, super().RCPT(env_recipient))

    def DATA(self):
        self._record("DATA")
        return super().DATA()

    def HEADER(self, name, value):
        self._record("HEADER", name, value, raw=self.header_raw)
        self.nheaders += 1
        if _local(self.env_sender) == "headerraise" and self.nheaders == 2:
            raise RuntimeError("HEADER raised on purpose")

    def EOH(self):
        self._record("EOH", raw=self.header_section)
        if _local(self.env_sender) == "linemode":
            self.chunkmode = False

    def BODY(self, chunk):
        self._record("BODY", chunk)
        local = _local(self.env_sender)
        if local == "bodyraise":
            raise RuntimeError("BODY raised on purpose")
        if local == "bodydisconnect":
            self.disconnect = True

    def EOM(self):
        self._record("EOM")
        if EOM_DELAY:
            time.sleep(EOM_DELAY)
        local = _local(self.env_sender)
        if local == "eomraise":
            raise RuntimeError("EOM raised on purpose")
        if local == "eomreject":
            return 554, "5.7.1 Message refused by the test handler"
        return super().EOM()

    def RSET(self):
        self._record("RSET")
        return super().RSET()

    def NOOP(self):
        self._record("NOOP")
        return super().NOOP()

    def QUIT(self):
        self._record("QUIT")
        return super().QUIT()

    def VRFY(self, address):
        self._record("VRFY", address)
        return self._magic(address, super().VRFY(address))

    def EXPN(self, address):
        self._record("EXPN", address)
        return super().EXPN(address)

    def HELP(self, command):
        self._record("HELP", command)
        return super().HELP(command)

    def UNKNOWN(self, line):
        self._record("UNKNOWN", line)
        return super().UNKNOWN(line)

    def STARTTLS(self):
        self._record("STARTTLS")
        return super().STARTTLS()

    def DISCONNECT(self):
        self._record("DISCONNECT")


def _tls_facts(tls):
    """The JSON-able part of ``self.tls``: version, cipher, bits, the peer certificate's subject."""
    if tls is None:
        return None
    peer = tls.get("peer_cert") or {}
    subject = {k: v for rdn in peer.get("subject", ()) for k, v in rdn}
    return {"version": tls.get("version"), "cipher": tls.get("cipher"), "bits": tls.get("bits"),
            "peer_subject": subject or None, "peer_cert_der": bool(tls.get("peer_cert_der"))}


class AuthRecorder(Recorder):
    """The recorder with an AUTH hook: alice/s3cret is the only good password."""

    def AUTH(self, mechanism, username, password, authzid):
        self._record("AUTH", mechanism, username, authzid)
        if username == "tempfail":
            return 454, "4.7.0 Try again later"
        if username == "raise":
            raise RuntimeError("AUTH raised on purpose")
        return username == "alice" and password == "s3cret"


class DSNRecorder(Recorder):
    """The recorder announcing DSN support (RFC 3461)."""

    dsn = True
