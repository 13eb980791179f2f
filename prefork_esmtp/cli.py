"""The ``prefork-esmtp`` command line (click); options come from the settings table."""

from __future__ import annotations

import logging
import sys
import tomllib
from collections.abc import Callable
from typing import Any, NoReturn

import click

from prefork_esmtp import __version__
from prefork_esmtp.listeners import ListenError, bind_all, describe
from prefork_esmtp.loader import HandlerLoadError, load_handler
from prefork_esmtp.logs import setup as setup_logging
from prefork_esmtp.settings import SETTINGS, Config, SettingError, resolve

log = logging.getLogger("prefork_esmtp")


class Fatal(Exception):
    """One line for the operator, then a non-zero exit."""


def fail(message: str, status: int = 1) -> NoReturn:
    click.echo(f"prefork-esmtp: error: {message}", err=True)
    sys.exit(status)


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one click option per setting (plus --config) to a command."""
    for setting in reversed(SETTINGS):
        if not setting.cli:
            continue
        if setting.flag:
            opt = click.option(f"{setting.option}/--no-{setting.option[2:]}", setting.name,
                               default=None, help=setting.help)
        else:
            opt = click.option(setting.option, setting.name, default=None, multiple=setting.multiple,
                               metavar=setting.metavar or None, help=setting.help)
        func = opt(func)
    return click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                        metavar="FILE", help="Read settings from this TOML file.")(func)


def read_config_file(path: str | None) -> dict[str, Any]:
    """The TOML file's settings, or raise Fatal with one clear line."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise Fatal(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise Fatal(f"config file {path}: {exc}") from None


def load_config(config_file: str | None, cli_values: dict[str, Any]) -> Config:
    file_values = read_config_file(config_file)
    try:
        return resolve(cli_values, file_values, source=config_file or "config file")
    except SettingError as exc:
        raise Fatal(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefork-esmtp")
def cli() -> None:
    """An ESMTP server framework with the process model of Apache's prefork MPM."""


@cli.command()
@settings_options
@click.option("-X", "single", is_flag=True,
              help="Debug mode: one process in the foreground, serving one connection after another.")
def start(config_file: str | None, single: bool, **values: Any) -> None:
    """Start the server in the foreground."""
    config = load_config(config_file, values)
    setup_logging(config.log_level, config.log_file)
    try:
        handler_class = load_handler(config.handler)
        listeners = bind_all(config.listen)
    except (HandlerLoadError, ListenError) as exc:
        raise Fatal(str(exc)) from None
    if not single:
        raise Fatal("the pre-forking master is not built yet; run with -X")
    from prefork_esmtp.worker import Worker

    worker = Worker(listeners, handler_class, config)
    worker.install_signals()
    for sock in listeners:
        log.info("listening on %s", describe(sock))
    log.info("serving with %s.%s in single-process mode (-X), pid %d",
             handler_class.__module__, handler_class.__qualname__, __import__("os").getpid())
    try:
        worker.run()
    finally:
        log.info("stopped")


def main() -> None:
    """Entry point: run the CLI; every error is one line on standard error."""
    try:
        cli.main(standalone_mode=False)
    except Fatal as exc:
        fail(str(exc))
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        fail("aborted")
    except click.ClickException as exc:
        fail(exc.format_message(), 2)
    except KeyboardInterrupt:
        sys.exit(130)
