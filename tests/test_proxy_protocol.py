"""The PROXY protocol on the real server, with raw sockets playing the load balancer.

No banner until a whole header came; the client after it is ``peer`` for the
handler, the per-IP limit, the logs and ``status``; a bad, missing, slow or
untrusted header closes the connection without a word; the header comes
before implicit TLS.  (HAProxy itself: test_haproxy.py.)
"""

from __future__ import annotations

import socket
import struct
import time

from conftest import HOSTNAME, Client, launch, wait_for
from master_support import cli, one_error_line, status_json
from protocol_support import nothing_arrives
from tls_support import client_context, pki  # noqa: F401 (pki is a fixture)

HANDLER = "proxy_handlers:ProxyRecorder"
SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_tcp4(src: str, sport: int, dst: str = "198.51.100.1", dport: int = 25, tlvs: bytes = b"") -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport) + tlvs
    return SIG + b"\x21\x11" + struct.pack("!H", len(block)) + block


def connect_records(srv) -> list[dict]:
    return [r for r in srv.records() if r["hook"] == "CONNECT"]


def facts_of(srv, port: int) -> dict:
    """The handler's view (peer, local, proxy) in the session of the client that claimed ``port``."""
    def find():
        for r in connect_records(srv):
            if r["args"][0][1:2] == [port]:
                return r["args"][2]
        return None
    return wait_for(find, 5, message=f"a CONNECT record for client port {port}")


def closed_without_reply(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True when the server closes (FIN or reset) having sent nothing at all."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def test_no_banner_before_the_header_then_the_client_is_the_peer(tmp_path):
    srv = launch(tmp_path, "--proxy-protocol", handler=HANDLER)
    try:
        c = Client(srv.connect())
        assert nothing_arrives(c, 0.5), "a banner was sent before the PROXY header"
        c.send(b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\n")
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example")[0] == 250
        facts = facts_of(srv, 40001)
        assert facts["peer"] == ["192.0.2.7", 40001]
        assert facts["local"] == ["198.51.100.1", 25]
        assert facts["proxy"]["version"] == 1 and facts["proxy"]["protocol"] == "TCP4"
        assert c.cmd("QUIT")[0] == 221
    finally:
        srv.stop()


def test_v2_header_and_smtp_in_one_packet_with_tlvs(tmp_path):
    """The client's first bytes behind the header in the same segment are kept for the session."""
    srv = launch(tmp_path, "--proxy-protocol", handler=HANDLER)
    try:
        tlvs = b"\x01\x00\x04smtp" + b"\x05\x00\x03id7" + b"\xe1\x00\x01z"
        c = Client(srv.connect())
        c.send(v2_tcp4("192.0.2.8", 40002, tlvs=tlvs) + b"EHLO client.example\r\n")
        assert c.reply()[0] == 220
        assert c.reply()[0] == 250
        c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        assert [code for code, _ in c.replies(3)] == [250, 250, 354]
        assert c.cmd(b"Subject: x\r\n\r\nhi\r\n.")[0] == 250
        facts = facts_of(srv, 40002)
        assert facts["peer"] == ["192.0.2.8", 40002]
        proxy = facts["proxy"]
        assert (proxy["version"], proxy["command"], proxy["alpn"], proxy["unique_id"]) == (2, "PROXY", "smtp".encode().hex(), b"id7".hex())
        assert [0xE1, b"z".hex()] in proxy["tlvs"]
        eom = [r for r in srv.records() if r["hook"] == "EOM"]
        assert eom and eom[-1]["args"][0]["peer"] == ["192.0.2.8", 40002]
        assert "client=192.0.2.8:40002" in srv.log()
    finally:
        srv.stop()


def test_v2_local_and_v1_unknown_keep_the_connections_own_addresses(tmp_path):
    srv = launch(tmp_path, "--proxy-protocol", handler=HANDLER)
    try:
        for header in (SIG + b"\x20\x00\x00\x00", b"PROXY UNKNOWN\r\n"):
            sock = srv.connect()
            c = Client(sock)
            c.send(header)
            assert c.reply()[0] == 220
            own = sock.getsockname()[1]
            facts = facts_of(srv, own)
            assert facts["peer"] == ["127.0.0.1", own]
            assert facts["local"] == ["127.0.0.1", srv.port]
            assert facts["proxy"]["command"] == ("LOCAL" if header.startswith(SIG) else "PROXY")
            c.close()
    finally:
        srv.stop()


def test_bad_missing_and_late_headers_close_without_a_reply(tmp_path):
    srv = launch(tmp_path, "--proxy-protocol", "--proxy-timeout", "3", handler=HANDLER)
    try:
        bad = [b"PROXY TCP4 192.0.2.01 198.51.100.1 1 25\r\n",  # leading zero
               b"EHLO client.example\r\n",  # a client speaking first: no header at all
               SIG + b"\x21\x11\x00\x08" + b"\x01" * 8,  # v2 TCP4 with an address block too short
               SIG + b"\x22\x11\x00\x00",  # command 2
               b"PROXY TCP4 192.0.2.1 198.51.100.1 1 25\n"]  # bare LF
        for data in bad:
            with srv.connect() as sock:
                sock.sendall(data)
                assert closed_without_reply(sock), data
        started = time.monotonic()
        with srv.connect() as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.1")  # and then nothing
            assert closed_without_reply(sock, 10)
        assert time.monotonic() - started >= 2.9
        log = wait_for(lambda: (t := srv.log()).count("bad PROXY header") >= 6 and t, 5,
                       message="six bad-header log lines")
        assert "not a PROXY protocol header" in log and "no complete PROXY header within 3s" in log
        assert not connect_records(srv), "CONNECT ran for a connection without a valid header"
        # DISCONNECT still runs, with the connection's own addresses (the balancer's, ours)
        ends = wait_for(lambda: (r := [x for x in srv.records() if x["hook"] == "DISCONNECT"]) and len(r) >= 6 and r,
                        5, message="six DISCONNECT records")
        assert all(r["args"][0]["peer"][0] == "127.0.0.1" and r["args"][0]["local"] == ["127.0.0.1", srv.port]
                   for r in ends), ends
    finally:
        srv.stop()


def test_after_the_header_the_idle_timeout_is_the_sessions_own(tmp_path):
    """The header's deadline does not outlive the header: a client may pause longer than
    proxy_timeout between commands, and still gets 421 at the idle timeout, longer or shorter."""
    srv = launch(tmp_path / "long", "--proxy-protocol", "--proxy-timeout", "3", "--timeout", "5",
                 "--error-sleep", "0", handler=HANDLER)
    try:
        c = Client(srv.connect())
        c.send(v2_tcp4("192.0.2.11", 40010))
        assert c.reply()[0] == 220
        time.sleep(3.6)  # the pause under test: past proxy_timeout, within the idle timeout
        assert c.cmd("EHLO client.example")[0] == 250
        started = time.monotonic()
        assert c.reply(timeout=10)[0] == 421
        assert 4.5 <= time.monotonic() - started < 8
    finally:
        srv.stop()
    srv = launch(tmp_path / "short", "--proxy-protocol", "--proxy-timeout", "3", "--timeout", "1",
                 "--error-sleep", "0", handler=HANDLER)
    try:
        c = Client(srv.connect())
        c.send(v2_tcp4("192.0.2.12", 40011))
        started = time.monotonic()
        assert c.reply()[0] == 220
        assert c.reply(timeout=10)[0] == 421
        assert 0.8 <= time.monotonic() - started < 2.5
    finally:
        srv.stop()


def test_untrusted_senders_are_closed_without_a_reply(tmp_path):
    srv = launch(tmp_path, "--proxy-protocol", "--proxy-trusted", "10.0.0.0/8",
                 "--proxy-trusted", "2001:db8::/32", handler=HANDLER)
    try:
        with srv.connect() as sock:
            sock.sendall(b"PROXY TCP4 192.0.2.7 198.51.100.1 40003 25\r\n")
            assert closed_without_reply(sock)
        wait_for(lambda: "not a trusted PROXY sender" in srv.log(), 5, message="the untrusted log line")
        assert not connect_records(srv)
    finally:
        srv.stop()
    srv = launch(tmp_path, "--proxy-protocol", "--proxy-trusted", "127.0.0.0/8", handler=HANDLER)
    try:
        c = Client(srv.connect())
        c.send(b"PROXY TCP4 192.0.2.7 198.51.100.1 40004 25\r\n")
        assert c.reply()[0] == 220
        assert facts_of(srv, 40004)["peer"] == ["192.0.2.7", 40004]
        c.close()
    finally:
        srv.stop()


def test_without_the_setting_a_proxy_line_is_just_an_unknown_command(tmp_path):
    """Never guessed: a server without proxy_protocol greets at once and refuses the line."""
    srv = launch(tmp_path, handler=HANDLER)
    try:
        c = Client(srv.connect())
        assert c.reply()[0] == 220
        code, _ = c.cmd(b"PROXY TCP4 192.0.2.7 198.51.100.1 40005 25")
        assert code == 500
        assert connect_records(srv)[0]["args"][2]["proxy"] is None
    finally:
        srv.stop()


def test_per_ip_limit_and_status_use_the_real_client(tmp_path):
    pidfile = tmp_path / "p.pid"
    srv = launch(tmp_path / "run", "--proxy-protocol", "--max-sessions-per-ip", "1", "--pidfile", str(pidfile),
                 mode=("--workers", "4"), handler=HANDLER)
    opened: list[Client] = []
    try:
        first = Client(srv.connect())
        opened.append(first)
        first.send(b"PROXY TCP4 192.0.2.7 198.51.100.1 40006 25\r\n")
        assert first.reply()[0] == 220
        second = Client(srv.connect())  # the same client behind the balancer: over the limit
        opened.append(second)
        second.send(b"PROXY TCP4 192.0.2.7 198.51.100.1 40007 25\r\n")
        assert second.reply() == (421, [f"4.7.0 {HOSTNAME} Error: too many connections from your address"])
        other = Client(srv.connect())  # another client through the same balancer address: served
        opened.append(other)
        other.send(b"PROXY TCP4 192.0.2.9 198.51.100.1 40008 25\r\n")
        assert other.reply()[0] == 220
        assert "too many sessions from 192.0.2.7" in srv.log()

        def peers() -> set[str]:
            return {w["peer"] for w in status_json(pidfile)["workers"] if w["state"] == "busy"}
        wait_for(lambda: {"192.0.2.7:40006", "192.0.2.9:40008"} <= peers(), 10,
                 message="status to show the real clients")
        assert not any(p.startswith("127.0.0.1") for p in peers())
    finally:
        for c in opened:
            c.close()
        srv.stop()


def test_header_comes_before_implicit_tls(tmp_path, pki):
    srv = launch(tmp_path, "--proxy-protocol", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                 handler=HANDLER, tls_listen=True)
    try:
        raw = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
        raw.sendall(v2_tcp4("192.0.2.10", 40009, dport=465))
        c = Client(client_context(pki).wrap_socket(raw, server_hostname=HOSTNAME))
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example")[0] == 250
        facts = facts_of(srv, 40009)
        assert facts["peer"] == ["192.0.2.10", 40009] and facts["tls"] is True
        assert c.cmd("QUIT")[0] == 221
        c.close()
    finally:
        srv.stop()


def test_settings_are_checked(tmp_path):
    assert "at least 3 seconds" in one_error_line(cli("configtest", "--proxy-timeout", "2"))
    assert "network" in one_error_line(cli("configtest", "--proxy-trusted", "10.0.0.0/33"))
    config = tmp_path / "c.toml"
    config.write_text('proxy_protocol = true\nproxy_trusted = ["10.0.0.0/8", "2001:db8::1"]\nproxy_timeout = 4\n')
    result = cli("configtest", "--config", str(config))
    assert result.returncode == 0, result.stderr
