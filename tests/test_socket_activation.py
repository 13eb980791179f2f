"""systemd socket activation: listeners inherited from fd 3 on, kept across reloads, never shut down.

With the real ``systemd-socket-activate`` (plain and implicit-TLS sockets by
name, notifications passed through), and with sockets the test itself holds
as systemd does, to see them outlive a stop and serve the next start.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import HOSTNAME, Client, require_tool, server_env, wait_for
from master_support import cli, one_error_line, strays, workers_of  # noqa: F401 (fixture)
from prefork_esmtp.activation import ActivationError, inherit, is_tls_name
from systemd_support import NotifySocket, listening_socket, start_activated
from tls_support import client_context, pki  # noqa: F401 (fixture)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def greeted(port: int, tls: ssl.SSLContext | None = None) -> Client:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname=HOSTNAME)
    client = Client(sock)
    code, lines = client.reply(timeout=15)
    assert code == 220, lines
    return client


def help_of(client: Client) -> str:
    code, lines = client.cmd("HELP")
    assert code == 214, lines
    return lines[0]


def socket_inodes(pid: int) -> dict[int, str]:
    """fd 3 and fd 4 of a process: ``socket:[inode]``, the same open socket as long as it is unchanged."""
    return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (3, 4)}


def listening_ports(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_systemd_socket_activate_plain_and_tls_across_a_reload(tmp_path, pki, strays):
    tool = require_tool("systemd-socket-activate")
    notify = NotifySocket()
    log_path, pid_path = tmp_path / "server.log", tmp_path / "p.pid"
    proc = None
    for attempt in range(3):  # the tool binds the ports itself: another test may take one first
        plain_port, tls_port = free_port(), free_port()
        with open(log_path, "wb") as output:
            proc = subprocess.Popen(
                [tool, "-l", f"127.0.0.1:{plain_port}", "-l", f"127.0.0.1:{tls_port}", "--fdname=smtp:smtps",
                 "-E", "PATH", "-E", "PYTHONPATH", "-E", f"NOTIFY_SOCKET={notify.address}",
                 sys.executable, "-m", "prefork_esmtp", "start", "--workers", "2", "--pidfile", str(pid_path),
                 "--hostname", HOSTNAME, "--handler", "systemd_handlers:EnvReport",
                 "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)],
                stdout=output, stderr=subprocess.STDOUT, env=server_env(), cwd=str(tmp_path))
        strays.add(proc.pid)
        wait_for(lambda: proc.poll() is not None or "as 4." in read_log(log_path), 10,
                 message="systemd-socket-activate to listen")
        if proc.poll() is None:
            break
    assert proc.poll() is None, read_log(log_path)
    try:
        # the first connection makes the tool exec the server, which inherits both sockets
        first = greeted(plain_port)
        wait_for(lambda: "ready: generation 1 serving" in read_log(log_path), 15, message="the first generation")
        log = read_log(log_path)
        assert f"listening on 127.0.0.1:{plain_port} (fd 3 'smtp', socket activation)" in log, log
        assert f"listening on 127.0.0.1:{tls_port} (implicit TLS, fd 4 'smtps', socket activation)" in log, log
        master = proc.pid  # the tool execs the server: LISTEN_PID is the master's own pid
        assert int(pid_path.read_text()) == master
        strays.add_tree(master)
        assert listening_ports(master) == {plain_port, tls_port}  # the default --listen was not bound
        notify.wait("READY", "1")
        assert help_of(first).startswith("2.0.0 systemd environment: none;")  # LISTEN_* and NOTIFY_* gone
        tls = greeted(tls_port, client_context(pki))
        assert tls.cmd("EHLO client.example")[0] == 250
        assert tls.cmd("QUIT")[0] == 221
        sockets_before = socket_inodes(master)

        mark = len(notify.receive())
        result = cli("reload", "--pidfile", str(pid_path), timeout=60)
        assert result.returncode == 0, result.stderr
        index, _ = notify.wait("RELOADING", "1", after=mark)
        notify.wait("READY", "1", after=index + 1)
        assert socket_inodes(master) == sockets_before  # the same sockets: never closed or reopened
        assert listening_ports(master) == {plain_port, tls_port}
        assert "keeping" not in read_log(log_path)  # no complaint about listen addresses: they are systemd's
        # the session from before the reload goes on; new ones on both sockets meet generation 2
        assert first.cmd("NOOP")[0] == 250
        after = greeted(plain_port)
        worker = int(help_of(after).rsplit("pid ", 1)[1])
        assert "[gen 2]" in workers_of(master)[worker]
        tls = greeted(tls_port, client_context(pki))
        assert tls.cmd("EHLO client.example")[0] == 250
        for client in (first, after, tls):
            assert client.cmd("QUIT")[0] == 221

        mark = len(notify.receive())
        result = cli("stop", "--pidfile", str(pid_path), timeout=60)
        assert result.returncode == 0, result.stderr
        notify.wait("STOPPING", "1", after=mark)
        assert proc.wait(10) == 0
        assert " ERROR " not in read_log(log_path)
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_inherited_listeners_outlive_a_stop_and_serve_the_next_start(tmp_path, strays):
    held = listening_socket()  # the test holds the socket as systemd does between starts
    port = held.getsockname()[1]
    try:
        args = ("--workers", "1", "--pidfile", str(tmp_path / "p.pid"), "--handler", "systemd_handlers:EnvReport")
        first = start_activated(tmp_path, [held], "smtp", *args, log_name="first.log")
        strays.add(first.pid)
        wait_for(lambda: "ready: generation 1" in read_log(tmp_path / "first.log"), 15, message="the server")
        client = greeted(port)
        assert help_of(client).startswith("2.0.0 systemd environment: none;")
        assert client.cmd("QUIT")[0] == 221
        result = cli("stop", "--pidfile", str(tmp_path / "p.pid"), timeout=60)
        assert result.returncode == 0, result.stderr
        assert first.wait(10) == 0

        # still listening (never shut down): a client now waits in the backlog, not refused ...
        assert held.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        waiting = socket.create_connection(("127.0.0.1", port), timeout=15)
        # ... and the next start, given the same socket, greets it
        second = start_activated(tmp_path, [held], "smtp", *args, log_name="second.log")
        strays.add(second.pid)
        client = Client(waiting)
        assert client.reply(timeout=15)[0] == 220
        assert client.cmd("QUIT")[0] == 221
        result = cli("stop", "--fast", "--pidfile", str(tmp_path / "p.pid"), timeout=60)
        assert result.returncode == 0, result.stderr
        assert second.wait(10) == 0
    finally:
        held.close()


def test_variables_meant_for_another_process_are_ignored_and_removed(start_server, client_for):
    srv = start_server(handler="systemd_handlers:EnvReport",
                       env={"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"})
    assert srv.port  # bound its own --listen instead
    assert help_of(client_for(srv)).startswith("2.0.0 systemd environment: none;")


@pytest.mark.parametrize("kind, names, error", [
    ("udp", "smtp", "fd 3 (smtp) from systemd is not a TCP socket (use ListenStream=PORT or ADDRESS:PORT)"),
    ("bound", "", "fd 3 from systemd is not listening (Accept=no is needed)"),
    ("file", "smtp", "fd 3 (smtp) from systemd is not a socket"),
    ("tcp", "smtps", "systemd passed an implicit-TLS socket (fd 3 'smtps', socket activation) "
                     "but tls_cert and tls_key are not set"),
    ("tcp", "smtp:smtps", "LISTEN_FDNAMES has 2 names for 1 descriptors"),
])
def test_descriptors_we_cannot_serve_give_one_line(tmp_path, kind, names, error):
    if kind == "file":
        thing = open(tmp_path / "plain-file", "w")
    elif kind == "bound":
        thing = socket.socket()
        thing.bind(("127.0.0.1", 0))
    else:
        thing = listening_socket(socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    try:
        proc = start_activated(tmp_path, [thing], names, "--workers", "1")
        assert proc.wait(30) == 1
    finally:
        thing.close()
    output = read_log(tmp_path / "server.log")
    result = subprocess.CompletedProcess([], 1, "", output)
    assert one_error_line(result) == f"prefork-esmtp: error: {error}"


@pytest.mark.parametrize("name, tls", [
    ("smtps", True), ("submissions", True), ("tls", True), ("smtp-tls", True), ("SMTPS", True),
    ("mx_tls.465", True), ("smtp", False), ("submission", False), ("starttls", False), ("lmtp", False),
    ("prefork-esmtp.socket", False), ("", False), ("smtpsx", False),
])
def test_names_that_mean_implicit_tls(name, tls):
    assert is_tls_name(name) is tls


def test_inherit_reads_and_removes_the_variables():
    environ = {"LISTEN_PID": "4242", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "smtps", "OTHER": "kept"}
    assert inherit(environ, pid=4243) is None  # not ours: ignored
    assert environ == {"OTHER": "kept"}  # but removed all the same
    assert inherit({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, pid=7) is None
    assert inherit({"OTHER": "kept"}, pid=7) is None
    with pytest.raises(ActivationError, match="LISTEN_FDS='x' is not a number"):
        inherit({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, pid=7)


def test_single_process_mode_serves_an_inherited_socket(tmp_path, strays):
    held = listening_socket()
    try:
        proc = start_activated(tmp_path, [held], "", "-X", "--handler", "systemd_handlers:EnvReport")
        strays.add(proc.pid)
        client = greeted(held.getsockname()[1])
        assert help_of(client) == f"2.0.0 systemd environment: none; pid {proc.pid}"
        assert client.cmd("QUIT")[0] == 221
        proc.terminate()
        proc.wait(10)
        assert "(fd 3, socket activation)" in read_log(tmp_path / "server.log")
    finally:
        held.close()
