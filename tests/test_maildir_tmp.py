"""Maildir leaves nothing in tmp/: a failed store is unlinked, stale files are swept (36 hours)."""

from __future__ import annotations

import os
import time

import pytest

from prefork_esmtp.handlers import maildir as M
from prefork_esmtp.state import ConnectionState, Envelope, attach


def handler_for(root, monkeypatch) -> M.Maildir:
    monkeypatch.setenv("PREFORK_ESMTP_MAILDIR", str(root))
    h = M.Maildir()
    attach(h, ConnectionState(peer=("192.0.2.1", 25), client="client.example", hostname="mx.example", esmtp=True),
           Envelope(sender="a@example.org", recipients=["b@example.org"]))
    return h


def test_failed_rename_leaves_no_file_in_tmp(tmp_path, monkeypatch):
    h = handler_for(tmp_path, monkeypatch)
    assert h.DATA()[0] == 354
    h.HEADER("Subject", "x")
    h.EOH()
    h.BODY(b"hello\r\n")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", dst)

    monkeypatch.setattr(M.os, "rename", refuse)
    with pytest.raises(PermissionError):  # the engine turns this into 451 4.3.0
        h.EOM()
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "new") == []


def test_stale_tmp_files_are_removed_fresh_ones_kept(tmp_path, monkeypatch):
    (tmp_path / "tmp").mkdir()
    old, fresh = tmp_path / "tmp" / "old.P1Q1.host", tmp_path / "tmp" / "fresh.P1Q2.host"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    hours_ago = time.time() - 37 * 3600
    os.utime(old, (hours_ago, hours_ago))
    M._cleaned.discard(str(tmp_path))
    h = handler_for(tmp_path, monkeypatch)
    assert h.DATA()[0] == 354  # the first delivery of a process sweeps tmp/
    assert not old.exists() and fresh.exists()
    h.DISCONNECT()
    assert sorted(os.listdir(tmp_path / "tmp")) == ["fresh.P1Q2.host"]


@pytest.mark.parametrize("esmtp,tls,auth,utf8,word", [
    (False, None, None, False, "SMTP"), (True, None, None, False, "ESMTP"),
    (True, {"version": "TLSv1.3"}, None, False, "ESMTPS"), (True, None, "alice", False, "ESMTPA"),
    (True, {"version": "TLSv1.3"}, "alice", False, "ESMTPSA"), (True, {"version": "TLSv1.3"}, None, True, "UTF8SMTPS"),
])
def test_received_with_word_follows_rfc3848_and_rfc6531(esmtp, tls, auth, utf8, word):
    h = M.Maildir()
    attach(h, ConnectionState(esmtp=esmtp, tls=tls, auth_user=auth),
           Envelope(mail_params={"SMTPUTF8": True} if utf8 else {}))
    assert M.with_protocol(h) == word


@pytest.mark.parametrize("recipients", [["b@example.org"], ["b@example.org", "c@example.org"]])
def test_received_names_a_recipient_only_when_there_is_one(tmp_path, monkeypatch, recipients):
    h = handler_for(tmp_path, monkeypatch)
    attach(h, envelope=Envelope(sender="a@example.org", recipients=recipients))
    assert h.DATA()[0] == 354
    h.EOH()
    assert h.EOM()[0] == 250
    stored = (tmp_path / "new" / os.listdir(tmp_path / "new")[0]).read_text()
    received = stored.split("\n\n", 1)[0]
    assert "with ESMTP" in received
    if len(recipients) == 1:
        assert "for <b@example.org>" in received
    else:
        assert "example.org>" not in received.split("Received:", 1)[1], "no recipient leaks to the others"
