"""A real HAProxy started by a test: its own config in the test's directory, loopback only, stopped by pid.

``running_haproxy(directory, frontends)`` writes a TCP-mode config with one
frontend per entry (a free port on 127.0.0.1) and a backend of one or more
servers behind each (round robin), with health checks that send the PROXY header too, starts ``haproxy``
in the foreground (never the system's service, never its config), waits
until every backend server is UP by HAProxy's own stats socket, and stops it
by its pid at the end.  A missing ``haproxy`` skips (fails in CI).
"""

from __future__ import annotations

import csv
import io
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from conftest import require_tool, wait_for
from mailservers import free_port


@dataclass
class Frontend:
    """One frontend and its backend: one server per port in ``server_ports`` (round robin),
    ``server_options`` on each server line."""

    name: str
    server_ports: list[int]
    server_options: str
    port: int = 0  # set when HAProxy runs


@dataclass
class HAProxy:
    proc: subprocess.Popen
    directory: Path
    frontends: dict[str, Frontend] = field(default_factory=dict)

    @property
    def stats_socket(self) -> Path:
        return self.directory / "stats.sock"

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` on the stats socket: one dict per proxy/server row."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            for _ in range(1000):  # bounded: the answer ends with the connection
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        text = data.decode().lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def server_status(self) -> dict[str, str]:
        """``backend/server`` -> HAProxy's status (UP, DOWN, ...) and last check result."""
        out = {}
        try:
            rows = self.stats()
        except OSError:
            return {}
        for row in rows:
            if row.get("svname") not in ("FRONTEND", "BACKEND", None):
                out[f"{row['pxname']}/{row['svname']}"] = f"{row['status']} {row.get('check_status', '')}".strip()
        return out

    def log(self) -> str:
        path = self.directory / "haproxy.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _config(directory: Path, frontends: list[Frontend]) -> str:
    lines = ["global",
             f"    stats socket {directory / 'stats.sock'} mode 600 level admin",
             "    log stderr format short local0 info",
             "defaults",
             "    mode tcp",
             "    log global",
             "    option tcplog",
             "    timeout connect 5s",
             "    timeout client 60s",
             "    timeout server 60s",
             "    timeout check 5s"]
    for fe in frontends:
        lines += [f"frontend fe_{fe.name}",
                  f"    bind 127.0.0.1:{fe.port}",
                  f"    default_backend {fe.name}",
                  f"backend {fe.name}",
                  "    balance roundrobin",
                  "    option smtpchk EHLO haproxy.test"]  # a real SMTP dialogue behind the header
        lines += [f"    server s{i} 127.0.0.1:{port} {fe.server_options} check inter 300ms"
                  for i, port in enumerate(fe.server_ports, 1)]
    return "\n".join(lines) + "\n"


@contextmanager
def running_haproxy(directory: Path, frontends: list[Frontend]) -> Iterator[HAProxy]:
    """HAProxy in front of the given servers, every backend server UP by a passed health check."""
    binary = require_tool("haproxy")
    directory.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):  # a free port may be taken between the look and the bind: once more
        for fe in frontends:
            fe.port = free_port()
        config = directory / "haproxy.cfg"
        config.write_text(_config(directory, frontends))
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"haproxy -c: {check.stdout}{check.stderr}"
        with open(directory / "haproxy.log", "wb") as output:
            # -db: stay in the foreground, so the pid we hold is HAProxy's; never the system's config
            proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=output, stderr=subprocess.STDOUT)
        haproxy = HAProxy(proc, directory, {fe.name: fe for fe in frontends})
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    return False
                status = haproxy.server_status()
                # UP after a passed check: HAProxy counts a server UP before its first check ran
                servers = sum(len(fe.server_ports) for fe in frontends)
                return len(status) == servers and all(s == "UP L7OK" for s in status.values())

            try:
                wait_for(lambda: up() or proc.poll() is not None, 20,
                         message="HAProxy's backend servers to be UP")
            except AssertionError:
                raise AssertionError(f"HAProxy servers not UP: {haproxy.server_status()}\n{haproxy.log()}") from None
            if proc.poll() is not None:
                if attempt == 0 and "cannot bind" in haproxy.log().lower():
                    continue
                raise AssertionError(f"haproxy exited with {proc.returncode}:\n{haproxy.log()}")
            yield haproxy
            return
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
