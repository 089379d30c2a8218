"""The pure-Python forwarder model against the documented behaviour (maglev.h, xdp_lb.c).

The differential test (tests/integration/test_forwarder_diff.py) ties the model to the real
program; these pin the model's own policies, so both cannot drift together unnoticed.
"""

from __future__ import annotations

import struct

import pytest

from node.forwarder import model as M
from node.forwarder import packets as P
from node.forwarder.maps import (
    BE_STATE_ACTIVE,
    BE_STATE_DOWN,
    BE_STATE_DRAIN,
    FAM_V4,
    FAM_V6,
    Stat,
    addr_bytes,
)

NH = bytes.fromhex("02000000b001")
VIP4, VIP6 = "10.1.1.1", "2001:db8:1::1"


def a(x: str) -> bytes:
    return addr_bytes(x)[1]


def make_state(**cfg) -> M.ModelState:
    st = M.ModelState(M.ModelConfig(next_hop_mac=NH, src_v4=a("10.0.0.1")[:4],
                                    src_v6=a("fd00::1"), **cfg))
    st.vips[(FAM_V4, a(VIP4), 80, 6)] = 0
    st.vips[(FAM_V4, a(VIP4), 0, 17)] = 1  # all-ports UDP
    st.vips[(FAM_V6, a(VIP6), 443, 6)] = 2
    st.backends[1] = M.ModelBackend(FAM_V4, a("10.2.0.1"), BE_STATE_ACTIVE, 0)
    st.backends[2] = M.ModelBackend(FAM_V4, a("10.2.0.2"), BE_STATE_ACTIVE, 0)
    st.backends[3] = M.ModelBackend(FAM_V4, a("10.2.0.3"), BE_STATE_ACTIVE, 1)
    st.backends[4] = M.ModelBackend(FAM_V6, a("2001:db8:2::4"), BE_STATE_ACTIVE, 2)
    st.tables[0] = [1, 2, 1, 2, 1, 2, 2]
    st.tables[1] = [3] * 7
    st.tables[2] = [4] * 7
    return st


def test_flow_hash_is_frozen() -> None:
    # Every node must hash a flow the same way; changing these values changes every table
    # lookup in a mixed-version cluster.
    assert M.flow_hash(M.Flow.of("192.0.2.1", "10.1.1.1", 1234, 80, "tcp")) == 0x2B43B956
    assert M.flow_hash(M.Flow.of("2001:db8::1", "2001:db8::100", 40000, 443, "udp")) == 0x2BA59D13


def test_table_index_stays_in_range() -> None:
    for size in (7, 65537, 655373):
        assert M.table_index(0, size) == 0
        assert M.table_index(0xFFFFFFFF, size) == size - 1


def test_ipv4_tcp_encap_header_and_inner_intact() -> None:
    st = make_state()
    frame = P.flow_packet("192.0.2.7", VIP4, 5555, 80)
    r = M.process(st, frame, now_ns=1)
    assert r.verdict == M.XDP_TX and r.inserted and not r.ct_hit
    out = r.data
    assert out[0:6] == NH and out[6:12] == P.NODE_MAC and out[12:14] == b"\x08\x00"
    outer = out[14:34]
    ver_ihl, tos, tot, _id, frag, ttl, proto, _c, src, dst = struct.unpack("!BBHHHBBH4s4s", outer)
    inner_len = struct.unpack("!H", frame[16:18])[0]
    assert (ver_ihl, ttl, proto, frag, tot) == (0x45, 64, 47, 0x4000, inner_len + 24)
    assert src == a("10.0.0.1")[:4]
    assert dst == a("10.2.0.1")[:4] or dst == a("10.2.0.2")[:4]
    assert M.checksum(outer) == 0  # a valid header sums to 0xffff
    assert out[34:38] == b"\x00\x00\x08\x00"
    assert out[38:] == frame[14:]


def test_ipv6_encap_uses_ipv6_outer_and_flow_label() -> None:
    st = make_state()
    frame = P.flow_packet("2001:db8:9::9", VIP6, 4000, 443)
    r = M.process(st, frame)
    assert r.verdict == M.XDP_TX and r.backend_id == 4
    w0, plen, nh, hlim = struct.unpack("!IHBB", r.data[14:22])
    assert w0 >> 28 == 6 and nh == 47 and hlim == 64
    assert w0 & 0xFFFFF == M.flow_hash(M.Flow.of("2001:db8:9::9", VIP6, 4000, 443, "tcp")) & 0xFFFFF
    assert plen == len(frame) - 14 + 4
    assert r.data[22:38] == a("fd00::1") and r.data[38:54] == a("2001:db8:2::4")
    assert r.data[54:58] == b"\x00\x00\x86\xdd" and r.data[58:] == frame[14:]


@pytest.mark.parametrize("frame,reason", [
    (P.flow_packet("192.0.2.1", "10.9.9.9", 1, 80), None),                 # not a VIP
    (P.flow_packet("192.0.2.1", VIP4, 1, 81), None),                       # VIP, other port
    (P.flow_packet("2001:db8::7", VIP6, 1, 443, "udp"), None),             # VIP, other protocol
    (P.ether(bytes(28), 0x0806), None),                                     # ARP
    (P.flow_packet("192.0.2.1", VIP4, 1, 80)[:30], Stat.PASS_MALFORMED),   # truncated IP
    (P.flow_packet("192.0.2.1", VIP4, 1, 80)[:8], None),                   # runt frame
])
def test_not_forwarded_passes_unchanged(frame: bytes, reason) -> None:
    st = make_state()
    r = M.process(st, frame)
    assert r.verdict == M.XDP_PASS and r.data == frame and r.reason == reason


def test_conntrack_hit_drain_and_down() -> None:
    st = make_state()
    syn = P.flow_packet("192.0.2.7", VIP4, 5555, 80)
    frame = P.flow_packet("192.0.2.7", VIP4, 5555, 80, tcp_flags=0x10)
    first = M.process(st, syn)
    again = M.process(st, frame)
    assert again.ct_hit and again.backend_id == first.backend_id
    assert not M.process(st, syn).ct_hit  # a SYN never consults conntrack
    st.backends[first.backend_id].state = BE_STATE_DRAIN
    st.tables[0] = [b for b in st.tables[0] if b != first.backend_id] or [1]
    assert M.process(st, frame).backend_id == first.backend_id  # drain keeps the flow
    st.backends[first.backend_id].state = BE_STATE_DOWN
    moved = M.process(st, frame)
    assert moved.verdict == M.XDP_TX and not moved.ct_hit and moved.backend_id != first.backend_id


def _colliding_flows(st: M.ModelState, n: int) -> list[int]:
    """Source ports of n TCP flows to VIP4:80 that share one conntrack slot."""
    by_slot: dict[int, list[int]] = {}
    for sport in range(1024, 65536):
        ports = by_slot.setdefault(st.ct_slot(M.Flow.of("192.0.2.7", VIP4, sport, 80, "tcp")), [])
        ports.append(sport)
        if len(ports) == n:
            return ports
    raise AssertionError("no collision found")


def test_conntrack_direct_new_flow_replaces_the_flow_in_its_slot() -> None:
    st = make_state(conntrack="direct", ct_slots=1024)
    a, b = _colliding_flows(st, 2)
    M.process(st, P.flow_packet("192.0.2.7", VIP4, a, 80))
    assert M.process(st, P.flow_packet("192.0.2.7", VIP4, a, 80, tcp_flags=0x10)).ct_hit
    M.process(st, P.flow_packet("192.0.2.7", VIP4, b, 80))  # same slot: a is pushed out
    assert list(st.ct) == [M.Flow.of("192.0.2.7", VIP4, b, 80, "tcp")] and st.ct_replaced == 1
    back = M.process(st, P.flow_packet("192.0.2.7", VIP4, a, 80, tcp_flags=0x10))
    assert not back.ct_hit and back.verdict == M.XDP_TX  # the table steers it, and re-tracks it
    assert M.Flow.of("192.0.2.7", VIP4, a, 80, "tcp") in st.ct and st.ct_replaced == 2


def test_conntrack_lru_keeps_flows_that_share_a_direct_slot() -> None:
    st = make_state(ct_slots=1024)
    assert st.config.conntrack == "lru"  # the default, as in ForwarderConfig
    a, b = _colliding_flows(st, 2)
    M.process(st, P.flow_packet("192.0.2.7", VIP4, a, 80))
    M.process(st, P.flow_packet("192.0.2.7", VIP4, b, 80))
    assert set(st.ct) == {M.Flow.of("192.0.2.7", VIP4, p, 80, "tcp") for p in (a, b)}
    assert st.ct_replaced == 0
    assert M.process(st, P.flow_packet("192.0.2.7", VIP4, a, 80, tcp_flags=0x10)).ct_hit


def test_udp_conntrack_expires_after_idle_time() -> None:
    st = make_state(udp_idle_ns=1000)
    frame = P.flow_packet("192.0.2.7", VIP4, 5555, 53, "udp")
    assert M.process(st, frame, now_ns=10).inserted
    assert M.process(st, frame, now_ns=900).ct_hit
    assert not M.process(st, frame, now_ns=2000).ct_hit


def test_fragment_policy() -> None:
    st = make_state()
    seg = P.l4("udp", a("192.0.2.1")[:4], a(VIP4)[:4], 7, 53, bytes(40))
    first = P.ether(P.ipv4("192.0.2.1", VIP4, 17, seg, df=False, frag=0x2000), 0x0800)
    later = P.ether(P.ipv4("192.0.2.1", VIP4, 17, bytes(48), df=False, frag=6), 0x0800)
    r1, r2 = M.process(st, first), M.process(st, later)
    # all-ports VIP: both pieces by the 3-tuple hash, to the same backend, no conntrack
    assert r1.verdict == r2.verdict == M.XDP_TX and r1.backend_id == r2.backend_id and not st.ct
    # port VIP without a fragment key (the address has several for TCP): the first fragment
    # is dropped (counted); a later one goes to the kernel
    tseg = P.l4("tcp", a("192.0.2.1")[:4], a(VIP4)[:4], 7, 80, bytes(40))
    tfirst = P.ether(P.ipv4("192.0.2.1", VIP4, 6, tseg, df=False, frag=0x2000), 0x0800)
    tlater = P.ether(P.ipv4("192.0.2.1", VIP4, 6, bytes(48), df=False, frag=6), 0x0800)
    assert M.process(st, tfirst).reason == Stat.DROP_FRAGMENT
    assert M.process(st, tlater).verdict == M.XDP_PASS
    # with the fragment key of its only TCP port VIP: both pieces follow that VIP's table
    st.frag_vips[(FAM_V4, a(VIP4), 6)] = 0
    r1, r2 = M.process(st, tfirst), M.process(st, tlater)
    assert r1.verdict == r2.verdict == M.XDP_TX and r1.backend_id == r2.backend_id
    assert st.stats[Stat.FRAG_FORWARDED] == 4 and not st.ct


def test_fragment_owners_only_for_a_single_port_vip() -> None:
    from node.forwarder.maps import fragment_owners

    keys = [(4, a(VIP4), 80, 6, 0), (4, a(VIP4), 53, 17, 1), (4, a(VIP4), 5353, 17, 2),
            (4, a("10.1.1.9"), 22, 6, 3), (4, a("10.1.1.9"), 0, 6, 4)]
    # UDP on VIP4 has two port VIPs, TCP on 10.1.1.9 an "all ports" VIP: neither gets a key
    assert fragment_owners(keys) == {(4, a(VIP4), 6): 0}


def test_too_big_answers_with_reduced_mtu() -> None:
    st = make_state(mtu=1500)
    frame = P.flow_packet("192.0.2.7", VIP4, 5555, 80, payload=bytes(1460))
    r = M.process(st, frame)
    assert r.verdict == M.XDP_TX and r.reason == Stat.ICMP_TOO_BIG_SENT
    ip = r.data[14:34]
    assert ip[9] == 1 and ip[12:16] == a(VIP4)[:4] and ip[16:20] == a("192.0.2.7")[:4]
    icmp = r.data[34:]
    assert icmp[0:2] == b"\x03\x04" and struct.unpack("!H", icmp[6:8])[0] == 1500 - 24
    assert icmp[8:] == frame[14:14 + 28] and M.checksum(icmp) == 0
    no_df = P.flow_packet("192.0.2.7", VIP4, 5555, 80, payload=bytes(1460), df=False)
    assert M.process(st, no_df).reason == Stat.DROP_TOO_BIG


def test_icmp_error_is_steered_to_flow_owner() -> None:
    st = make_state()
    flow = P.flow_packet("192.0.2.7", VIP4, 5555, 80)
    owner = M.process(st, flow).backend_id
    # what the backend sent (VIP -> client), quoted by a router's frag-needed
    reply = P.flow_packet(VIP4, "192.0.2.7", 80, 5555)[14:42]
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + reply
    err = P.ether(P.ipv4("192.0.2.254", VIP4, 1, icmp), 0x0800)
    r = M.process(st, err)
    assert r.verdict == M.XDP_TX and r.backend_id == owner and not r.inserted
    assert st.stats[Stat.ICMP_STEERED] == 1


def test_empty_table_drops_counted() -> None:
    st = make_state()
    st.tables[0] = []
    r = M.process(st, P.flow_packet("192.0.2.7", VIP4, 5555, 80))
    assert r.verdict == M.XDP_DROP and st.stats[Stat.DROP_NO_BACKEND] == 1


def test_vlan_tag_is_kept() -> None:
    st = make_state()
    frame = P.flow_packet("192.0.2.7", VIP4, 5555, 80, vlan=42)
    r = M.process(st, frame)
    assert r.verdict == M.XDP_TX
    assert r.data[12:18] == b"\x81\x00\x00\x2a\x08\x00" and r.data[42:] == frame[18:]
