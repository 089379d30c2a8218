"""Golden packets through the real tunnel health-check program (bpf/hc_tunnel.c), BPF_PROG_TEST_RUN.

The node's probe packets (a SYN to the VIP, marked for one backend) must leave as the forwarder's
own GRE packets would: outer IPv4 (DF, TTL 64, the inner TOS, a valid checksum) or outer IPv6
(the inner traffic class, hop limit 64), the plain 4-byte GRE header, then the probe packet byte
for byte, with the verdict TC_ACT_REDIRECT (bpf_redirect_neigh towards the uplink). Unmarked
packets pass untouched; a mark without a backend, or a family without an encap source, is
dropped and counted. The expected bytes are built here from the RFCs, not from the program.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

import pytest

from node.forwarder import build, libbpf
from node.forwarder.hc_tunnel import (
    HC_COUNTERS,
    HC_MARK_BASE,
    HcTarget,
    config_value,
    target_value,
    run_once,
)
from node.forwarder.model import checksum

pytestmark = [pytest.mark.root, pytest.mark.integration]

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
VIP4, VIP6 = "198.51.100.10", "2001:db8:100::10"
NODE4, NODE6 = "10.1.0.11", "fd00:1::11"
BACKEND4, BACKEND6 = "10.1.0.21", "fd00:1::21"
OUT_IFINDEX = 7
ETH = bytes.fromhex("020000000002" "020000000001")


def syn(src: bytes, dst: bytes, sport: int = 40000, dport: int = 80) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 65535, 0, 0)


def ipv4(src: str, dst: str, proto: int, payload: bytes, tos: int = 0, df: bool = True) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(payload), 0x1234, 0x4000 if df else 0, 64,
                      proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def ipv6(src: str, dst: str, nh: int, payload: bytes, tc: int = 0, flow: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20) | flow, len(payload), nh, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def outer4(inner: bytes, tos: int) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + 4 + len(inner), 0, 0x4000, 64, 47, 0,
                      socket.inet_aton(NODE4), socket.inet_aton(BACKEND4))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + struct.pack("!HH", 0, 0x0800) + inner


def outer6(inner: bytes, tc: int) -> bytes:
    return ipv6(NODE6, BACKEND6, 47, struct.pack("!HH", 0, 0x86DD) + inner, tc=tc)


class Program:
    def __init__(self) -> None:
        self.obj = libbpf.BpfObject(build.build("hc_tunnel"))
        self.obj.load()
        self.prog = self.obj.prog_fd("mlb_hc_tunnel")
        self.targets = self.obj.map_fd("hc_targets")
        self.config = self.obj.map_fd("hc_config")
        self.stats = self.obj.map_fd("hc_stats")

    def configure(self, v4: bool = True, v6: bool = True) -> None:
        libbpf.update(self.config, ctypes.c_uint32(0), config_value(
            ipaddress.ip_address(NODE4) if v4 else None, ipaddress.ip_address(NODE6) if v6 else None,
            OUT_IFINDEX))

    def target(self, mark_id: int, address: str | None) -> None:
        value = target_value(ipaddress.ip_address(address)) if address else HcTarget()
        libbpf.update(self.targets, ctypes.c_uint32(mark_id), value)

    def counters(self) -> dict[str, int]:
        return {name: sum(v.value for v in libbpf.read_percpu(self.stats, i, ctypes.c_uint64))
                for i, name in enumerate(HC_COUNTERS)}

    def run(self, frame: bytes, mark: int) -> tuple[int, bytes, dict[str, int]]:
        before = self.counters()
        verdict, out = run_once(self.prog, frame, mark)
        after = self.counters()
        return verdict, out, {k: after[k] - before[k] for k in after if after[k] != before[k]}


@pytest.fixture(scope="module")
def prog():
    p = Program()
    p.configure()
    p.target(1, BACKEND4)
    p.target(2, BACKEND6)
    yield p
    p.obj.close()


def test_marked_ipv4_probe_leaves_as_gre_to_the_backend_under_test(prog):
    inner = ipv4(NODE4, VIP4, 6, syn(b"", b""), tos=0x10)
    verdict, out, moved = prog.run(ETH + b"\x08\x00" + inner, HC_MARK_BASE | 1)
    assert verdict == TC_ACT_REDIRECT
    assert out == ETH + b"\x08\x00" + outer4(inner, tos=0x10)
    assert moved == {"encap_v4": 1}


def test_marked_ipv6_probe_leaves_as_gre_to_the_backend_under_test(prog):
    inner = ipv6(NODE6, VIP6, 6, syn(b"", b""), tc=0x28, flow=0x12345)
    verdict, out, moved = prog.run(ETH + b"\x86\xdd" + inner, HC_MARK_BASE | 2)
    assert verdict == TC_ACT_REDIRECT
    # the traffic class is kept, the flow label is not (outer flow label 0)
    assert out == ETH + b"\x86\xdd" + outer6(inner, tc=0x28)
    assert moved == {"encap_v6": 1}


def test_the_smallest_ipv4_probe_is_encapsulated_too(prog):
    """A 4-byte UDP datagram: 32 bytes of IPv4, shorter than an IPv6 header."""
    inner = ipv4(NODE4, VIP4, 17, struct.pack("!HHHH", 40000, 7, 12, 0) + b"ping")
    verdict, out, moved = prog.run(ETH + b"\x08\x00" + inner, HC_MARK_BASE | 1)
    assert (verdict, moved) == (TC_ACT_REDIRECT, {"encap_v4": 1})
    assert out == ETH + b"\x08\x00" + outer4(inner, tos=0)


def test_unmarked_and_foreign_marks_pass_untouched(prog):
    frame = ETH + b"\x08\x00" + ipv4(NODE4, VIP4, 6, syn(b"", b""))
    for mark in (0, 0x12340001, HC_MARK_BASE ^ 0x10000 | 1):
        verdict, out, moved = prog.run(frame, mark)
        assert (verdict, out, moved) == (TC_ACT_OK, frame, {"pass_unmarked": 1}), hex(mark)


def test_a_mark_without_a_backend_is_dropped_not_sent_direct(prog):
    frame = ETH + b"\x08\x00" + ipv4(NODE4, VIP4, 6, syn(b"", b""))
    verdict, _, moved = prog.run(frame, HC_MARK_BASE | 77)
    assert (verdict, moved) == (TC_ACT_SHOT, {"drop_no_target": 1})
    prog.target(3, BACKEND4)
    prog.target(3, None)  # freed: a late probe with the old mark must not reach anyone
    verdict, _, moved = prog.run(frame, HC_MARK_BASE | 3)
    assert (verdict, moved) == (TC_ACT_SHOT, {"drop_no_target": 1})


def test_family_mismatch_and_missing_source_are_dropped(prog):
    v6_frame = ETH + b"\x86\xdd" + ipv6(NODE6, VIP6, 6, syn(b"", b""))
    verdict, _, moved = prog.run(v6_frame, HC_MARK_BASE | 1)  # id 1 is an IPv4 backend
    assert (verdict, moved) == (TC_ACT_SHOT, {"drop_malformed": 1})
    prog.configure(v4=True, v6=False)
    try:
        verdict, _, moved = prog.run(v6_frame, HC_MARK_BASE | 2)
        assert (verdict, moved) == (TC_ACT_SHOT, {"drop_no_source": 1})
    finally:
        prog.configure()


def test_the_python_layouts_match_the_loaded_maps(prog):
    """hc_tunnel.py mirrors maglev.h: a drift would corrupt every target silently."""
    from node.forwarder.hc_tunnel import HC_MAX_TARGETS, HC_MARK_MASK, HcConfig

    targets, config = libbpf.map_info(prog.targets), libbpf.map_info(prog.config)
    assert (targets.value_size, targets.max_entries) == (ctypes.sizeof(HcTarget), HC_MAX_TARGETS)
    assert config.value_size == ctypes.sizeof(HcConfig)
    assert libbpf.map_info(prog.stats).max_entries == len(HC_COUNTERS)
    assert HC_MAX_TARGETS - 1 == ~HC_MARK_MASK & 0xFFFFFFFF
