"""systemd's notify protocol (Type=notify-reload): the real server reports to a socket the test listens on.

READY=1 once the first generation serves; RELOADING=1 with MONOTONIC_USEC at
a reload and READY=1 again when it is over (its failure in STATUS=);
STOPPING=1 at a stop; STATUS= with the workers busy and idle; WATCHDOG=1 at
half of WATCHDOG_USEC while the master's loop turns.
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from conftest import ROOT, TESTS, Client
from master_support import cli, pool_mode, wait_pool
from prefork_esmtp.sdnotify import Notifier, monotonic_usec, send
from systemd_support import NotifySocket


@pytest.fixture
def notify_socket():
    sock = NotifySocket()
    yield sock
    sock.close()


def now_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def help_line(client: Client) -> str:
    code, lines = client.cmd("HELP")
    assert code == 214, lines
    return lines[0]


def test_ready_reloading_status_and_stopping(start_server, client_for, tmp_path, notify_socket):
    srv = start_server(handler="systemd_handlers:EnvReport", mode=pool_mode(tmp_path, "--workers", "2"),
                       env={"NOTIFY_SOCKET": notify_socket.address})
    index, ready = notify_socket.wait("READY", "1")
    assert ready["STATUS"].startswith("generation 1: 2 workers, 0 busy, "), ready
    assert not any("RELOADING" in m or "STOPPING" in m for m in notify_socket.messages[:index])
    wait_pool(srv, 2)
    notify_socket.wait("STATUS", "generation 1: 2 workers, 0 busy, 2 idle")

    client = client_for(srv)  # one session: the STATUS line counts its worker as busy
    # the workers do not see the master's notify socket (nor any systemd variable)
    assert help_line(client).startswith("2.0.0 systemd environment: none;")
    mark = len(notify_socket.receive())
    notify_socket.wait("STATUS", "generation 1: 2 workers, 1 busy, 1 idle", after=mark)

    mark = len(notify_socket.receive())
    before = now_usec()
    result = cli("reload", "--pidfile", str(tmp_path / "p.pid"), timeout=60)
    after = now_usec()
    assert result.returncode == 0, result.stderr
    index, reloading = notify_socket.wait("RELOADING", "1", after=mark)
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    _, reloaded = notify_socket.wait("READY", "1", after=index + 1)
    # generation 2 serves; the worker of generation 1 still in a session is retiring
    assert reloaded["STATUS"].startswith("generation 2: 2 workers, "), reloaded
    assert "retiring" in reloaded["STATUS"], reloaded
    assert client.cmd("QUIT")[0] == 221

    mark = len(notify_socket.receive())
    result = cli("stop", "--pidfile", str(tmp_path / "p.pid"), timeout=60)
    assert result.returncode == 0, result.stderr
    _, stopping = notify_socket.wait("STOPPING", "1", after=mark)
    assert stopping["STATUS"] == "graceful stop"
    assert srv.proc.wait(10) == 0


def test_failed_reloads_end_with_ready_and_say_why(start_server, tmp_path, notify_socket):
    config = tmp_path / "server.toml"
    config.write_text(f'workers = 2\npidfile = "{tmp_path / "p.pid"}"\n')
    (tmp_path / "broken.py").write_text("from prefork_esmtp import ESMTPHandler\nHandler = ESMTPHandler\n")
    start_server(handler="", mode=("--config", str(config)),
                 env={"NOTIFY_SOCKET": notify_socket.address,
                      "PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS), str(ROOT)])})
    notify_socket.wait("READY", "1")

    # a config that does not parse: the reload fails at once, in the master
    config.write_text(f'workers = "many"\npidfile = "{tmp_path / "p.pid"}"\n')
    mark = len(notify_socket.receive())
    assert cli("reload", "--pidfile", str(tmp_path / "p.pid"), timeout=60).returncode == 1
    index, _ = notify_socket.wait("RELOADING", "1", after=mark)
    _, failed = notify_socket.wait("READY", "1", after=index + 1)
    assert failed["STATUS"].startswith("generation 1: 2 workers"), failed
    assert f"; last reload failed: {config}: workers: expected an integer, got 'many'" in failed["STATUS"], failed

    # a handler the new workers cannot import: the reload is aborted when they fail to boot
    config.write_text(f'workers = 2\nhandler = "broken:Handler"\npidfile = "{tmp_path / "p.pid"}"\n')
    (tmp_path / "broken.py").write_text("class Handler(:\n    pass\n")
    mark = len(notify_socket.receive())
    assert cli("reload", "--pidfile", str(tmp_path / "p.pid"), timeout=60).returncode == 1
    index, _ = notify_socket.wait("RELOADING", "1", after=mark)
    _, aborted = notify_socket.wait("READY", "1", after=index + 1)
    assert aborted["STATUS"].startswith("generation 1: "), aborted
    assert "last reload failed: " in aborted["STATUS"] and "SyntaxError" in aborted["STATUS"], aborted


def test_watchdog_pings_at_half_the_interval(start_server, tmp_path, notify_socket):
    interval = 1.0
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "1"),
                       env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": str(int(interval * 1e6))})
    first, _ = notify_socket.wait("WATCHDOG", "1")
    last, _ = notify_socket.wait("WATCHDOG", "1", after=first + 1)
    for _ in range(4):
        last, _ = notify_socket.wait("WATCHDOG", "1", after=last + 1)
    pings = [m["_at"] for m in notify_socket.messages if m.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    # every half interval: well within the interval systemd enforces, never a burst
    assert max(gaps) < interval, gaps
    assert min(gaps) > interval / 4, gaps
    srv.stop()


def test_no_watchdog_for_another_process(start_server, tmp_path, notify_socket):
    srv = start_server(mode=pool_mode(tmp_path, "--workers", "1"),
                       env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "200000",
                            "WATCHDOG_PID": "1"})
    index, _ = notify_socket.wait("READY", "1")
    # the master's loop keeps turning (STATUS follows the pool) while it sends no WATCHDOG=1
    # (five intervals of 0.2 s pass in that time)
    notify_socket.wait("STATUS", "generation 1: 1 worker, 0 busy, 1 idle")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        assert not any("WATCHDOG" in m for m in notify_socket.receive())
    assert srv.proc.poll() is None


# -- the notifier itself ----------------------------------------------------------------------

def test_notifier_sends_to_a_socket_path_and_reads_its_environment():
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")  # short: sun_path holds 107 octets
    path = os.path.join(directory, "notify")
    receiver = NotifySocket(path)
    try:
        environ = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()),
                   "OTHER": "kept"}
        notifier = Notifier.from_environ(environ)
        assert environ == {"OTHER": "kept"}  # taken out: no child process speaks for us
        assert notifier.watchdog_interval == 3.0
        notifier.ready("serving")
        notifier.status("serving")  # unchanged: not sent again
        notifier.status("busier")
        before = monotonic_usec()
        notifier.reloading()
        notifier.watchdog()
        notifier.watchdog()  # within half the interval: not sent again
        receiver.wait("WATCHDOG", "1")
        messages = [{k: v for k, v in m.items() if k != "_at"} for m in receiver.messages]
        assert messages[:3] == [{"READY": "1", "STATUS": "serving"}, {"STATUS": "busier"},
                                {"RELOADING": "1", "MONOTONIC_USEC": messages[2]["MONOTONIC_USEC"],
                                 "STATUS": "reloading"}]
        assert before <= int(messages[2]["MONOTONIC_USEC"]) <= monotonic_usec()
        assert messages[3:] == [{"WATCHDOG": "1"}]
        assert 0 < notifier.wait_limit(1.0) <= 1.5
    finally:
        receiver.close()
        os.rmdir(directory)


def test_notifier_without_a_socket_or_with_a_gone_one_does_nothing(caplog):
    assert Notifier.from_environ({}).address is None
    Notifier.from_environ({}).ready("x")  # no socket: nothing to do, nothing raised
    assert Notifier.from_environ({"NOTIFY_SOCKET": "relative/path"}).address is None
    other = Notifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"})
    assert other.address == "@x" and other.watchdog_interval == 0  # the watchdog is another process's
    gone = Notifier(f"@prefork-esmtp-test-nobody-{os.getpid()}")
    gone.ready("a")
    gone.status("b")
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1  # logged once, never raised
    with pytest.raises(OSError):
        send(gone.address, "READY=1")
