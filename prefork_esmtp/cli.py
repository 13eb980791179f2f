"""The ``prefork-esmtp`` command line (click); options come from the settings table.

``start`` (foreground, ``--daemon``, or ``-X`` single process), ``stop``,
``reload``, ``status`` and ``configtest``.  Every error an operator can cause
is one line on standard error and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable
from typing import Any, NoReturn

import click

from prefork_esmtp import __version__, pidfile, privileges, tls
from prefork_esmtp.activation import ActivationError, inherit
from prefork_esmtp.listeners import ListenError, bind_all, describe
from prefork_esmtp.loader import HandlerLoadError, configure_handler, load_handler
from prefork_esmtp.logs import reopen as reopen_logs
from prefork_esmtp.logs import setup as setup_logging
from prefork_esmtp.sdnotify import Notifier
from prefork_esmtp.settings import (HANDLER_OPTION_FLAG, HANDLER_OPTION_HELP, SETTINGS, Config, SettingError,
                                    resolve)

log = logging.getLogger("prefork_esmtp")


class Fatal(Exception):
    """One line for the operator, then a non-zero exit."""


def fail(message: str, status: int = 1) -> NoReturn:
    click.echo(f"prefork-esmtp: error: {message}", err=True)
    sys.exit(status)


def settings_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add one click option per setting (plus --config and --handler-option) to a command."""
    for setting in reversed(SETTINGS):
        if not setting.cli:
            continue
        if setting.name == "handler":  # listed right after --handler
            func = click.option(HANDLER_OPTION_FLAG, "handler_option", multiple=True, metavar="KEY=VALUE",
                                help=HANDLER_OPTION_HELP)(func)
        if setting.flag:
            opt = click.option(f"{setting.option}/--no-{setting.option[2:]}", setting.name,
                               default=None, help=setting.help)
        else:
            opt = click.option(setting.option, setting.name, default=None, multiple=setting.multiple,
                               metavar=setting.metavar or None, help=setting.help)
        func = opt(func)
    return config_option(func)


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
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
    """Settings from CLI over file over defaults, or Fatal naming the bad value."""
    file_values = read_config_file(config_file)
    try:
        return resolve(cli_values, file_values, source=config_file or "config file")
    except SettingError as exc:
        raise Fatal(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="prefork-esmtp")
def cli() -> None:
    """An ESMTP server framework with the process model of Apache's prefork MPM."""


# -- start ----------------------------------------------------------------------

@cli.command()
@settings_options
@click.option("-X", "single", is_flag=True,
              help="Debug mode: one process in the foreground, serving one connection after another.")
def start(config_file: str | None, single: bool, **values: Any) -> None:
    """Start the server (in the foreground unless --daemon)."""
    config = load_config(config_file, values)
    setup_logging(config.log_level, config.log_file)
    config_path = os.path.abspath(config_file) if config_file else None
    # Before anything else runs (a preloaded handler, the workers): the systemd variables
    # are taken out of the environment here, whatever happens next.
    try:
        inherited = inherit()
    except ActivationError as exc:
        raise Fatal(str(exc)) from None
    notifier = Notifier.from_environ()
    ids, tls_context, handler_class = _preflight(config, import_handler=single or config.preload)
    try:
        if config.pidfile:
            pidfile.check(config.pidfile)
        if inherited is not None:
            listeners, tls_listeners = inherited.plain, inherited.tls
            if tls_listeners and tls_context is None:
                raise Fatal(f"systemd passed an implicit-TLS socket ({inherited.origin(tls_listeners[0])}) "
                            "but tls_cert and tls_key are not set")
        else:
            listeners = bind_all(config.listen)
            tls_listeners = bind_all(config.tls_listen)
    except (ListenError, pidfile.PidfileError) as exc:
        raise Fatal(str(exc)) from None
    origin = inherited.origin if inherited is not None else None
    for sock in listeners:
        log.info("listening on %s%s", describe(sock), f" ({origin(sock)})" if origin else "")
    for sock in tls_listeners:
        log.info("listening on %s (implicit TLS%s)", describe(sock), f", {origin(sock)}" if origin else "")
    if single:
        _run_single(config, listeners + tls_listeners, handler_class, ids, tls_context,
                    frozenset(s.fileno() for s in tls_listeners))
        return
    notify = _daemonize() if config.daemon else (lambda error: None)
    from prefork_esmtp.master import Master

    def reload_config() -> Config:
        return load_config(config_path, values)

    master = Master(config, listeners, reload_config, handler_class, on_ready=notify,
                    tls_listeners=tls_listeners, tls_context=tls_context, notifier=notifier,
                    inherited=inherited is not None)
    try:
        status = master.run()
    except pidfile.PidfileError as exc:
        raise Fatal(str(exc)) from None
    if master.fatal:
        raise Fatal(master.fatal)
    sys.exit(status)


def _preflight(config: Config, import_handler: bool) -> tuple[Any, Any, type | None]:
    """What start and configtest both check: (worker uid/gid, TLS context, handler class or None)."""
    try:
        ids = privileges.resolve(config.user, config.group)
        tls_context = tls.make_context(config.tls_cert, config.tls_key, config.tls_client_ca)
        if config.tls_listen and tls_context is None:
            raise Fatal("tls_listen needs tls_cert and tls_key")
        if config.limits_backend != "local" and importlib.util.find_spec("redis") is None:
            raise Fatal("limits_backend = redis needs the redis package: pip install 'prefork-esmtp[redis]'")
        handler_class = load_handler(config.handler) if import_handler else None
        if handler_class is not None:  # -X, --preload and configtest: configured here, before serving
            configure_handler(handler_class, config.handler_options)
    except (HandlerLoadError, privileges.PrivilegeError, tls.TLSConfigError) as exc:
        raise Fatal(str(exc)) from None
    return ids, tls_context, handler_class


def _run_single(config: Config, listeners: list, handler_class: type, ids: Any, tls_context: Any,
                tls_fds: frozenset[int]) -> None:
    from prefork_esmtp.limits import Limits, RateTable
    from prefork_esmtp.worker import Worker

    privileges.drop(ids)
    worker = Worker(listeners, handler_class, config, tls_context=tls_context, tls_listeners=tls_fds,
                    limits=Limits(config, rates=RateTable()))
    worker.install_signals()
    signal.signal(signal.SIGUSR1, lambda s, f: reopen_logs())
    log.info("serving with %s.%s in single-process mode (-X), pid %d",
             handler_class.__module__, handler_class.__qualname__, os.getpid())
    try:
        worker.run()
    finally:
        log.info("stopped")


def _daemonize() -> Callable[[str], None]:
    """Detach (double fork, new session, stdio to /dev/null).

    The original process waits until the master reports that its first
    workers booted (or why they could not), so ``start --daemon`` still
    fails with one clear line and a non-zero exit.
    """
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as pipe:
            # One line, not up to EOF: the workers forked before the report inherit the pipe.
            message = pipe.readline().decode(errors="replace").strip()
        if message != "ok":
            fail(message or "the daemon exited during start-up")
        os._exit(0)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    sent = [False]

    def notify(error: str) -> None:
        if not sent[0]:
            sent[0] = True
            try:
                os.write(ready_w, (error or "ok").encode() + b"\n")
                os.close(ready_w)
            except OSError:
                pass

    return notify


# -- commands that find a running master ----------------------------------------------

def _pidfile_option(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--pidfile", "pidfile_path", default=None, metavar="FILE",
                        help="The running master's pidfile (default: the config's).")(func)
    return config_option(func)


def _find_master(config_file: str | None, pidfile_path: str | None) -> tuple[int, str, Config]:
    config = load_config(config_file, {"pidfile": pidfile_path})
    if not config.pidfile:
        raise Fatal("no pidfile: give --pidfile FILE or --config FILE with a pidfile setting")
    pid = pidfile.read(config.pidfile)
    if pid is None:
        raise Fatal(f"no server running: cannot read a pid from {config.pidfile}")
    if not pidfile.alive(pid):
        raise Fatal(f"no server running: pid {pid} from {config.pidfile} is gone (stale pidfile)")
    if not pidfile.is_master(pid):
        raise Fatal(f"no server running: pid {pid} from {config.pidfile} is not a prefork-esmtp master "
                    "(stale pidfile; that process was left alone)")
    return pid, config.pidfile, config


@cli.command()
@_pidfile_option
@click.option("--fast", is_flag=True, help="Fast stop (INT): cut sessions instead of letting them finish.")
def stop(config_file: str | None, pidfile_path: str | None, fast: bool) -> None:
    """Stop the server gracefully (TERM) and wait until it is gone."""
    pid, path, config = _find_master(config_file, pidfile_path)
    os.kill(pid, signal.SIGINT if fast else signal.SIGTERM)
    deadline = time.monotonic() + config.graceful_timeout + 10
    while pidfile.alive(pid):
        if time.monotonic() > deadline:
            raise Fatal(f"master pid {pid} still running after {config.graceful_timeout + 10:.0f}s")
        time.sleep(0.05)
    click.echo(f"stopped (master pid {pid})")


@cli.command()
@_pidfile_option
@click.option("--wait/--no-wait", default=True, help="Wait for the new generation (default) or return at once.")
def reload(config_file: str | None, pidfile_path: str | None, wait: bool) -> None:
    """Reload config and handler gracefully (HUP): no connection refused or cut."""
    pid, path, config = _find_master(config_file, pidfile_path)
    board = _read_board(path)
    before = board["reloads"] if board else 0
    os.kill(pid, signal.SIGHUP)
    if not wait or board is None:
        click.echo(f"reload signalled (master pid {pid})")
        return
    deadline = time.monotonic() + 60
    while True:
        board = _read_board(path)
        if board and board["reloads"] > before:
            break
        if time.monotonic() > deadline or not pidfile.alive(pid):
            raise Fatal(f"master pid {pid} did not finish the reload within 60s")
        time.sleep(0.05)
    if board["error"]:
        raise Fatal(f"reload failed, the old generation keeps serving: {board['error']}")
    click.echo(f"reloaded: generation {board['generation']} serving (master pid {pid})")


def _read_board(path: str) -> dict[str, Any] | None:
    from prefork_esmtp.scoreboard import Scoreboard

    try:
        board = Scoreboard.open(f"{path}.scoreboard")
    except (OSError, ValueError):
        return None
    header = board.header()
    header["slots"] = board.slots()
    return header


@cli.command()
@_pidfile_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_file: str | None, pidfile_path: str | None, as_json: bool) -> None:
    """Show the master and one row per worker (state, peer, sessions, memory)."""
    import psutil

    pid, path, config = _find_master(config_file, pidfile_path)
    board = _read_board(path)
    if board is None:
        raise Fatal(f"cannot read the scoreboard {path}.scoreboard")
    now = time.time()
    workers = []
    for slot in sorted(board["slots"], key=lambda s: (s.generation, s.pid)):
        row = {"pid": slot.pid, "generation": slot.generation, "state": slot.state_name,
               "peer": slot.peer, "sessions": slot.sessions, "age": round(now - slot.started, 1),
               "uss": None, "rss": None}
        try:
            mem = psutil.Process(slot.pid).memory_full_info()
            row["uss"], row["rss"] = mem.uss, mem.rss
        except (psutil.Error, OSError):
            pass
        workers.append(row)
    master = {"pid": pid, "uptime": round(now - board["started"], 1), "generation": board["generation"],
              "listeners": board["listeners"].split(", "), "workers": len(workers),
              "last_reload_error": board["error"] or None}
    if as_json:
        click.echo(json.dumps({"master": master, "workers": workers}, indent=2))
        return
    click.echo(f"master pid {pid}, up {_duration(master['uptime'])}, generation {master['generation']}, "
               f"listening on {board['listeners']}")
    if board["error"]:
        click.echo(f"last reload failed: {board['error']}")
    click.echo(f"{'PID':>7} {'GEN':>4} {'STATE':<9} {'SESSIONS':>8} {'USS':>9} {'RSS':>9} {'AGE':>8}  PEER")
    for row in workers:
        click.echo(f"{row['pid']:>7} {row['generation']:>4} {row['state']:<9} {row['sessions']:>8} "
                   f"{_mib(row['uss']):>9} {_mib(row['rss']):>9} {_duration(row['age']):>8}  {row['peer']}")


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 1048576:.1f}M"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@cli.command()
@settings_options
def configtest(config_file: str | None, **values: Any) -> None:
    """Check the configuration and import the handler (like apachectl -t)."""
    config = load_config(config_file, values)
    _, _, handler_class = _preflight(config, import_handler=True)
    click.echo(f"configuration OK: handler {handler_class.__module__}:{handler_class.__qualname__}, "
               f"listen {', '.join(str(a) for a in config.listen)}")


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
