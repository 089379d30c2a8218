"""Pure-Python reference model of bpf/xdp_lb.c.

Given a frame and the same state (VIPs, tables, backends, conntrack, config), ``process``
returns the verdict and output bytes the BPF program produces, byte for byte
(tests/integration/test_forwarder_diff.py runs both on random packets). It is also the answer to
"which backend gets this 5-tuple" (``pick``), for ``maglev trace`` and for the loader's
self-test. Keep every policy here in step with the C; the policy list is at the top of
xdp_lb.c. The flow hash is documented in maglev.h.

The one thing the model does not do is bpf_fib_lookup: it needs the kernel's routing and
neighbour tables, so model states always carry a next-hop MAC.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import Literal

from node.forwarder.maps import (
    BE_STATE_ACTIVE,
    BE_STATE_DOWN,
    BE_STATE_DRAIN,
    DEFAULT_CT_SLOTS,
    FAM_V4,
    FAM_V6,
    FH_C1,
    FH_C2,
    FLOW_HASH_SEED,
    GRE_F_KEY,
    GRE_V4_OVERHEAD,
    GRE_V6_OVERHEAD,
    OUTER_TTL,
    STOP_GAP_STEPS,
    Stat,
    addr_bytes,
    vip_filter_bit,
)

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
TCP, UDP, ICMP, ICMP6, GRE = 6, 17, 1, 58, 47
ICMP6_PTB_QUOTE = 1232
M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1


# ---- flow hash (maglev.h) ----------------------------------------------------------------------


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & M32


def _mix(h: int, k: int) -> int:
    k = (k * FH_C1) & M32
    k = _rotl(k, 15)
    k = (k * FH_C2) & M32
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & M32


def _final(h: int, nbytes: int) -> int:
    h ^= nbytes
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    h ^= h >> 16
    return h


def _words(raw: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(raw) // 4}I", raw)


@dataclass(frozen=True)
class Flow:
    """A flow key as the data path sees it: addresses as 16 bytes (IPv4 in the first 4),
    ports as wire bytes, 0 for fragments."""

    family: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    proto: int

    @classmethod
    def of(cls, src: str | IPv4Address | IPv6Address, dst: str | IPv4Address | IPv6Address,
           sport: int, dport: int, proto: int | str) -> "Flow":
        fam, s = addr_bytes(src)
        _, d = addr_bytes(dst)
        p = {"tcp": TCP, "udp": UDP}.get(proto, proto) if isinstance(proto, str) else proto
        return cls(fam, s, d, sport, dport, int(p))


def flow_hash(flow: Flow) -> int:
    """The documented flow hash: identical to flow_hash() in xdp_lb.c."""
    ports = struct.unpack("<I", flow.sport.to_bytes(2, "big") + flow.dport.to_bytes(2, "big"))[0]
    h = FLOW_HASH_SEED
    if flow.family == FAM_V4:
        for w in (*_words(flow.src[:4]), *_words(flow.dst[:4]), ports, flow.proto):
            h = _mix(h, w)
        return _final(h, 16)
    for w in (*_words(flow.src), *_words(flow.dst), ports, flow.proto):
        h = _mix(h, w)
    return _final(h, 40)


def table_index(h: int, size: int) -> int:
    """Lemire's reduction, as the data path indexes a table: (h * size) >> 32."""
    return (h * size) >> 32


# ---- state -------------------------------------------------------------------------------------


@dataclass
class ModelBackend:
    family: int
    addr: bytes  # 16 bytes
    state: int
    vip_id: int


@dataclass
class ModelConfig:
    next_hop_mac: bytes
    src_v4: bytes | None = None
    src_v6: bytes | None = None
    mtu: int = 1500
    udp_idle_ns: int = 30 * 10**9
    new_flow_rate: int = 0
    # the conntrack design (maglev.h): "lru" = the kernel's LRU hashes (conntrack_v4 for IPv4
    # flows, conntrack for IPv6: a lookup by family, the same flows), modelled as one plain dict
    # with no eviction (keep the flows below capacity when comparing with the program);
    # "direct" = one flow per slot, a new flow replaces the one in its slot
    conntrack: Literal["lru", "direct"] = "lru"
    ct_slots: int = DEFAULT_CT_SLOTS  # "direct" entries, a power of two (maps.ct_slots)


@dataclass
class ModelState:
    config: ModelConfig
    # (family, addr16, port, proto) -> vip id; port 0 = "all ports"
    vips: dict[tuple[int, bytes, int, int], int] = field(default_factory=dict)
    # fragment keys (maglev.h): (family, addr16, proto) -> the one port VIP fragments follow
    frag_vips: dict[tuple[int, bytes, int], int] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)  # vip id -> backend ids
    # second chance (second_chance.h): vip id -> (previous owner id per entry, 0 = unchanged;
    # the monotonic ns at which the window closes)
    prev_tables: dict[int, tuple[list[int], int]] = field(default_factory=dict)
    sc_hinted: int = 0  # sc_stats[SC_HINTED]
    backends: dict[int, ModelBackend] = field(default_factory=dict)
    # flow -> (backend id, last seen ns, vip id); write it through ct_put, which keeps the
    # program's design ("direct": one flow per slot, see maglev.h)
    ct: dict[Flow, tuple[int, int, int]] = field(default_factory=dict)
    ct_owner: dict[int, Flow] = field(default_factory=dict)  # "direct": slot -> the flow in it
    ct_replaced: int = 0  # model-only: tracked flows pushed out by a new flow (tests use it)
    stats: dict[Stat, int] = field(default_factory=dict)
    rate_window: tuple[int, int] = (0, 0)  # (window start ns, count): one CPU

    def count(self, reason: Stat) -> None:
        self.stats[reason] = self.stats.get(reason, 0) + 1

    def addr_maybe(self, addr: bytes) -> bool:
        """The address pre-filter: is the bit of this 16-byte address set by some VIP's
        address? (A hash bit, so other addresses may share it: the vips lookup decides.)"""
        bits = {vip_filter_bit(fam, a) for fam, a, _, _ in self.vips}
        return vip_filter_bit(0, addr) in bits

    def ct_slot(self, flow: Flow) -> int:
        """The "direct" slot of a flow."""
        return flow_hash(flow) & (self.config.ct_slots - 1)

    def ct_put(self, flow: Flow, value: tuple[int, int, int]) -> None:
        """Track flow as xdp_lb.c's ct_insert does: "lru" adds it (nothing is evicted: the
        model is meant for fewer flows than the map holds); "direct" puts it in its slot,
        replacing the flow that held it."""
        if self.config.conntrack == "lru":
            self.ct[flow] = value
            return
        slot = self.ct_slot(flow)
        old = self.ct_owner.get(slot)
        if old is not None and old != flow and self.ct.pop(old, None) is not None:
            self.ct_replaced += 1
        self.ct_owner[slot] = flow
        self.ct[flow] = value

    def ct_forget(self, flow: Flow) -> None:
        """Stop tracking flow (a RST ended it), as xdp_lb.c's ct_forget: "direct" empties the
        flow's slot."""
        self.ct.pop(flow, None)
        if self.config.conntrack == "direct":
            slot = self.ct_slot(flow)
            old = self.ct_owner.pop(slot, None)
            if old is not None and old != flow:
                self.ct.pop(old, None)


@dataclass
class Result:
    verdict: int
    data: bytes
    backend_id: int | None = None
    ct_hit: bool = False
    inserted: bool = False
    reason: Stat | None = None


@dataclass
class _Parsed:
    flow: Flow
    l3: int
    l3_len: int
    tos: int
    ihl: int = 0
    df: bool = False
    is_frag: bool = False
    is_icmp_err: bool = False
    frag_dport: int = 0
    syn: bool = False
    rst: bool = False


class _NotOurs(Exception):
    def __init__(self, reason: Stat | None = None):
        self.reason = reason


_MALFORMED = Stat.PASS_MALFORMED


def _u16(b: bytes, off: int) -> int:
    return int.from_bytes(b[off:off + 2], "big")


# ---- parsing ------------------------------------------------------------------------------------


def _tcp_flags(p: _Parsed, flags: int) -> None:
    """SYN without ACK opens a connection; RST ends it (parse.h: tcp_flags)."""
    p.syn = flags & 0x12 == 0x02
    p.rst = bool(flags & 0x04)


def _parse_icmp4_err(b: bytes, icmp: int, tos: int, l3: int, tot: int) -> _Parsed:
    end = len(b)
    if icmp + 8 > end:
        raise _NotOurs(_MALFORMED)
    if b[icmp] not in (3, 11):
        raise _NotOurs()
    inner = icmp + 8
    if inner + 20 > end:
        raise _NotOurs(_MALFORMED)
    ihl = (b[inner] & 15) * 4
    if b[inner] >> 4 != 4 or ihl < 20 or b[inner + 9] not in (TCP, UDP):
        raise _NotOurs()
    if _u16(b, inner + 6) & 0x1FFF:
        raise _NotOurs()
    ports = inner + ihl
    if ports + 4 > end:
        raise _NotOurs(_MALFORMED)
    flow = Flow(FAM_V4, b[inner + 16:inner + 20] + bytes(12), b[inner + 12:inner + 16] + bytes(12),
                _u16(b, ports + 2), _u16(b, ports), b[inner + 9])
    return _Parsed(flow, l3, tot, tos, is_icmp_err=True)


def _parse_v4(b: bytes, l3: int) -> _Parsed:
    end = len(b)
    if l3 + 20 > end:
        raise _NotOurs(_MALFORMED)
    ihl = (b[l3] & 15) * 4
    tot = _u16(b, l3 + 2)
    if b[l3] >> 4 != 4 or ihl < 20 or tot < ihl or l3 + tot > end:
        raise _NotOurs(_MALFORMED)
    tos, frag, proto = b[l3 + 1], _u16(b, l3 + 6), b[l3 + 9]
    df = bool(frag & 0x4000)
    if proto == ICMP:
        if frag & 0x3FFF:
            raise _NotOurs()
        p = _parse_icmp4_err(b, l3 + ihl, tos, l3, tot)
        p.ihl, p.df = ihl, df
        return p
    if proto not in (TCP, UDP):
        raise _NotOurs()
    src, dst = b[l3 + 12:l3 + 16] + bytes(12), b[l3 + 16:l3 + 20] + bytes(12)
    ports = l3 + ihl
    if frag & 0x3FFF:
        fdport = 0
        if not frag & 0x1FFF and tot >= ihl + 4 and ports + 4 <= end:
            fdport = _u16(b, ports + 2)
        return _Parsed(Flow(FAM_V4, src, dst, 0, 0, proto), l3, tot, tos, ihl, df, True, False, fdport)
    if tot < ihl + 4 or ports + 4 > end:
        raise _NotOurs(_MALFORMED)
    p = _Parsed(Flow(FAM_V4, src, dst, _u16(b, ports), _u16(b, ports + 2), proto), l3, tot, tos, ihl, df)
    if proto == TCP and tot >= ihl + 14 and ports + 14 <= end:
        _tcp_flags(p, b[ports + 13])
    return p


def _parse_icmp6_err(b: bytes, icmp: int, p: _Parsed) -> _Parsed:
    end = len(b)
    if icmp + 8 > end:
        raise _NotOurs(_MALFORMED)
    if b[icmp] not in (1, 2, 3):
        raise _NotOurs()
    inner = icmp + 8
    if inner + 40 > end:
        raise _NotOurs(_MALFORMED)
    if b[inner] >> 4 != 6 or b[inner + 6] not in (TCP, UDP):
        raise _NotOurs()
    ports = inner + 40
    if ports + 4 > end:
        raise _NotOurs(_MALFORMED)
    p.flow = Flow(FAM_V6, b[inner + 24:inner + 40], b[inner + 8:inner + 24], _u16(b, ports + 2),
                  _u16(b, ports), b[inner + 6])
    p.is_icmp_err = True
    return p


def _parse_v6(b: bytes, l3: int) -> _Parsed:
    end = len(b)
    if l3 + 40 > end:
        raise _NotOurs(_MALFORMED)
    plen = _u16(b, l3 + 4)
    if b[l3] >> 4 != 6 or l3 + 40 + plen > end:
        raise _NotOurs(_MALFORMED)
    tos = ((b[l3] & 15) << 4) | (b[l3 + 1] >> 4)
    nh = b[l3 + 6]
    src, dst = b[l3 + 8:l3 + 24], b[l3 + 24:l3 + 40]
    p = _Parsed(Flow(FAM_V6, src, dst, 0, 0, nh), l3, plen + 40, tos)
    if nh == 44:
        fh = l3 + 40
        if fh + 8 > end or plen < 8:
            raise _NotOurs(_MALFORMED)
        nh = b[fh]
        if nh not in (TCP, UDP):
            raise _NotOurs()
        p.flow = Flow(FAM_V6, src, dst, 0, 0, nh)
        p.is_frag = True
        ports = fh + 8
        if not _u16(b, fh + 2) & 0xFFF8 and plen >= 12 and ports + 4 <= end:
            p.frag_dport = _u16(b, ports + 2)
        return p
    if nh in (0, 43, 60):
        raise _NotOurs(Stat.PASS_IPV6_EXT)
    if nh == ICMP6:
        return _parse_icmp6_err(b, l3 + 40, p)
    if nh not in (TCP, UDP):
        raise _NotOurs()
    ports = l3 + 40
    if plen < 4 or ports + 4 > end:
        raise _NotOurs(_MALFORMED)
    p.flow = Flow(FAM_V6, src, dst, _u16(b, ports), _u16(b, ports + 2), nh)
    if nh == TCP and plen >= 14 and ports + 14 <= end:
        _tcp_flags(p, b[ports + 13])
    return p


# ---- output -----------------------------------------------------------------------------------


def checksum(data: bytes, initial: int = 0) -> int:
    if len(data) % 2:
        data += b"\0"
    s = initial + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _eth(b: bytes, l2: int, dmac: bytes, smac: bytes, ethertype: int) -> bytes:
    vlan = b"\x81\x00" + b[14:16] if l2 == 18 else b""
    return dmac + smac + vlan + ethertype.to_bytes(2, "big")


def _encap(b: bytes, l2: int, p: _Parsed, be: ModelBackend, cfg: ModelConfig, h: int,
           key: bytes = b"") -> bytes:
    """key: the previous owner's IPv4 address (second chance, IPv4 outer only) or b""."""
    inner_type = 0x0800 if p.flow.family == FAM_V4 else 0x86DD
    gre = (GRE_F_KEY if key else 0).to_bytes(2, "big") + inner_type.to_bytes(2, "big") + key
    if be.family == FAM_V4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, p.tos, p.l3_len + GRE_V4_OVERHEAD + len(key), 0, 0x4000,
                          OUTER_TTL, GRE, 0, cfg.src_v4, be.addr[:4])
        hdr = hdr[:10] + checksum(hdr).to_bytes(2, "big") + hdr[12:]
        eth = _eth(b, l2, cfg.next_hop_mac, b[0:6], 0x0800)
    else:
        w0 = 0x60000000 | (p.tos << 20) | (h & 0xFFFFF)
        hdr = struct.pack("!IHBB16s16s", w0, p.l3_len + 4, GRE, OUTER_TTL, cfg.src_v6, be.addr)
        eth = _eth(b, l2, cfg.next_hop_mac, b[0:6], 0x86DD)
    return eth + hdr + gre + b[l2:]


def _too_big_v4(b: bytes, l2: int, p: _Parsed, mtu: int) -> bytes:
    quote = b[l2:l2 + p.ihl + 8]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(quote), 0, 0, OUTER_TTL, ICMP, 0,
                     b[l2 + 16:l2 + 20], b[l2 + 12:l2 + 16])
    ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quote
    icmp = icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]
    return _eth(b, l2, b[6:12], b[0:6], 0x0800) + ip + icmp


def _too_big_v6(b: bytes, l2: int, p: _Parsed, mtu: int) -> bytes:
    n = p.l3_len & ~1 if p.l3_len < ICMP6_PTB_QUOTE else ICMP6_PTB_QUOTE
    quote = b[l2:l2 + n]
    src, dst = b[l2 + 24:l2 + 40], b[l2 + 8:l2 + 24]
    ip = struct.pack("!IHBB16s16s", 0x60000000, 8 + n, ICMP6, OUTER_TTL, src, dst)
    icmp = struct.pack("!BBHI", 2, 0, 0, mtu) + quote
    pseudo = src + dst + struct.pack("!II", 8 + n, ICMP6)
    c = checksum(pseudo + icmp)
    icmp = icmp[:2] + c.to_bytes(2, "big") + icmp[4:]
    return _eth(b, l2, b[6:12], b[0:6], 0x86DD) + ip + icmp


# ---- the program --------------------------------------------------------------------------------


def _rate_allows(st: ModelState, now: int) -> bool:
    limit = st.config.new_flow_rate
    if not limit:
        return True
    start, count = st.rate_window
    if (now - start) & M64 >= 10**9:
        start, count = now, 0
    if count >= limit:
        st.rate_window = (start, count)
        return False
    st.rate_window = (start, count + 1)
    return True


def process(st: ModelState, frame: bytes, now_ns: int = 0, selftest: bool = False) -> Result:
    """Run one frame through the model; mutates st (conntrack, stats) as the program would."""
    b = bytes(frame)
    if len(b) < 14:
        return Result(XDP_PASS, b)
    l2, ethertype = 14, _u16(b, 12)
    if ethertype == 0x8100:
        if len(b) < 18:
            return Result(XDP_PASS, b)
        l2, ethertype = 18, _u16(b, 16)
    if ethertype in (0x0800, 0x86DD):
        # the address pre-filter (maglev.h), right after the fixed header's bounds check
        dst = b[l2 + 16:l2 + 20] + bytes(12) if ethertype == 0x0800 else b[l2 + 24:l2 + 40]
        if len(b) < l2 + (20 if ethertype == 0x0800 else 40):
            st.count(_MALFORMED)
            return Result(XDP_PASS, b, reason=_MALFORMED)
        if not st.addr_maybe(dst):
            return Result(XDP_PASS, b)
    try:
        if ethertype == 0x0800:
            p = _parse_v4(b, l2)
        elif ethertype == 0x86DD:
            p = _parse_v6(b, l2)
        else:
            return Result(XDP_PASS, b)
    except _NotOurs as exc:
        if exc.reason is not None:
            st.count(exc.reason)
        return Result(XDP_PASS, b, reason=exc.reason)
    return _steer(st, b, l2, p, now_ns, selftest)


def _drop(st: ModelState, b: bytes, reason: Stat, be_id: int | None = None) -> Result:
    st.count(reason)
    return Result(XDP_DROP, b, backend_id=be_id, reason=reason)


def _find_vip(st: ModelState, b: bytes, p: _Parsed) -> int | Result:
    """The port's VIP, else the "all ports" VIP; a fragment (port 0) takes the "all ports"
    VIP, else the one port VIP of its address and protocol (frag_vips), else: a first fragment
    whose port has a VIP is dropped (several port VIPs: the rest could not follow it)."""
    f = p.flow
    vid = st.vips.get((f.family, f.dst, f.dport, f.proto))
    if vid is None and f.dport:
        vid = st.vips.get((f.family, f.dst, 0, f.proto))
    if vid is None and p.is_frag:
        vid = st.frag_vips.get((f.family, f.dst, f.proto))
        if vid is None and p.frag_dport and st.vips.get((f.family, f.dst, p.frag_dport, f.proto)) is not None:
            return _drop(st, b, Stat.DROP_FRAGMENT)
    return Result(XDP_PASS, b) if vid is None else vid


def _vip_owns(st: ModelState, vid: int, f: Flow) -> bool:
    for (fam, addr, port, proto), v in st.vips.items():
        if v == vid:
            return fam == f.family and proto == f.proto and port in (0, f.dport) and addr == f.dst
    return False


def _ct_usable(st: ModelState, ct: tuple[int, int, int], p: _Parsed, now: int, selftest: bool) -> bool:
    be_id, seen, vid = ct
    be = st.backends.get(be_id)
    if be is None or not _vip_owns(st, vid, p.flow) or be.vip_id != vid:
        return False
    if be.state not in (BE_STATE_ACTIVE, BE_STATE_DRAIN):
        return False
    if p.flow.proto == UDP:
        if (now - seen) & M64 > st.config.udp_idle_ns:
            return False
        if not selftest and not p.is_icmp_err:
            st.ct[p.flow] = (be_id, now, vid)  # refresh in place: same flow, same slot
    return True


def _steer(st: ModelState, b: bytes, l2: int, p: _Parsed, now: int, selftest: bool) -> Result:
    cfg, f = st.config, p.flow
    hit = inserted = False
    key = b""
    be_id: int | None = None
    be: ModelBackend | None = None
    h = flow_hash(f)
    # conntrack first (SYNs and fragments skip it): a usable entry needs no VIP lookup. (The
    # "lru" program looks a SYN's entry up, only to rewrite it in place: the same entry as
    # ct_put's. Its vip_only shortcut finds the VIP _find_vip finds.)
    ct = None if p.is_frag or p.syn else st.ct.get(f)
    if ct is not None and _ct_usable(st, ct, p, now, selftest):
        hit, be_id, vid = True, ct[0], ct[2]
        be = st.backends[be_id]
    else:
        found = _find_vip(st, b, p)
        if isinstance(found, Result):
            return found
        vid = found
        table = st.tables.get(vid) or []
        if not table:
            return _drop(st, b, Stat.DROP_NO_BACKEND)
        rel = table_index(h, len(table))
        found = _serving(st, vid, table, rel)
        if not isinstance(found, tuple):
            return _drop(st, b, found, table[rel])
        be_id, be = found
        key = b"" if selftest else _sc_hint(st, vid, rel, be, p, now)
        if not p.is_frag and not p.is_icmp_err and not selftest and not p.rst and not key:
            if _rate_allows(st, now):
                st.ct_put(f, (be_id, now if f.proto == UDP else 0, vid))
                inserted = True
            else:
                st.count(Stat.CT_INSERT_BYPASSED)
    assert be is not None and be_id is not None
    src = cfg.src_v4 if be.family == FAM_V4 else cfg.src_v6
    if src is None:
        return _drop(st, b, Stat.DROP_NO_ENCAP_SOURCE, be_id)
    overhead = (GRE_V4_OVERHEAD if be.family == FAM_V4 else GRE_V6_OVERHEAD) + len(key)
    if p.l3_len + overhead > cfg.mtu:
        if p.is_icmp_err or (f.family == FAM_V4 and not p.df):
            return _drop(st, b, Stat.DROP_TOO_BIG, be_id)
        st.count(Stat.ICMP_TOO_BIG_SENT)
        make = _too_big_v4 if f.family == FAM_V4 else _too_big_v6
        return Result(XDP_TX, make(b, l2, p, cfg.mtu - overhead), be_id, hit, inserted,
                      Stat.ICMP_TOO_BIG_SENT)
    out = _encap(b, l2, p, be, cfg, h, key)
    if selftest:
        st.count(Stat.SELF_TEST_PACKETS)
    else:
        if hit and p.rst:
            st.ct_forget(f)
        if p.is_frag:
            st.count(Stat.FRAG_FORWARDED)
        if p.is_icmp_err:
            st.count(Stat.ICMP_STEERED)
        if key:
            st.sc_hinted += 1
    return Result(XDP_TX, out, be_id, hit, inserted)


def _serving(st: ModelState, vid: int, table: list[int], rel: int) -> tuple[int, ModelBackend] | Stat:
    """xdp_lb.c: the table path's backend for entry ``rel``: its own if active; if it drains
    or is down, the next entry's (cyclically) that is active, within STOP_GAP_STEPS (the
    stop-gap rule, read by the data path). Otherwise the drop reason."""
    for i in range(STOP_GAP_STEPS + 1):
        be_id = table[(rel + i) % len(table)]
        be = st.backends.get(be_id)
        if be is None or be.vip_id != vid or be.state not in (BE_STATE_ACTIVE, BE_STATE_DRAIN, BE_STATE_DOWN):
            return Stat.DROP_BAD_BACKEND
        if be.state == BE_STATE_ACTIVE:
            return be_id, be
    return Stat.DROP_STOP_GAP_RUN


def _sc_hint(st: ModelState, vid: int, rel: int, be: ModelBackend, p: _Parsed, now: int) -> bytes:
    """second_chance.h: sc_hint. The previous owner's IPv4 address (the GRE key) for a packet
    steered by entry ``rel`` of VIP ``vid``'s table, or b"" for no hint."""
    prev = st.prev_tables.get(vid)
    if prev is None or p.syn or p.is_frag or p.is_icmp_err or be.family != FAM_V4:
        return b""
    ids, until = prev
    if now >= until or not ids[rel]:
        return b""
    pb = st.backends.get(ids[rel])
    if (pb is None or pb.vip_id != vid or pb.family != FAM_V4
            or pb.state not in (BE_STATE_ACTIVE, BE_STATE_DRAIN)
            or pb.addr[:4] == be.addr[:4] or pb.addr[:4] == bytes(4)):
        return b""
    return pb.addr[:4]


def pick(st: ModelState, flow: Flow) -> int | None:
    """The backend id a packet of ``flow`` goes to (a usable conntrack entry first, as the
    data path does for non-SYN packets), or None when the flow is not for a VIP or the VIP
    has no backends."""
    ct = st.ct.get(flow)
    if ct is not None:
        be = st.backends.get(ct[0])
        if (be and be.vip_id == ct[2] and _vip_owns(st, ct[2], flow)
                and be.state in (BE_STATE_ACTIVE, BE_STATE_DRAIN)):
            return ct[0]
    vid = st.vips.get((flow.family, flow.dst, flow.dport, flow.proto))
    if vid is None:
        vid = st.vips.get((flow.family, flow.dst, 0, flow.proto))
    if vid is None:
        return None
    table = st.tables.get(vid) or []
    if not table:
        return None
    found = _serving(st, vid, table, table_index(flow_hash(flow), len(table)))
    return found[0] if isinstance(found, tuple) else None
