"""Golden packets through the real backend decap program (bpf/decap.c) with BPF_PROG_TEST_RUN.

Each case builds a frame by hand, runs it through the loaded program and checks the verdict, the
exact output bytes and which counter moved. A decapsulated frame must be the Ethernet header
(with the inner EtherType) followed by the inner packet byte for byte; anything the program
does not decapsulate must come out untouched.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from node.forwarder.model import checksum
from node.forwarder.tc import TC_ACT_OK, TC_ACT_SHOT, DecapProgram, build_decap_object

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIP4 = ipaddress.ip_address("198.51.100.10")
VIP6 = ipaddress.ip_address("2001:db8:100::10")
OTHER4 = "198.51.100.99"
OTHER6 = "2001:db8:100::99"
CLIENT4, CLIENT6 = "192.0.2.7", "2001:db8:7::7"
NODE4, BACKEND4 = "10.1.0.1", "10.1.0.2"
NODE6, BACKEND6 = "fd00:1::1", "fd00:1::2"
ETH_IP, ETH_IP6, ETH_ARP = 0x0800, 0x86DD, 0x0806
GRE, TCP, UDP = 47, 6, 17


def eth(proto: int) -> bytes:
    return bytes.fromhex("020000000002") + bytes.fromhex("020000000001") + struct.pack("!H", proto)


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, frag: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 0x1234, frag, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    ) + options
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes) -> bytes:
    return struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), nexthdr, 64,
        socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst),
    ) + payload


def gre(proto: int, payload: bytes, flags: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack("!HH", flags, proto) + extra + payload


def tcp_segment(data: bytes = b"payload") -> bytes:
    # Ports, seq, ack, offset 5, ACK|PSH, window; the checksum is left alone: decap never reads it.
    return struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 0x50, 0x18, 65535, 0xBEEF, 0) + data


def inner4(dst: str = str(VIP4), data: bytes = b"payload") -> bytes:
    return ipv4(CLIENT4, dst, TCP, tcp_segment(data))


def inner6(dst: str = str(VIP6), data: bytes = b"payload") -> bytes:
    return ipv6(CLIENT6, dst, TCP, tcp_segment(data))


def over4(inner: bytes, proto: int) -> bytes:
    return eth(ETH_IP) + ipv4(NODE4, BACKEND4, GRE, gre(proto, inner))


def over6(inner: bytes, proto: int) -> bytes:
    return eth(ETH_IP6) + ipv6(NODE6, BACKEND6, GRE, gre(proto, inner))


@pytest.fixture(scope="module")
def obj_path():
    return build_decap_object()


@pytest.fixture
def prog(obj_path):
    with DecapProgram.load(obj_path) as p:
        p.set_vips([VIP4, VIP6])
        yield p


def run_counted(prog: DecapProgram, frame: bytes) -> tuple[int, bytes, dict[str, int]]:
    """Run a frame; return verdict, output and the counters that moved (name -> packets)."""
    before = prog.counters()
    verdict, out = prog.test_run(frame)
    after = prog.counters()
    moved = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    return verdict, out, moved


def assert_decapsulated(prog: DecapProgram, frame: bytes, inner: bytes, proto: int, counter: str) -> None:
    verdict, out, moved = run_counted(prog, frame)
    assert verdict == TC_ACT_OK
    assert out == eth(proto) + inner, "output must be the Ethernet header + the inner packet exactly"
    assert moved == {counter: 1}


def assert_untouched(prog: DecapProgram, frame: bytes, counter: str) -> None:
    verdict, out, moved = run_counted(prog, frame)
    assert verdict == TC_ACT_OK
    assert out == frame
    assert moved == {counter: 1}


def test_ipv4_in_gre_over_ipv4_is_decapsulated(prog):
    inner = inner4()
    assert_decapsulated(prog, over4(inner, ETH_IP), inner, ETH_IP, "decap_v4")


def test_ipv6_in_gre_over_ipv6_is_decapsulated(prog):
    inner = inner6()
    assert_decapsulated(prog, over6(inner, ETH_IP6), inner, ETH_IP6, "decap_v6")


def test_ipv6_inner_over_ipv4_outer_gets_ipv6_ethertype(prog):
    inner = inner6()
    assert_decapsulated(prog, over4(inner, ETH_IP6), inner, ETH_IP6, "decap_v6")


def test_ipv4_inner_over_ipv6_outer_gets_ipv4_ethertype(prog):
    inner = ipv4(CLIENT4, str(VIP4), UDP, struct.pack("!HHHH", 5000, 53, 9, 0) + b"x")  # 29 bytes
    assert_decapsulated(prog, over6(inner, ETH_IP), inner, ETH_IP, "decap_v4")


def test_outer_ipv4_options_are_popped_too(prog):
    inner = inner4()
    options = bytes([1, 1, 1, 0])  # NOP NOP NOP EOL
    frame = eth(ETH_IP) + ipv4(NODE4, BACKEND4, GRE, gre(ETH_IP, inner), options=options)
    assert_decapsulated(prog, frame, inner, ETH_IP, "decap_v4")


def test_large_inner_packet_is_decapsulated_intact(prog):
    inner = inner4(data=bytes(range(256)) * 5)
    assert_decapsulated(prog, over4(inner, ETH_IP), inner, ETH_IP, "decap_v4")


@pytest.mark.parametrize("frame", [
    pytest.param(eth(ETH_IP) + inner4(), id="tcp-to-vip-ipv4"),
    pytest.param(eth(ETH_IP6) + inner6(), id="tcp-to-vip-ipv6"),
    pytest.param(eth(ETH_IP) + ipv4(NODE4, BACKEND4, UDP, struct.pack("!HHHH", 1, 2, 8, 0)), id="udp"),
])
def test_non_gre_passes_untouched(prog, frame):
    assert_untouched(prog, frame, "pass_not_gre")


def test_arp_passes_untouched(prog):
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, b"\x02" * 6,
                      socket.inet_aton(NODE4), b"\0" * 6, socket.inet_aton(BACKEND4))
    assert_untouched(prog, eth(ETH_ARP) + arp, "pass_not_ip")


@pytest.mark.parametrize("frame", [
    pytest.param(over4(inner4(OTHER4), ETH_IP), id="ipv4"),
    pytest.param(over6(inner6(OTHER6), ETH_IP6), id="ipv6"),
    # Address bytes of a configured VIP, but the other family: the key includes the family.
    pytest.param(over4(ipv4(CLIENT4, "32.1.13.184", TCP, tcp_segment()), ETH_IP), id="family-matters"),
])
def test_gre_to_a_non_vip_passes_untouched(prog, frame):
    assert_untouched(prog, frame, "pass_not_vip")


def test_vip_removed_from_map_is_no_longer_decapsulated(prog):
    prog.set_vips([VIP6])
    assert prog.vips() == [VIP6]
    assert_untouched(prog, over4(inner4(), ETH_IP), "pass_not_vip")


# A key alone over IPv4 is second chance (tests/integration/test_decap_second_chance.py).
@pytest.mark.parametrize("flags,extra", [
    pytest.param(0x3000, b"\0\0\0\x01\0\0\0\x01", id="key-and-sequence"),
    pytest.param(0x1000, b"\0\0\0\x01", id="sequence"),
    pytest.param(0x8000, b"\0\0\0\0", id="checksum"),
    pytest.param(0x0001, b"", id="version-1"),
])
def test_gre_with_options_passes_untouched(prog, flags, extra):
    frame = eth(ETH_IP) + ipv4(NODE4, BACKEND4, GRE, gre(ETH_IP, inner4(), flags, extra))
    assert_untouched(prog, frame, "pass_gre_flags")


def test_keyed_gre_over_ipv6_passes_untouched(prog):
    """The forwarder names a previous owner over IPv4 only; a keyed IPv6 tunnel is not ours."""
    frame = eth(ETH_IP6) + ipv6(NODE6, BACKEND6, GRE, gre(ETH_IP6, inner6(), 0x2000, b"\n\1\0\3"))
    assert_untouched(prog, frame, "pass_gre_flags")


def test_gre_carrying_ethernet_passes_untouched(prog):
    assert_untouched(prog, over4(eth(ETH_IP) + inner4(), 0x6558), "pass_gre_proto")


def test_outer_fragment_passes_untouched(prog):
    frame = eth(ETH_IP) + ipv4(NODE4, BACKEND4, GRE, gre(ETH_IP, inner4()), frag=0x2000)
    assert_untouched(prog, frame, "pass_fragment")


def _truncations() -> list:
    full4, full6 = over4(inner4(), ETH_IP), over6(inner6(), ETH_IP6)
    # Frames too short for the outer IP header itself cannot be test-run: the kernel's
    # BPF_PROG_TEST_RUN refuses them (EINVAL) before the program runs.
    return [
        pytest.param(full4[: 14 + 20 + 2], id="gre-cut"),
        pytest.param(full4[: 14 + 20 + 4 + 12], id="inner-ipv4-cut"),
        pytest.param(full6[: 14 + 40 + 2], id="gre-cut-ipv6"),
        pytest.param(full6[: 14 + 40 + 4 + 30], id="inner-ipv6-cut"),
        # ihl=15 claims 60 bytes of header: GRE would start past the end of the frame.
        pytest.param(eth(ETH_IP) + bytes([0x4F]) + full4[15:14 + 20 + 4], id="ihl-past-end"),
        pytest.param(eth(ETH_IP) + bytes([0x44]) + full4[15:], id="ihl-below-5"),
    ]


@pytest.mark.parametrize("frame", _truncations())
def test_truncated_frames_pass_untouched_and_are_counted(prog, frame):
    assert_untouched(prog, frame, "pass_truncated")


def test_vip_packet_the_kernel_refuses_to_shrink_is_dropped_and_counted(prog):
    """A GSO packet whose type the kernel cannot re-segment after a shrink (here: gso_size set
    by the test run, gso_type unset) makes bpf_skb_adjust_room fail; the program must drop it
    and count it rather than pass it on still encapsulated."""
    frame = over4(inner4(data=b"x" * 1000), ETH_IP)
    before = prog.counters()
    verdict, _ = prog.test_run(frame, gso_size=500, gso_segs=2)
    after = prog.counters()
    assert verdict == TC_ACT_SHOT
    moved = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    assert moved == {"drop_adjust": 1}


def test_counters_add_up_to_packets_seen(prog):
    frames = [over4(inner4(), ETH_IP), over6(inner6(), ETH_IP6), eth(ETH_IP) + inner4(),
              over4(inner4(OTHER4), ETH_IP)]
    for f in frames:
        prog.test_run(f)
    counters = prog.counters()
    assert sum(p for p, _ in counters.values()) == len(frames)
    assert sum(b for _, b in counters.values()) == sum(len(f) for f in frames)


def test_map_layouts_match_the_python_mirror(prog):
    """maglev.h (decap section) and tc.py describe the same bytes (a drift would corrupt the VIP map silently)."""
    import ctypes

    from node.forwarder import libbpf
    from node.forwarder.tc import DECAP_COUNTERS, DecapCounter, DecapVipKey, DecapVipValue

    vips, stats = libbpf.map_info(prog.vips_fd), libbpf.map_info(prog.stats_fd)
    assert (vips.key_size, vips.value_size) == (ctypes.sizeof(DecapVipKey), ctypes.sizeof(DecapVipValue))
    assert stats.value_size == ctypes.sizeof(DecapCounter)
    assert stats.max_entries == len(DECAP_COUNTERS)
