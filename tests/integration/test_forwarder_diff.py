"""Differential test: random frames through the real XDP program (BPF_PROG_TEST_RUN) and
through node/forwarder/model.py must give identical verdicts and identical output bytes, and
the same drop/event counters at the end.

Frames are built to reach every branch: both families, VLAN tags, VIP and non-VIP addresses and
ports, all-ports VIPs, TCP/UDP/ICMP/other protocols, ICMP errors quoting VIP flows, fragments,
IPv4 options, oversize packets (the too-big answer), then random truncation and byte damage.
It runs once per conntrack design ("lru", "direct"), each with its own model.
"""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from node.forwarder import model as M
from node.forwarder import packets as P
from node.forwarder.loader import BackendSpec, VipSpec
from node.forwarder.maps import Stat
from node.forwarder.testing import temp_forwarder

pytestmark = [pytest.mark.root, pytest.mark.integration]

VIPS4 = ["10.1.1.1", "10.1.1.2", "10.1.1.3"]
VIPS6 = ["2001:db8:1::1", "2001:db8:1::2"]
OTHER4 = ["10.9.9.9", "192.0.2.1"]
OTHER6 = ["2001:db8:9::9"]
PORTS = [80, 80, 443, 443, 53, 53, 81, 0, 65535]  # weighted towards VIP ports


def _vips() -> list[VipSpec]:
    def b(key, addr, state="active"):
        return BackendSpec(key, ip_address(addr), state)

    def v(name, addr, proto, port, backends, size=13):
        act = [x.key for x in backends if x.state == "active"]
        table = [act[(i * 7) % len(act)] for i in range(size)] if act else []
        return VipSpec(name, ip_address(addr), proto, port, tuple(backends), table)

    return [
        v("t80", "10.1.1.1", "tcp", 80, [b("a", "10.2.0.1"), b("b", "10.2.0.2"), b("c", "10.2.0.3", "drain")]),
        v("u53", "10.1.1.1", "udp", 53, [b("d", "10.2.1.1"), b("e", "10.2.1.2", "down")], size=7),
        v("tall", "10.1.1.2", "tcp", "all", [b("f", "10.2.2.1"), b("g", "10.2.2.2")], size=251),
        v("uall", "10.1.1.2", "udp", "all", [b("h", "10.2.3.1")]),
        v("none", "10.1.1.3", "tcp", 80, [], size=0),
        v("t6", "2001:db8:1::1", "tcp", 443, [b("i", "2001:db8:2::1"), b("j", "2001:db8:2::2")], size=65537),
        v("u6all", "2001:db8:1::2", "udp", "all", [b("k", "2001:db8:2::3")]),
    ]


def ip4(draw, pool) -> str:
    return draw(st.one_of(st.sampled_from(pool), st.ip_addresses(v=4).map(str)))


def ip6(draw, pool) -> str:
    return draw(st.one_of(st.sampled_from(pool), st.ip_addresses(v=6).map(str)))


@st.composite
def l4_segment(draw, src: bytes, dst: bytes):
    proto = draw(st.sampled_from(["tcp", "udp"]))
    size = draw(st.one_of(st.integers(0, 64), st.integers(1300, 1500)))
    seg = P.l4(proto, src, dst, draw(st.sampled_from([1234, 40000, *PORTS])),
               draw(st.sampled_from(PORTS)), bytes(size), draw(st.sampled_from([0x02, 0x10, 0x11])))
    return (6 if proto == "tcp" else 17), seg


@st.composite
def frame_v4(draw):
    family_vip = draw(st.sampled_from([True, True, True, False]))
    src = ip4(draw, OTHER4)
    dst = draw(st.sampled_from(VIPS4)) if family_vip else ip4(draw, OTHER4)
    kind = draw(st.sampled_from(["l4", "l4", "l4", "icmp_err", "icmp_other", "frag", "other"]))
    df = draw(st.booleans())
    tos = draw(st.integers(0, 255))
    options = draw(st.sampled_from([b"", b"", b"\x01\x01\x01\x00", bytes(8)]))
    if kind == "l4":
        num, seg = draw(l4_segment(ip_address(src).packed, ip_address(dst).packed))
        l3 = P.ipv4(src, dst, num, seg, df=df, tos=tos, options=options)
    elif kind == "icmp_err":
        # a backend's reply (VIP -> client) quoted by a router
        num, seg = draw(l4_segment(ip_address(dst).packed, ip_address(src).packed))
        quoted = P.ipv4(dst, src, num, seg)[:28 + draw(st.integers(0, 20))]
        icmp = struct.pack("!BBHHH", draw(st.sampled_from([3, 11, 5])), 4, 0, 0, 1400) + quoted
        l3 = P.ipv4(ip4(draw, OTHER4), dst, 1, icmp, df=df, tos=tos)
    elif kind == "icmp_other":
        l3 = P.ipv4(src, dst, 1, b"\x08\x00\x00\x00" + bytes(draw(st.integers(0, 40))), tos=tos)
    elif kind == "frag":
        num, seg = draw(l4_segment(ip_address(src).packed, ip_address(dst).packed))
        frag = draw(st.sampled_from([0x2000, 0x2000, 0x2000 | 5, 5, 0x1FFF]))
        l3 = P.ipv4(src, dst, num, seg, df=False, frag=frag, tos=tos, options=options)
    else:
        l3 = P.ipv4(src, dst, draw(st.sampled_from([47, 50, 132, 2])), bytes(20), tos=tos)
    return l3, 0x0800


@st.composite
def frame_v6(draw):
    src = ip6(draw, OTHER6)
    dst = draw(st.sampled_from(VIPS6)) if draw(st.sampled_from([True, True, True, False])) else ip6(draw, OTHER6)
    kind = draw(st.sampled_from(["l4", "l4", "l4", "icmp_err", "frag", "ext", "other"]))
    tc = draw(st.integers(0, 255))
    if kind == "l4":
        num, seg = draw(l4_segment(ip_address(src).packed, ip_address(dst).packed))
        l3 = P.ipv6(src, dst, num, seg, tc=tc, flow=draw(st.integers(0, 0xFFFFF)))
    elif kind == "icmp_err":
        num, seg = draw(l4_segment(ip_address(dst).packed, ip_address(src).packed))
        quoted = P.ipv6(dst, src, num, seg)[:48 + draw(st.integers(0, 40))]
        icmp = struct.pack("!BBHI", draw(st.sampled_from([1, 2, 3, 4, 128])), 0, 0, 1400) + quoted
        l3 = P.ipv6(ip6(draw, OTHER6), dst, 58, icmp, tc=tc)
    elif kind == "frag":
        num, seg = draw(l4_segment(ip_address(src).packed, ip_address(dst).packed))
        off = draw(st.sampled_from([0, 1, 0x100]))
        fh = struct.pack("!BBHI", num, 0, (off << 3) | draw(st.sampled_from([0, 1])), 7)
        l3 = P.ipv6(src, dst, 44, fh + seg, tc=tc)
    elif kind == "ext":
        l3 = P.ipv6(src, dst, draw(st.sampled_from([0, 43, 60])), bytes(24), tc=tc)
    else:
        l3 = P.ipv6(src, dst, draw(st.sampled_from([47, 50, 132])), bytes(20), tc=tc)
    return l3, 0x86DD


@st.composite
def frames(draw):
    l3, ethertype = draw(st.one_of(frame_v4(), frame_v4(), frame_v6(), frame_v6(),
                                   st.tuples(st.binary(min_size=0, max_size=60), st.sampled_from([0x0806, 0x0800, 0x86DD, 0x8100]))))
    frame = P.ether(l3, ethertype, vlan=draw(st.sampled_from([None, None, 5])))
    damage = draw(st.sampled_from(["none"] * 7 + ["truncate", "byte", "length"]))
    if damage == "truncate":
        frame = frame[:draw(st.integers(14, len(frame)))]
    elif damage == "byte":
        pos = draw(st.integers(12, min(len(frame) - 1, 100)))
        frame = frame[:pos] + bytes([draw(st.integers(0, 255))]) + frame[pos + 1:]
    elif damage == "length":
        pos = 16 if frame[12:14] == b"\x08\x00" else 18 if frame[12:14] == b"\x86\xdd" else None
        if pos is not None and len(frame) > pos + 2:
            frame = frame[:pos] + draw(st.integers(0, 0xFFFF)).to_bytes(2, "big") + frame[pos + 2:]
    return frame


def _first_fragment(dst: str, proto: str, dport: int) -> bytes:
    """A first fragment to a port VIP: rare at random, so always among the examples."""
    a = ip_address(dst)
    seg = P.l4(proto, ip_address("192.0.2.1" if a.version == 4 else "2001:db8:9::1").packed,
               a.packed, 7, dport, bytes(40))
    num = 6 if proto == "tcp" else 17
    if a.version == 4:
        return P.ether(P.ipv4("192.0.2.1", dst, num, seg, df=False, frag=0x2000), 0x0800)
    fh = struct.pack("!BBHI", num, 0, 1, 9)
    return P.ether(P.ipv6("2001:db8:9::1", dst, 44, fh + seg), 0x86DD)


RARE = [_first_fragment("10.1.1.1", "tcp", 80), _first_fragment("10.1.1.1", "udp", 53),
        _first_fragment("2001:db8:1::1", "tcp", 443)]


def _colliding_flows(slots: int) -> list[bytes]:
    """SYNs of two flows to a port VIP that share a "direct" conntrack slot (the second replaces
    the first), then an ACK of the second (a conntrack hit). Random frames do this only by
    chance, so every run also sends this sequence, in this order."""
    src, dst = ip_address("192.0.2.1"), ip_address("10.1.1.1")

    def slot(sport: int) -> int:
        return M.flow_hash(M.Flow.of(src, dst, sport, 80, "tcp")) & (slots - 1)

    first = slot(1000)
    other = next(p for p in range(1001, 65536) if slot(p) == first)
    return [P.ether(P.ipv4(str(src), str(dst), 6, P.l4("tcp", src.packed, dst.packed, p, 80, b"", flags)), 0x0800)
            for p, flags in ((1000, 0x02), (other, 0x02), (other, 0x10))]


# conntrack_size per design. "direct": the smallest (1024 slots), so random flows collide and
# the program's "a new flow replaces the one in its slot" is compared with the model's too.
# "lru": room for every flow the examples make (the model does not evict; with per-CPU LRU
# lists each CPU holds conntrack_size / possible CPUs).
CT_SIZES = {"lru": 65536, "direct": 1024}
COLLIDING = _colliding_flows(CT_SIZES["direct"])


@pytest.mark.parametrize("mode", ["lru", "direct"])
def test_program_and_model_agree_on_random_frames(mode: str) -> None:
    with temp_forwarder(table_capacity=1 << 18, conntrack_size=CT_SIZES[mode], conntrack=mode) as fwd:
        fwd.sync(_vips())
        state = fwd.model_state()
        assert state.config.conntrack == mode
        seen_verdicts: dict[int, int] = {}

        def compare(frame: bytes) -> None:
            verdict, out = fwd.test_run(frame)
            expect = M.process(state, frame)
            assert verdict == expect.verdict, (frame.hex(), expect)
            assert out == expect.data, (frame.hex(), out.hex(), expect.data.hex())
            seen_verdicts[verdict] = seen_verdicts.get(verdict, 0) + 1

        @settings(max_examples=2000, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(frames())
        @example(RARE[0])
        @example(RARE[1])
        @example(RARE[2])
        def check(frame: bytes) -> None:
            compare(frame)

        check()
        for frame in COLLIDING:
            compare(frame)
        # every kind of outcome was exercised, and the counters agree
        assert {M.XDP_TX, M.XDP_PASS, M.XDP_DROP} <= set(seen_verdicts), seen_verdicts
        c = fwd.counters()
        bpf = {**{f"DROP_{k.upper()}": v for k, v in c["drops"].items()},
               **{k.upper(): v for k, v in c["events"].items()}}
        model = {r.name: state.stats.get(r, 0) for r in Stat}
        assert bpf == model
        assert sum(v["ct_hits"] for v in c["vips"].values()) > 0, "no conntrack hit exercised"
        assert sum(v["new_flows"] for v in c["vips"].values()) > 0
        if mode == "direct":
            assert state.ct_replaced > 0, "no conntrack slot replacement exercised"
        else:
            assert state.ct_replaced == 0
        # the same flows are tracked (in "direct": in the same slots), steered to the same
        # backends (last_seen differs: the model ran with now = 0)
        kept = fwd.model_state(with_conntrack=True)
        assert {f: (v[0], v[2]) for f, v in kept.ct.items()} == {f: (v[0], v[2]) for f, v in state.ct.items()}
        for name in ("DROP_NO_BACKEND", "ICMP_TOO_BIG_SENT", "ICMP_STEERED", "FRAG_FORWARDED",
                     "PASS_MALFORMED", "PASS_IPV6_EXT", "DROP_FRAGMENT"):
            assert model[name] > 0, f"{name} never exercised: {model}"
