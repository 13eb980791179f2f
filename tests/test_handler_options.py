"""Handler options: the ``[handler]`` table and ``--handler-option KEY=VALUE``, checked by the handler.

Through the real server: the options reach the handler in every mode (-X, a
pool importing in each worker, --preload), the command line overrides the
file key by key, a refused option is one line at start, configtest and
reload (the old generation keeps serving), and a filter mixin composes with
the ready-made Maildir.  In-process: the merge of file and command line, and
the cooperative configure() chain.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from master_support import cli, one_error_line, pool_mode, status_json, wait_pool

from option_handlers import RejectSender
from prefork_esmtp import ESMTPHandler, HandlerConfigError
from prefork_esmtp.handlers.maildir import Maildir
from prefork_esmtp.handlers.sink import Sink
from prefork_esmtp.settings import SettingError, resolve

GREETER = "option_handlers:Greeter"
FILTERED = "option_handlers:FilteredMaildir"
PRELOAD = pytest.mark.parametrize("preload", [(), ("--preload",)], ids=["import-in-workers", "preload"])


def greeting(srv) -> str:
    """The text of a new session's 220 line after the server's hostname."""
    with smtplib.SMTP(timeout=10) as smtp:
        code, text = smtp.connect("127.0.0.1", srv.port)
        assert code == 220, text
        return text.decode().split(" ", 1)[1]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the merge: [handler] table, command line over file, key by key ------------------------------

def test_table_and_command_line_merge_key_by_key():
    config = resolve({"handler_option": ("greeting=from the command line", "extra=")},
                     {"workers": 2, "handler": {"class": GREETER, "greeting": "from the file", "size": 5}})
    assert config.handler == GREETER
    assert config.handler_options == {"greeting": "from the command line", "size": 5, "extra": ""}
    assert config.workers == 2


def test_the_handler_key_stays_a_plain_class_name_without_options():
    config = resolve({}, {"handler": GREETER})
    assert (config.handler, config.handler_options) == (GREETER, {})
    config = resolve({"handler": "m:C"}, {"handler": {"class": GREETER, "x": "1"}})
    assert (config.handler, config.handler_options) == ("m:C", {"x": "1"})  # --handler wins over class


@pytest.mark.parametrize("cli_values, file_values, expected", [
    ({"handler_option": ("novalue",)}, {}, "--handler-option: expected KEY=VALUE, got 'novalue'"),
    ({"handler_option": ("=x",)}, {}, "--handler-option: expected KEY=VALUE, got '=x'"),
    ({"handler_option": ("class=m:C",)}, {}, "'class' is not a handler option: name the class with --handler"),
    ({}, {"handler": {"class": 5}}, "config file: [handler] class: expected a non-empty string, got 5"),
    ({}, {"handler": {"bad key": 1}}, "[handler] option 'bad key'"),
    ({}, {"handler_option": "x=1"}, "unknown setting 'handler_option'"),
], ids=["no-equals", "no-key", "class", "bad-class", "bad-key", "not-a-toml-key"])
def test_malformed_options_are_refused_with_one_line(cli_values, file_values, expected):
    with pytest.raises(SettingError) as caught:
        resolve(cli_values, file_values)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


# -- the configure() chain ------------------------------------------------------------------------

def test_base_takes_no_options_and_names_the_unknown_ones():
    ESMTPHandler.configure({})
    Sink.configure({})
    with pytest.raises(HandlerConfigError, match=r"^unknown handler options 'colour', 'size'$"):
        Sink.configure({"size": "1", "colour": "red"})


def test_mixin_and_delivery_handler_each_take_their_keys_and_store_them_on_the_class_in_use(tmp_path):
    class Mine(RejectSender, Maildir):
        pass

    class Other(RejectSender, Maildir):
        pass

    Mine.configure({"root": str(tmp_path / "box"), "reject_sender": "spam@example.org"})
    assert (Mine.root, Mine.reject_sender) == (str(tmp_path / "box"), "spam@example.org")
    # nothing leaks into the parents or a sibling class
    assert (Maildir.root, RejectSender.reject_sender) == (None, None)
    assert (Other.root, Other.reject_sender) == (None, None)
    with pytest.raises(HandlerConfigError, match=r"^unknown handler option 'rot'$"):
        Mine.configure({"rot": "/x", "reject_sender": "spam@example.org"})  # the base refuses the rest
    with pytest.raises(HandlerConfigError, match=r"^root: expected a directory name, got 5$"):
        Mine.configure({"root": 5})
    Mine.configure({})  # no root: the environment's or ./maildir again
    assert Mine.root is None


# -- configtest -----------------------------------------------------------------------------------

def test_configtest_checks_the_options_with_the_handler(tmp_path):
    path = write_config(tmp_path / "s.toml", f'workers = 2\n\n[handler]\nclass = "{GREETER}"\ngreeting = "hi"\n')
    result = cli("configtest", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK: handler option_handlers:Greeter,")

    line = one_error_line(cli("configtest", "--config", str(path), "--handler-option", "colour=red"))
    assert line == "prefork-esmtp: error: handler option_handlers:Greeter: unknown handler option 'colour'"
    write_config(path, f'[handler]\nclass = "{GREETER}"\ngreeting = ["not", "text"]\n')
    line = one_error_line(cli("configtest", "--config", str(path)))
    assert line.endswith("greeting: expected one line of text, got ['not', 'text']"), line
    line = one_error_line(cli("configtest", "--handler", GREETER))
    assert line.endswith("greeting: missing (give --handler-option greeting=TEXT)"), line


# -- start: the options reach the handler; refusals are one line ---------------------------------------

def test_option_reaches_the_handler_and_the_command_line_wins(start_server, tmp_path):
    path = write_config(tmp_path / "s.toml", f'[handler]\nclass = "{GREETER}"\ngreeting = "from the file"\n')
    srv = start_server("--config", str(path), handler="")
    assert greeting(srv) == "from the file"
    srv.stop()
    srv = start_server("--config", str(path), "--handler-option", "greeting=from the command line", handler="")
    assert greeting(srv) == "from the command line"


@PRELOAD
def test_a_pool_configures_every_worker(start_server, tmp_path, preload):
    srv = start_server(*preload, "--handler-option", "greeting=pool of two", handler=GREETER,
                       mode=pool_mode(tmp_path, "--workers", "2"))
    wait_pool(srv, 2)
    for _ in range(4):
        assert greeting(srv) == "pool of two"


@pytest.mark.parametrize("mode", [("-X",), ("--workers", "3"), ("--workers", "3", "--preload")],
                         ids=["single", "import-in-workers", "preload"])
def test_start_with_a_refused_option_fails_once_with_the_reason(tmp_path, mode):
    result = cli("start", *mode, "--listen", "127.0.0.1:0", "--pidfile", str(tmp_path / "p.pid"),
                 "--handler", GREETER, "--handler-option", "greeting=hi", "--handler-option", "colour=red",
                 cwd=tmp_path, timeout=20)
    line = one_error_line(result)
    assert line == "prefork-esmtp: error: handler option_handlers:Greeter: unknown handler option 'colour'"
    assert result.stderr.count("worker cannot boot") <= 3, result.stderr  # each worker tried once at most
    assert not (tmp_path / "p.pid").exists()


# -- reload: new options for the new generation; refused ones leave the old one serving --------------

@PRELOAD
def test_reload_hands_new_options_and_refuses_bad_ones(start_server, tmp_path, preload):
    path = tmp_path / "s.toml"

    def configure(options: str) -> None:
        write_config(path, f'workers = 2\npidfile = "{tmp_path / "p.pid"}"\n\n'
                           f'[handler]\nclass = "{GREETER}"\n{options}')

    configure('greeting = "generation one"\n')
    srv = start_server("--config", str(path), *preload, handler="", mode=())
    old_pool = wait_pool(srv, 2)
    assert greeting(srv) == "generation one"

    configure('greeting = "generation two"\n')
    result = cli("reload", "--config", str(path), timeout=60)
    assert result.returncode == 0, result.stderr
    assert greeting(srv) == "generation two"
    pool = wait_pool(srv, 2)
    assert not pool & old_pool

    configure('greeting = "generation three"\nlimit = 5\n')  # a key the handler does not know
    line = one_error_line(cli("reload", "--config", str(path), timeout=60))
    assert line == ("prefork-esmtp: error: reload failed, the old generation keeps serving: "
                    "handler option_handlers:Greeter: unknown handler option 'limit'")
    assert greeting(srv) == "generation two"
    assert wait_pool(srv, 2) == pool
    status = status_json(tmp_path / "p.pid")
    assert status["master"]["generation"] == 2
    assert "unknown handler option 'limit'" in status["master"]["last_reload_error"]


# -- composition with a ready-made handler, through the real server -----------------------------------

def test_filter_mixin_in_front_of_maildir_each_with_its_options(start_server, tmp_path):
    path = write_config(tmp_path / "s.toml", f'[handler]\nclass = "{FILTERED}"\nroot = "boxes/in"\n'
                                             'reject_sender = "spam@example.org"\n')
    # the command line overrides one key; the file's other key (root) stays
    srv = start_server("--config", str(path), "--handler-option", "reject_sender=junk@example.org", handler="",
                       env={"PREFORK_ESMTP_MAILDIR": str(tmp_path / "not-this-one")})
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("junk@example.org", ["to@example.net"], b"Subject: no\r\n\r\nno\r\n")
        assert refused.value.smtp_code == 550
        smtp.rset()
        assert smtp.sendmail("spam@example.org", ["to@example.net"], b"Subject: yes\r\n\r\nyes\r\n") == {}
    stored = list((tmp_path / "boxes" / "in" / "new").iterdir())  # relative to the server's directory
    assert len(stored) == 1
    assert b"Subject: yes" in stored[0].read_bytes()
    assert not (tmp_path / "not-this-one").exists()



def test_the_example_config_and_make_run_use_a_handler_table_maildir_accepts(tmp_path):
    from conftest import ROOT
    from prefork_esmtp.settingsdoc import HANDLER_TABLE_EXAMPLE

    example = "\n".join(line[3:] for line in HANDLER_TABLE_EXAMPLE if line.startswith("## "))
    run_toml = (ROOT / "conf" / "run.toml").read_text()
    for text in (example, run_toml):
        path = write_config(tmp_path / "example.toml", text)
        result = cli("configtest", "--config", str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("configuration OK: handler prefork_esmtp.handlers.maildir:Maildir,")
