"""The shipped systemd units: they pass ``systemd-analyze verify`` and agree with the naming rule."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess

from conftest import ROOT, require_tool
from prefork_esmtp.activation import is_tls_name

CONF = ROOT / "conf"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(CONF / name)
    return parser


def test_socket_units_name_a_plain_and_an_implicit_tls_listener():
    service = unit("prefork-esmtp.service")
    assert service["Service"]["Type"] == "notify-reload"
    assert "ExecReload" not in service["Service"]  # notify-reload sends HUP itself
    sockets = service["Service"]["Sockets"].split()
    assert sorted(sockets) == sorted(p.name for p in CONF.glob("*.socket"))
    listeners = {unit(name)["Socket"]["ListenStream"]: unit(name)["Socket"]["FileDescriptorName"]
                 for name in sockets}
    assert listeners == {"25": "smtp", "465": "smtps"}
    assert not is_tls_name(listeners["25"]) and is_tls_name(listeners["465"])
    assert "--daemon" not in service["Service"]["ExecStart"]


def test_units_pass_systemd_analyze_verify(tmp_path):
    tool = require_tool("systemd-analyze")
    for path in [*CONF.glob("*.socket"), CONF / "prefork-esmtp.service"]:
        shutil.copy(path, tmp_path / path.name)
    service = tmp_path / "prefork-esmtp.service"
    # verify wants ExecStart's program to exist; the rest is checked as shipped
    service.write_text(re.sub(r"ExecStart=\S+", "ExecStart=/bin/true", service.read_text()))
    version = int(re.search(r"systemd (\d+)", subprocess.run([tool, "--version"], capture_output=True,
                                                             text=True).stdout).group(1))
    result = subprocess.run([tool, "verify", "--man=no", *sorted(p.name for p in tmp_path.iterdir())],
                            capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if version < 253:  # Type=notify-reload is newer than this systemd; nothing else may be wrong
        assert [p for p in problems if "notify-reload" not in p] == [], problems
    else:
        assert problems == [] and result.returncode == 0, problems
