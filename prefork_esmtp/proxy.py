"""The PROXY protocol (HAProxy's proxy-protocol.txt), versions 1 and 2: who the client really is.

A load balancer in front of us opens the TCP connection, so the socket's
peer is the balancer.  With ``proxy_protocol`` on, the balancer first sends
one header naming the client's address; this module parses it (:func:`parse`,
pure bytes in, a :class:`ProxyHeader` out) and takes it off a socket without
consuming one byte past it (:func:`receive`), so the client's first bytes,
or its TLS ClientHello on an implicit-TLS listener, stay where they are.
Anything that is not exactly a header is a :class:`ProxyError`: the caller
closes the connection without a reply (the spec's "abort the connection").
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Version 2 starts with these 12 octets (they contain a NUL and cannot start a v1 line).
SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest v1 line, CRLF included (the spec's worst case, "PROXY UNKNOWN" with IPv6 fields).
V1_MAX = 107
#: The longest v2 header we take: the 16-octet fixed part plus addresses and TLVs.  The format
#: allows 65,551; what HAProxy sends (addresses, ALPN, authority, a 128-octet unique id, SSL
#: facts with the client certificate's CN) fits well within this bound.
V2_MAX = 4096
_V2_FIXED = struct.Struct("!12sBBH")
_PORTS = struct.Struct("!HH")

# v2 TLV types and SSL sub-types (section 2.2)
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30
_SSL_SUBTYPES = {0x21: "version", 0x22: "cn", 0x23: "cipher", 0x24: "sig_alg", 0x25: "key_alg"}
UNIQUE_ID_MAX = 128

# v2 family-and-transport octet: the combinations the spec defines, their names, the length
# of their address block, and whether we take the addresses (TCP only: we serve SMTP over TCP;
# the others fall back to the connection's own addresses, as the spec allows).
_FAMILIES: dict[int, tuple[str, int, bool]] = {
    0x00: ("UNSPEC", 0, False),
    0x11: ("TCP4", 12, True),
    0x12: ("UDP4", 12, False),
    0x21: ("TCP6", 36, True),
    0x22: ("UDP6", 36, False),
    0x31: ("UNIX_STREAM", 216, False),
    0x32: ("UNIX_DGRAM", 216, False),
}


class ProxyError(ValueError):
    """Not a complete, valid PROXY protocol header (or none came in time); the message says why."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``source`` and ``destination`` are the client's and the address it
    connected to, or None when the header does not give them (v1 UNKNOWN, v2
    LOCAL, a family other than TCP over IPv4/IPv6): then the connection's own
    addresses stand.
    """

    version: int  #: 1 or 2
    command: str  #: "PROXY", or "LOCAL" (v2: the proxy's own connection, e.g. a health check)
    protocol: str  #: v1: TCP4, TCP6 or UNKNOWN; v2: TCP4, TCP6, UDP4, UDP6, UNIX_STREAM, UNIX_DGRAM, UNSPEC
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    netns: str | None = None
    ssl: dict[str, Any] | None = None
    #: every v2 TLV as (type, value), in order, those named above included (custom types 0xE0-0xEF too)
    tlvs: tuple[tuple[int, bytes], ...] = field(default_factory=tuple)

    def facts(self) -> dict[str, Any]:
        """The header as the handler's ``proxy`` session fact (a plain dict)."""
        return {
            "version": self.version, "command": self.command, "protocol": self.protocol,
            "source": self.source, "destination": self.destination, "alpn": self.alpn,
            "authority": self.authority, "unique_id": self.unique_id, "netns": self.netns,
            "ssl": dict(self.ssl) if self.ssl is not None else None, "tlvs": list(self.tlvs),
        }


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse the header at the start of ``data``: the header and its length in octets.

    None when ``data`` is a proper beginning of a header and more octets are
    needed; :class:`ProxyError` as soon as ``data`` cannot begin a valid one.
    Octets after the header (the client's first bytes) are left alone.
    """
    if not data:
        return None
    if data[0] == SIGNATURE_V2[0]:
        return _parse_v2(data)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyError("not a PROXY protocol header")


# -- version 1: one text line ----------------------------------------------------

def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    head = data[:len(V1_PREFIX)]
    if head != V1_PREFIX[:len(head)]:
        raise ProxyError("not a PROXY protocol header")
    lf = data.find(b"\n", 0, V1_MAX)
    if lf < 0:
        if len(data) >= V1_MAX:
            raise ProxyError(f"v1 line without CRLF in its first {V1_MAX} octets")
        return None
    if data[lf - 1] != 0x0D:
        raise ProxyError("v1 line ended by a bare LF")
    line = data[:lf - 1]
    if 13 in line or not line.isascii():  # CR
        raise ProxyError("v1 line with a bare CR or a non-ASCII octet")
    fields = line.decode("ascii").split(" ")
    if len(fields) < 2 or fields[0] != "PROXY":
        raise ProxyError("v1 line without a protocol")
    protocol = fields[1]
    if protocol == "UNKNOWN":  # the spec: ignore whatever follows up to the CRLF
        return ProxyHeader(1, "PROXY", "UNKNOWN"), lf + 1
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1 protocol {protocol[:10]!r} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyError("v1 line without exactly two addresses and two ports")
    version = 4 if protocol == "TCP4" else 6
    source = (_v1_address(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], version), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", protocol, source, destination), lf + 1


def _v1_address(text: str, version: int) -> str:
    """An address in its canonical text form for the announced family (no leading zeros, no scope)."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        address = None
    if address is None or address.version != version or "%" in text \
            or (version == 4 and str(address) != text):
        raise ProxyError(f"v1 address {text[:40]!r} is not a canonical IPv{version} address")
    return str(address)


def _v1_port(text: str) -> int:
    if not (text.isdigit() and len(text) <= 5 and (text == "0" or text[0] != "0")) or int(text) > 65535:
        raise ProxyError(f"v1 port {text[:10]!r} is not a decimal 0 to 65535 without leading zeros")
    return int(text)


# -- version 2: binary ------------------------------------------------------------

def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    head = data[:len(SIGNATURE_V2)]
    if head != SIGNATURE_V2[:len(head)]:
        raise ProxyError("not a PROXY protocol header (bad v2 signature)")
    if len(data) < _V2_FIXED.size:
        if len(data) > 12 and data[12] >> 4 != 2:  # say so as early as possible
            raise ProxyError(f"v2 signature with version {data[12] >> 4}, not 2")
        return None
    _, version_command, family, length = _V2_FIXED.unpack_from(data)
    if version_command >> 4 != 2:
        raise ProxyError(f"v2 signature with version {version_command >> 4}, not 2")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyError(f"v2 command {command} is neither LOCAL nor PROXY")
    if family not in _FAMILIES and command == 1:  # LOCAL ignores the family (a proxy's own connection)
        raise ProxyError(f"v2 address family and protocol 0x{family:02x} is not defined")
    total = _V2_FIXED.size + length
    if total > V2_MAX:
        raise ProxyError(f"v2 header of {total} octets is longer than {V2_MAX}")
    if len(data) < total:
        return None
    block = data[_V2_FIXED.size:total]
    if family not in _FAMILIES:  # LOCAL with a family we cannot size: skip its block whole
        return ProxyHeader(2, "LOCAL", "UNSPEC"), total
    protocol, address_length, usable = _FAMILIES[family]
    if len(block) < address_length:
        raise ProxyError(f"v2 {protocol} header with {len(block)} address octets, {address_length} needed")
    # no TLVs (what send-proxy-v2 sends by default): nothing to walk
    values = _tlvs(block, address_length, data[:total]) if len(block) > address_length else {}
    if command == 0:  # LOCAL: the proxy's own connection; its address block means nothing
        return ProxyHeader(2, "LOCAL", protocol, **values), total
    source = destination = None
    if usable:
        if protocol == "TCP4":  # dotted quad, as ipaddress writes it, in one C call each
            hosts = (socket.inet_ntop(socket.AF_INET, block[0:4]), socket.inet_ntop(socket.AF_INET, block[4:8]))
            ports = _PORTS.unpack_from(block, 8)
        else:  # ipaddress's RFC 5952 text (the C library's differs for IPv4-mapped addresses)
            hosts = (str(ipaddress.IPv6Address(block[0:16])), str(ipaddress.IPv6Address(block[16:32])))
            ports = _PORTS.unpack_from(block, 32)
        source, destination = (hosts[0], ports[0]), (hosts[1], ports[1])
    return ProxyHeader(2, "PROXY", protocol, source, destination, **values), total


def _split_tlvs(block: bytes, start: int, what: str) -> list[tuple[int, bytes]]:
    """The (type, value) pairs of a TLV sequence; each length is checked against what is left."""
    out = []
    pos, end = start, len(block)
    while pos < end:  # each round advances by at least 3 octets
        if end - pos < 3:
            raise ProxyError(f"v2 {what} cut short: {end - pos} octets left, a TLV needs 3")
        kind, length = block[pos], int.from_bytes(block[pos + 1:pos + 3], "big")
        pos += 3
        if length > end - pos:
            raise ProxyError(f"v2 {what} type 0x{kind:02x} of {length} octets runs past the header")
        out.append((kind, block[pos:pos + length]))
        pos += length
    return out


def _tlvs(block: bytes, start: int, header: bytes) -> dict[str, Any]:
    """The TLVs after the address block, checked, with those we know decoded."""
    tlvs = _split_tlvs(block, start, "TLV")
    values: dict[str, Any] = {"tlvs": tuple(tlvs)}
    offset = _V2_FIXED.size + start  # where the TLVs start in the whole header
    for kind, value in tlvs:
        offset += 3
        if kind == PP2_TYPE_ALPN:
            values["alpn"] = value
        elif kind == PP2_TYPE_AUTHORITY:
            values["authority"] = value.decode("utf-8", "replace")
        elif kind == PP2_TYPE_CRC32C:
            if len(value) != 4:
                raise ProxyError(f"v2 CRC32C TLV of {len(value)} octets, not 4")
            zeroed = header[:offset] + b"\0\0\0\0" + header[offset + 4:]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                raise ProxyError("v2 header fails its CRC32C checksum")
        elif kind == PP2_TYPE_UNIQUE_ID:
            if len(value) > UNIQUE_ID_MAX:
                raise ProxyError(f"v2 UNIQUE_ID TLV of {len(value)} octets, at most {UNIQUE_ID_MAX}")
            values["unique_id"] = value
        elif kind == PP2_TYPE_SSL:
            values["ssl"] = _ssl(value)
        elif kind == PP2_TYPE_NETNS:
            values["netns"] = value.decode("ascii", "replace")
        offset += len(value)
    return values


def _ssl(value: bytes) -> dict[str, Any]:
    """The SSL TLV: client flags, verify result, and its sub-TLVs (version, cn, cipher, sig_alg, key_alg)."""
    if len(value) < 5:
        raise ProxyError(f"v2 SSL TLV of {len(value)} octets, at least 5 needed")
    client, verify = struct.unpack_from("!BI", value)
    facts: dict[str, Any] = {"client": client, "verify": verify, "version": None, "cn": None,
                             "cipher": None, "sig_alg": None, "key_alg": None}
    for kind, sub in _split_tlvs(value, 5, "SSL sub-TLV"):
        name = _SSL_SUBTYPES.get(kind)
        if name is not None:
            facts[name] = sub.decode("utf-8", "replace")
    return facts


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B), the v2 header's optional checksum."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for octet in data:
        crc = table[(crc ^ octet) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- off the socket -----------------------------------------------------------------

def receive(sock: socket.socket, timeout: float,
            settimeout: Callable[[float], None] | None = None) -> ProxyHeader:
    """Read one header off ``sock`` within ``timeout`` seconds, and not one octet more.

    The first read peeks (which version comes, and how long it is, is not
    known yet) and usually shows the whole header; then exactly the
    header's octets are taken, so what follows it stays in the socket for
    the reader or the TLS handshake.  A header arriving in pieces (even one
    octet at a time) is put together, all within the one deadline.
    ``settimeout(seconds)`` bounds the next reads (the connection's: the
    kernel's ``SO_RCVTIMEO`` on a blocking socket, no ``poll()`` per read);
    by default the socket's own Python timeout.  Either way the reads'
    timeout is left at most ``timeout``.
    """
    if settimeout is None:
        settimeout = sock.settimeout
    deadline = time.monotonic() + timeout
    left = timeout
    got = b""
    for _ in range(V2_MAX + 1):  # each round takes at least one octet, or ends
        settimeout(left)
        try:
            peeked = sock.recv(V2_MAX - len(got), socket.MSG_PEEK)
        except (TimeoutError, BlockingIOError):  # a Python timeout, or the kernel's (SO_RCVTIMEO)
            break
        except OSError as exc:
            raise ProxyError(f"connection failed before a complete PROXY header: {exc}") from None
        if not peeked:
            raise ProxyError(f"connection closed after {len(got)} octets, before a complete PROXY header")
        result = parse(got + peeked if got else peeked)
        if result is not None:
            header, length = result
            _take(sock, length - len(got))
            return header
        got += _take(sock, len(peeked))  # all of it belongs to the header
        left = deadline - time.monotonic()
        if left <= 0:
            break
    raise ProxyError(f"no complete PROXY header within {timeout:g}s ({len(got)} octets came)")


def _take(sock: socket.socket, size: int) -> bytes:
    """Read ``size`` octets that a peek has shown are there."""
    parts = []
    while size > 0:
        data = sock.recv(size)
        if not data:
            raise ProxyError("connection closed inside the PROXY header")
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


# -- who may send it -------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted(host: str, networks: list[Network]) -> bool:
    """Whether a proxy at ``host`` may send the header: in one of ``networks``, or any when there are none.

    An IPv4 peer on a dual-stack socket (``::ffff:192.0.2.1``) counts as its IPv4 address.
    """
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return any(address in net or (mapped is not None and mapped in net) for net in networks)
