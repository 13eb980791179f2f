"""Every reply the engine itself sends, in one table; hook results as replies; the reply formatter.

Handlers return ``(code, *messages)``; :func:`call_hook` turns that into a
:class:`HookReply` (or 451 when the hook fails).  The session frames either
kind (``code-`` / ``code ``) and, with ENHANCEDSTATUSCODES on, puts a default
enhanced status code (RFC 3463 / RFC 2034) before any message that lacks one.
A :class:`FramedReply` is a hook's reply the engine made already framed so
(the base MAIL and RCPT replies): the session sends its bytes as they are.
"""

from __future__ import annotations

import logging
import re
from operator import itemgetter
from typing import Any, NamedTuple

from prefork_esmtp import counters

log = logging.getLogger("prefork_esmtp.session")


class Reply(NamedTuple):
    """One of the engine's replies: code, enhanced status code ('' for none) and text.

    ``counts``: whether it counts against the client's error limit (not when the
    fault is ours or a limit's).  ``closes``: the session ends after it (421 always does).
    """

    code: int
    enhanced: str
    text: str
    counts: bool = True
    closes: bool = False

    @property
    def line(self) -> str:
        """The reply's text with its enhanced status code in front, as one reply line."""
        return f"{self.enhanced} {self.text}" if self.enhanced else self.text

    @property
    def lines(self) -> list[str]:
        """The reply as a list of lines (one), as :func:`format_reply` takes them."""
        return [self.line]

    def format(self, *args: Any) -> "Reply":
        """The same reply with ``%``-style arguments put into its text."""
        return self._replace(text=self.text % args)


class HookReply(NamedTuple):
    """A hook's reply, normalized: code and message lines (several make a multi-line reply)."""

    code: int
    lines: list[str]
    counts: bool = True
    closes = False  # a plain class attribute, not a field: a hook's reply never ends the session by itself


_tuple_new = tuple.__new__  # a HookReply without the Python-level __new__ of a NamedTuple


class FramedReply(tuple):
    """A hook's one-line reply made with its bytes as they go on the wire, for the engine to send as
    they are: ``tuple.__new__(FramedReply, (code, data, start))``, where ``data`` is what
    :func:`wire` frames from ``HookReply(code, [text])`` for the verb it answers and ``text``
    starts at ``data[start]``.  The engine makes the base MAIL and RCPT hooks' replies so, once,
    where it builds them; it reads as that HookReply (``code``, ``lines``, ``counts``, ``closes``).
    """

    __slots__ = ()
    code = property(itemgetter(0), doc="The reply code.")
    data = property(itemgetter(1), doc="The reply as it goes on the wire, CRLF included.")
    counts = True  # as a HookReply's default
    closes = False

    @property
    def lines(self) -> list[str]:
        """The reply's text as the hook wrote it, as a list of one line (as HookReply.lines)."""
        return [self[1][self[2]:-2].decode("utf-8", "surrogateescape")]

    def __repr__(self) -> str:
        return f"FramedReply(code={self[0]!r}, data={self[1]!r})"


#: What a verb returns: its final reply, or None when its last reply was an interim one.
Answer = Reply | HookReply | FramedReply | None


# The engine's own replies.  Names say when each is used.
SYNTAX_HELO = Reply(501, "5.5.4", "Syntax: HELO hostname")
SYNTAX_EHLO = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_CONTROL = Reply(501, "5.5.2", "Error: the HELO/EHLO name contains a control character")
SYNTAX_NOARGS = Reply(501, "5.5.4", "Syntax: %s")
SYNTAX_VRFY = Reply(501, "5.5.4", "Syntax: VRFY address")
SYNTAX_EXPN = Reply(501, "5.5.4", "Syntax: EXPN mailing-list")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
REJECTED_SESSION = Reply(503, "5.5.1", "Error: this session was refused; send QUIT")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: command line too long")
BAD_CHARACTERS = Reply(500, "5.5.2", "Error: command contains NUL, CR or non-ASCII characters")
BAD_UTF8 = Reply(500, "5.5.2", "Error: command is not valid UTF-8")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Error: non-ASCII address needs MAIL FROM with SMTPUTF8")
UNSUPPORTED_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter: %s")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter: %s")
BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter: %s (use 7BIT or 8BITMIME)")
BAD_SMTPUTF8 = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Error: message size exceeds the fixed limit of %d octets")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message exceeds the fixed size limit; message discarded")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Error: message header too long; message discarded")
TOO_MANY_HEADER_LINES = Reply(552, "5.3.4", "Error: too many header lines; message discarded")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients", counts=False)
BARE_NEWLINE = Reply(554, "5.6.0", "Error: bare CR or LF in message; lines must end with CRLF")
BAD_PARAMETER = Reply(501, "5.5.4", "Bad %s parameter: %s")
BAD_COMMAND_LF = Reply(500, "5.5.2", "Error: bare LF in command; lines must end with CRLF")
PIPELINING_ABUSE = Reply(554, "5.5.0", "%s Error: improper use of SMTP command pipelining", counts=False, closes=True)
TOO_MANY_JUNK = Reply(421, "4.7.0", "%s Error: too many NOOP, RSET, VRFY, EXPN or HELP commands")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "%s Error: too many connections from your address")
RATE_MESSAGES = Reply(450, "4.7.1", "Error: too many messages from your address; try again later", counts=False)
RATE_RECIPIENTS = Reply(450, "4.7.1", "Error: too many recipients from your address; try again later", counts=False)
DATA_TOO_SLOW = Reply(421, "4.4.2", "%s Error: data rate too low")
# TLS (RFC 3207, 8314)
SYNTAX_STARTTLS = Reply(501, "5.5.4", "Syntax: STARTTLS")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
# AUTH (RFC 4954)
AUTH_NOT_ENABLED = Reply(502, "5.5.1", "Error: authentication not enabled")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_TWICE = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
SYNTAX_AUTH = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Error: cannot decode the response: %s")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure", counts=False)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
# CHUNKING (RFC 3030)
SYNTAX_BDAT = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]", closes=True)  # the chunk size is unknown: no way to stay in sync
CHUNK_OK = Reply(250, "2.0.0", "%d octets received")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA after BDAT in one transaction")
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "Error: BODY=BINARYMIME needs BDAT, not DATA")
HOOK_FAILED = Reply(451, "4.3.0", "Error: local error in processing; try again later", counts=False)
TIMEOUT = Reply(421, "4.4.2", "%s Error: timeout exceeded")
COMMAND_TOO_SLOW = Reply(421, "4.4.2", "%s Error: command line not complete in time")
SESSION_TOO_LONG = Reply(421, "4.4.2", "%s Error: session time limit reached")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "%s Error: too many errors")
LMTP_NEEDS_LHLO = Reply(500, "5.5.1", "Error: this is an LMTP server; say LHLO")
SHUTTING_DOWN = Reply(421, "4.3.2", "%s Service shutting down, closing connection")

#: The replies above (and the base handler's fixed replies), whose framed bytes wire() keeps.
_CONSTANTS = {value for value in tuple(globals().values()) if type(value) is Reply}

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?= |$)")

# Default enhanced codes by (verb, code) first, then by code, then by class.
_BY_VERB = {
    ("MAIL", 2): "2.1.0",
    ("RCPT", 2): "2.1.5",
    ("VRFY", 2): "2.0.0",
}
_BY_CODE = {
    500: "5.5.2", 501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4",
    530: "5.7.0", 535: "5.7.8", 538: "5.7.11", 552: "5.3.4", 555: "5.5.4",
    421: "4.3.0", 451: "4.3.0", 452: "4.3.1", 454: "4.7.0",
}


#: Replies that carry no enhanced status code (RFC 2034 section 4: greeting, HELO/EHLO, 3xx).
_PLAIN_VERBS = frozenset({"CONNECT", "HELO", "EHLO", "LHLO"})


def default_enhanced(code: int, verb: str) -> str | None:
    """The enhanced status code to put before a message that has none, or None to add none.

    None for the greeting (verb ``CONNECT``), HELO/EHLO replies and 3xx replies.
    """
    if verb in _PLAIN_VERBS or 300 <= code < 400:
        return None
    cls = code // 100
    return _BY_VERB.get((verb, cls)) or _BY_CODE.get(code) or f"{cls}.0.0"


#: default_enhanced by (verb, code), as they come up: the verbs are the engine's names (never
#: a client's word) and codes run from 200 to 599, so the table stays small.
_DEFAULTS: dict[tuple[str, int], str | None] = {}
#: The bytes of the engine's constant replies (this module's) by (reply, verb).  A reply made
#: with arguments (which may carry a client's word) is framed each time, so the table stays small.
WIRED: dict[tuple[Reply, str], bytes] = {}
#: What goes before a one-line reply's text that has no enhanced code of its own, by (verb, code):
#: the code and the default enhanced code (``"250 2.1.0 "``), or the code alone (``"250 "``).
#: Filled by wire() as (verb, code) pairs come up: as small as _DEFAULTS.
HEADS: dict[tuple[str, int], str] = {}


def wire(reply: Reply | HookReply | FramedReply, verb: str) -> bytes:
    """A final reply to ``verb`` as it goes on the wire: :func:`format_reply` with
    :func:`default_enhanced`, the engine's constant replies framed once, a hook's one-line
    reply without the loop, a :class:`FramedReply`'s bytes as they are (framed for its verb)."""
    if type(reply) is FramedReply:
        return reply[1]
    if type(reply) is Reply:
        data = WIRED.get((reply, verb))
        if data is None:
            data = format_reply(reply.code, [reply.line], default_enhanced(reply.code, verb))
            if reply in _CONSTANTS:
                WIRED[reply, verb] = data
        return data
    code, lines, _ = reply
    try:
        enhanced = _DEFAULTS[verb, code]
    except KeyError:
        enhanced = _DEFAULTS[verb, code] = default_enhanced(code, verb)
        HEADS[verb, code] = f"{code} {enhanced} " if enhanced is not None else f"{code} "
    if len(lines) != 1:
        return format_reply(code, lines, enhanced)
    line = lines[0]
    if enhanced is not None and (line[1:2] != "." or _ENHANCED.match(line) is None):  # the default code first
        return (f"{code} {enhanced} {line}\r\n" if line else f"{code} {enhanced}\r\n").encode(
            "utf-8", "surrogateescape")
    return f"{code} {line}\r\n".encode("utf-8", "surrogateescape")


def has_enhanced(message: str) -> bool:
    """Whether a reply message already starts with an enhanced status code."""
    return _ENHANCED.match(message) is not None


class BadHookResult(ValueError):
    """A hook returned something that is not ``(code, *messages)``."""


def normalize(result: Any) -> HookReply:
    """Turn a hook's return value into a :class:`HookReply` (code, lines), or raise BadHookResult.

    Accepts ``(code, msg, ...)``, a list of the same, or a bare code.  Messages
    are made str; CR and LF inside a message split it into separate lines so a
    handler can never break the reply framing.
    """
    if type(result) is tuple and len(result) > 1:
        # The common case first, without a copy per message: an int code and printable str
        # messages (a printable str holds no line boundary that splitlines would split at).
        code = result[0]
        if type(code) is int and 200 <= code <= 599:
            lines = [result[1]] if len(result) == 2 else list(result[1:])
            for message in lines:
                if type(message) is not str or not message.isprintable():
                    break
            else:
                return _tuple_new(HookReply, (code, lines, True))
    if isinstance(result, int) and not isinstance(result, bool):
        code, messages = result, ()
    elif isinstance(result, (tuple, list)) and result:
        code, *messages = result
    else:
        raise BadHookResult(f"expected (code, *messages), got {result!r}")
    if isinstance(code, str) and code.isdigit():
        code = int(code)
    if not isinstance(code, int) or isinstance(code, bool) or not 200 <= code <= 599:
        raise BadHookResult(f"reply code must be an int from 200 to 599, got {code!r}")
    code = int(code)  # an int subclass (an enum of codes) as its number: f"{code}" is what goes on the wire
    lines: list[str] = []
    for message in messages:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        lines.extend(str(message).splitlines() or [""])
    return HookReply(code, lines)


def call_hook(handler: Any, hook: str, who: str, *args: Any) -> HookReply | Reply:
    """Call a reply hook and return its reply.

    A hook that raises, or returns something that is not a reply, gets
    451 4.3.0 (transient: the client retries, nothing is lost; it does not
    count against the client's error limit); the traceback is logged and the
    session goes on.
    """
    try:
        result = getattr(handler, hook)(*args)
        # normalize's common case, without the call: (int code, one printable str)
        if type(result) is tuple and len(result) == 2:
            code, message = result
            if type(code) is int and 200 <= code <= 599 and type(message) is str and message.isprintable():
                return _tuple_new(HookReply, (code, [message], True))
        return normalize(result)
    except BadHookResult as exc:
        log.error("%s hook returned a bad reply: %s", hook, exc)
    except Exception:
        log.exception("%s hook raised (client %s)", hook, who)
    counters.hook_failed(hook)
    return HOOK_FAILED


#: The base handler's hooks whose reply is a constant, with arguments for a call that shows it.
#: (Only the hooks the engine answers from this table: the session's CONNECT, NOOP, RSET and
#: QUIT, the transaction's DATA and EOM.)
_FIXED_HOOKS: dict[str, tuple[Any, ...]] = {
    "CONNECT": (), "DATA": (), "EOM": (), "NOOP": (), "RSET": (), "QUIT": (),
}
#: fixed_replies by handler class (bounded: classes are few, but a test may make many).
_FIXED: dict[type, dict[str, Reply]] = {}
_FIXED_MAX = 64


def fixed_replies(cls: type) -> dict[str, Reply]:
    """The replies of the hooks ``cls`` takes unchanged from the base handler, by hook name.

    Those hooks return a constant and do nothing else, so the engine may use
    the reply without the call (unless the handler object has its own
    attribute of that name): the same bytes on the wire, the reply framed once.
    """
    fixed = _FIXED.get(cls)
    if fixed is not None:
        return fixed
    from prefork_esmtp.handler import ESMTPHandler  # the handler module needs nothing of this one

    base = ESMTPHandler()
    fixed = {}
    for hook, args in _FIXED_HOOKS.items():
        own = ESMTPHandler.__dict__[hook]
        if getattr(cls, hook, None) is own:
            reply = normalize(own(base, *args))
            if len(reply.lines) == 1:
                fixed[hook] = Reply(reply.code, "", reply.lines[0])
                _CONSTANTS.add(fixed[hook])
    if len(_FIXED) < _FIXED_MAX:
        _FIXED[cls] = fixed
    return fixed


def format_reply(code: int, lines: list[str], enhanced: str | None) -> bytes:
    """Frame a reply: ``code-text`` lines then ``code text``, CRLF-terminated.

    ``enhanced`` is the default enhanced code for lines without one, or None to
    add none (greeting, HELO/EHLO, 3xx).  A line that carries its own code sets
    the default for the lines after it.
    """
    if not lines:
        lines = [""]
    if len(lines) == 1:  # the common case, without the loop
        line = lines[0]
        if enhanced is not None and (line[1:2] != "." or _ENHANCED.match(line) is None):
            line = f"{enhanced} {line}" if line else enhanced
        return f"{code} {line}\r\n".encode("utf-8", "surrogateescape") if line else f"{code} \r\n".encode()
    if enhanced is None:  # no codes to add (EHLO, the greeting): one join
        return (f"{code}-" + f"\r\n{code}-".join(lines[:-1]) + f"\r\n{code} {lines[-1]}\r\n").encode(
            "utf-8", "surrogateescape")
    out = []
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if enhanced is not None:
            m = _ENHANCED.match(line)
            if m:
                enhanced = m.group(0)
            else:
                line = f"{enhanced} {line}" if line else enhanced
        sep = " " if i == last else "-"
        out.append(f"{code}{sep}{line}\r\n" if line else f"{code}{sep}\r\n")
    return "".join(out).encode("utf-8", "surrogateescape")


def first_line(reply: Reply | HookReply | FramedReply, verb: str = "", limit: int = 200) -> str:
    """The first line of a reply as the client got it (``code [enhanced] text``), clipped, for logs."""
    line = format_reply(reply.code, reply.lines[:1], default_enhanced(reply.code, verb))
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def per_recipient(result: Any, count: int) -> list[HookReply] | None:
    """EOM's per-recipient replies, when it returned a list of ``count`` replies; None otherwise.

    A list whose items are themselves replies (tuples or lists) is one reply per
    accepted recipient, in order; anything else is one reply for the message.
    Raises BadHookResult for such a list of the wrong length.
    """
    if not (isinstance(result, list) and result and all(isinstance(r, (tuple, list)) for r in result)):
        return None
    if len(result) != count:
        raise BadHookResult(f"{len(result)} replies for {count} recipients")
    return [normalize(r) for r in result]


def one_for_all(replies: list[HookReply]) -> tuple[HookReply, list[int]]:
    """One reply for a message from one reply per recipient, and the indexes delivered (2xx).

    All 2xx: the first.  All refused with the same class: the first refusal.
    Mixed: 451 4.3.0 for the whole message, so the client retries and nobody
    loses the message (those already delivered may get a second copy).
    """
    delivered = [i for i, r in enumerate(replies) if 200 <= r.code < 300]
    if len(delivered) == len(replies):
        return replies[0], delivered
    failed = [r for r in replies if not 200 <= r.code < 300]
    if not delivered and len({r.code // 100 for r in failed}) == 1:
        return failed[0], delivered
    return HookReply(451, [f"4.3.0 Delivered to {len(delivered)} of {len(replies)} recipients only; "
                           "try again later"]), delivered
