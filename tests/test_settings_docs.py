"""The README's settings table and conf/prefork-esmtp.toml come from the settings table."""

import subprocess
import sys
import tomllib

from conftest import ROOT

from prefork_esmtp.settings import SETTINGS, resolve
from prefork_esmtp.settingsdoc import example_toml, markdown_table


def test_readme_table_is_generated_from_settings():
    assert markdown_table() in (ROOT / "README.md").read_text(), \
        "README settings table is stale: run python -m prefork_esmtp.settingsdoc"


def test_example_config_is_generated_and_names_every_key():
    text = (ROOT / "conf" / "prefork-esmtp.toml").read_text()
    assert text == example_toml(), "conf/prefork-esmtp.toml is stale: run python -m prefork_esmtp.settingsdoc"
    for setting in SETTINGS:
        assert f"# {setting.name} = " in text


def test_example_config_uncommented_is_valid():
    """Every documented default, uncommented, is accepted by the real parser."""
    lines = []
    for line in example_toml().splitlines():
        if line.startswith("# ") and " = " in line and "..." not in line:
            lines.append(line[2:].split("   #")[0])
    values = tomllib.loads("\n".join(lines))
    config = resolve({}, values)
    assert config.max_message_size == 10 * 1024 * 1024
    unset = [s for s in SETTINGS if s.default is None and s.name != "hostname"]
    assert set(values) == {s.name for s in SETTINGS} - {s.name for s in unset}


def test_every_setting_has_a_cli_option():
    out = subprocess.run([sys.executable, "-m", "prefork_esmtp", "start", "--help"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for setting in SETTINGS:
        assert setting.option in out
