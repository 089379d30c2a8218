"""Differential test: random frames through the real XDP program (BPF_PROG_TEST_RUN) and
through node/forwarder/model.py must give identical verdicts and identical output bytes, and
the same drop/event counters and tracked flows at the end.

Frames are built to reach every branch: both families, VLAN tags, VIP and non-VIP addresses and
ports, all-ports VIPs, an address with one port VIP per protocol and one with several (the two
fragment policies), TCP/UDP/ICMP/other protocols, SYN/ACK/FIN/RST, ICMP errors quoting VIP
flows, fragments, IPv4 options, oversize packets (the too-big answer), then random truncation
and byte damage. A fixed sequence first guarantees the rare outcomes (each counter below is
asserted), then MAGLEV_DIFF_FRAMES random frames (default 100,000) from MAGLEV_DIFF_SEED
(default 13): the same frames every run. `make fuzz` runs many more with a fresh seed; a
failure names the seed and the frame, so it replays. It runs once per conntrack design ("lru",
"direct"), each with its own model.
"""

from __future__ import annotations

import os
import random
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from node.forwarder import maps
from node.forwarder import model as M
from node.forwarder import packets as P
from node.forwarder.loader import BackendSpec, VipSpec
from node.forwarder.maps import Stat
from node.forwarder.testing import temp_forwarder

pytestmark = [pytest.mark.root, pytest.mark.integration]

FRAMES = int(os.environ.get("MAGLEV_DIFF_FRAMES", "100000"))
SEED = int(os.environ.get("MAGLEV_DIFF_SEED", "13"))

VIPS4 = ["10.1.1.1", "10.1.1.2", "10.1.1.3", "10.1.1.4", "10.1.1.5"]
VIPS6 = ["2001:db8:1::1", "2001:db8:1::2"]
OTHER4 = ["10.9.9.9", "192.0.2.1"]
OTHER6 = ["2001:db8:9::9"]
PORTS = [80, 80, 443, 443, 53, 53, 81, 0, 65535, 22]  # weighted towards VIP ports
TCP_FLAGS = [0x02, 0x02, 0x10, 0x10, 0x10, 0x11, 0x12, 0x04, 0x14]


def _vips() -> list[VipSpec]:
    def b(key, addr, state="active"):
        return BackendSpec(key, ip_address(addr), state)

    def v(name, addr, proto, port, backends, size=13):
        act = [x.key for x in backends if x.state == "active"]
        table = [act[(i * 7) % len(act)] for i in range(size)] if act else []
        return VipSpec(name, ip_address(addr), proto, port, tuple(backends), table)

    return [
        # 10.1.1.1: one TCP and one UDP port VIP (fragments follow them by the 3-tuple)
        v("t80", "10.1.1.1", "tcp", 80, [b("a", "10.2.0.1"), b("b", "10.2.0.2"), b("c", "10.2.0.3", "drain")]),
        v("u53", "10.1.1.1", "udp", 53, [b("d", "10.2.1.1"), b("e", "10.2.1.2", "down")], size=7),
        v("tall", "10.1.1.2", "tcp", "all", [b("f", "10.2.2.1"), b("g", "10.2.2.2")], size=251),
        v("uall", "10.1.1.2", "udp", "all", [b("h", "10.2.3.1")]),
        v("none", "10.1.1.3", "tcp", 80, [], size=0),
        # 10.1.1.4: two TCP port VIPs (a first fragment to either port is dropped)
        v("t4a", "10.1.1.4", "tcp", 80, [b("m", "10.2.4.1")]),
        v("t4b", "10.1.1.4", "tcp", 443, [b("n", "10.2.4.2"), b("o", "2001:db8:2::4")], size=11),
        v("t6", "2001:db8:1::1", "tcp", 443, [b("i", "2001:db8:2::1"), b("j", "2001:db8:2::2")], size=65537),
        v("u6all", "2001:db8:1::2", "udp", "all", [b("k", "2001:db8:2::3")]),
        # forty backends, each entry's next forty entries all different (see _stop_serving)
        v("walk", "10.1.1.5", "tcp", 80, [b(f"w{i}", f"10.2.5.{i + 1}") for i in range(40)], size=251),
    ]


def _stop_serving(fwd) -> None:
    """The data path's stop-gap (maglev.h: STOP_GAP_STEPS), as node.stop_gaps starts it: t80
    loses "a" (its entries fall to the next active entry, next to second chance's previous
    owners). "walk" keeps only w0, every fortieth entry, so an entry more than STOP_GAP_STEPS
    before the next w0 is dropped (DROP_STOP_GAP_RUN): stop_serving never does that (it
    leaves a VIP losing most of its backends to the table patch), a state written by hand
    (a version that did, a bug) is met the same way by the program and the model."""
    assert fwd.stop_serving({"t80": {"a"}, "walk": {f"w{i}" for i in range(1, 40)}}) == ["t80"]
    for i in range(1, 40):
        fwd._set_state(fwd.backend_id("walk", f"w{i}"), maps.BE_STATE_DRAIN if i % 2 else maps.BE_STATE_DOWN)


class Frames:
    """Random frames from one seeded generator (fast enough for 100k per design)."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def ip4(self, pool) -> str:
        r = self.r
        return r.choice(pool) if r.random() < 0.5 else str(IPv4Address(r.getrandbits(32)))

    def ip6(self, pool) -> str:
        r = self.r
        return r.choice(pool) if r.random() < 0.5 else str(IPv6Address(r.getrandbits(128)))

    def l4(self, src: bytes, dst: bytes) -> tuple[int, bytes]:
        r = self.r
        proto = r.choice(["tcp", "udp"])
        size = r.randint(0, 64) if r.random() < 0.5 else r.randint(1300, 1500)
        seg = P.l4(proto, src, dst, r.choice([1234, 40000, *PORTS]), r.choice(PORTS), bytes(size),
                   r.choice(TCP_FLAGS))
        return (6 if proto == "tcp" else 17), seg

    def v4(self) -> tuple[bytes, int]:
        r = self.r
        src = self.ip4(OTHER4)
        dst = r.choice(VIPS4) if r.random() < 0.75 else self.ip4(OTHER4)
        kind = r.choice(["l4", "l4", "l4", "icmp_err", "icmp_other", "frag", "other"])
        df = r.random() < 0.5
        tos = r.randint(0, 255)
        options = r.choice([b"", b"", b"\x01\x01\x01\x00", bytes(8)])
        a, b = ip_address(src).packed, ip_address(dst).packed
        if kind == "l4":
            num, seg = self.l4(a, b)
            l3 = P.ipv4(src, dst, num, seg, df=df, tos=tos, options=options)
        elif kind == "icmp_err":
            # a backend's reply (VIP -> client) quoted by a router
            num, seg = self.l4(b, a)
            quoted = P.ipv4(dst, src, num, seg)[:28 + r.randint(0, 20)]
            icmp = struct.pack("!BBHHH", r.choice([3, 11, 5]), 4, 0, 0, 1400) + quoted
            l3 = P.ipv4(self.ip4(OTHER4), dst, 1, icmp, df=df, tos=tos)
        elif kind == "icmp_other":
            l3 = P.ipv4(src, dst, 1, b"\x08\x00\x00\x00" + bytes(r.randint(0, 40)), tos=tos)
        elif kind == "frag":
            num, seg = self.l4(a, b)
            frag = r.choice([0x2000, 0x2000, 0x2000 | 5, 5, 0x1FFF])
            l3 = P.ipv4(src, dst, num, seg, df=False, frag=frag, tos=tos, options=options)
        else:
            l3 = P.ipv4(src, dst, r.choice([47, 50, 132, 2]), bytes(20), tos=tos)
        return l3, 0x0800

    def v6(self) -> tuple[bytes, int]:
        r = self.r
        src = self.ip6(OTHER6)
        dst = r.choice(VIPS6) if r.random() < 0.75 else self.ip6(OTHER6)
        kind = r.choice(["l4", "l4", "l4", "icmp_err", "frag", "ext", "other"])
        tc = r.randint(0, 255)
        a, b = ip_address(src).packed, ip_address(dst).packed
        if kind == "l4":
            num, seg = self.l4(a, b)
            l3 = P.ipv6(src, dst, num, seg, tc=tc, flow=r.randint(0, 0xFFFFF))
        elif kind == "icmp_err":
            num, seg = self.l4(b, a)
            quoted = P.ipv6(dst, src, num, seg)[:48 + r.randint(0, 40)]
            icmp = struct.pack("!BBHI", r.choice([1, 2, 3, 4, 128]), 0, 0, 1400) + quoted
            l3 = P.ipv6(self.ip6(OTHER6), dst, 58, icmp, tc=tc)
        elif kind == "frag":
            num, seg = self.l4(a, b)
            off = r.choice([0, 1, 0x100])
            fh = struct.pack("!BBHI", num, 0, (off << 3) | r.choice([0, 1]), 7)
            l3 = P.ipv6(src, dst, 44, fh + seg, tc=tc)
        elif kind == "ext":
            l3 = P.ipv6(src, dst, r.choice([0, 43, 60]), bytes(24), tc=tc)
        else:
            l3 = P.ipv6(src, dst, r.choice([47, 50, 132]), bytes(20), tc=tc)
        return l3, 0x86DD

    def frame(self) -> bytes:
        r = self.r
        pick = r.randrange(5)
        if pick < 2:
            l3, ethertype = self.v4()
        elif pick < 4:
            l3, ethertype = self.v6()
        else:
            l3, ethertype = r.randbytes(r.randint(0, 60)), r.choice([0x0806, 0x0800, 0x86DD, 0x8100])
        frame = P.ether(l3, ethertype, vlan=r.choice([None, None, 5]))
        damage = r.choice(["none"] * 7 + ["truncate", "byte", "length"])
        if damage == "truncate":
            frame = frame[:r.randint(14, len(frame))]
        elif damage == "byte":
            pos = r.randint(12, min(len(frame) - 1, 100))
            frame = frame[:pos] + bytes([r.randint(0, 255)]) + frame[pos + 1:]
        elif damage == "length":
            pos = 16 if frame[12:14] == b"\x08\x00" else 18 if frame[12:14] == b"\x86\xdd" else None
            if pos is not None and len(frame) > pos + 2:
                frame = frame[:pos] + r.randint(0, 0xFFFF).to_bytes(2, "big") + frame[pos + 2:]
        return frame


def _second_chance_change(vips: list[VipSpec]) -> list[VipSpec]:
    """t80 gains backend "p" (every third entry moves to it), with a window far longer than
    the test: its moved entries name their previous owner (a, b or the draining c)."""
    t80 = vips[0]
    assert t80.name == "t80"
    backends = (*t80.backends, BackendSpec("p", ip_address("10.2.0.9"), "active"))
    table = ["p" if i % 3 == 0 else k for i, k in enumerate(t80.table)]
    vips[0] = VipSpec(t80.name, t80.address, t80.protocol, t80.port, backends, table,
                      second_chance_window=3600.0)
    return vips


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


def _guaranteed() -> list[bytes]:
    """One frame (or sequence) per rare outcome the test asserts, sent before the random ones."""
    c4, c6 = "192.0.2.1", "2001:db8:9::1"
    syn = P.flow_packet(c4, "10.1.1.1", 2000, 80, tcp_flags=0x02)
    rst = P.flow_packet(c4, "10.1.1.1", 2000, 80, tcp_flags=0x14)
    quoted = P.ipv4("10.1.1.1", c4, 6, P.l4("tcp", ip_address("10.1.1.1").packed, ip_address(c4).packed, 80, 2001, b""))
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + quoted[:28]
    return [
        _first_fragment("10.1.1.4", "tcp", 80),      # several port VIPs: DROP_FRAGMENT
        _first_fragment("10.1.1.1", "udp", 53),      # one port VIP: FRAG_FORWARDED
        _first_fragment("2001:db8:1::1", "tcp", 443),
        P.flow_packet(c4, "10.1.1.3", 2000, 80),     # empty table: DROP_NO_BACKEND
        P.flow_packet(c4, "10.1.1.1", 2001, 80, tcp_flags=0x10, size=1500),  # ICMP_TOO_BIG_SENT
        P.flow_packet(c4, "10.1.1.1", 2002, 80, tcp_flags=0x10, size=1500, df=False),  # DROP_TOO_BIG
        P.ether(P.ipv4("198.51.100.1", "10.1.1.1", 1, icmp), 0x0800),       # ICMP_STEERED
        P.ether(P.ipv6(c6, "2001:db8:1::1", 0, bytes(24)), 0x86DD),          # PASS_IPV6_EXT
        P.flow_packet(c4, "10.1.1.1", 2000, 80)[:30],                        # PASS_MALFORMED
        syn, rst, rst,                                # tracked, forgotten, then a miss
        *COLLIDING,
    ]


# conntrack_size per design. "direct": the smallest (1024 slots), so random flows collide and
# the program's "a new flow replaces the one in its slot" is compared with the model's too.
# "lru": room for every flow the frames make (the model does not evict).
CT_SIZES = {"lru": 1 << 18, "direct": 1024}
COLLIDING = _colliding_flows(CT_SIZES["direct"])


@pytest.mark.parametrize("mode", ["lru", "direct"])
def test_program_and_model_agree_on_random_frames(mode: str) -> None:
    with temp_forwarder(table_capacity=1 << 18, conntrack_size=CT_SIZES[mode], conntrack=mode) as fwd:
        fwd.sync(_vips())
        fwd.sync(_second_chance_change(_vips()))  # t80's moved entries name their previous owner
        _stop_serving(fwd)
        state = fwd.model_state()
        assert state.prev_tables, "no previous-owner table to compare"

        assert state.config.conntrack == mode
        seen_verdicts: dict[int, int] = {}
        gen = Frames(SEED)

        def compare(frame: bytes, n: int) -> None:
            verdict, out = fwd.test_run(frame)
            expect = M.process(state, frame)
            where = f"seed {SEED}, frame {n}: {frame.hex()}"
            assert verdict == expect.verdict, (where, expect)
            assert out == expect.data, (where, out.hex(), expect.data.hex())
            seen_verdicts[verdict] = seen_verdicts.get(verdict, 0) + 1

        for i, frame in enumerate(_guaranteed()):
            compare(frame, -1 - i)
        forgotten = state.ct.get(M.Flow.of("192.0.2.1", "10.1.1.1", 2000, 80, "tcp"))
        assert forgotten is None, "the RST did not end the tracked flow"
        for n in range(FRAMES):
            compare(gen.frame(), n)
        # every kind of outcome was exercised, and the counters agree
        assert {M.XDP_TX, M.XDP_PASS, M.XDP_DROP} <= set(seen_verdicts), seen_verdicts
        c = fwd.counters()
        bpf = {**{f"DROP_{k.upper()}": v for k, v in c["drops"].items()},
               **{k.upper(): v for k, v in c["events"].items()}}
        model = {r.name: state.stats.get(r, 0) for r in Stat}
        assert bpf.pop("SECOND_CHANCE_HINTED") == state.sc_hinted > 0, "second chance never exercised"
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
                     "PASS_MALFORMED", "PASS_IPV6_EXT", "DROP_FRAGMENT", "DROP_TOO_BIG", "DROP_STOP_GAP_RUN"):
            assert model[name] > 0, f"{name} never exercised: {model}"
