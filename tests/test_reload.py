"""Graceful reload (HUP / ``prefork-esmtp reload``) with real processes.

Listeners stay open and sessions in progress finish on the old generation:
no session fails and no message is lost or doubled under load; a changed
handler module or config is picked up; a broken one leaves the old
generation serving and ``reload`` says why in one line.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TESTS, require_tool, wait_for
from master_support import cli, one_error_line, pool_mode, status_json, wait_pool, workers_of


def eom_count(srv) -> int:
    """EOM records so far (cheap: counts bytes, no JSON parsing)."""
    try:
        return srv.record_path.read_bytes().count(b'"hook": "EOM"')
    except FileNotFoundError:
        return 0


def test_five_reloads_under_load_lose_no_session_and_no_message(start_server, tmp_path):
    smtp_source = require_tool("smtp-source")
    total = 1000
    # EOM sleeps 20 ms so that the load (8 sessions in parallel) lasts well over a second
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "8"), env={"PREFORK_TEST_EOM_DELAY": "0.02"})
    wait_pool(srv, 8)
    # -N numbers the recipients 1c@, 2c@, ...: every message is identifiable by its recipient;
    # smtp-source exits non-zero with a "fatal:" line on any refused, reset or failed session.
    load = subprocess.Popen([smtp_source, "-N", "-s", "8", "-m", str(total), "-l", "2048",
                             "-f", "a@b.example", "-t", "c@d.example", f"127.0.0.1:{srv.port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for reload in range(1, 6):
            wait_for(lambda: eom_count(srv) >= reload * total // 10, 30,
                     message=f"{reload * total // 10} messages before reload {reload}")
            assert load.poll() is None, "the load ended before the reloads: make it longer"
            os.kill(srv.proc.pid, signal.SIGHUP)
            wait_for(lambda: f"reloaded: generation {reload + 1} serving" in srv.log(), 15,
                     message=f"reload {reload} to complete")
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
    assert load.returncode == 0, err
    assert err == ""
    records = srv.records()
    delivered = sorted(int(re.fullmatch(r"(\d+)c@d\.example", r["recipients"][0]).group(1))
                       for r in records if r["hook"] == "EOM")
    assert delivered == list(range(1, total + 1))  # every message exactly once
    assert sum(1 for r in records if r["hook"] == "CONNECT") == total  # one session per message
    serving = {r["pid"] for r in records if r["hook"] == "EOM"}
    assert len(serving) > 8  # several generations served the load
    assert " ERROR " not in srv.log()
    wait_pool(srv, 8)
    assert all("[gen 6]" in t for t in workers_of(srv.proc.pid).values())


HANDLER = '''
from prefork_esmtp import ESMTPHandler


class Handler(ESMTPHandler):
    def NOOP(self):
        return 250, "2.0.0 {text}"
'''


def write_handler(directory: Path, text: str) -> None:
    (directory / "reloadable.py").write_text(HANDLER.format(text=text))


def handler_env(directory: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(directory), str(TESTS), str(ROOT)])}


def reload_command(tmp_path: Path) -> subprocess.CompletedProcess:
    return cli("reload", "--pidfile", str(tmp_path / "p.pid"), timeout=60)


PRELOAD = pytest.mark.parametrize("preload", [(), ("--preload",)], ids=["import-in-workers", "preload"])


@PRELOAD
def test_reload_picks_up_a_changed_handler_module(start_server, client_for, tmp_path, preload):
    write_handler(tmp_path, "version one")
    srv = start_server(*preload, handler="reloadable:Handler", mode=pool_mode(tmp_path, "--workers", "2"),
                       env=handler_env(tmp_path))
    wait_pool(srv, 2)
    before = client_for(srv)
    assert before.cmd("NOOP") == (250, ["2.0.0 version one"])

    write_handler(tmp_path, "version two, edited")
    result = reload_command(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reloaded: generation 2 serving (master pid {srv.proc.pid})"
    after = client_for(srv)
    assert after.cmd("NOOP") == (250, ["2.0.0 version two, edited"])
    # the session opened before the reload goes on, on the old generation, to its natural end
    assert before.cmd("NOOP") == (250, ["2.0.0 version one"])
    assert before.cmd("QUIT")[0] == 221
    assert before.closed()
    assert after.cmd("QUIT")[0] == 221
    wait_for(lambda: len(workers_of(srv.proc.pid)) == 2
             and all("[gen 2]" in t for t in workers_of(srv.proc.pid).values()), 10,
             message="only generation 2 workers left")


@PRELOAD
def test_reload_with_a_broken_handler_keeps_the_old_generation(start_server, client_for, tmp_path, preload):
    write_handler(tmp_path, "version one")
    srv = start_server(*preload, handler="reloadable:Handler", mode=pool_mode(tmp_path, "--workers", "2"),
                       env=handler_env(tmp_path))
    old_pool = wait_pool(srv, 2)
    (tmp_path / "reloadable.py").write_text("class Handler(:\n    pass\n")  # a syntax error

    line = one_error_line(reload_command(tmp_path))
    assert "reloadable" in line and "SyntaxError" in line, line
    assert "old generation keeps serving" in line
    client = client_for(srv)
    assert client.cmd("NOOP") == (250, ["2.0.0 version one"])
    assert client.cmd("QUIT")[0] == 221
    assert wait_pool(srv, 2) == old_pool
    status = status_json(tmp_path / "p.pid")
    assert status["master"]["generation"] == 1
    assert "SyntaxError" in status["master"]["last_reload_error"]
    assert {w["generation"] for w in status["workers"]} == {1}
    assert "reload failed" in srv.log()
    assert srv.log().count("worker cannot boot") <= 2  # no respawn loop of the broken generation

    write_handler(tmp_path, "version three, fixed")  # fixed: the next reload goes through
    result = reload_command(tmp_path)
    assert result.returncode == 0, result.stderr
    client = client_for(srv)
    assert client.cmd("NOOP") == (250, ["2.0.0 version three, fixed"])
    assert status_json(tmp_path / "p.pid")["master"]["last_reload_error"] is None


def test_reload_rereads_the_config_file_and_rejects_a_bad_one(start_server, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(f'workers = 2\npidfile = "{tmp_path / "p.pid"}"\n')
    srv = start_server(mode=("--config", str(config)))
    old_pool = wait_pool(srv, 2)

    config.write_text(f'workers = "many"\npidfile = "{tmp_path / "p.pid"}"\n')
    line = one_error_line(reload_command(tmp_path))  # the master re-reads the file and refuses it
    assert "reload failed, the old generation keeps serving" in line, line
    assert "workers: expected an integer, got 'many'" in line, line
    assert wait_pool(srv, 2) == old_pool

    config.write_text(f'workers = 3\npidfile = "{tmp_path / "p.pid"}"\n')
    result = cli("reload", "--config", str(config), timeout=60)
    assert result.returncode == 0, result.stderr
    new_pool = wait_pool(srv, 3)
    assert not new_pool & old_pool


def test_handler_broken_on_disk_after_start_pauses_respawns_instead_of_looping(start_server, tmp_path):
    """Without --preload a replacement worker imports the file as it is now: if that fails, back off."""
    write_handler(tmp_path, "version one")
    srv = start_server(handler="reloadable:Handler", mode=pool_mode(tmp_path, "--workers", "2"),
                       env=handler_env(tmp_path))
    pool = wait_pool(srv, 2)
    (tmp_path / "reloadable.py").write_text("class Handler(:\n    pass\n")  # broken, no reload
    os.kill(min(pool), signal.SIGKILL)
    wait_for(lambda: "could not boot" in srv.log(), 10, message="the replacement's boot failure")
    assert "no new workers for 2s" in srv.log()
    # A respawn loop forks and fails dozens of times a second.  Wait until the back-off has
    # let a second attempt happen (after 2 s), then count: the attempts are a handful.
    wait_for(lambda: "no new workers for 4s" in srv.log(), 10, message="the second, longer back-off")
    assert srv.log().count("worker cannot boot") <= 3, srv.log()
    assert srv.proc.poll() is None
    assert len(workers_of(srv.proc.pid)) == 1  # the surviving worker still serves
    # the operator fixes the file and reloads: back to a full pool at once
    write_handler(tmp_path, "version two")
    result = reload_command(tmp_path)
    assert result.returncode == 0, result.stderr
    wait_pool(srv, 2)


def test_reload_to_more_workers_than_the_master_has_room_for(start_server, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text("workers = 1\n")
    srv = start_server("--config", str(config), mode=pool_mode(tmp_path))
    wait_pool(srv, 1)
    config.write_text("workers = 50\n")  # the scoreboard was sized for 1 (room for 5)
    result = reload_command(tmp_path)
    assert result.returncode == 0, result.stderr
    wait_pool(srv, 5)
    assert "this master has room for 5" in srv.log()
    result = reload_command(tmp_path)  # and the next reload is not wedged
    assert result.returncode == 0, result.stderr
    assert status_json(tmp_path / "p.pid")["master"]["generation"] == 3
