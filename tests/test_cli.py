"""The command line with real processes: status, reload, stop, start errors, configtest, --daemon.

Every error an operator can cause is one line on standard error and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import RECORDER, wait_for
from master_support import (cli, one_error_line, pool_mode, status_json, strays, title,  # noqa: F401
                            wait_gone, wait_pool, workers_of)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- status, reload, stop ------------------------------------------------------------------------

def test_status_shows_the_master_and_one_row_per_worker(start_server, client_for, tmp_path):
    pidfile = tmp_path / "p.pid"
    pidfile.write_text(f"{dead_pid()}\n")  # a stale pidfile is replaced
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "3"))
    pool = wait_pool(srv, 3)
    assert pidfile.read_text() == f"{srv.proc.pid}\n"
    client = client_for(srv)
    assert client.cmd("EHLO client.example")[0] == 250
    peer = f"127.0.0.1:{client.sock.getsockname()[1]}"

    status = status_json(pidfile)
    master = status["master"]
    assert master["pid"] == srv.proc.pid
    assert 0 <= master["uptime"] < 60
    assert master["generation"] == 1
    assert master["listeners"] == [f"127.0.0.1:{srv.port}"]
    workers = status["workers"]
    assert {w["pid"] for w in workers} == pool
    for w in workers:
        assert set(w) >= {"pid", "generation", "state", "peer", "sessions", "uss", "rss", "age"}
        assert w["generation"] == 1
        assert w["sessions"] == 0
        assert 0 < w["uss"] <= w["rss"] < 512 * 1024 * 1024
        assert 0 <= w["age"] < 60
    busy = [w for w in workers if w["state"] == "busy"]
    assert len(busy) == 1 and busy[0]["peer"] == peer
    assert sorted(w["state"] for w in workers) == ["busy", "idle", "idle"]
    assert all(w["peer"] == "" for w in workers if w["state"] == "idle")
    assert client.cmd("QUIT")[0] == 221
    assert client.closed()
    wait_for(lambda: {w["pid"]: w["sessions"] for w in status_json(pidfile)["workers"]}[busy[0]["pid"]] == 1,
             5, message="the worker's session count in status")

    result = cli("status", "--pidfile", str(pidfile))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"master pid {srv.proc.pid}, up \d+s, generation 1, listening on 127\.0\.0\.1:{srv.port}",
                        lines[0]), lines[0]
    assert lines[1].split() == ["PID", "GEN", "STATE", "SESSIONS", "USS", "RSS", "AGE", "PEER"]
    rows = {int(line.split()[0]): line.split() for line in lines[2:]}
    assert set(rows) == pool
    for row in rows.values():
        assert row[1] == "1" and row[2] == "idle"
        assert re.fullmatch(r"\d+\.\dM", row[4]) and re.fullmatch(r"\d+\.\dM", row[5])
    assert sorted(row[3] for row in rows.values()) == ["0", "0", "1"]


def test_reload_and_stop_commands(start_server, tmp_path):
    pidfile = tmp_path / "p.pid"
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "2"))
    old = wait_pool(srv, 2)
    result = cli("reload", "--pidfile", str(pidfile))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"reloaded: generation 2 serving (master pid {srv.proc.pid})"
    new = wait_pool(srv, 2)
    assert not new & old
    assert {w["generation"] for w in status_json(pidfile)["workers"]} == {2}
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        assert smtp.noop()[0] == 250

    result = cli("stop", "--pidfile", str(pidfile))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stopped (master pid {srv.proc.pid})"
    assert srv.proc.wait(10) == 0
    assert not pidfile.exists()
    assert not Path(f"{pidfile}.scoreboard").exists()
    wait_gone(new, 5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()


def test_stop_fast_and_config_file_find_the_master(start_server, client_for, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(f'workers = 3\ngraceful_timeout = 60\npidfile = "{tmp_path / "p.pid"}"\n')
    srv = start_server("--workers", "2", mode=("--config", str(config)))  # the command line wins
    pool = wait_pool(srv, 2)
    result = cli("status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["master"]["pid"] == srv.proc.pid
    client = client_for(srv)
    assert client.cmd("EHLO client.example")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.org>")[0] == 250  # a transaction in progress
    started = time.monotonic()
    result = cli("stop", "--fast", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert srv.proc.wait(10) == 0
    assert time.monotonic() - started < 5  # not the 60 s graceful timeout: sessions are cut
    assert client.closed(5)
    wait_gone(pool, 5)


@pytest.mark.parametrize("command", ["status", "stop", "reload"])
def test_commands_without_a_running_server(tmp_path, command):
    pidfile = tmp_path / "p.pid"
    assert "no server running" in one_error_line(cli(command, "--pidfile", str(pidfile)))
    pidfile.write_text(f"{dead_pid()}\n")
    line = one_error_line(cli(command, "--pidfile", str(pidfile)))
    assert "stale pidfile" in line, line


# -- start errors: one line, non-zero, no traceback ----------------------------------------------

def start(tmp_path: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return cli("start", "--listen", "127.0.0.1:0", "--hostname", "mx.test.example", *args,
               cwd=tmp_path, timeout=timeout)


HANDLER_ERRORS = [
    ("nosuchmodule:Handler", "", "cannot import handler module 'nosuchmodule'"),
    ("brokenhandler:Handler", "raise RuntimeError('boom at import')\n",
     "cannot import handler module 'brokenhandler': RuntimeError: boom at import"),
    ("brokenhandler:Handler", "x = 1\n", "module 'brokenhandler' has no class 'Handler'"),
    ("brokenhandler:Handler", "class Handler:\n    pass\n", "not a subclass of prefork_esmtp.ESMTPHandler"),
]


@pytest.mark.parametrize("preload", [(), ("--preload",)], ids=["import-in-workers", "preload"])
@pytest.mark.parametrize("spec, source, expected", HANDLER_ERRORS, ids=["missing", "raises", "no-class", "not-handler"])
def test_first_start_with_an_unusable_handler_fails_once_and_clearly(tmp_path, spec, source, expected, preload):
    if source:
        (tmp_path / "brokenhandler.py").write_text(source)
    started = time.monotonic()
    result = start(tmp_path, "--workers", "3", "--pidfile", str(tmp_path / "p.pid"), "--handler", spec, *preload)
    assert time.monotonic() - started < 15
    line = one_error_line(result)
    assert expected in line, line
    # each worker tried once at most: no respawn loop
    assert result.stderr.count("worker cannot boot") <= 3, result.stderr
    assert result.stderr.count("cannot start:") <= 1, result.stderr  # reported once, not per worker
    assert not (tmp_path / "p.pid").exists()
    if preload:  # imported before anything started: nothing but the error
        assert result.stderr.splitlines() == [line]


def test_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("start", "--listen", f"127.0.0.1:{port}", "--workers", "1", cwd=tmp_path)
    line = one_error_line(result)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "in use" in line, line
    assert result.stderr.splitlines() == [line]


def test_live_pidfile_is_refused(start_server, tmp_path):
    """A pidfile naming a running master refuses a second start (one naming anyone else: see
    test_pidfile_identity)."""
    pidfile = tmp_path / "p.pid"
    srv = start_server("--pidfile", str(pidfile), mode=("--workers", "1"))
    master = srv.proc.pid
    assert pidfile.read_text() == f"{master}\n"
    result = start(tmp_path, "--workers", "1", "--pidfile", str(pidfile))
    line = one_error_line(result)
    assert f"pidfile {pidfile} names a running process (pid {master})" in line, line
    assert result.stderr.splitlines() == [line]
    assert pidfile.read_text() == f"{master}\n"


BAD_OPTIONS = [
    (("--no-such-flag",), "No such option '--no-such-flag'"),
    (("--workers", "0"), "--workers: must be at least 1, got 0"),
    (("--workers", "many"), "--workers: expected an integer, got 'many'"),
    (("--graceful-timeout", "-1"), "--graceful-timeout: must be a number of seconds greater than 0"),
    (("--listen", "nowhere"), "--listen: expected HOST:PORT"),
    (("--user", "no-such-user-here"), "no such user: no-such-user-here"),
]


@pytest.mark.parametrize("args, expected", BAD_OPTIONS, ids=[a[0] for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line(tmp_path, args, expected):
    result = start(tmp_path, *args)
    line = one_error_line(result)
    assert expected in line, line
    assert result.stderr.splitlines() == [line]


BAD_FILES = [
    ("workers = \n", "config file {path}: Invalid value"),
    ('workers = "many"\n', "{path}: workers: expected an integer, got 'many'"),
    ("wrkers = 3\n", "{path}: unknown setting 'wrkers'"),
    ('accept_mode = "sometimes"\n', "{path}: accept_mode: expected one of exclusive, shared"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES, ids=["toml-syntax", "bad-value", "unknown-key", "bad-choice"])
def test_bad_config_file_is_one_line(tmp_path, text, expected):
    path = tmp_path / "server.toml"
    path.write_text(text)
    for command in (("start",), ("configtest",)):
        result = cli(*command, "--config", str(path), cwd=tmp_path)
        line = one_error_line(result)
        assert expected.format(path=path) in line, line
        assert result.stderr.splitlines() == [line]


def test_missing_config_file_is_one_line(tmp_path):
    line = one_error_line(cli("start", "--config", str(tmp_path / "nope.toml")))
    assert f"cannot read config file {tmp_path / 'nope.toml'}" in line, line


# -- configtest ----------------------------------------------------------------------------------

def test_configtest_ok(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text(f'handler = "{RECORDER}"\nworkers = 4\nlisten = ["127.0.0.1:2600", "[::1]:2600"]\n')
    result = cli("configtest", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("configuration OK: handler recorder:Recorder, "
                                     "listen 127.0.0.1:2600, [::1]:2600")


def test_configtest_fails_on_an_unimportable_handler(tmp_path):
    line = one_error_line(cli("configtest", "--handler", "nosuchmodule:Handler"))
    assert "cannot import handler module 'nosuchmodule'" in line, line


def test_configtest_checks_what_start_checks_tls_listen_needs_a_certificate(tmp_path):
    for command in ("configtest", "start"):
        line = one_error_line(cli(command, "--tls-listen", "127.0.0.1:0", "--handler", RECORDER))
        assert line == "prefork-esmtp: error: tls_listen needs tls_cert and tls_key", (command, line)


# -- --daemon ------------------------------------------------------------------------------------

def test_daemon_detaches_serves_and_stops(tmp_path, strays):
    pidfile, log_file = tmp_path / "d.pid", tmp_path / "d.log"
    try:
        result = start(tmp_path, "--daemon", "--workers", "2", "--pidfile", str(pidfile),
                       "--log-file", str(log_file), "--handler", RECORDER)
        assert result.returncode == 0, result.stderr
        pid = int(pidfile.read_text())
        strays.add_tree(pid)
        assert title(pid).startswith("prefork-esmtp: master")
        master = psutil.Process(pid)
        assert master.ppid() != os.getpid()  # detached: not our child
        assert os.getsid(pid) != os.getsid(0)  # a session of its own (double fork: not its leader)
        assert psutil.Process(pid).terminal() is None
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", log_file.read_text()).group(1))
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            assert smtp.noop()[0] == 250
        workers = set(workers_of(pid))
        strays.add(*workers)
        assert len(workers) == 2

        result = cli("stop", "--pidfile", str(pidfile))
        assert result.returncode == 0, result.stderr
        wait_gone({pid, *workers}, 5)
        assert not pidfile.exists()
    finally:
        if pidfile.exists():  # whatever happened above, the daemon does not outlive the test
            strays.add_tree(int(pidfile.read_text()))
        strays.kill()


def test_daemon_start_failure_is_reported_by_the_start_command(tmp_path):
    result = start(tmp_path, "--daemon", "--workers", "2", "--pidfile", str(tmp_path / "d.pid"),
                   "--handler", "nosuchmodule:Handler")
    line = one_error_line(result)
    assert "cannot import handler module 'nosuchmodule'" in line, line
    wait_for(lambda: not (tmp_path / "d.pid").exists(), 5, message="the failed daemon's pidfile to go")


def test_version():
    result = cli("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"prefork-esmtp, version \d+\.\d+\.\d+\S*", result.stdout.strip()), result.stdout
