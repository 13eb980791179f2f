"""The PROXY protocol parser, byte by byte: v1 lines, v2 binary headers, TLVs, and what is refused.

Each header is built here from the spec's layout (proxy-protocol.txt), not
with the parser's own helpers, so a mistake in one does not hide in the other.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time

import pytest

from prefork_esmtp.proxy import SIGNATURE_V2, V1_MAX, V2_MAX, ProxyError, crc32c, parse, receive, trusted

SIG = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"


def v2(command: int, family: int, block: bytes, version: int = 2) -> bytes:
    return SIG + bytes([version << 4 | command, family]) + struct.pack("!H", len(block)) + block


def tcp4(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def tcp6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def test_signature_is_the_specs():
    assert SIGNATURE_V2 == SIG


# -- version 1 ----------------------------------------------------------------------

def test_v1_tcp4_and_what_follows_is_left():
    data = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\nEHLO x\r\n"
    header, length = parse(data)
    assert data[length:] == b"EHLO x\r\n"
    assert (header.version, header.command, header.protocol) == (1, "PROXY", "TCP4")
    assert header.source == ("192.0.2.10", 56324)
    assert header.destination == ("198.51.100.1", 25)


def test_v1_tcp6_longest_line():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    data = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(data) == 104
    header, length = parse(data)
    assert length == 104 and header.source == (full, 65535)


def test_v1_tcp6_compressed():
    header, _ = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 25\r\n")
    assert header.source == ("2001:db8::1", 4000) and header.destination == ("2001:db8::2", 25)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff:f:: whatever we ignore 1 2\r\n"])
def test_v1_unknown_uses_the_connections_own_addresses(line):
    header, length = parse(line + b"QUIT\r\n")
    assert length == len(line)
    assert (header.protocol, header.source, header.destination) == ("UNKNOWN", None, None)


def test_v1_worst_case_107_octets_is_taken_108_is_not():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX == 107
    assert parse(line)[1] == 107
    with pytest.raises(ProxyError, match="without CRLF"):
        parse(line[:-2] + b"0\r\n")


def test_v1_oversized_without_crlf_is_refused_at_107_octets():
    data = b"PROXY TCP4 " + b"1" * 95
    assert len(data) == 106 and parse(data) is None  # could still end in CRLF
    with pytest.raises(ProxyError, match="without CRLF"):
        parse(data + b"1")


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",  # bare LF
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r 2\r\n",  # bare CR
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",  # trailing space
    b"PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",  # two spaces
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",  # a port missing
    b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",  # no such protocol
    b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",  # case matters
    b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",  # family mismatch
    b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
    b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",  # leading zero (octal confusion)
    b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",  # leading zero in a port
    b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",  # scope id
    b"PROXY TCP4 192.0.2.1 192.0.2.2 \xd9\xa1 2\r\n",  # a non-ASCII digit
    b"PROXY\r\n",
    b"PROXY \r\n",
])
def test_v1_malformed_lines_are_refused(data):
    with pytest.raises(ProxyError):
        parse(data)


@pytest.mark.parametrize("data", [b"EHLO client.example\r\n", b"GET / HTTP/1.0\r\n", b"\x16\x03\x01\x02\x00",
                                  b"PROXX", b"proxy tcp4", b"\r\n\r\n\x00\r\nQUIX\n"])
def test_wrong_signature_is_refused_at_the_first_wrong_octet(data):
    with pytest.raises(ProxyError, match="not a PROXY"):
        parse(data)


def test_a_bad_first_octet_is_refused_alone():
    """A client speaking SMTP first (or TLS) is caught at once, not after a timeout."""
    for first in (b"E", b"\x16", b"\0"):
        with pytest.raises(ProxyError):
            parse(first)


def test_v1_split_one_octet_at_a_time():
    data = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\n"
    for end in range(len(data)):
        assert parse(data[:end]) is None, end
    assert parse(data)[1] == len(data)


# -- version 2 ----------------------------------------------------------------------

def test_v2_tcp4():
    data = v2(1, 0x11, tcp4("192.0.2.10", "198.51.100.1", 56324, 25)) + b"EHLO x\r\n"
    header, length = parse(data)
    assert length == 16 + 12 and data[length:] == b"EHLO x\r\n"
    assert (header.version, header.command, header.protocol) == (2, "PROXY", "TCP4")
    assert header.source == ("192.0.2.10", 56324) and header.destination == ("198.51.100.1", 25)
    assert header.tlvs == ()


def test_v2_tcp6():
    header, length = parse(v2(1, 0x21, tcp6("2001:db8::10", "2001:db8::1", 40000, 465)))
    assert length == 16 + 36
    assert header.source == ("2001:db8::10", 40000) and header.destination == ("2001:db8::1", 465)


def test_v2_ipv4_mapped_address_is_kept_as_sent():
    header, _ = parse(v2(1, 0x21, tcp6("::ffff:192.0.2.7", "::1", 1, 2)))
    host, port = header.source
    assert ipaddress.ip_address(host) == ipaddress.ip_address("::ffff:192.0.2.7") and port == 1


def test_v2_local_health_check_ignores_any_address_block():
    """LOCAL: the proxy's own connection; the receiver must skip by the length, not assume zero."""
    header, length = parse(v2(0, 0x00, b""))
    assert (header.command, header.source, length) == ("LOCAL", None, 16)
    header, length = parse(v2(0, 0x11, tcp4("192.0.2.10", "198.51.100.1", 1, 2)))
    assert (header.command, header.source, length) == ("LOCAL", None, 28)
    header, length = parse(v2(0, 0x77, b"\xff" * 9))  # LOCAL ignores the family
    assert (header.command, header.source, length) == ("LOCAL", None, 25)


@pytest.mark.parametrize("family,block", [(0x00, b""), (0x12, tcp4("192.0.2.1", "192.0.2.2", 53, 53)),
                                          (0x22, tcp6("::1", "::2", 1, 2)), (0x31, b"/tmp/a".ljust(216, b"\0"))])
def test_v2_families_we_do_not_serve_fall_back_to_the_connection(family, block):
    header, length = parse(v2(1, family, block))
    assert length == 16 + len(block) and header.command == "PROXY" and header.source is None


@pytest.mark.parametrize("data,why", [
    (v2(1, 0x11, tcp4("192.0.2.1", "192.0.2.2", 1, 2), version=1), "version 1, not 2"),
    (v2(1, 0x11, tcp4("192.0.2.1", "192.0.2.2", 1, 2), version=3), "version 3"),
    (v2(2, 0x11, tcp4("192.0.2.1", "192.0.2.2", 1, 2)), "command 2"),
    (v2(0xF, 0x11, tcp4("192.0.2.1", "192.0.2.2", 1, 2)), "command 15"),
    (v2(1, 0x13, tcp4("192.0.2.1", "192.0.2.2", 1, 2)), "0x13"),
    (v2(1, 0x41, tcp4("192.0.2.1", "192.0.2.2", 1, 2)), "0x41"),
    (v2(1, 0x10, tcp4("192.0.2.1", "192.0.2.2", 1, 2)), "0x10"),
    (v2(1, 0x11, b"\x01" * 11), "11 address octets, 12 needed"),
    (v2(1, 0x21, b"\x01" * 35), "35 address octets, 36 needed"),
])
def test_v2_malformed_fixed_part_is_refused(data, why):
    with pytest.raises(ProxyError, match=why):
        parse(data)


def test_v2_wrong_version_is_refused_before_the_length_arrives():
    with pytest.raises(ProxyError, match="version 1"):
        parse(SIG + b"\x11")


def test_v2_oversized_is_refused_from_its_length_field_alone():
    fixed = SIG + b"\x21\x11" + struct.pack("!H", V2_MAX - 16 + 1)
    with pytest.raises(ProxyError, match="longer than"):
        parse(fixed)
    with pytest.raises(ProxyError, match="longer than"):
        parse(SIG + b"\x21\x11\xff\xff")
    assert parse(SIG + b"\x21\x11" + struct.pack("!H", V2_MAX - 16)) is None  # the largest, still coming


def test_v2_truncated_is_incomplete_at_every_length():
    data = v2(1, 0x21, tcp6("2001:db8::10", "2001:db8::1", 40000, 25) + tlv(0x05, b"id-1"))
    for end in range(len(data)):
        assert parse(data[:end]) is None, end
    assert parse(data)[1] == len(data)


def test_v2_tlvs_alpn_authority_unique_id_ssl_netns_custom():
    ssl_value = (b"\x07" + struct.pack("!I", 0) + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client.example")
                 + tlv(0x23, b"TLS_AES_256_GCM_SHA384") + tlv(0x24, b"RSA-SHA256") + tlv(0x25, b"RSA2048")
                 + tlv(0x99, b"unknown sub-type, skipped"))
    tlvs = (tlv(0x01, b"smtp") + tlv(0x02, b"mx.example.org") + tlv(0x04, b"\0\0\0") + tlv(0x05, b"abc" * 10)
            + tlv(0x20, ssl_value) + tlv(0x30, b"blue") + tlv(0xE1, b"\x01\x02") + tlv(0x04, b""))
    header, length = parse(v2(1, 0x11, tcp4("192.0.2.10", "198.51.100.1", 1, 25) + tlvs) + b"QUIT\r\n")
    assert length == 16 + 12 + len(tlvs)
    assert header.alpn == b"smtp" and header.authority == "mx.example.org"
    assert header.unique_id == b"abc" * 10 and header.netns == "blue"
    assert header.ssl == {"client": 7, "verify": 0, "version": "TLSv1.3", "cn": "client.example",
                          "cipher": "TLS_AES_256_GCM_SHA384", "sig_alg": "RSA-SHA256", "key_alg": "RSA2048"}
    assert [kind for kind, _ in header.tlvs] == [0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xE1, 0x04]
    assert (0xE1, b"\x01\x02") in header.tlvs
    facts = header.facts()
    assert facts["source"] == ("192.0.2.10", 1) and facts["alpn"] == b"smtp" and facts["ssl"]["cn"] == "client.example"


def test_v2_tlvs_after_a_local_header_are_read_too():
    header, _ = parse(v2(0, 0x00, tlv(0x05, b"check-1")))
    assert header.command == "LOCAL" and header.unique_id == b"check-1"


@pytest.mark.parametrize("tlvs,why", [
    (b"\x01", "cut short: 1 octets left"),
    (b"\x01\x00", "cut short: 2 octets left"),
    (b"\x01\x00\x05abcd", "type 0x01 of 5 octets runs past"),
    (tlv(0x01, b"ok") + b"\x02\xff\xff", "type 0x02 of 65535 octets runs past"),
    (tlv(0x20, b"\x01\0\0\0"), "SSL TLV of 4 octets"),
    (tlv(0x20, b"\x01\0\0\0\0" + b"\x21\x00\x09TLS"), "SSL sub-TLV type 0x21 of 9 octets runs past"),
    (tlv(0x20, b"\x01\0\0\0\0" + b"\x21\x00"), "SSL sub-TLV cut short"),
    (tlv(0x05, b"x" * 129), "UNIQUE_ID TLV of 129 octets"),
    (tlv(0x03, b"\0\0\0"), "CRC32C TLV of 3 octets"),
])
def test_v2_tlvs_with_bad_lengths_are_refused(tlvs, why):
    with pytest.raises(ProxyError, match=why):
        parse(v2(1, 0x11, tcp4("192.0.2.10", "198.51.100.1", 1, 25) + tlvs))


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4's check value for CRC32C


def _with_crc(block_before: bytes, block_after: bytes = b"") -> bytes:
    body = block_before + tlv(0x03, b"\0\0\0\0") + block_after
    data = v2(1, 0x11, body)
    at = 16 + len(block_before) + 3
    return data[:at] + struct.pack("!I", crc32c(data)) + data[at + 4:]


def test_v2_crc32c_checked():
    data = _with_crc(tcp4("192.0.2.10", "198.51.100.1", 1, 25), tlv(0x05, b"id"))
    header, _ = parse(data)
    assert header.unique_id == b"id"
    tampered = data[:16] + socket.inet_aton("192.0.2.11") + data[20:]
    with pytest.raises(ProxyError, match="CRC32C"):
        parse(tampered)


# -- off a real socket: never a byte past the header ---------------------------------

def _pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


@pytest.fixture(params=["python", "kernel"])
def read_timeout(request):
    """How receive() bounds its reads: the socket's Python timeout, or (as a worker does) SO_RCVTIMEO."""
    if request.param == "python":
        return lambda server: None

    def kernel(server: socket.socket):
        server.setblocking(True)

        def settimeout(seconds: float) -> None:
            micro = max(1, int(seconds * 1e6))
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                              struct.pack("@ll", micro // 1_000_000, micro % 1_000_000))
        return settimeout
    return kernel


def test_receive_leaves_the_clients_first_bytes_in_the_socket(read_timeout):
    client, server = _pair()
    with client, server:
        client.sendall(v2(1, 0x11, tcp4("192.0.2.10", "198.51.100.1", 56324, 25)) + b"\x16\x03\x01TLS hello")
        header = receive(server, 5, read_timeout(server))
        assert header.source == ("192.0.2.10", 56324)
        server.settimeout(5)
        assert server.recv(100) == b"\x16\x03\x01TLS hello"


def test_receive_one_octet_at_a_time(read_timeout):
    client, server = _pair()
    data = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\n"
    with client, server:
        def drip() -> None:
            for i in range(len(data)):
                client.sendall(data[i:i + 1])
                threading.Event().wait(0.005)
            client.sendall(b"EHLO x\r\n")

        sender = threading.Thread(target=drip)
        sender.start()
        try:
            header = receive(server, 10, read_timeout(server))
        finally:
            sender.join(10)
        assert header.source == ("192.0.2.10", 56324)
        server.settimeout(5)
        rest = b""
        while len(rest) < 8:  # bounded: the sender has sent exactly these 8
            chunk = server.recv(100)
            assert chunk
            rest += chunk
        assert rest == b"EHLO x\r\n"


def test_receive_times_out_on_a_partial_header(read_timeout):
    client, server = _pair()
    with client, server:
        client.sendall(b"PROXY TCP4 192.0.2.10")
        started = time.monotonic()
        with pytest.raises(ProxyError, match=r"no complete PROXY header within 0.3s \(21 octets came\)"):
            receive(server, 0.3, read_timeout(server))
        assert 0.25 <= time.monotonic() - started < 3


def test_receive_keeps_one_deadline_for_a_header_in_pieces(read_timeout):
    """A proxy sending a piece now and then cannot stretch the deadline: each wait is what is left."""
    client, server = _pair()
    data = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 25\r\n"
    stop = threading.Event()
    with client, server:
        def drip() -> None:
            for i in range(len(data) - 1):  # never the last octet
                if stop.wait(0.2):
                    return
                client.sendall(data[i:i + 1])

        sender = threading.Thread(target=drip)
        sender.start()
        started = time.monotonic()
        try:
            with pytest.raises(ProxyError, match=r"no complete PROXY header within 1s"):
                receive(server, 1, read_timeout(server))
        finally:
            stop.set()
            sender.join(10)
        assert 0.9 <= time.monotonic() - started < 1.5


def test_receive_refuses_a_client_that_closes_early_or_speaks_smtp():
    client, server = _pair()
    with client, server:
        client.sendall(SIG[:5])
        client.shutdown(socket.SHUT_WR)
        with pytest.raises(ProxyError, match="closed after 5 octets"):
            receive(server, 5)
    client, server = _pair()
    with client, server:
        client.sendall(b"EHLO me\r\n")
        with pytest.raises(ProxyError, match="not a PROXY"):
            receive(server, 5)


# -- trusted senders ------------------------------------------------------------------

def test_trusted_networks():
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "2001:db8::/32", "192.0.2.5")]
    assert trusted("10.1.2.3", nets) and trusted("192.0.2.5", nets) and trusted("2001:db8::7", nets)
    assert trusted("::ffff:10.9.9.9", nets)  # an IPv4 peer on a dual-stack socket
    assert not trusted("192.0.2.6", nets) and not trusted("11.0.0.1", nets) and not trusted("2001:db9::1", nets)
    assert not trusted("not-an-address", nets)
    assert trusted("203.0.113.9", [])  # none listed: any peer
