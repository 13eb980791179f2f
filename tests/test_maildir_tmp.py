"""Maildir leaves nothing in tmp/: a failed store is unlinked, stale files are swept (36 hours)."""

from __future__ import annotations

import os
import time

import pytest

from prefork_esmtp.handlers import maildir as M


def handler_for(root, monkeypatch) -> M.Maildir:
    monkeypatch.setenv("PREFORK_ESMTP_MAILDIR", str(root))
    h = M.Maildir()
    h.peer, h.client, h.hostname, h.esmtp = ("192.0.2.1", 25), "client.example", "mx.example", True
    h.env_sender, h.env_recipients = "a@example.org", ["b@example.org"]
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
