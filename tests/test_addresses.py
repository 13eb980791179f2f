"""Tests for prefork_esmtp.addresses: MAIL/RCPT argument parsing and xtext."""

from __future__ import annotations

import pickle
import re
import string

import pytest

from prefork_esmtp.addresses import AddressError, decode_xtext, parse_path_argument

BAD_SENDER = (501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = (501, "5.1.3", "Bad recipient address syntax")
SENDER_TOO_LONG = (553, "5.1.7", "Address too long")
RECIPIENT_TOO_LONG = (553, "5.1.3", "Address too long")


def reply_of(argument: str, keyword: str) -> tuple[int, str, str]:
    """The (code, enhanced, text) of the AddressError the argument raises."""
    with pytest.raises(AddressError) as info:
        parse_path_argument(argument, keyword)
    err = info.value
    return err.code, err.enhanced, err.text


# --- AddressError -------------------------------------------------------------


def test_address_error_attributes():
    err = AddressError(501, "5.1.7", "Bad sender address syntax")
    assert isinstance(err, ValueError)
    assert (err.code, err.enhanced, err.text) == BAD_SENDER
    assert str(err) == "501 5.1.7 Bad sender address syntax"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.enhanced, copy.text) == BAD_SENDER


# --- Keyword and colon ----------------------------------------------------------


def test_simple_sender_and_recipient():
    assert parse_path_argument("FROM:<a@example.org>", "FROM") == ("a@example.org", {})
    assert parse_path_argument("TO:<c@example.net>", "TO") == ("c@example.net", {})


def test_keyword_is_case_insensitive():
    assert parse_path_argument("from:<a@example.org>", "FROM") == ("a@example.org", {})
    assert parse_path_argument("To:<c@example.net>", "TO") == ("c@example.net", {})
    assert parse_path_argument("tO:<c@example.net>", "TO")[0] == "c@example.net"


def test_leading_spaces_before_keyword():
    assert parse_path_argument("   FROM:<a@example.org>", "FROM")[0] == "a@example.org"


def test_spaces_after_colon():
    assert parse_path_argument("FROM: <a@example.org>", "FROM")[0] == "a@example.org"
    assert parse_path_argument("TO:    <c@example.net>", "TO")[0] == "c@example.net"


def test_missing_colon():
    assert reply_of("FROM<a@example.org>", "FROM") == (501, "5.5.4", "Syntax: MAIL FROM:<address>")
    assert reply_of("TO <c@example.net>", "TO") == (501, "5.5.4", "Syntax: RCPT TO:<address>")
    assert reply_of("FROM :<a@example.org>", "FROM") == (501, "5.5.4", "Syntax: MAIL FROM:<address>")


def test_missing_or_wrong_keyword():
    assert reply_of("<a@example.org>", "FROM") == (501, "5.5.4", "Syntax: MAIL FROM:<address>")
    assert reply_of("", "TO") == (501, "5.5.4", "Syntax: RCPT TO:<address>")
    assert reply_of("TO:<c@example.net>", "FROM") == (501, "5.5.4", "Syntax: MAIL FROM:<address>")
    assert reply_of("FROM:<a@example.org>", "TO") == (501, "5.5.4", "Syntax: RCPT TO:<address>")


def test_keyword_argument_must_be_from_or_to():
    with pytest.raises(ValueError) as info:
        parse_path_argument("VRFY:<a@b>", "VRFY")
    assert not isinstance(info.value, AddressError)


# --- Angle brackets, null path, postmaster ------------------------------------------


def test_missing_brackets():
    assert reply_of("FROM:a@example.org", "FROM") == BAD_SENDER
    assert reply_of("TO:c@example.net", "TO") == BAD_RECIPIENT
    assert reply_of("FROM:<a@example.org", "FROM") == BAD_SENDER
    assert reply_of("TO:c@example.net>", "TO") == BAD_RECIPIENT


def test_empty_after_colon():
    assert reply_of("FROM:", "FROM") == BAD_SENDER
    assert reply_of("TO:   ", "TO") == BAD_RECIPIENT


def test_null_sender():
    assert parse_path_argument("FROM:<>", "FROM") == ("", {})
    assert parse_path_argument("FROM:<> BODY=8BITMIME", "FROM") == ("", {"BODY": "8BITMIME"})


def test_null_recipient_rejected():
    assert reply_of("TO:<>", "TO") == BAD_RECIPIENT


def test_null_path_with_junk():
    assert reply_of("FROM:< >", "FROM") == BAD_SENDER
    assert reply_of("FROM:<>x", "FROM") == BAD_SENDER


def test_postmaster_recipient():
    assert parse_path_argument("TO:<postmaster>", "TO") == ("postmaster", {})
    assert parse_path_argument("TO:<Postmaster>", "TO") == ("Postmaster", {})
    assert parse_path_argument("TO:<POSTMASTER> NOTIFY=NEVER", "TO") == ("POSTMASTER", {"NOTIFY": "NEVER"})


def test_postmaster_sender_rejected():
    assert reply_of("FROM:<postmaster>", "FROM") == BAD_SENDER


def test_local_part_without_domain_rejected():
    assert reply_of("TO:<webmaster>", "TO") == BAD_RECIPIENT
    assert reply_of("FROM:<alice>", "FROM") == BAD_SENDER
    assert reply_of("TO:<postmaster@>", "TO") == BAD_RECIPIENT
    assert reply_of("TO:<@example.org>", "TO") == BAD_RECIPIENT


# --- Source routes ---------------------------------------------------------------


def test_source_route_ignored():
    arg = "TO:<@hosta.example,@hostb.example:user@hostc.example>"
    assert parse_path_argument(arg, "TO") == ("user@hostc.example", {})
    assert parse_path_argument("FROM:<@relay.example:a@b.example>", "FROM")[0] == "a@b.example"


@pytest.mark.parametrize(
    "path",
    [
        "<@hosta.example,hostb.example:user@hostc.example>",  # second hop lacks "@"
        "<@:user@hostc.example>",  # empty domain
        "<@hosta.example user@hostc.example>",  # no colon
        "<@hosta.example,:user@hostc.example>",  # trailing comma
        "<@hosta.example:>",  # no mailbox
        "<@[1.2.3.4]:user@hostc.example>",  # At-domain is a Domain, not a literal
        "<@hosta.example:postmaster>",
    ],
)
def test_bad_source_route(path):
    assert reply_of("TO:" + path, "TO") == BAD_RECIPIENT


# --- Local parts ------------------------------------------------------------------


def test_dot_string_local_part_with_all_atext():
    local = "!#$%&'*+-/=?^_`{|}~.Az09"
    assert parse_path_argument(f"FROM:<{local}@example.org>", "FROM")[0] == local + "@example.org"


def test_quoted_local_part_with_spaces():
    assert parse_path_argument('TO:<"john doe"@example.org>', "TO")[0] == '"john doe"@example.org'


def test_quoted_local_part_with_escapes_kept_as_written():
    arg = r'TO:<"john \"jd\" doe\\"@example.org> NOTIFY=NEVER'
    assert parse_path_argument(arg, "TO") == (r'"john \"jd\" doe\\"@example.org', {"NOTIFY": "NEVER"})


def test_quoted_local_part_may_hold_brackets_and_at():
    assert parse_path_argument('TO:<"a>b@c"@example.org>', "TO")[0] == '"a>b@c"@example.org'
    assert parse_path_argument('TO:<""@example.org>', "TO")[0] == '""@example.org'


@pytest.mark.parametrize(
    "local",
    [
        '"unterminated@example.org',
        '"bad"quote"',
        '"tab\there"',
        '"back\\slash"x',
        '"ends with backslash\\"',
    ],
)
def test_bad_quoted_local_part(local):
    assert reply_of(f"FROM:<{local}@example.org>", "FROM") == BAD_SENDER


@pytest.mark.parametrize("local", ["a..b", ".a", "a.", "a b", "a(b)", "a,b", "a[b]", "a\\b"])
def test_bad_dot_string(local):
    assert reply_of(f"FROM:<{local}@example.org>", "FROM") == BAD_SENDER


def test_two_at_signs_rejected():
    assert reply_of("TO:<a@b@example.org>", "TO") == BAD_RECIPIENT


# --- Domains ----------------------------------------------------------------------


def test_domain_forms():
    for domain in ["example.org", "localhost", "a-b.c-d.example", "123.example", "x1.EXAMPLE.org"]:
        assert parse_path_argument(f"TO:<u@{domain}>", "TO")[0] == "u@" + domain


@pytest.mark.parametrize(
    "domain",
    ["-a.example", "a-.example", "example..org", ".example.org", "example.org.", "ex_ample.org", "exa mple.org"],
)
def test_bad_domain(domain):
    assert reply_of(f"TO:<u@{domain}>", "TO") == BAD_RECIPIENT


def test_label_starting_with_hyphen():
    assert reply_of("FROM:<a@-example.org>", "FROM") == BAD_SENDER
    assert reply_of("FROM:<a@mail.-example.org>", "FROM") == BAD_SENDER


def test_double_dots():
    assert reply_of("FROM:<a..b@example.org>", "FROM") == BAD_SENDER
    assert reply_of("FROM:<a@example..org>", "FROM") == BAD_SENDER


def test_trailing_dot_in_domain():
    assert reply_of("TO:<a@example.org.>", "TO") == BAD_RECIPIENT


# --- Address literals ------------------------------------------------------------


@pytest.mark.parametrize("literal", ["[1.2.3.4]", "[0.0.0.0]", "[255.255.255.255]", "[192.0.2.1]"])
def test_ipv4_literal(literal):
    assert parse_path_argument(f"TO:<u@{literal}>", "TO")[0] == "u@" + literal


@pytest.mark.parametrize(
    "literal", ["[300.1.1.1]", "[1.2.3]", "[1.2.3.4.5]", "[1.2.3.]", "[1.2.3.4 ]", "[]", "[1.2.3.1234]", "[a.b.c.d]"]
)
def test_bad_ipv4_literal(literal):
    assert reply_of(f"TO:<u@{literal}>", "TO") == BAD_RECIPIENT


@pytest.mark.parametrize(
    "literal",
    ["[IPv6:::1]", "[ipv6:2001:db8::1]", "[IPV6:2001:DB8:0:0:0:0:0:1]", "[IPv6:::ffff:192.0.2.1]"],
)
def test_ipv6_literal(literal):
    assert parse_path_argument(f"TO:<u@{literal}>", "TO")[0] == "u@" + literal


@pytest.mark.parametrize(
    "literal",
    ["[IPv6:zz::1]", "[IPv6:1::2::3]", "[IPv6:]", "[IPv6:fe80::1%eth0]", "[IPv6:1.2.3.4]", "[IPv6:1:2:3:4:5:6:7:8:9]"],
)
def test_bad_ipv6_literal(literal):
    assert reply_of(f"TO:<u@{literal}>", "TO") == BAD_RECIPIENT


@pytest.mark.parametrize(
    "literal",
    [
        "[x-tag:anything!<>goes]",
        "[tag2:a]",
        "[X:1.2.3.4]",
        "[2001:db8::1]",  # by the grammar, tag "2001" and content "db8::1"
    ],
)
def test_general_address_literal(literal):
    assert parse_path_argument(f"FROM:<u@{literal}>", "FROM")[0] == "u@" + literal


@pytest.mark.parametrize(
    "literal", ["[tag-:x]", "[ta_g:x]", "[tag:]", "[:x]", "[tag:a b]", "[tag:a\\b]", "[tag:a[b]", "[tag:é]"]
)
def test_bad_general_address_literal(literal):
    assert reply_of(f"FROM:<u@{literal}>", "FROM") == BAD_SENDER


# --- UTF-8 (RFC 6531) -----------------------------------------------------------------


def test_utf8_local_part_and_domain_accepted():
    assert parse_path_argument("FROM:<用户@例子.广告>", "FROM")[0] == "用户@例子.广告"
    assert parse_path_argument("TO:<jürgen.müller@bücher.example>", "TO")[0] == "jürgen.müller@bücher.example"
    assert parse_path_argument('TO:<"héllo wörld"@example.org>', "TO")[0] == '"héllo wörld"@example.org'


def test_utf8_domain_label_still_needs_ldh_edges():
    assert reply_of("TO:<a@-bücher.example>", "TO") == BAD_RECIPIENT
    assert reply_of("TO:<a@bücher..example>", "TO") == BAD_RECIPIENT


def test_lone_surrogate_rejected():
    assert reply_of("TO:<a\udcff@example.org>", "TO") == BAD_RECIPIENT


# --- Length limits (RFC 5321 4.5.3.1) ------------------------------------------------


def test_local_part_at_64_octets():
    local = "a" * 64
    assert parse_path_argument(f"FROM:<{local}@example.org>", "FROM")[0] == local + "@example.org"


def test_local_part_beyond_64_octets():
    assert reply_of(f"FROM:<{'a' * 65}@example.org>", "FROM") == SENDER_TOO_LONG
    assert reply_of(f"TO:<{'a' * 65}@example.org>", "TO") == RECIPIENT_TOO_LONG


def test_local_part_limit_counts_utf8_octets():
    assert parse_path_argument(f"TO:<{'é' * 32}@example.org>", "TO")[0] == "é" * 32 + "@example.org"
    assert reply_of(f"TO:<{'é' * 32}a@example.org>", "TO") == RECIPIENT_TOO_LONG


def test_quoted_local_part_limit_counts_quotes():
    assert parse_path_argument(f'TO:<"{"a" * 62}"@example.org>', "TO")[0].startswith('"')
    assert reply_of(f'TO:<"{"a" * 63}"@example.org>', "TO") == RECIPIENT_TOO_LONG


def _domain(octets: int) -> str:
    """A valid domain name of exactly ``octets`` octets (labels of 63 or fewer)."""
    labels = []
    while octets > 0:
        size = min(63, octets)
        if octets - size == 1:  # avoid leaving room for a dot and nothing else
            size -= 1
        labels.append("d" * size)
        octets -= size + 1
    domain = ".".join(labels)
    return domain


def test_domain_helper():
    for n in (1, 63, 64, 65, 252, 255, 256):
        assert len(_domain(n)) == n


def test_domain_at_255_octets_is_always_beyond_the_path_limit():
    # "<" + "a" + "@" + 255 + ">" is 259 octets: the path limit decides first.
    assert reply_of(f"TO:<a@{_domain(255)}>", "TO") == RECIPIENT_TOO_LONG


def test_domain_beyond_255_octets():
    assert reply_of(f"FROM:<a@{_domain(256)}>", "FROM") == SENDER_TOO_LONG


def test_domain_limit_through_source_route_free_path():
    # The longest domain a path can carry: 256 - len("<a@>") = 252 octets.
    assert parse_path_argument(f"TO:<a@{_domain(252)}>", "TO")[0] == "a@" + _domain(252)


def test_path_at_256_octets():
    local = "l" * 64
    domain = _domain(256 - len(f"<{local}@>"))
    path = f"<{local}@{domain}>"
    assert len(path) == 256
    assert parse_path_argument(f"TO:{path} NOTIFY=NEVER", "TO") == (f"{local}@{domain}", {"NOTIFY": "NEVER"})


def test_path_beyond_256_octets():
    local = "l" * 64
    domain = _domain(257 - len(f"<{local}@>"))
    assert reply_of(f"TO:<{local}@{domain}>", "TO") == RECIPIENT_TOO_LONG
    assert reply_of(f"FROM:<{local}@{domain}>", "FROM") == SENDER_TOO_LONG


def test_path_limit_counts_utf8_octets():
    local = "é" * 32  # 64 octets
    domain = _domain(256 - 64 - 3)
    assert parse_path_argument(f"TO:<{local}@{domain}>", "TO")[0] == f"{local}@{domain}"
    assert reply_of(f"TO:<{local}@x{domain}>", "TO") == RECIPIENT_TOO_LONG


def test_path_limit_includes_source_route():
    route = "@relay.example:"
    local = "l" * 64
    domain = _domain(256 - len(f"<{route}{local}@>"))
    assert len(f"<{route}{local}@{domain}>") == 256
    assert parse_path_argument(f"TO:<{route}{local}@{domain}>", "TO")[0] == f"{local}@{domain}"
    # One more octet in the (ignored) route makes the path too long.
    assert reply_of(f"TO:<@x{route[1:]}{local}@{domain}>", "TO") == RECIPIENT_TOO_LONG


def test_syntax_error_wins_over_length():
    assert reply_of(f"TO:<{'a' * 65}@-bad.example>", "TO") == BAD_RECIPIENT


# --- Parameters -------------------------------------------------------------------------


def test_params_with_and_without_values():
    arg = "FROM:<a@example.org> SIZE=1000 BODY=8BITMIME SMTPUTF8"
    assert parse_path_argument(arg, "FROM") == (
        "a@example.org",
        {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None},
    )


def test_param_keywords_upper_cased_values_kept():
    assert parse_path_argument("TO:<c@example.net> notify=Success,Delay", "TO")[1] == {"NOTIFY": "Success,Delay"}


def test_param_keyword_forms():
    params = parse_path_argument("FROM:<a@example.org> X-FOO=1 9A 0-- A", "FROM")[1]
    assert params == {"X-FOO": "1", "9A": None, "0--": None, "A": None}


def test_params_multiple_and_trailing_spaces():
    assert parse_path_argument("FROM:<a@example.org>   SIZE=1    BODY=7BIT   ", "FROM")[1] == {
        "SIZE": "1",
        "BODY": "7BIT",
    }
    assert parse_path_argument("TO:<c@example.net>   ", "TO") == ("c@example.net", {})


def test_param_value_may_hold_any_printable_but_equals():
    value = "!\"#$%&'()*+,-./09:;<>?@AZ[\\]^_`az{|}~"
    assert parse_path_argument(f"FROM:<a@example.org> ENVID={value}", "FROM")[1] == {"ENVID": value}


def test_params_with_utf8_values():
    params = parse_path_argument("TO:<c@example.net> ORCPT=utf-8;jürgen@bücher.example", "TO")[1]
    assert params == {"ORCPT": "utf-8;jürgen@bücher.example"}


def test_duplicate_param():
    assert reply_of("FROM:<a@example.org> SIZE=1 size=2", "FROM") == (501, "5.5.4", "Duplicate parameter: SIZE")
    assert reply_of("FROM:<> SMTPUTF8 SMTPUTF8", "FROM") == (501, "5.5.4", "Duplicate parameter: SMTPUTF8")


@pytest.mark.parametrize(
    "param, echoed",
    [
        ("SIZE=", "SIZE="),  # empty value
        ("=x", "=x"),  # no keyword
        ("=", "="),
        ("BO_DY=8BITMIME", "BO_DY=8BITMIME"),  # "_" is not in a keyword
        ("-SIZE=1", "-SIZE=1"),  # keyword starts with "-"
        ("SIZE=1=2", "SIZE=1=2"),  # "=" is not in a value
        ("BÖDY=8BIT", "B?DY=8BIT"),  # keywords are ASCII; echo is made printable ASCII
        ("SIZE=a\tb", "SIZE=a?b"),  # control characters are not in a value
        ("SIZE=\x7f", "SIZE=?"),
    ],
)
def test_bad_param_syntax(param, echoed):
    assert reply_of(f"FROM:<a@example.org> {param}", "FROM") == (501, "5.5.4", "Bad parameter syntax: " + echoed)


def test_space_inside_param_splits_it():
    # "BO DY" is, by the grammar, the two value-less parameters BO and DY; the
    # caller rejects them as unsupported.  "BODY =8BIT" leaves a bad "=8BIT".
    assert parse_path_argument("FROM:<a@example.org> BO DY", "FROM")[1] == {"BO": None, "DY": None}
    assert reply_of("FROM:<a@example.org> BODY =8BIT", "FROM") == (501, "5.5.4", "Bad parameter syntax: =8BIT")
    assert reply_of("FROM:<a@example.org> BO DY=", "FROM") == (501, "5.5.4", "Bad parameter syntax: DY=")


def test_bad_param_echo_is_made_printable():
    err = reply_of("FROM:<a@example.org> X=\x00\x1b[0m" + "y" * 200 + "=", "FROM")
    assert err[:2] == (501, "5.5.4")
    assert err[2].isascii() and err[2].isprintable()
    assert len(err[2]) < 150


def test_text_glued_to_path_is_bad_address():
    assert reply_of("FROM:<a@example.org>x", "FROM") == BAD_SENDER
    assert reply_of("TO:<c@example.net>SIZE=1", "TO") == BAD_RECIPIENT
    assert reply_of("TO:<postmaster>x", "TO") == BAD_RECIPIENT
    assert reply_of("TO:<c@example.net>>", "TO") == BAD_RECIPIENT


def test_tab_is_not_a_separator():
    assert reply_of("FROM:<a@example.org>\tSIZE=1", "FROM") == BAD_SENDER


# --- xtext (RFC 3461 4) ----------------------------------------------------------------


def test_decode_xtext_plain_and_escaped():
    assert decode_xtext("QQ314159") == "QQ314159"
    assert decode_xtext("rfc822;a+2Bb@example.org") == "rfc822;a+b@example.org"
    assert decode_xtext("a+3Db+20c") == "a=b c"
    assert decode_xtext("+2B+2B") == "++"
    assert decode_xtext("") == ""


def test_decode_xtext_utf8_octets():
    assert decode_xtext("j+C3+BCrgen") == "jürgen"


@pytest.mark.parametrize(
    "value",
    [
        "a+2b",  # lower-case hex
        "a+2",  # short escape
        "a+",  # bare plus
        "a+G0",  # not hex
        "a=b",  # literal equals
        "a b",  # space is outside 33-126
        "a\tb",
        "a\x7fb",
        "jürgen",  # non-ASCII must be escaped
        "+FF",  # not UTF-8
    ],
)
def test_decode_xtext_bad(value):
    with pytest.raises(AddressError) as info:
        decode_xtext(value)
    assert (info.value.code, info.value.enhanced) == (501, "5.5.4")
    assert info.value.text.startswith("Bad xtext: ")


# --- the one-match path for plain addresses ---------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prefork_esmtp.addresses import _parse_general  # noqa: E402


def _outcome(parse, argument: str, keyword: str):
    try:
        return parse(argument, keyword)
    except AddressError as exc:
        return exc.args


_PATH_TOKENS = ["FROM:", "TO:", "from:", " ", "<", ">", "@", ".", "a", "Z9", "-", "+", "é", "\"", "[",
                "]", "127.0.0.1", "IPv6:", ":", ",", "@r.example:", "postmaster", "<>", " SIZE=10",
                " BODY=8BITMIME", "=", "x" * 60, "y" * 200, "\u212a", "\u017f"]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_PATH_TOKENS), max_size=14).map("".join), st.sampled_from(["FROM", "TO"]))
def test_plain_path_match_agrees_with_the_full_grammar(argument, keyword):
    assert _outcome(parse_path_argument, argument, keyword) == _outcome(_parse_general, argument, keyword)


@pytest.mark.parametrize("argument", [
    "FROM:<a@b.example>", "FROM: <a.b+c@sub.b-c.example> SIZE=100 BODY=8BITMIME", "from:<A@B>",
    "FROM:<" + "l" * 64 + "@d.example>", "FROM:<" + "l" * 65 + "@d.example>",
    "FROM:<a@" + ".".join(["d" * 63] * 4) + ">",  # domain 255 octets: the path is too long
    "FROM:<a@b>x", "FROM:<a@b>SIZE=1", "FROM:<a@-b>", "FROM:<a..b@c>", "FROM:<a@b.>",
    "FROM:<\u212aelvin@b>", "FROM:<a@\u017f.example>",
])
def test_plain_path_examples_agree_with_the_full_grammar(argument):
    for keyword, text in (("FROM", argument), ("TO", argument.replace("FROM:", "TO:", 1).replace("from:", "to:", 1))):
        assert _outcome(parse_path_argument, text, keyword) == _outcome(_parse_general, text, keyword)


# --- the whole-argument match the engine tries first ------------------------------------------

from prefork_esmtp.addresses import common_sender, plain_recipient  # noqa: E402

_WHOLE = {"FROM": common_sender, "TO": plain_recipient}
_WHOLE_TOKENS = _PATH_TOKENS + ["l" * 64, "l" * 63, "d" * 63 + ".", "d" * 60, "\t", "\x00", "\u2028", ">x",
                                 " SIZE=", "0", "9" * 10, " BODY=7BIT", " BODY=BINARYMIME", " size=1", " BODY=8bitmime"]


def _whole_agrees(argument: str, keyword: str) -> None:
    """Where the whole-argument match takes an argument, both parsers take it the same way
    (a sender's SIZE and BODY included)."""
    m = _WHOLE[keyword](argument)
    if m is not None:
        params = {}
        if keyword == "FROM" and m.group(2) is not None:
            size, body = m.group(2, 3)
            params = {"SIZE": size} if body is None else {"SIZE": size, "BODY": body}
        assert _outcome(parse_path_argument, argument, keyword) == (m.group(1), params)
        assert _outcome(_parse_general, argument, keyword) == (m.group(1), params)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_WHOLE_TOKENS), max_size=16).map("".join), st.sampled_from(["FROM", "TO"]))
def test_whole_plain_match_agrees_with_the_parsers(argument, keyword):
    _whole_agrees(argument, keyword)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80), st.sampled_from(["FROM", "TO"]))
def test_whole_plain_match_agrees_on_any_text(text, keyword):
    for argument in (text, f"{keyword}:{text}", f"{keyword}:<{text}>"):
        _whole_agrees(argument, keyword)


_ATOM = st.text("abcXYZ019!#$%&'*+-/=?^_`{|}~", min_size=1, max_size=70)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


def _long_domain(length: int) -> str:
    """A domain of ``length`` octets, of labels of up to 63."""
    labels = []
    while length > 0:
        labels.append("d" * min(63, length))
        length -= len(labels[-1]) + 1
    return ".".join(labels)


# Locals and domains about the length limits, and ordinary ones.
_LOCALS = st.one_of(st.lists(_ATOM, min_size=1, max_size=3).map(".".join),
                    st.integers(60, 68).map(lambda n: "l" * n))
_DOMAINS = st.one_of(st.lists(_LABEL, min_size=1, max_size=5).map(".".join),
                     st.integers(180, 200).map(_long_domain))


@settings(max_examples=600, deadline=None)
@given(_LOCALS, _DOMAINS, st.sampled_from(["FROM", "TO", "from", "To"]), st.sampled_from(["", " ", "  "]))
def test_whole_plain_match_takes_every_plain_address_within_the_limits(local, domain, keyword, space):
    argument = f"{keyword}:{space}<{local}@{domain}>"
    fits = len(local) <= 64 and len(local) + len(domain) + 3 <= 256
    m = _WHOLE[keyword.upper()](argument)
    assert (m is not None) == fits
    if fits:
        assert m.group(1) == f"{local}@{domain}"
    _whole_agrees(argument, keyword.upper())


@settings(max_examples=300, deadline=None)
@given(_LOCALS, _DOMAINS, st.from_regex(r"[0-9]{1,22}", fullmatch=True),
       st.sampled_from(["", " BODY=8BITMIME", " BODY=7BIT", " BODY=BINARYMIME", " BODY=8bitmime", " BODY=X"]))
def test_sized_match_takes_the_common_esmtp_mail_within_the_limits(local, domain, size, body):
    argument = f"FROM:<{local}@{domain}> SIZE={size}{body}"
    fits = len(local) <= 64 and len(local) + len(domain) + 3 <= 256 and len(size) <= 20 \
        and body in ("", " BODY=8BITMIME", " BODY=7BIT", " BODY=BINARYMIME")
    m = common_sender(argument)
    assert (m is not None) == fits
    if fits:
        assert m.group(1, 2, 3) == (f"{local}@{domain}", size, body[6:] or None)
    _whole_agrees(argument, "FROM")


def test_whole_plain_match_examples():
    assert common_sender("FROM:<a@b.example>").group(1, 2, 3) == ("a@b.example", None, None)
    assert common_sender("FROM:<a@b> SIZE=1").group(1, 2, 3) == ("a@b", "1", None)
    assert common_sender("FROM:<a@b> SIZE=12 BODY=8BITMIME").group(1, 2, 3) == ("a@b", "12", "8BITMIME")
    assert plain_recipient("to: <A.b+c@B-c.example>").group(1) == "A.b+c@B-c.example"
    assert common_sender("FROM:<" + "l" * 64 + "@d.example>") is not None
    for argument in ["FROM:<" + "l" * 65 + "@d.example>", "FROM:<a@" + ".".join(["d" * 63] * 4) + ">",
                     "FROM:<a@b> SIZE=1 ", "FROM:<a@b> BODY=8BITMIME", "FROM:<a@b> SIZE=1 BODY=8bitmime",
                     "FROM:<a@b> SIZE=" + "9" * 21, "FROM:<a@b> SIZE=1 SMTPUTF8",
                     "FROM:<a@b>x", "FROM:<>", "TO:<a@b>", "FROM:<\u212aelvin@b>",
                     "FROM:<\"q\"@b>", "FROM:<a@[127.0.0.1]>", "FROM:<@r.example:a@b>", "FROM:\t<a@b>"]:
        assert common_sender(argument) is None, argument
    assert plain_recipient("TO:<postmaster>") is None
    path = "a" * 64 + "@" + ".".join(["d" * 63, "d" * 63, "d" * 61])  # 254 octets: the path is 256
    assert len(path) == 254
    assert plain_recipient(f"TO:<{path}>").group(1) == path
    assert plain_recipient(f"TO:<{path}d>") is None


# The whole-argument matchers as they were written with backtracking quantifiers: the possessive
# ones must take exactly the arguments these take, with the same groups.
_BACKTRACKING_PATH = (
    "<(?=[^@]{1,64}@)(?=[^>]{1,254}>)(([A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~]+(?:\\.[A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~]+)*)"
    "@([A-Za-z0-9](?:[A-Za-z0-9\\-]*[A-Za-z0-9])?(?:\\.[A-Za-z0-9](?:[A-Za-z0-9\\-]*[A-Za-z0-9])?)*))>"
)
_BACKTRACKING = {
    "FROM": re.compile(" *[Ff][Rr][Oo][Mm]: *" + _BACKTRACKING_PATH, re.ASCII).fullmatch,
    "TO": re.compile(" *[Tt][Oo]: *" + _BACKTRACKING_PATH, re.ASCII).fullmatch,
    "SIZED": re.compile(" *[Ff][Rr][Oo][Mm]: *" + _BACKTRACKING_PATH
                        + " SIZE=([0-9]{1,20})(?: BODY=(8BITMIME|7BIT|BINARYMIME))?", re.ASCII).fullmatch,
}
_LABEL_TOKENS = ["a", "Z9", "-", "--", ".", "..", "@", "<", ">", " ", "FROM:", "TO:", "from: ", "x" * 63, "l" * 64,
                 "d" * 63 + ".", "+", "=", "_", "\u212a", "\u0131", "\x7f", "\t", " SIZE=", "0", "9" * 20,
                 " BODY=8BITMIME", " BODY=7BIT", " BODY=BINARYMIME", "SIZE", "BODY"]


def _same_match(argument: str) -> None:
    old_m, new_m = _BACKTRACKING["TO"](argument), plain_recipient(argument)
    assert (old_m is None) == (new_m is None), ("TO", argument)
    if old_m is not None:
        assert new_m.group(1) == old_m.group(1)
    # the sender's one match takes what the plain and the sized pattern took, with their groups
    plain, sized, new_m = _BACKTRACKING["FROM"](argument), _BACKTRACKING["SIZED"](argument), common_sender(argument)
    assert (new_m is None) == (plain is None and sized is None), ("FROM", argument)
    if plain is not None:
        assert new_m.group(1, 2, 3) == (plain.group(1), None, None)
    if sized is not None:
        assert new_m.group(1, 2, 3) == sized.group(1, 4, 5)


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_LABEL_TOKENS), max_size=18).map("".join))
def test_possessive_matchers_take_what_the_backtracking_ones_took(argument):
    _same_match(argument)
    for prefix in ("FROM:<", "TO:<"):
        _same_match(prefix + argument)
        _same_match(prefix + argument + ">")


@settings(max_examples=1000, deadline=None)
@given(_LOCALS, _DOMAINS, st.sampled_from(["", ">", "> SIZE=1", "> SIZE=10 BODY=7BIT", "-", ".", "x>"]))
def test_possessive_matchers_agree_about_the_length_limits(local, domain, tail):
    for argument in (f"FROM:<{local}@{domain}{tail}", f"TO:<{local}@{domain}{tail}"):
        _same_match(argument)


def test_every_address_a_whole_argument_matcher_takes_is_printable():
    """The engine answers with the base MAIL/RCPT hook's reply without asking isprintable() of an
    address these matchers took: every code point at each kind of place in the path is tried."""
    templates = ["<{}@d>", "<a{}b@d>", "<a@{}>", "<a@b{}c>"]
    matchers = [(common_sender, "FROM:", ""), (plain_recipient, "TO:", ""), (common_sender, "FROM:", " SIZE=1")]
    taken = set()
    for code in range(0x110000):
        c = chr(code)
        for template in templates:
            path = template.format(c)
            for match, keyword, tail in matchers:
                m = match(keyword + path + tail)
                if m is not None:
                    assert m.group(1).isprintable() and m.group(1).isascii(), (hex(code), template)
                    taken.add(c)
    assert taken == set(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~.")
