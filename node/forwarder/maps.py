"""Python mirror of bpf/maglev.h: every map key/value layout, constant and reason, in ONE place.

ctypes structures give the exact byte layout (natural alignment, like clang -target bpf);
tests/integration/test_forwarder_layout.py checks each size against the BTF of the built object.
Addresses and ports are stored as on the wire (network order bytes); helpers below convert.
"""

from __future__ import annotations

import ctypes as C
import enum
import hashlib
from ipaddress import IPv4Address, IPv6Address, ip_address

MAX_VIPS = 4096
MAX_BACKENDS = 65537
NAME_LEN = 256
DEFAULT_TABLE_CAPACITY = 4194304
TABLE_CHUNK = 8
STOP_GAP_STEPS = 32  # entries a table hit on a draining/down backend walks on (maglev.h)
DEFAULT_CT_SIZE = 1000000
DEFAULT_CT_SLOTS = 1048576

FAM_V4 = 4
FAM_V6 = 6

BE_STATE_UNUSED = 0
BE_STATE_ACTIVE = 1
BE_STATE_DRAIN = 2
BE_STATE_DOWN = 3
STATE_CODES = {"active": BE_STATE_ACTIVE, "drain": BE_STATE_DRAIN, "down": BE_STATE_DOWN}

CFG_F_FIB_LOOKUP = 1
CFG_F_HAVE_SRC_V4 = 2
CFG_F_HAVE_SRC_V6 = 4

GRE_V4_OVERHEAD = 24
GRE_V6_OVERHEAD = 44
GRE_F_KEY = 0x2000  # second chance: the GRE key names the entry's previous owner (maglev.h)
GRE_KEY_LEN = 4
SC_KEY_SPENT = 0
OUTER_TTL = 64
FLOW_HASH_SEED = 0x4D414756
FH_C1 = 0xCC9E2D51
FH_C2 = 0x1B873593

IPPROTO = {"tcp": 6, "udp": 17}

# Map names as in xdp_lb.c (also the pin file names under the bpffs directory).
MAP_NAMES = ("vips", "vip_meta", "tables", "backends", "vip_names", "be_names", "conntrack",
             "config", "rate", "vip_stats", "be_stats", "stats", "vip_addrs", "sc_meta", "sc_stats",
             "vip_only")
# "lru" keeps IPv4 flows in a map of their own (maglev.h: a 16-byte key hashes faster).
CT_V4 = "conntrack_v4"
ALL_MAP_NAMES = (*MAP_NAMES, CT_V4)


def map_names(conntrack: str) -> tuple[str, ...]:
    """The maps of the object built for conntrack design ``conntrack``."""
    return ALL_MAP_NAMES if conntrack == "lru" else MAP_NAMES

# Fragment keys in `vips` and the address pre-filter `vip_addrs` (maglev.h).
VIP_KEY_FRAG = 0x80
VIP_FILTER_LOG2 = 16
VIP_FILTER_WORDS = (1 << VIP_FILTER_LOG2) // 64
VIP_FILTER_MUL = 0x9E3779B1
VIP_ONLY_ENTRIES = 1 << VIP_FILTER_LOG2  # vip_only: one __u16 per pre-filter index


class Stat(enum.IntEnum):
    """enum stat_reason. DROP_* are drops; the others count events that are not drops."""

    DROP_NO_BACKEND = 0
    DROP_BAD_BACKEND = 1
    DROP_NO_ENCAP_SOURCE = 2
    DROP_TOO_BIG = 3
    DROP_FIB = 4
    DROP_ADJUST = 5
    DROP_FRAGMENT = 6
    PASS_MALFORMED = 7
    PASS_IPV6_EXT = 8
    FRAG_FORWARDED = 9
    ICMP_TOO_BIG_SENT = 10
    ICMP_STEERED = 11
    CT_INSERT_BYPASSED = 12
    SELF_TEST_PACKETS = 13
    DROP_STOP_GAP_RUN = 14


STAT_MAX = len(Stat)


class VipKey(C.Structure):
    _fields_ = [("addr", C.c_uint8 * 16), ("port_be", C.c_uint8 * 2), ("proto", C.c_uint8),
                ("family", C.c_uint8)]


class VipValue(C.Structure):
    _fields_ = [("vip_id", C.c_uint32), ("flags", C.c_uint32)]


class TableSlot(C.Structure):
    _fields_ = [("offset", C.c_uint32), ("size", C.c_uint32)]


class VipMeta(C.Structure):
    _fields_ = [("active", C.c_uint32), ("in_use", C.c_uint32), ("slot", TableSlot * 2),
                ("key", VipKey), ("pad", C.c_uint32)]


class ScMeta(C.Structure):
    """struct sc_meta (second chance): per slot 1 + the offset of its previous-owner region
    (0 = none), and the CLOCK_MONOTONIC ns at which the VIP's window closes."""

    _fields_ = [("prev", C.c_uint32 * 2), ("until_ns", C.c_uint64)]


SC_HINTED = 0  # enum sc_stat_reason
SC_STAT_MAX = 1
SC_STAT_NAMES = ("second_chance_hinted",)  # as the forwarder's counters report them (events)


class TableChunk(C.Structure):
    _fields_ = [("ids", C.c_uint32 * TABLE_CHUNK)]


class Backend(C.Structure):
    _fields_ = [("addr", C.c_uint8 * 16), ("family", C.c_uint8), ("state", C.c_uint8),
                ("pad", C.c_uint16), ("vip_id", C.c_uint32)]


class Name(C.Structure):
    _fields_ = [("text", C.c_char * NAME_LEN)]


class FlowKey(C.Structure):
    _fields_ = [("src", C.c_uint8 * 16), ("dst", C.c_uint8 * 16), ("sport_be", C.c_uint8 * 2),
                ("dport_be", C.c_uint8 * 2), ("proto", C.c_uint8), ("family", C.c_uint8),
                ("pad", C.c_uint16)]


class FlowKeyV4(C.Structure):
    """struct flow_key_v4: conntrack_v4's key ("lru")."""

    _fields_ = [("src", C.c_uint8 * 4), ("dst", C.c_uint8 * 4), ("sport_be", C.c_uint8 * 2),
                ("dport_be", C.c_uint8 * 2), ("proto", C.c_uint8), ("family", C.c_uint8),
                ("pad", C.c_uint16)]

    def full(self) -> FlowKey:
        """The same flow as a struct flow_key (IPv4 in the first 4 address bytes)."""
        k = FlowKey()
        k.src[:4] = self.src
        k.dst[:4] = self.dst
        k.sport_be[:] = self.sport_be
        k.dport_be[:] = self.dport_be
        k.proto, k.family = self.proto, self.family
        return k

    @classmethod
    def of(cls, k: FlowKey) -> "FlowKeyV4":
        s = cls()
        s.src[:] = k.src[:4]
        s.dst[:] = k.dst[:4]
        s.sport_be[:] = k.sport_be
        s.dport_be[:] = k.dport_be
        s.proto, s.family = k.proto, k.family
        return s


class CtValue(C.Structure):
    _fields_ = [("backend_id", C.c_uint32), ("vip_id", C.c_uint32), ("last_seen_ns", C.c_uint64)]


class CtEntry(C.Structure):
    """One "direct" conntrack slot (64 bytes); seq odd = being rewritten, key.family 0 = empty."""

    _fields_ = [("seq", C.c_uint32), ("pad", C.c_uint32), ("key", FlowKey), ("val", CtValue)]


# Conntrack designs (maglev.h, forwarder.conntrack): the kernel's LRU hash FlowKey -> CtValue,
# or a direct-mapped array of CtEntry slots.
CONNTRACK_MODES = ("lru", "direct")
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
CT_MAP_TYPES = {"lru": BPF_MAP_TYPE_LRU_HASH, "direct": BPF_MAP_TYPE_ARRAY}


def ct_slots(conntrack_size: int) -> int:
    """"direct" conntrack entries for a configured size: the next power of two (the data path
    masks the flow hash with entries - 1)."""
    return 1 << max(0, conntrack_size - 1).bit_length()


BPF_F_NO_COMMON_LRU = 2  # per-CPU LRU lists (only the bench's comparison object has it)


def ct_entries(conntrack_size: int, mode: str, ncpu: int) -> int:
    """The conntrack map's max_entries as the kernel reports it for a configured size: a power
    of two ("direct"), or the size itself ("lru": one LRU shared by the CPUs; only per-CPU
    lists, which the forwarder no longer uses, would round it up to a multiple of the CPUs)."""
    if mode == "direct":
        return ct_slots(conntrack_size)
    return conntrack_size


class Config(C.Structure):
    _fields_ = [("flags", C.c_uint32), ("src_v4", C.c_uint8 * 4), ("src_v6", C.c_uint8 * 16),
                ("next_hop_mac", C.c_uint8 * 6), ("mtu", C.c_uint16), ("udp_idle_ns", C.c_uint64),
                ("new_flow_rate", C.c_uint64), ("ct_mask", C.c_uint32), ("pad2", C.c_uint32)]


class RateState(C.Structure):
    _fields_ = [("window_start_ns", C.c_uint64), ("count", C.c_uint64)]


class FlowStats(C.Structure):
    """struct flow_stats: what be_stats counts per backend id (and vip_stats keeps of the
    backend ids a VIP no longer has)."""

    _fields_ = [("packets", C.c_uint64), ("bytes", C.c_uint64), ("new_flows", C.c_uint64),
                ("ct_hits", C.c_uint64)]


STORED_STAT_FIELDS = tuple(f for f, _ in FlowStats._fields_)
# what the loader reports: the stored fields and ct_misses = packets - ct_hits (maglev.h)
STAT_FIELDS = (*STORED_STAT_FIELDS, "ct_misses")
# counter maps: a pinned one of another shape (an older version's) is replaced, not refused
COUNTER_MAPS = ("vip_stats", "be_stats")
# the reasons counter grows with the version (a reason added to enum stat_reason): an older
# pin of fewer entries is replaced, its counters restart at zero
COUNTER_LENGTHS = {"stats": STAT_MAX}
# the pre-filter is global data (maglev.h): libbpf names its map after the section; it is
# pinned as vip_addrs. An older version's vip_addrs (one word per element) is replaced: the
# loader rebuilds the filter from the VIPs at every open.
# vip_only (maglev.h: the only VIP of each pre-filter index) is global data too, rebuilt the
# same way (an older version's pins have none: it is made and written at open).
OBJECT_MAP_NAMES = {"vip_addrs": ".data.vip_addrs", "vip_only": ".data.vip_only"}
REBUILT_MAPS = ("vip_addrs", "vip_only")


def obj_map_name(name: str) -> str:
    """The name libbpf knows map ``name`` (a pin name) by in the object."""
    return OBJECT_MAP_NAMES.get(name, name)


# struct name -> ctypes type, for the BTF size check.
LAYOUTS: dict[str, type[C.Structure]] = {
    "vip_key": VipKey, "vip_value": VipValue, "table_slot": TableSlot, "vip_meta": VipMeta,
    "table_chunk": TableChunk,
    "backend": Backend, "name": Name, "flow_key": FlowKey, "flow_key_v4": FlowKeyV4, "ct_value": CtValue, "ct_entry": CtEntry,
    "config": Config, "rate_state": RateState, "flow_stats": FlowStats, "sc_meta": ScMeta,
}


def _sz(t) -> int:
    return C.sizeof(t)


# map name -> (key size, value size) as in xdp_lb.c: a pinned map of another shape was made by
# an incompatible version and cannot be re-used. conntrack's shape depends on the design.
MAP_SHAPES: dict[str, tuple[int, int]] = {
    "vips": (_sz(VipKey), _sz(VipValue)), "vip_meta": (4, _sz(VipMeta)),
    "tables": (4, _sz(TableChunk)), "backends": (4, _sz(Backend)), "vip_names": (4, _sz(Name)),
    "be_names": (4, _sz(Name)), "config": (4, _sz(Config)),
    "rate": (4, _sz(RateState)), "vip_stats": (4, _sz(FlowStats)), "be_stats": (4, _sz(FlowStats)),
    "stats": (4, 8), "vip_addrs": (4, 8 * VIP_FILTER_WORDS), "sc_meta": (4, _sz(ScMeta)), "sc_stats": (4, 8),
    "vip_only": (4, 2 * VIP_ONLY_ENTRIES), CT_V4: (_sz(FlowKeyV4), _sz(CtValue)),
}
CT_SHAPES: dict[str, tuple[int, int]] = {"lru": (_sz(FlowKey), _sz(CtValue)), "direct": (4, _sz(CtEntry))}


def map_shape(name: str, conntrack: str) -> tuple[int, int]:
    """(key size, value size) of map ``name`` in the object built for conntrack design
    ``conntrack``."""
    return CT_SHAPES[conntrack] if name == "conntrack" else MAP_SHAPES[name]


def addr_bytes(addr: IPv4Address | IPv6Address | str) -> tuple[int, bytes]:
    """(family, 16 bytes): IPv4 in the first 4 bytes, the rest zero (as maglev.h says)."""
    a = ip_address(addr) if isinstance(addr, str) else addr
    if a.version == 4:
        return FAM_V4, a.packed + bytes(12)
    return FAM_V6, a.packed


def bytes_addr(family: int, raw: bytes) -> IPv4Address | IPv6Address:
    return IPv4Address(bytes(raw[:4])) if family == FAM_V4 else IPv6Address(bytes(raw[:16]))


def vip_key(address: IPv4Address | IPv6Address, protocol: str, port: int | str) -> VipKey:
    fam, raw = addr_bytes(address)
    k = VipKey()
    k.addr[:] = raw
    k.port_be[:] = (0 if port == "all" else int(port)).to_bytes(2, "big")
    k.proto = IPPROTO[protocol]
    k.family = fam
    return k


def vip_filter_bit(family: int, addr: bytes) -> int:
    """The pre-filter bit of a 16-byte address (maglev.h): the XOR of its four words as the
    data path loads them (little-endian), times VIP_FILTER_MUL, top VIP_FILTER_LOG2 bits."""
    w = [int.from_bytes(addr[i:i + 4], "little") for i in range(0, 16, 4)]
    return (((w[0] ^ w[1] ^ w[2] ^ w[3]) * VIP_FILTER_MUL) & 0xFFFFFFFF) >> (32 - VIP_FILTER_LOG2)


def vip_filter_words(addresses) -> list[int]:
    """The vip_addrs array for these (family, 16-byte address) pairs."""
    words = [0] * VIP_FILTER_WORDS
    for fam, addr in addresses:
        i = vip_filter_bit(fam, addr)
        words[i // 64] |= 1 << (i % 64)
    return words


def vip_only_entries(keys) -> dict[int, int]:
    """vip_only's non-zero entries (maglev.h): pre-filter index -> 1 + vip id, for each index
    that exactly one VIP's address has. keys: (family, addr16, port, proto, vip id) of every
    VIP; VIPs sharing an address, or addresses sharing an index, leave their index at 0."""
    vips: dict[int, set[int]] = {}
    for fam, addr, _port, _proto, vid in keys:
        vips.setdefault(vip_filter_bit(fam, addr), set()).add(vid)
    return {i: next(iter(v)) + 1 for i, v in vips.items() if len(v) == 1}


def fragment_owners(keys) -> dict[tuple[int, bytes, int], int]:
    """(family, addr, proto) -> vip id of the one port VIP that fragments of that address and
    protocol follow: only where there is exactly one port VIP and no "all ports" VIP (maglev.h).
    keys: (family, addr16, port, proto, vip id) of every VIP."""
    ports: dict[tuple[int, bytes, int], list[int]] = {}
    all_ports: set[tuple[int, bytes, int]] = set()
    for fam, addr, port, proto, vid in keys:
        if port == 0:
            all_ports.add((fam, addr, proto))
        else:
            ports.setdefault((fam, addr, proto), []).append(vid)
    return {k: v[0] for k, v in ports.items() if len(v) == 1 and k not in all_ports}


def encode_name(text: str) -> bytes:
    """Bytes stored in a name slot; keys too long for the slot are replaced by a digest (ids
    only need identity, and the digest is deterministic)."""
    raw = text.encode()
    if len(raw) >= NAME_LEN:
        raw = b"sha256:" + hashlib.sha256(raw).hexdigest().encode()
    return raw


def backend_name(vip: str, key: str) -> bytes:
    """Backend ids belong to a (VIP, backend key) pair: the same address can be healthy for
    one VIP's port and unhealthy for another's."""
    return encode_name(vip + "\0" + key)
