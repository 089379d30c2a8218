"""Golden packets through the real XDP program (BPF_PROG_TEST_RUN, root namespace, static
next-hop MAC): exact outer headers, inner bytes intact, and every "not ours" case untouched.
Every test runs with both conntrack designs (forwarder.conntrack "lru" and "direct"), except
the two that show where they differ."""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest

from node.forwarder import model as M
from node.forwarder import packets as P
from node.forwarder.loader import BackendSpec, VipSpec
from node.forwarder.testing import TEST_NEXT_HOP, temp_forwarder

pytestmark = [pytest.mark.root, pytest.mark.integration]

NH = bytes.fromhex(TEST_NEXT_HOP.replace(":", ""))
VIP4, VIP6 = "10.1.1.1", "2001:db8:1::1"
CLIENT4, CLIENT6 = "192.0.2.7", "2001:db8:9::7"
SRC4, SRC6 = ip_address("10.0.0.1").packed, ip_address("fd00::1").packed


def be(key: str, addr: str, state: str = "active") -> BackendSpec:
    return BackendSpec(key, ip_address(addr), state)


def vip(name, addr, proto, port, backends, table=None) -> VipSpec:
    if table is None:
        active = [b.key for b in backends if b.state == "active"]
        table = [active[i % len(active)] for i in range(13)] if active else []
    return VipSpec(name, ip_address(addr), proto, port, tuple(backends), table)


def base_vips(**states) -> list[VipSpec]:
    b4 = [be(k, f"10.2.0.{i}", states.get(k, "active")) for i, k in enumerate("abc", 1)]
    return [
        vip("web4", VIP4, "tcp", 80, b4),
        vip("dns4", VIP4, "udp", 53, [be("d1", "10.2.1.1"), be("d2", "10.2.1.2")]),
        vip("web6", VIP6, "tcp", 443, [be("x", "2001:db8:2::1"), be("y", "2001:db8:2::2")]),
        vip("dns6", VIP6, "udp", 53, [be("z", "2001:db8:3::1")]),
        vip("any4", "10.1.1.2", "udp", "all", [be("u", "10.2.2.1")]),
        vip("empty", "10.1.1.3", "tcp", 80, [], []),
    ]


CT_MODES = ["lru", "direct"]


@pytest.fixture(params=CT_MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def fwd(mode):
    with temp_forwarder(conntrack=mode) as f:
        assert f.conntrack == mode
        f.sync(base_vips())
        yield f


def run(fwd, frame):
    return fwd.test_run(frame)


def outer_dst(out: bytes) -> str:
    if out[12:14] == b"\x08\x00":
        return str(ip_address(out[30:34]))
    return str(ip_address(out[38:54]))


def key_for(fwd, vipname: str, addr: str) -> str:
    st = fwd.model_state()
    for (v, key), bid in fwd.backend_ids.items():
        if v == vipname and str(ip_address(st.backends[bid].addr[:4] if st.backends[bid].family == 4 else st.backends[bid].addr)) == addr:
            return key
    raise AssertionError(addr)


@pytest.mark.parametrize("src,dst,port,proto", [
    (CLIENT4, VIP4, 80, "tcp"), (CLIENT4, VIP4, 53, "udp"),
    (CLIENT6, VIP6, 443, "tcp"), (CLIENT6, VIP6, 53, "udp"),
])
def test_vip_packet_is_gre_encapsulated(fwd, src, dst, port, proto) -> None:
    frame = P.flow_packet(src, dst, 40001, port, proto, payload=b"hello")
    expect = M.process(fwd.model_state(), frame)
    verdict, out = run(fwd, frame)
    assert verdict == M.XDP_TX
    assert out == expect.data
    assert out[0:6] == NH and out[6:12] == P.NODE_MAC
    if ":" in dst:
        assert out[12:14] == b"\x86\xdd"
        w0, plen, nh, hlim = struct.unpack("!IHBB", out[14:22])
        assert (w0 >> 28, nh, hlim, plen) == (6, 47, 64, len(frame) - 14 + 4)
        assert out[22:38] == SRC6
        assert out[54:58] == b"\x00\x00\x86\xdd" and out[58:] == frame[14:]
    else:
        assert out[12:14] == b"\x08\x00"
        hdr = out[14:34]
        assert hdr[0] == 0x45 and hdr[8] == 64 and hdr[9] == 47 and hdr[12:16] == SRC4
        assert struct.unpack("!H", hdr[2:4])[0] == struct.unpack("!H", frame[16:18])[0] + 24
        assert M.checksum(hdr) == 0, "outer IPv4 checksum must verify"
        assert out[34:38] == b"\x00\x00\x08\x00" and out[38:] == frame[14:]


def test_vlan_tagged_vip_packet_keeps_tag(fwd) -> None:
    frame = P.flow_packet(CLIENT4, VIP4, 40001, 80, vlan=7)
    verdict, out = run(fwd, frame)
    assert verdict == M.XDP_TX and out[12:18] == b"\x81\x00\x00\x07\x08\x00"
    assert out == M.process(fwd.model_state(), frame).data


def _malformed_frames() -> list[tuple[str, bytes]]:
    good = P.flow_packet(CLIENT4, VIP4, 40001, 80)
    bad_ihl = bytearray(good); bad_ihl[14] = 0x44
    bad_ver = bytearray(good); bad_ver[14] = 0x55
    long_len = bytearray(good); long_len[16:18] = (1000).to_bytes(2, "big")
    short_len = bytearray(good); short_len[16:18] = (22).to_bytes(2, "big")  # no room for ports
    v6 = P.flow_packet(CLIENT6, VIP6, 40001, 443)
    v6_long = bytearray(v6); v6_long[18:20] = (2000).to_bytes(2, "big")
    return [("bad ihl", bytes(bad_ihl)), ("bad version", bytes(bad_ver)),
            ("total length beyond frame", bytes(long_len)), ("no ports", bytes(short_len)),
            ("ipv4 truncated", good[:30]), ("ethernet header only", good[:14]), ("ipv6 truncated", v6[:50]),
            ("ipv6 payload beyond frame", bytes(v6_long))]


@pytest.mark.parametrize("name,frame", _malformed_frames())
def test_malformed_is_passed_and_counted(fwd, name, frame) -> None:
    before = fwd.counters()["events"]["pass_malformed"]
    verdict, out = run(fwd, frame)
    assert (verdict, out) == (M.XDP_PASS, frame), name
    assert fwd.counters()["events"]["pass_malformed"] == before + 1


@pytest.mark.parametrize("name,frame", [
    ("not a VIP", P.flow_packet(CLIENT4, "10.9.9.9", 1, 80)),
    ("VIP, other port", P.flow_packet(CLIENT4, VIP4, 1, 81)),
    ("VIP6, other port", P.flow_packet(CLIENT6, VIP6, 1, 80)),
    ("ARP", P.ether(bytes.fromhex("0001080006040001") + bytes(20), 0x0806)),
    ("ICMP echo to VIP", P.ether(P.ipv4(CLIENT4, VIP4, 1, b"\x08\x00\xf7\xff" + bytes(4)), 0x0800)),
    ("IPv6 hop-by-hop", P.ether(P.ipv6(CLIENT6, VIP6, 0, bytes(16)), 0x86DD)),
])
def test_not_ours_passes_untouched(fwd, name, frame) -> None:
    assert run(fwd, frame) == (M.XDP_PASS, frame), name
    c = fwd.counters()
    assert sum(s["packets"] for s in c["vips"].values()) == 0
    assert sum(c["drops"].values()) == 0


def test_empty_table_drops_and_counts(fwd) -> None:
    verdict, _ = run(fwd, P.flow_packet(CLIENT4, "10.1.1.3", 1, 80))
    assert verdict == M.XDP_DROP
    assert fwd.counters()["drops"]["no_backend"] == 1


def test_conntrack_hit_versus_miss_and_counters(fwd) -> None:
    syn = P.flow_packet(CLIENT4, VIP4, 40001, 80)
    frame = P.flow_packet(CLIENT4, VIP4, 40001, 80, tcp_flags=0x10)
    v1, out1 = run(fwd, syn)
    v2, out2 = run(fwd, frame)
    assert v1 == v2 == M.XDP_TX and outer_dst(out1) == outer_dst(out2)
    c = fwd.counters()
    assert c["vips"]["web4"] == {"packets": 2, "bytes": 2 * 40, "new_flows": 1, "ct_hits": 1, "ct_misses": 1}
    key = key_for(fwd, "web4", outer_dst(out1))
    assert c["vip_backends"]["web4"][key]["packets"] == 2
    assert c["backends"][key]["packets"] == 2
    # Point the whole table at another backend: the tracked flow stays where it is.
    other = next(k for k in "abc" if k != key)
    vips = base_vips()
    vips[0] = vip("web4", VIP4, "tcp", 80, vips[0].backends, [other] * 13)
    fwd.sync(vips)
    assert run(fwd, frame)[1] == out2
    # a SYN on the same 5-tuple is a new connection: it follows the table, and its entry
    # ("lru": rewritten in place) sends the connection's next packets there too
    entries = fwd.conntrack_count()
    assert key_for(fwd, "web4", outer_dst(run(fwd, syn)[1])) == other
    assert key_for(fwd, "web4", outer_dst(run(fwd, frame)[1])) == other
    assert fwd.conntrack_count() == entries
    new_flow = P.flow_packet(CLIENT4, VIP4, 40002, 80)
    assert key_for(fwd, "web4", outer_dst(run(fwd, new_flow)[1])) == other


def _sharing_a_slot(st: M.ModelState) -> tuple[int, int]:
    """Source ports of two TCP flows to VIP4:80 whose flow hashes share a 1024-slot "direct"
    conntrack slot."""
    seen: dict[int, int] = {}
    for sport in range(20000, 40000):
        s = M.flow_hash(M.Flow.of(CLIENT4, VIP4, sport, 80, "tcp")) & 1023
        if s in seen:
            return seen[s], sport
        seen[s] = sport
    raise AssertionError("no two flows share a slot")


def _ack(sport: int) -> bytes:
    return P.flow_packet(CLIENT4, VIP4, sport, 80, tcp_flags=0x10)


def _track_then_repoint(f, sport: int) -> tuple[bytes, str]:
    """Track flow sport, then point web4's whole table at another backend, so only conntrack
    keeps the flow where it is: (its encapsulated ACK, that other backend's key)."""
    run(f, P.flow_packet(CLIENT4, VIP4, sport, 80))
    _, out = run(f, _ack(sport))
    other = next(k for k in "abc" if k != key_for(f, "web4", outer_dst(out)))
    vips = base_vips()
    vips[0] = vip("web4", VIP4, "tcp", 80, vips[0].backends, [other] * 13)
    f.sync(vips)
    assert run(f, _ack(sport))[1] == out
    return out, other


def test_lru_keeps_every_flow_below_capacity() -> None:
    """"lru" (the default): two flows that would share a "direct" slot are both kept; a new
    flow displaces no tracked flow while the map has room."""
    with temp_forwarder(conntrack_size=1024) as f:
        assert f.conntrack == "lru"
        f.sync(base_vips())
        a, b = _sharing_a_slot(f.model_state())
        out_a, _ = _track_then_repoint(f, a)
        run(f, P.flow_packet(CLIENT4, VIP4, b, 80))
        assert f.conntrack_count() == 2
        assert run(f, _ack(a))[1] == out_a  # still tracked: stays on its backend
        assert set(f.model_state(with_conntrack=True).ct) == {
            M.Flow.of(CLIENT4, VIP4, a, 80, "tcp"), M.Flow.of(CLIENT4, VIP4, b, 80, "tcp")}


def test_direct_new_flow_replaces_the_tracked_flow_in_its_slot() -> None:
    """"direct" (maglev.h): a new flow whose hash shares a slot pushes the tracked flow out,
    and that flow follows the table from then on (and is tracked again)."""
    with temp_forwarder(conntrack_size=1024, conntrack="direct") as f:
        f.sync(base_vips())
        st = f.model_state()
        assert st.config.ct_slots == 1024
        a, b = _sharing_a_slot(st)
        assert st.ct_slot(M.Flow.of(CLIENT4, VIP4, a, 80, "tcp")) == st.ct_slot(M.Flow.of(CLIENT4, VIP4, b, 80, "tcp"))
        _, other = _track_then_repoint(f, a)
        run(f, P.flow_packet(CLIENT4, VIP4, b, 80))  # b's SYN takes the slot
        assert f.conntrack_count() == 1
        assert list(f.model_state(with_conntrack=True).ct) == [M.Flow.of(CLIENT4, VIP4, b, 80, "tcp")]
        assert key_for(f, "web4", outer_dst(run(f, _ack(a))[1])) == other
        assert f.conntrack_count() == 1  # a took the slot back
        assert list(f.model_state(with_conntrack=True).ct) == [M.Flow.of(CLIENT4, VIP4, a, 80, "tcp")]


def _flow_on(fwd, key: str) -> tuple[bytes, bytes]:
    """(SYN, ACK) of a new flow the table sends to backend `key` (searching source ports)."""
    st = fwd.model_state()
    bid = fwd.backend_id("web4", key)
    for sport in range(20000, 30000):
        if M.pick(st, M.Flow.of(CLIENT4, VIP4, sport, 80, "tcp")) == bid:
            return (P.flow_packet(CLIENT4, VIP4, sport, 80),
                    P.flow_packet(CLIENT4, VIP4, sport, 80, tcp_flags=0x10))
    raise AssertionError("no flow found")


def test_drain_keeps_existing_flows_takes_no_new(fwd) -> None:
    syn, frame = _flow_on(fwd, "a")
    _, out = run(fwd, syn)
    assert outer_dst(out) == "10.2.0.1"
    fwd.sync(base_vips(a="drain"))
    assert outer_dst(run(fwd, frame)[1]) == "10.2.0.1"  # established flow stays
    for sport in range(1000, 1200):  # new flows never land on the draining backend
        _, o = run(fwd, P.flow_packet(CLIENT4, VIP4, sport, 80))
        assert outer_dst(o) != "10.2.0.1"


@pytest.mark.parametrize("how", ["down", "removed"])
def test_down_or_removed_backend_rehashes(fwd, how) -> None:
    syn, frame = _flow_on(fwd, "a")
    run(fwd, syn)
    vips = base_vips(a="down")
    if how == "removed":
        vips[0] = vip("web4", VIP4, "tcp", 80, [b for b in vips[0].backends if b.key != "a"])
    fwd.sync(vips)
    verdict, out = run(fwd, frame)
    assert verdict == M.XDP_TX and outer_dst(out) in ("10.2.0.2", "10.2.0.3")
    assert out == M.process(fwd.model_state(), frame).data
    assert fwd.counters()["vips"]["web4"]["new_flows"] == 2  # re-inserted on the new backend


def test_staged_table_is_invisible_until_flip(fwd) -> None:
    vid = fwd.vip_id("web4")
    a_id, b_id = fwd.backend_id("web4", "a"), fwd.backend_id("web4", "b")
    fwd.sync([vip("web4", VIP4, "tcp", 80, base_vips()[0].backends, ["a"] * 65537)])
    frames = [P.flow_packet(CLIENT4, VIP4, 10000 + i, 80, tcp_flags=0x10) for i in range(300)]
    spare = fwd.stage_table(vid, [b_id] * 65537)
    fwd.conntrack_clear()
    assert {outer_dst(run(fwd, f)[1]) for f in frames} == {"10.2.0.1"}
    fwd.flip_table(vid, spare)
    fwd.conntrack_clear()
    assert {outer_dst(run(fwd, f)[1]) for f in frames} == {"10.2.0.2"}
    assert a_id != b_id


def test_table_flips_under_concurrent_traffic(fwd) -> None:
    """Packets run on another thread (and CPU) while tables of different sizes flip: every
    packet goes to the backend of the old or the new table, none is dropped."""
    import threading

    backs = base_vips()[0].backends
    tables = [["a"] * 65537, ["b"] * 7, ["a"] * 251, ["b"] * 65537]
    stop = threading.Event()
    seen: set[str] = set()
    bad: list[tuple[int, bytes]] = []

    def traffic() -> None:
        runner = type(fwd._runner)(fwd.prog_fd)
        i = 0
        while not stop.is_set():
            i += 1
            v, out = runner.run(P.flow_packet(CLIENT4, VIP4, 1024 + i % 60000, 80, tcp_flags=0x10))
            if v != M.XDP_TX:
                bad.append((v, out))
            else:
                seen.add(outer_dst(out))

    fwd.sync([vip("web4", VIP4, "tcp", 80, backs, tables[3])])
    fwd.conntrack_clear()
    t = threading.Thread(target=traffic)
    t.start()
    try:
        for i in range(200):
            fwd.sync([vip("web4", VIP4, "tcp", 80, backs, tables[i % 4])])
    finally:
        stop.set()
        t.join()
    assert not bad
    assert seen and seen <= {"10.2.0.1", "10.2.0.2"}
    assert fwd.counters()["drops"]["bad_backend"] == 0


def test_too_big_ipv4_answers_frag_needed(fwd) -> None:
    frame = P.flow_packet(CLIENT4, VIP4, 40001, 80, payload=bytes(1460))
    verdict, out = run(fwd, frame)
    assert verdict == M.XDP_TX
    assert out == M.process(fwd.model_state(), frame).data
    assert out[0:6] == P.CLIENT_MAC and out[6:12] == P.NODE_MAC
    ip, icmp = out[14:34], out[34:]
    assert ip[9] == 1 and ip[12:16] == ip_address(VIP4).packed and ip[16:20] == ip_address(CLIENT4).packed
    assert M.checksum(ip) == 0 and M.checksum(icmp) == 0
    assert icmp[:2] == b"\x03\x04" and struct.unpack("!H", icmp[6:8])[0] == 1500 - 24
    assert icmp[8:] == frame[14:14 + 28]
    assert fwd.counters()["events"]["icmp_too_big_sent"] == 1
    verdict, _ = run(fwd, P.flow_packet(CLIENT4, VIP4, 40001, 80, payload=bytes(1460), df=False))
    assert verdict == M.XDP_DROP and fwd.counters()["drops"]["too_big"] == 1


def test_too_big_ipv6_answers_packet_too_big(fwd) -> None:
    frame = P.flow_packet(CLIENT6, VIP6, 40001, 443, payload=bytes(1440))
    verdict, out = run(fwd, frame)
    assert verdict == M.XDP_TX
    assert out == M.process(fwd.model_state(), frame).data
    icmp = out[54:]
    assert icmp[:2] == b"\x02\x00" and struct.unpack("!I", icmp[4:8])[0] == 1500 - 44
    assert len(icmp) == 8 + 1232 and icmp[8:] == frame[14:14 + 1232]
    pseudo = out[22:54] + struct.pack("!II", len(icmp), 58)
    assert M.checksum(pseudo + icmp) == 0


def test_icmp_error_steered_to_flow_owner(fwd) -> None:
    frame = P.flow_packet(CLIENT4, VIP4, 40001, 80)
    owner = outer_dst(run(fwd, frame)[1])
    # point the table elsewhere: only conntrack knows the owner now
    backs = base_vips()[0].backends
    other = next(b.key for b in backs if str(b.address) != owner)
    fwd.sync([vip("web4", VIP4, "tcp", 80, backs, [other] * 13)] + base_vips()[1:])
    quoted = P.flow_packet(VIP4, CLIENT4, 80, 40001)[14:42]
    err = P.ether(P.ipv4("192.0.2.254", VIP4, 1, struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + quoted), 0x0800)
    verdict, out = run(fwd, err)
    assert verdict == M.XDP_TX and outer_dst(out) == owner and out[38:] == err[14:]
    assert fwd.counters()["events"]["icmp_steered"] == 1


def _fragments(src: str, dst: str, proto: str, sport: int, dport: int, payload: bytes, piece: int = 1200) -> list[bytes]:
    """A real datagram (correct L4 checksum) cut into fragments of at most ``piece`` payload
    bytes (a multiple of 8), as a host whose path MTU is smaller than the datagram sends it."""
    a, b = ip_address(src), ip_address(dst)
    seg = P.l4(proto, a.packed, b.packed, sport, dport, payload)
    num = 6 if proto == "tcp" else 17
    out = []
    for off in range(0, len(seg), piece):
        more = off + piece < len(seg)
        chunk = seg[off:off + piece]
        if a.version == 4:
            l3 = P.ipv4(src, dst, num, chunk, df=False, frag=(0x2000 if more else 0) | (off // 8), ident=77)
            out.append(P.ether(l3, 0x0800))
        else:
            fh = struct.pack("!BBHI", num, 0, off | int(more), 77)
            out.append(P.ether(P.ipv6(src, dst, 44, fh + chunk), 0x86DD))
    return out


def _three_tuple_backend(fwd, vipname: str, src: str, dst: str, proto: str) -> str:
    """The backend address the VIP's table gives the 3-tuple (ports 0) of a fragment."""
    st = fwd.model_state()
    vid = fwd.vip_ids[vipname]
    table = st.tables[vid]
    bid = table[M.table_index(M.flow_hash(M.Flow.of(src, dst, 0, 0, proto)), len(table))]
    be = st.backends[bid]
    return str(ip_address(be.addr[:4] if be.family == 4 else be.addr))


def test_fragments_of_an_all_ports_vip_follow_its_table(fwd) -> None:
    frags = _fragments(CLIENT4, "10.1.1.2", "udp", 7, 5000, bytes(3000))
    outs = [run(fwd, f) for f in frags]
    assert [v for v, _ in outs] == [M.XDP_TX] * 3
    assert {outer_dst(o) for _, o in outs} == {"10.2.2.1"}
    assert fwd.counters()["events"]["frag_forwarded"] == 3


@pytest.mark.parametrize("src,dst,proto,port,vipname", [
    (CLIENT4, VIP4, "udp", 53, "dns4"), (CLIENT6, VIP6, "udp", 53, "dns6"),
    (CLIENT4, VIP4, "tcp", 80, "web4"), (CLIENT6, VIP6, "tcp", 443, "web6"),
])
def test_large_datagram_to_the_only_port_vip_of_its_address_meets_one_backend(fwd, src, dst, proto, port, vipname) -> None:
    """EDNS-sized UDP (and a fragmented TCP segment) to a port VIP: the address has exactly one
    port VIP for the protocol, so every fragment, the first included, follows that VIP's table
    by the 3-tuple and arrives intact inside GRE."""
    frags = _fragments(src, dst, proto, 40001, port, bytes(range(256)) * 12)
    want = _three_tuple_backend(fwd, vipname, src, dst, proto)
    st = fwd.model_state()
    for f in frags:
        verdict, out = run(fwd, f)
        assert verdict == M.XDP_TX, f.hex()
        assert outer_dst(out) == want
        assert out[-(len(f) - 14):] == f[14:], "inner fragment must be untouched"
        assert out == M.process(st, f).data
    c = fwd.counters()
    assert c["events"]["frag_forwarded"] == len(frags) and c["drops"].get("fragment", 0) == 0
    assert fwd.conntrack_count() == 0, "fragments never create conntrack entries"


def test_fragments_to_an_address_with_several_port_vips_keep_the_old_policy(fwd) -> None:
    """Two UDP port VIPs on one address: a fragment cannot tell them apart, so the first one
    (whose port has a VIP) is dropped and counted, the later ones go to the kernel. Removing
    the second VIP brings the 3-tuple steering back."""
    vips = base_vips() + [vip("sip4", VIP4, "udp", 5060, [be("s1", "10.2.4.1")])]
    fwd.sync(vips)
    assert (4, ip_address(VIP4).packed + bytes(12), 17) not in fwd.model_state().frag_vips
    first, *later = _fragments(CLIENT4, VIP4, "udp", 7, 53, bytes(3000))
    assert run(fwd, first)[0] == M.XDP_DROP
    for f in later:
        assert run(fwd, f) == (M.XDP_PASS, f)
    assert fwd.counters()["drops"]["fragment"] == 1
    # TCP on the same address still has one port VIP: its fragments are forwarded
    tfirst = _fragments(CLIENT4, VIP4, "tcp", 7, 80, bytes(3000))[0]
    assert run(fwd, tfirst)[0] == M.XDP_TX
    fwd.sync(base_vips())
    assert fwd.model_state().frag_vips[(4, ip_address(VIP4).packed + bytes(12), 17)] == fwd.vip_ids["dns4"]
    assert run(fwd, first)[0] == M.XDP_TX


def test_an_all_ports_vip_takes_the_fragments_before_a_port_vip(fwd) -> None:
    vips = base_vips() + [vip("tcp2", "10.1.1.2", "tcp", 22, [be("t1", "10.2.5.1")]),
                          vip("tcp2all", "10.1.1.2", "tcp", "all", [be("t2", "10.2.5.2")])]
    fwd.sync(vips)
    for f in _fragments(CLIENT4, "10.1.1.2", "tcp", 7, 22, bytes(3000)):
        verdict, out = run(fwd, f)
        assert verdict == M.XDP_TX and outer_dst(out) == "10.2.5.2"


def test_rst_ends_the_tracked_flow(fwd) -> None:
    """A client's RST is forwarded to the flow's backend and removes its conntrack entry (the
    slot is free at once); a RST that misses conntrack creates none."""
    syn = P.flow_packet(CLIENT4, VIP4, 40100, 80, tcp_flags=0x02)
    rst = P.flow_packet(CLIENT4, VIP4, 40100, 80, tcp_flags=0x14)
    v, out_syn = run(fwd, syn)
    assert v == M.XDP_TX and fwd.conntrack_count() == 1
    v, out_rst = run(fwd, rst)
    assert v == M.XDP_TX and outer_dst(out_rst) == outer_dst(out_syn)
    assert fwd.conntrack_count() == 0
    stray = P.flow_packet(CLIENT4, VIP4, 40101, 80, tcp_flags=0x04)
    assert run(fwd, stray)[0] == M.XDP_TX and fwd.conntrack_count() == 0
    c = fwd.counters()["vips"]["web4"]
    assert (c["new_flows"], c["ct_hits"]) == (1, 1)


def test_fin_keeps_the_tracked_flow(fwd) -> None:
    """The forwarder sees only the client's half: after the client's FIN the server may still
    send for as long as it likes and the client's ACKs must reach the same backend, so a FIN
    leaves the entry where it is (README: connection tracking)."""
    run(fwd, P.flow_packet(CLIENT4, VIP4, 40102, 80, tcp_flags=0x02))
    run(fwd, P.flow_packet(CLIENT4, VIP4, 40102, 80, tcp_flags=0x11))
    assert fwd.conntrack_count() == 1
    run(fwd, P.flow_packet(CLIENT4, VIP4, 40102, 80, tcp_flags=0x10))
    assert fwd.counters()["vips"]["web4"]["ct_hits"] == 2


def test_self_test_passes_and_leaves_no_trace(fwd) -> None:
    res = fwd.self_test()
    assert res.ok, res.reason
    assert {c.vip for c in res.checks} == {"web4", "dns4", "web6", "dns6", "any4", "empty"}
    c = fwd.counters()
    assert sum(s["packets"] for s in c["vips"].values()) == 0
    assert c["events"]["self_test_packets"] == 5
    assert fwd.conntrack_count() == 0


def test_self_test_reports_a_vip_that_cannot_forward(mode) -> None:
    with temp_forwarder(encap_source_v6=None, conntrack=mode) as f:
        f.sync(base_vips())
        res = f.self_test()
        assert not res.ok
        bad = {c.vip for c in res.checks if not c.ok}
        assert bad == {"web6", "dns6"}
        assert "DROP" in res.reason
        # Those VIPs' own fault: the controller withdraws them alone (node.self_test).
        assert not res.node_wide


def test_udp_conntrack_idle_expiry(mode) -> None:
    import time

    with temp_forwarder(udp_idle_timeout=0.3, conntrack=mode) as f:
        f.sync(base_vips())
        frame = P.flow_packet(CLIENT4, VIP4, 40001, 53, "udp")
        run(f, frame)
        run(f, frame)
        assert f.counters()["vips"]["dns4"]["ct_hits"] == 1
        time.sleep(0.5)
        run(f, frame)
        s = f.counters()["vips"]["dns4"]
        assert (s["ct_hits"], s["ct_misses"], s["new_flows"]) == (1, 2, 2)


def test_new_flow_insert_rate_limit(mode) -> None:
    import os

    cpu = sorted(os.sched_getaffinity(0))[0]
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # the limit is per CPU
    try:
        with temp_forwarder(new_flow_rate_limit=10, conntrack=mode) as f:
            f.sync(base_vips())
            for sport in range(2000, 2025):
                assert run(f, P.flow_packet(CLIENT4, VIP4, sport, 80))[0] == M.XDP_TX
            c = f.counters()
            assert c["vips"]["web4"]["new_flows"] == 10
            assert c["events"]["ct_insert_bypassed"] == 15
            assert f.conntrack_count() == 10
    finally:
        os.sched_setaffinity(0, old)


def test_icmpv6_packet_too_big_steered_to_flow_owner(fwd) -> None:
    owner = outer_dst(run(fwd, P.flow_packet(CLIENT6, VIP6, 40001, 443))[1])
    quoted = P.flow_packet(VIP6, CLIENT6, 443, 40001)[14:14 + 48]
    icmp = struct.pack("!BBHI", 2, 0, 0, 1400) + quoted
    err = P.ether(P.ipv6("2001:db8:ffff::1", VIP6, 58, icmp), 0x86DD)
    verdict, out = run(fwd, err)
    assert verdict == M.XDP_TX and outer_dst(out) == owner and out[58:] == err[14:]
    assert out == M.process(fwd.model_state(with_conntrack=True), err).data
