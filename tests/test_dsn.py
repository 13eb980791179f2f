"""DSN parameters (RFC 3461): MAIL RET/ENVID and RCPT NOTIFY/ORCPT are
parsed, validated (bad values 501, not 555) and handed to the handler; DSN is
advertised only when the handler says it supports DSN (recorder:DSNRecorder).
"""

from __future__ import annotations

import pytest

from conftest import Client
from protocol_support import module_server
from tls_support import ehlo_keywords, records_of


dsn_srv = module_server("dsn", "--error-sleep", "0", handler="recorder:DSNRecorder")


plain_srv = module_server("nodsn", "--error-sleep", "0")


def connect(srv) -> tuple[Client, list[str]]:
    c = Client(srv.connect())
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO client.example")
    assert code == 250
    return c, lines


@pytest.fixture
def c(dsn_srv):
    client, _ = connect(dsn_srv)
    yield client
    client.close()


def test_dsn_advertised_only_when_the_handler_supports_it(dsn_srv, plain_srv):
    for srv, offered in ((dsn_srv, True), (plain_srv, False)):
        client, lines = connect(srv)
        try:
            assert ("DSN" in ehlo_keywords(lines)) is offered
        finally:
            client.close()


def send_with_dsn(c: Client) -> None:
    assert c.cmd("MAIL FROM:<alice@example.org> RET=HDRS ENVID=QQ314159+2Bx") == (250, ["2.1.0 <alice@example.org>, sender ok"])
    assert c.cmd("RCPT TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bdsn@example.net")[0] == 250
    assert c.cmd("RCPT TO:<carol@example.net> NOTIFY=NEVER")[0] == 250
    assert c.cmd("RCPT TO:<dave@example.net> notify=delay orcpt=RFC822;dave@example.net")[0] == 250
    assert c.cmd("RCPT TO:<erin@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: dsn\r\n\r\nbody\r\n.")[0] == 250


EXPECTED_RCPT_PARAMS = [
    {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;bob+2Bdsn@example.net"},
    {"NOTIFY": "NEVER"},
    {"NOTIFY": "delay", "ORCPT": "RFC822;dave@example.net"},
    {},
]


@pytest.mark.parametrize("which", ["dsn_srv", "plain_srv"])
def test_dsn_parameters_reach_the_handler(request, which):
    """Handed over as written, whether or not the handler advertises DSN (never 555)."""
    srv = request.getfixturevalue(which)
    c, _ = connect(srv)
    try:
        send_with_dsn(c)
        records = records_of(srv, c)
    finally:
        c.close()
    [mail] = [r for r in records if r["hook"] == "MAIL"]
    assert mail["args"] == ["alice@example.org", {"RET": "HDRS", "ENVID": "QQ314159+2Bx"}]
    rcpts = [r["args"] for r in records if r["hook"] == "RCPT"]
    assert [args[1] for args in rcpts] == EXPECTED_RCPT_PARAMS, "rcpt_params is each RCPT's own"
    [eom] = [r for r in records if r["hook"] == "EOM"]
    assert eom["mail_params"] == {"RET": "HDRS", "ENVID": "QQ314159+2Bx"}
    assert eom["recipients_params"] == EXPECTED_RCPT_PARAMS


def test_ret_full_and_lower_case(dsn_srv, c):
    assert c.cmd("MAIL FROM:<a@example.org> ret=full")[0] == 250
    assert c.cmd("RCPT TO:<b@example.net>")[0] == 250
    mail = [r for r in records_of(dsn_srv, c) if r["hook"] == "MAIL"]
    assert mail[-1]["args"][1] == {"RET": "full"}


def bad(name: str, value: str) -> str:
    if name.endswith(":"):
        return f"5.5.4 Bad {name} {value}"
    return f"5.5.4 Bad {name} parameter: {value}"


@pytest.mark.parametrize("params, name, value", [
    ("RET=FOO", "RET", "FOO"),
    ("RET=", "parameter syntax:", "RET="),  # an empty value is bad ESMTP syntax (RFC 5321)
    ("RET", "RET", "None"),
    ("ENVID=a+zz", "ENVID", "a+zz"),
    ("ENVID=a+2b", "ENVID", "a+2b"),  # hex must be upper case
    ("ENVID=" + "x" * 101, "ENVID", "x" * 101),
    ("ENVID", "ENVID", "None"),
])
def test_bad_mail_dsn_values_501(dsn_srv, c, params, name, value):
    assert c.cmd(f"MAIL FROM:<a@example.org> {params}") == (501, [bad(name, value)])
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250, "no transaction was started"


@pytest.mark.parametrize("params, name, value", [
    ("NOTIFY=BOGUS", "NOTIFY", "BOGUS"),
    ("NOTIFY=NEVER,SUCCESS", "NOTIFY", "NEVER,SUCCESS"),
    ("NOTIFY=", "parameter syntax:", "NOTIFY="),
    ("NOTIFY=SUCCESS,,FAILURE", "NOTIFY", "SUCCESS,,FAILURE"),
    ("NOTIFY", "NOTIFY", "None"),
    ("ORCPT=bob@example.net", "ORCPT", "bob@example.net"),
    ("ORCPT=rfc822;", "ORCPT", "rfc822;"),
    ("ORCPT=;bob@example.net", "ORCPT", ";bob@example.net"),
    ("ORCPT=rfc822;bob+zz@example.net", "ORCPT", "rfc822;bob+zz@example.net"),
    ("ORCPT=rfc_822;bob@example.net", "ORCPT", "rfc_822;bob@example.net"),
])
def test_bad_rcpt_dsn_values_501(dsn_srv, c, params, name, value):
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd(f"RCPT TO:<b@example.net> {params}") == (501, [bad(name, value)])
    assert c.cmd("RCPT TO:<b@example.net>")[0] == 250
    rcpts = [r["args"] for r in records_of(dsn_srv, c) if r["hook"] == "RCPT"]
    assert rcpts == [["b@example.net", {}]], "the refused RCPT never reached the handler"


def test_unknown_parameters_still_555(c):
    assert c.cmd("MAIL FROM:<a@example.org> FOO=bar") == (555, ["5.5.4 Unsupported parameter: FOO"])
    assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<b@example.net> RET=HDRS") == (555, ["5.5.4 Unsupported parameter: RET"]), \
        "RET belongs to MAIL"
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<a@example.org> NOTIFY=NEVER") == (555, ["5.5.4 Unsupported parameter: NOTIFY"])
