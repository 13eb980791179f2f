"""The scoreboard file next to the pidfile never follows a planted symlink."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import server_env
from master_support import pool_mode, wait_pool


def test_planted_symlink_is_replaced_not_followed(start_server, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    board = tmp_path / "p.pid.scoreboard"
    board.symlink_to(victim)
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "1"))
    wait_pool(srv, 1)
    assert victim.read_text() == "precious\n", "the symlink's target was overwritten"
    assert not board.is_symlink() and board.is_file()
    status = subprocess.run([sys.executable, "-m", "prefork_esmtp", "status", "--json",
                             "--pidfile", str(tmp_path / "p.pid")],
                            capture_output=True, text=True, timeout=30, env=server_env())
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["master"]["pid"] == srv.proc.pid
