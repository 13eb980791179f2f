"""A pidfile naming an unrelated process (a reused pid after a crash): stop refuses, start replaces."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import server_env
from master_support import pool_mode, wait_pool


@pytest.fixture
def bystander():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait(10)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefork_esmtp", *args], capture_output=True,
                          text=True, timeout=60, env=server_env())


@pytest.mark.parametrize("command", ["stop", "reload", "status"])
def test_commands_refuse_a_pidfile_naming_someone_else(tmp_path, bystander, command):
    pid_path = tmp_path / "p.pid"
    pid_path.write_text(f"{bystander.pid}\n")
    result = cli(command, "--pidfile", str(pid_path))
    assert result.returncode != 0
    assert "not a prefork-esmtp master" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert bystander.poll() is None, "the unrelated process was signalled"


def test_start_replaces_a_pidfile_naming_someone_else(start_server, tmp_path, bystander):
    (tmp_path / "p.pid").write_text(f"{bystander.pid}\n")
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "1"))
    wait_pool(srv, 1)
    assert (tmp_path / "p.pid").read_text().strip() == str(srv.proc.pid)
    assert bystander.poll() is None
    result = cli("stop", "--pidfile", str(tmp_path / "p.pid"))
    assert result.returncode == 0 and "stopped" in result.stdout, result.stderr
    assert srv.proc.wait(30) == 0
