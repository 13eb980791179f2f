"""Every setting, declared once: name, type, default, validation, one line of help.

The click options, the TOML keys, the error messages for bad values and the
settings table in the README all come from :data:`SETTINGS`.  Precedence is
command line > config file > default.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class SettingError(ValueError):
    """A bad value for a setting; the message is one line meant for the operator."""


# -- value parsers: each takes a str (CLI) or a TOML value and returns the value -----

def parse_int(value: Any, minimum: int = 0) -> int:
    """An integer, at least ``minimum``."""
    if isinstance(value, bool):
        raise SettingError(f"expected an integer, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SettingError(f"expected an integer, got {value!r}") from None
    if number < minimum:
        raise SettingError(f"must be at least {minimum}, got {number}")
    return number


_SIZE = re.compile(r"(\d+)\s*([kKmMgG]?)i?[bB]?")
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(value: Any) -> int:
    """A size in octets: ``10485760``, ``512K``, ``10M``, ``1G`` (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise SettingError(f"must not be negative, got {value}")
        return value
    m = _SIZE.fullmatch(str(value).strip())
    if not m:
        raise SettingError(f"expected a size such as 10485760, 512K or 10M, got {value!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_seconds(value: Any) -> float:
    """A duration in seconds, greater than zero (``300``, ``0.5``)."""
    if isinstance(value, bool):
        raise SettingError(f"expected a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise SettingError(f"expected a number of seconds, got {value!r}") from None
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise SettingError(f"must be a number of seconds greater than 0, got {value!r}")
    return seconds


def parse_nonnegative_seconds(value: Any) -> float:
    """A duration in seconds, zero or more."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return 0.0
    if isinstance(value, str) and value.strip() in ("0", "0.0"):
        return 0.0
    return parse_seconds(value)


def parse_bool(value: Any) -> bool:
    """true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingError(f"expected true or false, got {value!r}")


def parse_str(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise SettingError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def parse_optional_str(value: Any) -> str | None:
    """A string, or empty for none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SettingError(f"expected a string, got {value!r}")
    return value.strip() or None


@dataclass(frozen=True)
class Address:
    """A listen address: host (IPv4, IPv6 or name) and TCP port."""

    host: str
    port: int

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: Any) -> Address:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (all IPv4 addresses)."""
    text = parse_str(value)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.%\w]+)\]:(\d+)|([^:\[\]]*):(\d+)", text)
    if not m:
        raise SettingError(f"expected HOST:PORT or [IPV6]:PORT, got {text!r}")
    host = m.group(1) if m.group(1) is not None else (m.group(3) or "0.0.0.0")
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise SettingError(f"port must be 0 to 65535, got {port}")
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise SettingError(f"{host!r} is not an IPv6 address") from None
    return Address(host, port)


def parse_network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4 or IPv6 network, ``192.0.2.0/24``, ``2001:db8::/32``, or one address (``10.0.0.5``)."""
    text = parse_str(value)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise SettingError(f"expected a network such as 10.0.0.0/8 or an address, got {text!r}") from None


def parse_proxy_timeout(value: Any) -> float:
    """Seconds, at least PROXY_TIMEOUT_MIN (the PROXY spec: cover a TCP retransmit)."""
    seconds = parse_seconds(value)
    if seconds < PROXY_TIMEOUT_MIN:
        raise SettingError(f"must be at least {PROXY_TIMEOUT_MIN:g} seconds (a TCP retransmit), got {value!r}")
    return seconds


def parse_data_rate_grace(value: Any) -> float:
    """Seconds, at least DATA_RATE_GRACE_MIN: with less, a client's first octets after the 354
    (a round trip away) would already be late and nearly every message refused as too slow."""
    seconds = parse_nonnegative_seconds(value)
    if seconds < DATA_RATE_GRACE_MIN:
        raise SettingError(f"must be at least {DATA_RATE_GRACE_MIN:g} second (the client's first octets "
                           f"need a round trip), got {value!r}")
    return seconds


#: The shortest grace before min_data_rate applies to a DATA/BDAT transfer.
DATA_RATE_GRACE_MIN = 1.0


#: The shortest wait for a PROXY header: proxy-protocol.txt asks for at least 3 s, to cover a TCP retransmit.
PROXY_TIMEOUT_MIN = 3.0


def parse_optional_address(value: Any) -> Address | None:
    """``HOST:PORT`` or ``[IPV6]:PORT``, or empty for none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return parse_address(value)


def parse_handler(value: Any) -> str:
    """``module:Class`` (or ``module.Class``)."""
    text = parse_str(value)
    if not re.fullmatch(r"[A-Za-z_][\w.]*[:.][A-Za-z_]\w*", text):
        raise SettingError(f"expected module:Class, got {text!r}")
    return text


# -- handler options: not settings of the server but of the handler class, which checks them.
# Their TOML face is the [handler] table, their CLI face a repeatable flag.

#: The repeatable command-line flag, and its help.
HANDLER_OPTION_FLAG = "--handler-option"
HANDLER_OPTION_HELP = ("An option for the handler class, KEY=VALUE; repeat for several. "
                       "Overrides the same key of the config file's [handler] table.")
_OPTION_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
#: The key of the ``[handler]`` table that names the class (TOML cannot have both
#: ``handler = "module:Class"`` and a ``[handler]`` table); never a handler option.
HANDLER_CLASS_KEY = "class"


def parse_handler_option(value: Any) -> tuple[str, str]:
    """``KEY=VALUE``, one handler option from the command line (the value may be empty)."""
    text = value if isinstance(value, str) else ""
    key, sep, option = text.partition("=")
    key = key.strip()
    if not sep or not _OPTION_KEY.fullmatch(key):
        raise SettingError(f"expected KEY=VALUE, got {value!r}")
    if key == HANDLER_CLASS_KEY:
        raise SettingError("'class' is not a handler option: name the class with --handler")
    return key, option


def parse_limits_backend(value: Any) -> str:
    """``local``, or a ``redis://`` / ``rediss://`` / ``unix://`` URL of a Redis server."""
    text = parse_str(value)
    if text == "local" or re.fullmatch(r"(rediss?|unix)://\S+", text):
        return text
    raise SettingError(f"expected local or a redis://host:port/db URL, got {text!r}")


def choice(*options: str) -> Callable[[Any], str]:
    """A parser for one of ``options`` (case-insensitive)."""

    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise SettingError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    parse.__doc__ = "one of: " + ", ".join(options)
    return parse


@dataclass(frozen=True)
class Setting:
    """One setting: its TOML key, parser, default, help, and CLI face."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    section: str
    multiple: bool = False  # repeatable flag / TOML list
    flag: bool = False  # a --name/--no-name boolean switch
    cli: bool = True  # has a command-line option
    metavar: str = ""
    minimum: int | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value: Any) -> Any:
        """Parse one value from the CLI or TOML, or raise SettingError."""
        if self.multiple:
            values = value if isinstance(value, (list, tuple)) else [value]
            return [self.parse(v) for v in values]
        return self.parse(value)


def _hostname() -> str:
    return socket.getfqdn()


def _int(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        return parse_int(value, minimum)

    parse.__doc__ = f"an integer, at least {minimum}"
    return parse


SETTINGS: list[Setting] = [
    # server
    Setting("listen", parse_address, ["127.0.0.1:2525"], "Address to listen on, HOST:PORT or [IPV6]:PORT; repeat for several.", "server", multiple=True, metavar="HOST:PORT"),
    Setting("handler", parse_handler, "prefork_esmtp:ESMTPHandler", "The handler class, module:Class. The default accepts and discards all mail.", "server", metavar="MODULE:CLASS"),
    Setting("hostname", parse_str, None, "This server's name in the greeting and EHLO reply (default: the machine's FQDN).", "server", metavar="NAME"),
    Setting("protocol", choice("smtp", "lmtp"), "smtp", "The protocol spoken: smtp, or lmtp (RFC 2033: LHLO, and one reply per recipient after the message; never on port 25).", "server", metavar="PROTOCOL"),
    # limits
    Setting("max_message_size", parse_size, 10 * 1024 * 1024, "Largest message accepted, in octets (K/M/G suffixes); advertised with SIZE; larger gets 552.", "limits", metavar="SIZE"),
    Setting("max_line_length", _int(512), 512, "Longest command line in octets including CRLF (RFC 5321 minimum 512); longer gets 500.", "limits", metavar="N"),
    Setting("max_header_size", _int(1000), 102400, "Longest single header (unfolded) in octets; longer gets 552 after end of data.", "limits", metavar="N"),
    Setting("max_header_lines", _int(1), 1000, "Most header lines per message, continuation lines included; more get 552 after end of data.", "limits", metavar="N"),
    Setting("max_recipients", _int(100), 1000, "Recipients per message (RFC 5321 minimum 100); more get 452.", "limits", metavar="N"),
    Setting("max_errors", _int(1), 20, "Error replies per session before 421 and close.", "limits", metavar="N"),
    Setting("timeout", parse_seconds, 300.0, "Seconds to wait for each read from the client; then 421 and close.", "limits", metavar="SECONDS"),
    Setting("bare_newline", choice("keep", "reject"), "keep", "A bare CR or LF in message data: keep it as it came, or reject the message with 554 after end of data.", "limits", metavar="POLICY"),
    # process model
    Setting("workers", _int(1), 8, "Fixed pool size: worker processes, each serving one session at a time.", "pool", metavar="N"),
    Setting("min_spare", _int(0), None, "Adaptive pool: keep at least this many idle workers (Apache MinSpareServers). Setting it or max-spare turns the adaptive pool on.", "pool", metavar="N"),
    Setting("max_spare", _int(1), None, "Adaptive pool: retire idle workers above this many (Apache MaxSpareServers).", "pool", metavar="N"),
    Setting("max_workers", _int(1), 256, "Adaptive pool: never more workers than this (Apache MaxRequestWorkers).", "pool", metavar="N"),
    Setting("max_connections_per_child", _int(0), 0, "Recycle a worker after this many sessions, plus up to 10% random jitter (0: never).", "pool", metavar="N"),
    Setting("graceful_timeout", parse_seconds, 30.0, "On stop, seconds to let sessions finish before killing what is left.", "pool", metavar="SECONDS"),
    Setting("worker_timeout", parse_seconds, 60.0, "Kill and replace a worker silent this many seconds past its promised check-in (stuck in a hook).", "pool", metavar="SECONDS"),
    Setting("preload", parse_bool, False, "Import the handler in the master before forking (shared memory; reload then re-imports in the master).", "pool", flag=True),
    Setting("accept_mode", choice("exclusive", "shared"), "exclusive", "How idle workers wait for connections: exclusive (EPOLLEXCLUSIVE, one wake-up per connection) or shared (every idle worker wakes).", "pool", metavar="MODE"),
    Setting("pidfile", parse_optional_str, None, "Write the master's pid here; stop, reload and status find the master by it.", "server", metavar="FILE"),
    Setting("user", parse_optional_str, None, "Workers run as this user (the master binds first, so port 25 works as root).", "server", metavar="USER"),
    Setting("group", parse_optional_str, None, "Workers run with this group (default: the user's primary group).", "server", metavar="GROUP"),
    Setting("daemon", parse_bool, False, "Detach from the terminal after start-up checks pass (use with --log-file and --pidfile).", "server", flag=True),
    # TLS and AUTH
    Setting("tls_cert", parse_optional_str, None, "PEM certificate chain for STARTTLS and TLS listeners (HUP reloads it).", "tls", metavar="FILE"),
    Setting("tls_key", parse_optional_str, None, "PEM private key of tls_cert.", "tls", metavar="FILE"),
    Setting("tls_client_ca", parse_optional_str, None, "Ask clients for a certificate and verify it against these CAs (handlers see it in self.tls); unset: no client certificates.", "tls", metavar="FILE"),
    Setting("tls_listen", parse_address, [], "Implicit-TLS address (port 465 style, RFC 8314), HOST:PORT; repeat for several.", "tls", multiple=True, metavar="HOST:PORT"),
    Setting("tls_handshake_timeout", parse_seconds, 30.0, "Seconds a client may take to complete the TLS handshake.", "tls", metavar="SECONDS"),
    Setting("require_tls", parse_bool, False, "Refuse everything but EHLO, NOOP, STARTTLS and QUIT with 530 until TLS is on (not for a public MX).", "tls", flag=True),
    Setting("auth_plaintext", parse_bool, False, "Offer and allow AUTH without TLS (otherwise 538 outside TLS).", "tls", flag=True),
    Setting("require_auth", parse_bool, False, "Refuse MAIL with 530 until the client has authenticated (a submission port).", "tls", flag=True),
    # PROXY protocol
    Setting("proxy_protocol", parse_bool, False, "Every listener expects a PROXY protocol header (v1 or v2) from a load balancer before anything else, and takes the client's address from it; never guessed. A connection without a valid header is closed without a reply.", "proxy", flag=True),
    Setting("proxy_trusted", parse_network, [], "Networks (or addresses) allowed to send the PROXY header; connections from elsewhere are closed without a reply. Repeat for several; none: any peer.", "proxy", multiple=True, metavar="NETWORK"),
    Setting("proxy_timeout", parse_proxy_timeout, 5.0, "Seconds a load balancer has to send the whole PROXY header (Postfix's smtpd_upstream_proxy_timeout); at least 3.", "proxy", metavar="SECONDS"),
    # abuse defences
    Setting("command_bare_lf", choice("accept", "reject"), "accept", "A command line ended by a bare LF: accept it, or reject it with 500 (Postfix's smtpd_forbid_bare_newline idea).", "abuse", metavar="POLICY"),
    Setting("forbid_unauth_pipelining", parse_bool, False, "Answer 554 and close when an unauthenticated client talks before the greeting or sends more after a command that must end a pipelined group (EHLO, DATA, QUIT, NOOP...).", "abuse", flag=True),
    Setting("command_deadline", parse_nonnegative_seconds, 30.0, "Seconds a client may take to send one command line once its first octet arrived (Postfix's smtpd_per_record_deadline idea), else 421; 0 turns it off.", "abuse", metavar="SECONDS"),
    Setting("max_session_time", parse_nonnegative_seconds, 3600.0, "Seconds a whole session may last; then 421 at the next read, a message under way is not accepted; 0 turns it off.", "abuse", metavar="SECONDS"),
    Setting("min_data_rate", _int(0), 500, "During DATA/BDAT the client must average at least this many octets per second (after min_data_rate_grace), else 421; 0 turns it off.", "abuse", metavar="OCTETS"),
    Setting("min_data_rate_grace", parse_data_rate_grace, 10.0, "Seconds at the start of each DATA/BDAT transfer before min_data_rate applies (at least 1: the first octets need a round trip).", "abuse", metavar="SECONDS"),
    Setting("max_junk_commands", _int(1), 100, "NOOP, RSET, VRFY, EXPN and HELP commands per session before 421 and close.", "abuse", metavar="N"),
    Setting("max_sessions_per_ip", _int(0), 0, "Concurrent sessions from one client IP across all workers (and hosts with limits_backend); more get 421 4.7.0 (0: no limit).", "abuse", metavar="N"),
    Setting("max_messages_per_ip", _int(0), 0, "MAIL commands from one client address per limits_window, across workers (and hosts with limits_backend); more get 450 4.7.1 (0: no limit).", "abuse", metavar="N"),
    Setting("max_recipients_per_ip", _int(0), 0, "RCPT commands from one client address per limits_window, across workers (and hosts with limits_backend); more get 450 4.7.1 (0: no limit).", "abuse", metavar="N"),
    Setting("limits_window", parse_seconds, 60.0, "The time window of max_messages_per_ip and max_recipients_per_ip, in seconds.", "abuse", metavar="SECONDS"),
    Setting("limits_backend", parse_limits_backend, "local", "Where the per-address limits count: local (this host's workers share memory) or redis://host:port/db (every host using that Redis shares them; Redis down: limits fail open).", "abuse", metavar="URL"),
    Setting("soft_error_limit", _int(1), 10, "After this many errors in a session, wait error_sleep before each error reply.", "abuse", metavar="N"),
    Setting("error_sleep", parse_nonnegative_seconds, 1.0, "Seconds to wait before each error reply once past soft_error_limit.", "abuse", metavar="SECONDS"),
    # logging
    Setting("log_level", choice("debug", "info", "warning", "error", "critical"), "info", "Logging level.", "logging", metavar="LEVEL"),
    Setting("log_file", parse_optional_str, None, "Log to this file instead of standard error (reopened on USR1).", "logging", metavar="FILE"),
    Setting("log_format", choice("text", "json"), "text", "Log records as text lines, or as one JSON object per line (for log shippers); see Logs in the README.", "logging", metavar="FORMAT"),
    Setting("metrics_listen", parse_optional_address, None, "Serve Prometheus metrics on http://HOST:PORT/metrics from the master (needs prefork-esmtp[metrics]; a change needs a restart).", "logging", metavar="HOST:PORT"),
]

BY_NAME = {s.name: s for s in SETTINGS}


class Config:
    """The effective settings, as plain attributes named like the settings.

    Plain instance attributes, not a lookup hook: the session reads settings
    on every command, so the cheapest attribute access is the right one.
    """

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    @property
    def values(self) -> dict[str, Any]:
        """Every setting by name."""
        return dict(self.__dict__)

    #: The handler's options: the [handler] table, overridden key by key by --handler-option.
    handler_options: dict[str, Any]

    def set(self, name: str, value: Any) -> None:
        """Change one setting (the master keeps its listeners across a reload)."""
        if name not in BY_NAME:
            raise KeyError(name)
        setattr(self, name, value)


def resolve(cli: dict[str, Any], file: dict[str, Any], source: str = "config file") -> Config:
    """Merge CLI values over file values over defaults; raise SettingError naming the culprit.

    ``cli`` maps setting names to raw CLI values (None = not given), and
    ``handler_option`` to the ``KEY=VALUE`` strings of ``--handler-option``;
    ``file`` maps TOML keys to values.  The file's ``[handler]`` table holds the
    handler's options (and may name its class with ``class``).  Both end up in
    ``Config.handler_options``, one dict, the command line overriding key by key.
    """
    file, options, class_in_table = _split_handler_table(file, source)
    for key in file:
        if key not in BY_NAME:
            raise SettingError(f"{source}: unknown setting {key!r}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = cli.get(setting.name)
        if raw not in (None, ()):
            where = setting.option
        elif setting.name in file:
            raw, where = file[setting.name], f"{source}: {setting.name}"
            if setting.name == "handler" and class_in_table:
                where = f"{source}: [handler] class"
        else:
            raw, where = None, ""
        if raw is None:
            default = setting.default
            values[setting.name] = setting.convert(default) if default is not None else None
            continue
        try:
            values[setting.name] = setting.convert(raw)
        except SettingError as exc:
            raise SettingError(f"{where}: {exc}") from None
    for text in cli.get("handler_option") or ():
        try:
            key, value = parse_handler_option(text)
        except SettingError as exc:
            raise SettingError(f"{HANDLER_OPTION_FLAG}: {exc}") from None
        options[key] = value
    values["handler_options"] = options
    if values["hostname"] is None:
        values["hostname"] = _hostname()
    if values["protocol"] == "lmtp" and any(a.port == 25 for a in values["listen"] + values["tls_listen"]):
        raise SettingError("protocol = lmtp must not listen on port 25 (RFC 2033 section 5): choose another port")
    return Config(values)


def _split_handler_table(file: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """The file's settings without the ``[handler]`` table, the table's options, and whether it named the class.

    A ``class`` key in the table stands for the ``handler`` setting.
    """
    table = file.get("handler")
    if not isinstance(table, dict):
        return file, {}, False
    rest = {k: v for k, v in file.items() if k != "handler"}
    options = dict(table)
    if HANDLER_CLASS_KEY in options:
        rest["handler"] = options.pop(HANDLER_CLASS_KEY)
    for key in options:
        if not _OPTION_KEY.fullmatch(key):
            raise SettingError(f"{source}: [handler] option {key!r}: expected a name of letters, digits, _ . -")
    return rest, options, HANDLER_CLASS_KEY in table
