"""Build Ethernet frames for the forwarder's self-test, tests and bench.

Small and explicit on purpose: every header field is visible, checksums are correct, and a
64-byte frame is really 64 bytes (padding included), so tests say exactly what goes in.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

from node.forwarder.model import checksum

CLIENT_MAC = bytes.fromhex("02000000c001")
NODE_MAC = bytes.fromhex("02000000a001")


def l4(proto: str, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
       flags: int = 0x02) -> bytes:
    """A TCP (20-byte header, SYN by default) or UDP segment with a correct checksum."""
    if proto == "tcp":
        hdr = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
        num = 6
    else:
        hdr = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        num = 17
    seg = hdr + payload
    if len(src) == 4:
        pseudo = src + dst + struct.pack("!BBH", 0, num, len(seg))
    else:
        pseudo = src + dst + struct.pack("!IxxxB", len(seg), num)
    c = checksum(pseudo + seg) or (0xFFFF if num == 17 else 0)
    off = 16 if proto == "tcp" else 6
    return seg[:off] + c.to_bytes(2, "big") + seg[off + 2:]


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, tos: int = 0, df: bool = True,
         frag: int = 0, ttl: int = 64, ident: int = 1, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    flags = (0x4000 if df else 0) | frag
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(payload), ident, flags, ttl,
                      proto, 0, IPv4Address(src).packed, IPv4Address(dst).packed) + options
    hdr = hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:]
    return hdr + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes, *, tc: int = 0, flow: int = 0,
         hlim: int = 64) -> bytes:
    w0 = 0x60000000 | (tc << 20) | flow
    return struct.pack("!IHBB16s16s", w0, len(payload), nh, hlim, IPv6Address(src).packed,
                       IPv6Address(dst).packed) + payload


def ether(l3: bytes, ethertype: int, *, dst: bytes = NODE_MAC, src: bytes = CLIENT_MAC,
          vlan: int | None = None, min_len: int = 60) -> bytes:
    """An Ethernet frame (without FCS), padded to min_len like a NIC would deliver it."""
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    frame = dst + src + tag + ethertype.to_bytes(2, "big") + l3
    return frame + bytes(max(0, min_len - len(frame)))


def flow_packet(src: str, dst: str, sport: int, dport: int, proto: str = "tcp",
                payload: bytes = b"", *, size: int | None = None, vlan: int | None = None,
                tcp_flags: int = 0x02, df: bool = True, tos: int = 0) -> bytes:
    """A TCP/UDP frame between two addresses of one family. size pads the payload so the
    frame (without FCS) has that many bytes: 60 bytes + 4 FCS = the classic 64-byte frame."""
    a = ip_address(src)
    hdr_len = 14 + (4 if vlan is not None else 0) + (20 if a.version == 4 else 40) + (20 if proto == "tcp" else 8)
    if size is not None and size > hdr_len + len(payload):
        payload = payload + bytes(size - hdr_len - len(payload))
    num = 6 if proto == "tcp" else 17
    seg = l4(proto, a.packed, ip_address(dst).packed, sport, dport, payload, tcp_flags)
    if a.version == 4:
        return ether(ipv4(src, dst, num, seg, df=df, tos=tos), 0x0800, vlan=vlan)
    return ether(ipv6(src, dst, num, seg, tc=tos), 0x86DD, vlan=vlan)
