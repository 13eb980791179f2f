"""The conversation over a real socket: greeting, EHLO, every command's reply,
syntax and sequence errors, paths and ESMTP parameters, RSET/QUIT, CONNECT refusals.

One server with the default settings serves most tests of this module (a
module-scoped fixture); each test finds its own session in the shared records.
"""

from __future__ import annotations

import smtplib

import pytest

from conftest import HOSTNAME, wait_for
from protocol_support import module_server, session_hooks, session_messages, session_records
from prefork_esmtp import __version__

DEFAULT_SIZE = 10 * 1024 * 1024


srv = module_server("conversation")


@pytest.fixture
def c(srv, client_for):
    """A raw client on the shared server, greeted (220 checked)."""
    return client_for(srv)


@pytest.fixture
def ehloed(c):
    code, lines = c.cmd("EHLO client.example")
    assert code == 250, lines
    return c


def mail_rcpt(c, sender="alice@example.org", recipient="bob@example.net"):
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{recipient}>")[0] == 250


# --- greeting, HELO, EHLO ------------------------------------------------------


def test_greeting_carries_hostname_and_no_enhanced_code(srv, client_for):
    c = client_for(srv, greet=False)
    assert c.reply() == (220, [f"{HOSTNAME} ESMTP Mail Server"])


def test_helo_reply_has_hostname_and_no_enhanced_code(c):
    assert c.cmd("HELO client.example") == (250, [f"{HOSTNAME} OK"])


def test_ehlo_first_line_and_extensions(c):
    code, lines = c.cmd("EHLO client.example")
    assert code == 250
    assert lines[0] == f"{HOSTNAME} client.example, pleased to meet you"
    keywords = lines[1:]
    assert sorted(keywords) == sorted(["PIPELINING", f"SIZE {DEFAULT_SIZE}", "8BITMIME", "SMTPUTF8",
                                       "ENHANCEDSTATUSCODES", "HELP", "CHUNKING", "BINARYMIME"])


def test_ehlo_with_smtplib(srv):
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        code, text = smtp.ehlo("client.example")
        assert code == 250
        assert text.split(b"\n")[0] == f"{HOSTNAME} client.example, pleased to meet you".encode()
        for ext in ("pipelining", "8bitmime", "smtputf8", "enhancedstatuscodes", "help"):
            assert smtp.has_extn(ext), ext
        assert smtp.esmtp_features["size"] == str(DEFAULT_SIZE)


def test_ehlo_and_helo_record_the_client_domain(srv, c):
    c.cmd("EHLO one.example")
    c.cmd("HELO two.example")
    records = session_records(srv, c)
    assert [(r["hook"], r["args"]) for r in records[1:]] == [("EHLO", ["one.example"]),
                                                            ("HELO", ["two.example"])]


# --- every command's default reply ----------------------------------------------


def test_default_replies_of_every_command_with_enhanced_codes(ehloed):
    c = ehloed
    assert c.cmd("MAIL FROM:<alice@example.org>") == (250, ["2.1.0 <alice@example.org>, sender ok"])
    assert c.cmd("RCPT TO:<bob@example.net>") == (250, ["2.1.5 <bob@example.net>, recipient ok"])
    assert c.cmd("DATA") == (354, ['Enter mail, end with "." on a line by itself'])
    c.send(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert c.reply() == (250, ["2.0.0 Message accepted for delivery"])
    assert c.cmd("VRFY bob") == (252, ["2.0.0 Cannot VRFY user; try RCPT to attempt delivery"])
    assert c.cmd("EXPN staff") == (502, ["5.5.1 Sorry we don't allow this operation"])
    assert c.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert c.cmd("RSET") == (250, ["2.0.0 OK"])
    assert c.cmd("HELP") == (214, [f"2.0.0 This is prefork-esmtp {__version__}"])
    assert c.cmd("FOO bar") == (500, ["5.5.2 Command unrecognized: FOO bar"])
    assert c.cmd("QUIT") == (221, ["2.0.0 Closing connection"])
    assert c.closed()


def test_help_passes_its_argument_to_the_hook(srv, c):
    assert c.cmd("HELP MAIL")[0] == 214
    assert c.cmd("HELP")[0] == 214
    helps = [r["args"] for r in session_records(srv, c) if r["hook"] == "HELP"]
    assert helps == [["MAIL"], [None]]


def test_vrfy_and_expn_pass_their_argument(srv, c):
    c.cmd("VRFY bob@example.net")
    c.cmd("EXPN list@example.net")
    records = [(r["hook"], r["args"]) for r in session_records(srv, c) if r["hook"] in ("VRFY", "EXPN")]
    assert records == [("VRFY", ["bob@example.net"]), ("EXPN", ["list@example.net"])]


def test_noop_takes_a_parameter(c):
    assert c.cmd("NOOP anything at all") == (250, ["2.0.0 OK"])


# --- case-insensitivity ----------------------------------------------------------


def test_commands_are_case_insensitive(srv, c):
    assert c.cmd("ehlo client.example")[0] == 250
    assert c.cmd("mail from:<alice@example.org>")[0] == 250
    assert c.cmd("RcPt To:<bob@example.net>")[0] == 250
    assert c.cmd("data")[0] == 354
    c.send(b"\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("nOoP") == (250, ["2.0.0 OK"])
    assert c.cmd("rset") == (250, ["2.0.0 OK"])
    assert c.cmd("hElO client.example")[0] == 250
    assert c.cmd("Quit")[0] == 221
    (message,) = session_messages(srv, c)
    assert (message["sender"], message["recipients"]) == ("alice@example.org", ["bob@example.net"])


# --- 500 unknown --------------------------------------------------------------


def test_unknown_command_goes_to_unknown_hook(srv, c):
    assert c.cmd("XYZZY plugh") == (500, ["5.5.2 Command unrecognized: XYZZY plugh"])
    unknown = [r["args"] for r in session_records(srv, c) if r["hook"] == "UNKNOWN"]
    assert unknown == [["XYZZY plugh"]]
    assert c.cmd("NOOP")[0] == 250


def test_empty_line_is_unknown(c):
    code, lines = c.cmd("")
    assert code == 500 and lines[0].startswith("5.5.2 ")


# --- 501 syntax errors ------------------------------------------------------------


@pytest.mark.parametrize("line, code, enhanced", [
    ("HELO", 501, "5.5.4"),
    ("EHLO", 501, "5.5.4"),
    ("EHLO   ", 501, "5.5.4"),
    ("VRFY", 501, "5.5.4"),
    ("EXPN", 501, "5.5.4"),
    ("RSET now", 501, "5.5.4"),
    ("QUIT now", 501, "5.5.4"),
    ("MAIL alice@example.org", 501, "5.5.4"),
    ("MAIL TO:<alice@example.org>", 501, "5.5.4"),
    ("MAIL FROM:alice@example.org", 501, "5.1.7"),
    ("MAIL FROM:<alice@example.org", 501, "5.1.7"),
    ("MAIL FROM:<alice>", 501, "5.1.7"),
    ("MAIL FROM:<postmaster>", 501, "5.1.7"),
    ("MAIL FROM:<alice@example.org>x", 501, "5.1.7"),
    ("MAIL FROM:<alice@example.org> SIZE=abc", 501, "5.5.4"),
    ("MAIL FROM:<alice@example.org> SIZE", 501, "5.5.4"),
    ("MAIL FROM:<alice@example.org> SMTPUTF8=yes", 501, "5.5.4"),
    ("MAIL FROM:<alice@example.org> SIZE=1 SIZE=2", 501, "5.5.4"),
])
def test_syntax_errors_get_501(ehloed, line, code, enhanced):
    got, lines = ehloed.cmd(line)
    assert (got, lines[0].split(" ")[0]) == (code, enhanced), lines
    # the session is in sync and no transaction started
    assert ehloed.cmd("RCPT TO:<bob@example.net>")[0] == 503


@pytest.mark.parametrize("line, enhanced", [
    ("RCPT bob@example.net", "5.5.4"),
    ("RCPT FROM:<bob@example.net>", "5.5.4"),
    ("RCPT TO:bob@example.net", "5.1.3"),
    ("RCPT TO:<>", "5.1.3"),
    ("RCPT TO:<bob@>", "5.1.3"),
    ("RCPT TO:<bob@[300.1.1.1]>", "5.1.3"),
])
def test_rcpt_syntax_errors_get_501(ehloed, line, enhanced):
    c = ehloed
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    code, lines = c.cmd(line)
    assert (code, lines[0].split(" ")[0]) == (501, enhanced), lines
    assert c.cmd("DATA")[0] == 554  # that recipient was not counted


def test_data_with_argument_is_501(ehloed):
    mail_rcpt(ehloed)
    code, lines = ehloed.cmd("DATA now")
    assert (code, lines[0].split(" ")[0]) == (501, "5.5.4")
    assert ehloed.cmd("DATA")[0] == 354
    ehloed.send(b"\r\n.\r\n")
    assert ehloed.reply()[0] == 250


# --- 503 out of sequence -----------------------------------------------------------


@pytest.mark.parametrize("line", ["MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.net>", "DATA"])
def test_transaction_commands_before_helo_get_503(c, line):
    code, lines = c.cmd(line)
    assert (code, lines[0].split(" ")[0]) == (503, "5.5.1"), lines


def test_rcpt_and_data_before_mail_get_503(ehloed):
    assert ehloed.cmd("RCPT TO:<bob@example.net>")[0:1] == (503,)
    code, lines = ehloed.cmd("DATA")
    assert (code, lines[0].split(" ")[0]) == (503, "5.5.1")


def test_nested_mail_gets_503(srv, ehloed):
    assert ehloed.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    code, lines = ehloed.cmd("MAIL FROM:<carol@example.org>")
    assert (code, lines[0].split(" ")[0]) == (503, "5.5.1")
    assert ehloed.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert ehloed.cmd("DATA")[0] == 354
    ehloed.send(b"\r\n.\r\n")
    assert ehloed.reply()[0] == 250
    (message,) = session_messages(srv, ehloed)
    assert message["sender"] == "alice@example.org"


# --- DATA without recipients ---------------------------------------------------


def test_data_without_recipients_after_mail(ehloed):
    assert ehloed.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    code, lines = ehloed.cmd("DATA")
    assert code in (503, 554) and lines[0].startswith("5.5.1 "), (code, lines)


def test_data_when_every_recipient_was_refused(srv, ehloed):
    c = ehloed
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<reject@example.net>") == (550, ["5.7.1 Rejected by the test handler"])
    code, lines = c.cmd("DATA")
    assert code in (503, 554) and lines[0].startswith("5.5.1 "), (code, lines)
    assert "DATA" not in session_hooks(srv, c)
    assert c.cmd("NOOP")[0] == 250  # no DATA section was started


def test_mail_refused_by_hook_starts_no_transaction(ehloed):
    c = ehloed
    assert c.cmd("MAIL FROM:<reject@example.org>")[0] == 550
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 503
    assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250  # not "nested MAIL"


# --- MAIL/RCPT paths through the server ------------------------------------------


@pytest.mark.parametrize("argument, sender", [
    ("FROM:<>", ""),
    ("FROM:<alice@example.org>", "alice@example.org"),
    ("FROM: <alice@example.org>", "alice@example.org"),
    ("from:<alice@example.org>", "alice@example.org"),
    ('FROM:<"john doe"@example.org>', '"john doe"@example.org'),
    ('FROM:<"a\\"b"@example.org>', '"a\\"b"@example.org'),
    ("FROM:<@relay.example,@hop.example:alice@example.org>", "alice@example.org"),
    ("FROM:<alice@[192.0.2.1]>", "alice@[192.0.2.1]"),
    ("FROM:<alice@[IPv6:2001:db8::1]>", "alice@[IPv6:2001:db8::1]"),
])
def test_mail_paths(srv, ehloed, argument, sender):
    code, lines = ehloed.cmd(f"MAIL {argument}")
    assert code == 250, lines
    assert lines == [f"2.1.0 <{sender}>, sender ok"]
    (mail,) = [r for r in session_records(srv, ehloed) if r["hook"] == "MAIL"]
    assert mail["args"][0] == sender


@pytest.mark.parametrize("argument, recipient", [
    ("TO:<postmaster>", "postmaster"),
    ("TO:<PostMaster>", "PostMaster"),
    ("TO:<postmaster@example.net>", "postmaster@example.net"),
    ("TO: <bob@example.net>", "bob@example.net"),
    ('TO:<"bob smith"@example.net>', '"bob smith"@example.net'),
    ("TO:<@hop1.example,@hop2.example:bob@example.net>", "bob@example.net"),
])
def test_rcpt_paths(srv, ehloed, argument, recipient):
    c = ehloed
    assert c.cmd("MAIL FROM:<>")[0] == 250
    code, lines = c.cmd(f"RCPT {argument}")
    assert code == 250, lines
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: paths\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["sender"] == ""
    assert message["recipients"] == [recipient]


# --- ESMTP parameters -------------------------------------------------------------


def test_size_within_limit_is_accepted_and_recorded(srv, ehloed):
    assert ehloed.cmd("MAIL FROM:<alice@example.org> SIZE=1000")[0] == 250
    (mail,) = [r for r in session_records(srv, ehloed) if r["hook"] == "MAIL"]
    assert mail["args"][1] == {"SIZE": "1000"}


def test_size_over_limit_is_552(srv, ehloed):
    code, lines = ehloed.cmd(f"MAIL FROM:<alice@example.org> SIZE={DEFAULT_SIZE + 1}")
    assert (code, lines[0].split(" ")[0]) == (552, "5.3.4"), lines
    assert "MAIL" not in session_hooks(srv, ehloed)
    assert ehloed.cmd("RCPT TO:<bob@example.net>")[0] == 503
    assert ehloed.cmd(f"MAIL FROM:<alice@example.org> SIZE={DEFAULT_SIZE}")[0] == 250


@pytest.mark.parametrize("value", ["7BIT", "8BITMIME", "8bitmime"])
def test_body_parameter_values(srv, ehloed, value):
    c = ehloed
    assert c.cmd(f"MAIL FROM:<alice@example.org> BODY={value}")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: 8bit \xc3\xa9\r\n\r\ncaf\xc3\xa9\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["mail_params"] == {"BODY": value}
    assert message["body"] == b"caf\xc3\xa9\r\n"


@pytest.mark.parametrize("value", ["BINARY", "9BIT"])
def test_bad_body_parameter_is_501(ehloed, value):
    code, lines = ehloed.cmd(f"MAIL FROM:<alice@example.org> BODY={value}")
    assert (code, lines[0].split(" ")[0]) == (501, "5.5.4"), lines


def test_smtputf8_with_utf8_addresses(srv, ehloed):
    c = ehloed
    assert c.cmd("MAIL FROM:<jos\u00e9@exampl\u00e9.org> SMTPUTF8".encode())[0] == 250
    assert c.cmd("RCPT TO:<\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a>".encode())[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: utf8\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["sender"] == "jos\u00e9@exampl\u00e9.org"
    assert message["recipients"] == ["\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a"]
    assert message["mail_params"] == {"SMTPUTF8": None}


def test_utf8_sender_without_smtputf8_is_553_5_6_7(srv, ehloed):
    code, lines = ehloed.cmd("MAIL FROM:<jos\u00e9@example.org>".encode())
    assert (code, lines[0].split(" ")[0]) == (553, "5.6.7"), lines
    assert "MAIL" not in session_hooks(srv, ehloed)


def test_utf8_recipient_without_smtputf8_is_553_5_6_7(srv, ehloed):
    assert ehloed.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    code, lines = ehloed.cmd("RCPT TO:<b\u00f6b@example.net>".encode())
    assert (code, lines[0].split(" ")[0]) == (553, "5.6.7"), lines
    assert "RCPT" not in session_hooks(srv, ehloed)


def test_smtputf8_with_smtplib(srv):
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as smtp:
        smtp.ehlo("client.example")
        refused = smtp.sendmail("jos\u00e9@example.org", ["b\u00f6b@example.net"],
                                "Subject: hi\r\n\r\nol\u00e1\r\n".encode(), mail_options=["SMTPUTF8"])
        assert refused == {}
    senders = [m["sender"] for m in srv.accepted_messages()]
    assert "jos\u00e9@example.org" in senders


@pytest.mark.parametrize("line", ["MAIL FROM:<alice@example.org> FOO=bar",
                                  "MAIL FROM:<alice@example.org> BODY=7BIT XYZ"])
def test_unknown_mail_parameter_is_555(ehloed, line):
    code, lines = ehloed.cmd(line)
    assert (code, lines[0].split(" ")[0]) == (555, "5.5.4"), lines


def test_unknown_rcpt_parameter_is_555(srv, ehloed):
    assert ehloed.cmd("MAIL FROM:<alice@example.org>")[0] == 250
    code, lines = ehloed.cmd("RCPT TO:<bob@example.net> FOO=bar")
    assert (code, lines[0].split(" ")[0]) == (555, "5.5.4"), lines
    assert ehloed.cmd("DATA")[0] == 554


# --- NUL and non-ASCII junk ------------------------------------------------------


@pytest.mark.parametrize("line", [b"NO\x00OP", b"\x00", b"HELO caf\xc3\xa9.example", b"\xff\xfe\xfd",
                                  b"NOOP \x80", b"NOOP\rRSET", b"MAIL FROM:<\xff@example.org> SMTPUTF8"])
def test_nul_and_non_ascii_junk_is_500(srv, ehloed, line):
    code, lines = ehloed.cmd(line)
    assert (code, lines[0].split(" ")[0]) == (500, "5.5.2"), lines
    assert ehloed.cmd("NOOP") == (250, ["2.0.0 OK"])
    assert not {"UNKNOWN", "MAIL", "HELO", "RSET"} & set(session_hooks(srv, ehloed)[2:])


# --- RSET and HELO/EHLO reset the transaction ------------------------------------


def test_rset_resets_the_transaction(srv, ehloed):
    c = ehloed
    mail_rcpt(c)
    assert c.cmd("RSET") == (250, ["2.0.0 OK"])
    assert c.cmd("RCPT TO:<bob@example.net>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    mail_rcpt(c, "carol@example.org", "dave@example.net")
    assert c.cmd("DATA")[0] == 354
    c.send(b"\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert (message["sender"], message["recipients"]) == ("carol@example.org", ["dave@example.net"])


@pytest.mark.parametrize("verb", ["HELO", "EHLO"])
def test_helo_and_ehlo_reset_the_transaction(srv, ehloed, verb):
    c = ehloed
    mail_rcpt(c)
    assert c.cmd(f"{verb} again.example")[0] == 250
    assert c.cmd("DATA")[0] == 503
    mail_rcpt(c, "carol@example.org", "dave@example.net")  # no "nested MAIL"
    assert c.cmd("DATA")[0] == 354
    c.send(b"\r\n.\r\n")
    assert c.reply()[0] == 250
    (message,) = session_messages(srv, c)
    assert message["recipients"] == ["dave@example.net"]


# --- QUIT ----------------------------------------------------------------------


def test_quit_replies_221_then_closes(srv, c):
    c.send(b"QUIT\r\n")
    assert c.reply() == (221, ["2.0.0 Closing connection"])
    assert c.closed(5)
    assert c.buf == b""


def test_quit_with_smtplib(srv):
    smtp = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    smtp.ehlo("client.example")
    assert smtp.quit()[0] == 221


# --- CONNECT refusals ----------------------------------------------------------------


def test_connect_554_serves_only_quit(start_server, client_for):
    srv = start_server(env={"PREFORK_TEST_CONNECT": "554"})
    c = client_for(srv, greet=False)
    assert c.reply() == (554, [f"{HOSTNAME} Go away"])
    for line in ("EHLO client.example", "HELO client.example", "MAIL FROM:<a@example.org>", "NOOP"):
        code, lines = c.cmd(line)
        assert (code, lines[0].split(" ")[0]) == (503, "5.5.1"), (line, lines)
    assert c.cmd("QUIT")[0] == 221
    assert c.closed(5)
    wait_for(lambda: "DISCONNECT" in srv.hooks(), 5, message="DISCONNECT")
    assert srv.hooks() == ["CONNECT", "QUIT", "DISCONNECT"]


def test_connect_421_closes(start_server, client_for):
    srv = start_server(env={"PREFORK_TEST_CONNECT": "421"})
    c = client_for(srv, greet=False)
    assert c.reply() == (421, [f"{HOSTNAME} Go away"])
    assert c.closed(5)
    c.close()
    # the process lives on and greets the next client the same way
    c2 = client_for(srv, greet=False)
    assert c2.reply()[0] == 421
    assert srv.proc.poll() is None


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662"])
def test_size_with_non_ascii_digits_is_501_not_a_crash(ehloed, value):
    """str.isdigit() is true for superscripts and Arabic-Indic digits; int() is not."""
    code, lines = ehloed.cmd(f"MAIL FROM:<alice@example.org> SMTPUTF8 SIZE={value}".encode())
    assert (code, lines[0].split(" ")[0]) == (501, "5.5.4"), lines
    assert ehloed.cmd("NOOP")[0] == 250
