"""Parsing of the MAIL FROM / RCPT TO argument (RFC 5321 4.1.2, RFC 6531).

``parse_path_argument`` turns ``FROM:<a@b> SIZE=10`` into ``("a@b", {"SIZE": "10"})``
or raises :class:`AddressError`, which carries the SMTP reply to send.  It only
checks syntax: which parameters are supported, and whether UTF-8 is permitted
in this transaction (SMTPUTF8), is for the caller to decide.

The grammar is matched with a few compiled regular expressions rather than a
character-by-character loop; only address literals and parameters need a little
Python afterwards.  ``decode_xtext`` (RFC 3461 4) is here for ENVID and ORCPT.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = ["AddressError", "parse_path_argument", "plain_recipient", "common_sender", "decode_xtext"]


class AddressError(ValueError):
    """A MAIL/RCPT argument the server must refuse; carries the SMTP reply."""

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        # All three go to args so that the exception pickles and compares sanely.
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


# --- Grammar pieces (strings, combined below) --------------------------------

# RFC 6531 UTF8-non-ascii: any non-ASCII code point that UTF-8 can carry
# (lone surrogates, e.g. from surrogateescape decoding, are not characters).
_NON_ASCII = "\u0080-\ud7ff\ue000-\U0010ffff"
# RFC 5322 atext, plus UTF-8 (RFC 6531 3.3).
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _NON_ASCII
_DOT_STRING = "[" + _ATEXT + "]+(?:\\.[" + _ATEXT + "]+)*"
# qtextSMTP (%d32-33 / %d35-91 / %d93-126, plus UTF-8) and quoted-pairSMTP.
_QUOTED_STRING = '"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e' + _NON_ASCII + ']|\\\\[\\x20-\\x7e])*"'
_LET_DIG = "A-Za-z0-9" + _NON_ASCII
_SUB_DOMAIN = "[" + _LET_DIG + "](?:[" + _LET_DIG + "\\-]*[" + _LET_DIG + "])?"
_DOMAIN = _SUB_DOMAIN + "(?:\\." + _SUB_DOMAIN + ")*"
_AT_DOMAIN = "@" + _DOMAIN
# dcontent: %d33-90 / %d94-126 (everything printable but "[", "\" and "]").
_DCONTENT = "\\x21-\\x5a\\x5e-\\x7e"

# Path = "<" [ A-d-l ":" ] Mailbox ">"; the address literal is only delimited
# here and its content checked by _valid_literal().
_PATH_RE = re.compile(
    "<(?:" + _AT_DOMAIN + "(?:," + _AT_DOMAIN + ")*:)?"
    "(?P<local>" + _DOT_STRING + "|" + _QUOTED_STRING + ")"
    "@(?P<domain>" + _DOMAIN + "|\\[(?P<literal>[" + _DCONTENT + "]*)\\])"
    ">"
)
_POSTMASTER_RE = re.compile("<(postmaster)>", re.IGNORECASE | re.ASCII)

_IPV4_RE = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")
_IPV6_CHARS_RE = re.compile(r"[0-9A-Fa-f:.]+")  # no "%scope", which ipaddress allows
_GENERAL_LITERAL_RE = re.compile("[A-Za-z0-9-]*[A-Za-z0-9]:[" + _DCONTENT + "]+")

# esmtp-param = esmtp-keyword ["=" esmtp-value]; value is %d33-60 / %d62-126 (+ UTF-8).
_PARAM_RE = re.compile(
    "(?P<keyword>[A-Za-z0-9][A-Za-z0-9-]*)"
    "(?:=(?P<value>[\\x21-\\x3c\\x3e-\\x7e" + _NON_ASCII + "]+))?"
)

# RFC 3461 4: xchar is "!".."~" except "+" and "="; hexchar is "+" and two
# upper-case hex digits.
_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR_RE = re.compile(r"\+([0-9A-F]{2})")

# Characters not echoed back verbatim in a reply text.
_UNSAFE_RE = re.compile(r"[^\x20-\x7e]")

# The common case in one match: ASCII dot-string "@" domain, no source route, no literal.
_ASCII_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~"
_ASCII_SUB_DOMAIN = "[A-Za-z0-9](?:[A-Za-z0-9\\-]*[A-Za-z0-9])?"
_PLAIN_PATH = (  # groups: the address, its local part, its domain
    "<(([" + _ASCII_ATEXT + "]+(?:\\.[" + _ASCII_ATEXT + "]+)*)"
    "@(" + _ASCII_SUB_DOMAIN + "(?:\\." + _ASCII_SUB_DOMAIN + ")*))>"
)
_PLAIN = {
    "FROM": re.compile(" *FROM: *" + _PLAIN_PATH, re.IGNORECASE | re.ASCII),
    "TO": re.compile(" *TO: *" + _PLAIN_PATH, re.IGNORECASE | re.ASCII),
}

# The commonest argument whole, for the engine to take in one match: a plain path and nothing
# after it.  The lookaheads keep it within RFC 5321's lengths: at most 64 octets before "@"
# (a plain local part holds no "@"), at most 254 between the brackets (the path's 256 with
# them, which also bounds the domain); anything longer goes to parse_path_argument.
# The same language as _PLAIN_PATH (its one group: the address), with possessive quantifiers:
# each run takes all it can and never gives any back, since no shorter run could let the rest
# match (a run of atext is followed by "." or "@", a label's letters and digits by "-", "." or
# ">"), so a near miss such as "<a@b> SIZE=1" fails at once instead of backtracking through
# every run.  A label is runs of letters and digits joined by runs of hyphens, which is
# _ASCII_SUB_DOMAIN's language (starts and ends with a letter or digit) without its backtrack.
_POSSESSIVE_SUB_DOMAIN = "[A-Za-z0-9]++(?:-++[A-Za-z0-9]++)*+"
_WHOLE_PLAIN_PATH = (
    "<(?=[^@]{1,64}+@)(?=[^>]{1,254}+>)"
    "([" + _ASCII_ATEXT + "]++(?:\\.[" + _ASCII_ATEXT + "]++)*+"
    "@" + _POSSESSIVE_SUB_DOMAIN + "(?:\\." + _POSSESSIVE_SUB_DOMAIN + ")*+)>"
)

# (The keyword's cases are spelled out: without IGNORECASE the match is a fifth quicker.)
#: ``TO:<local@domain>`` with no parameters, as :func:`parse_path_argument` would take it
#: (``fullmatch``; group 1 is the address), or None: then parse_path_argument decides.
#: Its addresses are printable ASCII.
plain_recipient = re.compile(" *+[Tt][Oo]: *+" + _WHOLE_PLAIN_PATH, re.ASCII).fullmatch
#: The sender the same way, for the engine: ``FROM:<local@domain>`` with no parameters, or with
#: ``SIZE=n`` (at most 20 digits, as the SIZE check wants) and maybe ``BODY=8BITMIME`` (or
#: ``7BIT``, ``BINARYMIME``), in capitals: what ESMTP clients such as Postfix send.  Group 1 is
#: the address, 2 SIZE's digits, 3 BODY's value (2 and 3 None when there are no parameters).
#: Every address it takes is printable ASCII (atext, letters, digits, "-", "." and "@").
common_sender = re.compile(" *+[Ff][Rr][Oo][Mm]: *+" + _WHOLE_PLAIN_PATH
                           + "(?: SIZE=([0-9]{1,20}+)(?: BODY=(8BITMIME|7BIT|BINARYMIME))?)?", re.ASCII).fullmatch

_MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
_MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
_MAX_PATH = 256  # RFC 5321 4.5.3.1.3, brackets included

_Reply = tuple[int, str, str]

# keyword -> (prefix regex, syntax error, bad-address error, too-long error)
_KEYWORDS: dict[str, tuple[re.Pattern[str], _Reply, _Reply, _Reply]] = {
    "FROM": (
        re.compile(" *FROM: *", re.IGNORECASE | re.ASCII),
        (501, "5.5.4", "Syntax: MAIL FROM:<address>"),
        (501, "5.1.7", "Bad sender address syntax"),
        (553, "5.1.7", "Address too long"),
    ),
    "TO": (
        re.compile(" *TO: *", re.IGNORECASE | re.ASCII),
        (501, "5.5.4", "Syntax: RCPT TO:<address>"),
        (501, "5.1.3", "Bad recipient address syntax"),
        (553, "5.1.3", "Address too long"),
    ),
}


def _octets(text: str) -> int:
    """Length of ``text`` in UTF-8 octets, which is what RFC 5321 limits count."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _printable(text: str, limit: int = 100) -> str:
    """``text`` made safe to echo in a reply: printable ASCII only, shortened."""
    text = _UNSAFE_RE.sub("?", text)
    return text if len(text) <= limit else text[:limit] + "..."


def _valid_literal(literal: str) -> bool:
    """Whether the inside of ``[...]`` is an IPv4, IPv6 or general address literal."""
    m = _IPV4_RE.fullmatch(literal)
    if m is not None:
        return all(int(snum) <= 255 for snum in m.groups())
    if literal[:5].lower() == "ipv6:":
        addr = literal[5:]
        if _IPV6_CHARS_RE.fullmatch(addr) is None:
            return False
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            return False
        return True
    # General-address-literal = Standardized-tag ":" 1*dcontent
    return _GENERAL_LITERAL_RE.fullmatch(literal) is not None


def _parse_parameters(text: str) -> dict[str, str | None]:
    """Parse ``esmtp-param *(SP esmtp-param)``, the text after the path.

    ``text`` is empty or starts with a space.  Keywords become upper-case keys;
    a keyword without ``=`` maps to None.
    """
    params: dict[str, str | None] = {}
    for raw in text.split(" "):
        if not raw:
            continue  # runs of spaces, and trailing spaces
        m = _PARAM_RE.fullmatch(raw)
        if m is None:
            raise AddressError(501, "5.5.4", "Bad parameter syntax: " + _printable(raw))
        keyword = m.group("keyword").upper()
        if keyword in params:
            raise AddressError(501, "5.5.4", "Duplicate parameter: " + _printable(keyword))
        params[keyword] = m.group("value")
    return params


def _plain_lengths_ok(m: re.Match[str]) -> bool:
    """Whether a plain path's local part, domain and whole path are within RFC 5321's limits."""
    local, domain = m.group(2, 3)
    return len(local) <= _MAX_LOCAL_PART and len(domain) <= _MAX_DOMAIN and len(local) + len(domain) + 3 <= _MAX_PATH


def parse_path_argument(argument: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """Parse 'FROM:<a@b> SIZE=10' (keyword 'FROM') or 'TO:<c@d> NOTIFY=NEVER' (keyword 'TO').

    Returns the address (``""`` for the null reverse-path ``<>``, source route
    dropped, local part and domain as written) and the parameters, keyed by
    upper-case keyword.  Raises :class:`AddressError` with the reply to send.
    """
    plain = _PLAIN.get(keyword)
    if plain is not None:
        m = plain.match(argument)
        if m is not None:
            address = m.group(1)
            rest = argument[m.end():]
            # an address of at most 64 octets is within every length limit
            if (not rest or rest[0] == " ") and (len(address) <= _MAX_LOCAL_PART or _plain_lengths_ok(m)):
                return address, _parse_parameters(rest) if rest else {}
    return _parse_general(argument, keyword)


def _parse_general(argument: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """:func:`parse_path_argument` for every argument the grammar allows (and refuses)."""
    try:
        prefix_re, syntax, bad, too_long = _KEYWORDS[keyword.upper()]
    except KeyError:
        raise ValueError(f"keyword must be 'FROM' or 'TO', not {keyword!r}") from None
    m = prefix_re.match(argument)
    if m is None:
        raise AddressError(*syntax)
    pos = m.end()
    is_sender = keyword.upper() == "FROM"

    if argument.startswith("<>", pos):
        if not is_sender:
            raise AddressError(*bad)  # the null path is a reverse-path only
        address, end = "", pos + 2
    elif (pm := _POSTMASTER_RE.match(argument, pos)) is not None:
        if is_sender:
            raise AddressError(*bad)  # RFC 5321 4.1.1.3: "<Postmaster>" is for RCPT
        address, end = pm.group(1), pm.end()
    else:
        pm = _PATH_RE.match(argument, pos)
        if pm is None:
            raise AddressError(*bad)
        literal = pm.group("literal")
        if literal is not None and not _valid_literal(literal):
            raise AddressError(*bad)
        local, domain = pm.group("local", "domain")
        end = pm.end()
        if (
            _octets(local) > _MAX_LOCAL_PART
            or _octets(domain) > _MAX_DOMAIN
            or _octets(argument[pos:end]) > _MAX_PATH
        ):
            raise AddressError(*too_long)
        address = local + "@" + domain

    rest = argument[end:]
    if rest and rest[0] != " ":
        raise AddressError(*bad)  # e.g. "<a@b>x": the path did not end at ">"
    return address, _parse_parameters(rest)


def decode_xtext(value: str) -> str:
    """Decode RFC 3461 xtext (``+XX`` hex escapes), as used by ENVID and ORCPT.

    The escaped octets are decoded as UTF-8 (plain ASCII in practice); octets
    that are not valid UTF-8 make the xtext bad, like malformed escapes do.
    """
    if _XTEXT_RE.fullmatch(value) is None:
        raise AddressError(501, "5.5.4", "Bad xtext: " + _printable(value))
    if "+" not in value:
        return value
    raw = _HEXCHAR_RE.sub(lambda m: "%c" % int(m.group(1), 16), value)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        raise AddressError(501, "5.5.4", "Bad xtext: " + _printable(value)) from None
