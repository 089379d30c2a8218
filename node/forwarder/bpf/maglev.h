/* maglev.h: THE one definition of every map key and value the forwarder shares with user
 * space. node/forwarder/maps.py mirrors these layouts in one place; change both together
 * (tests/integration/test_forwarder_layout.py compares the sizes against the BTF of the
 * built object, so a drift fails loudly instead of corrupting maps).
 *
 * It also defines the maps of the backend's decap program (decap.c, at the end).
 *
 * All multi-byte fields are host byte order unless named *_be / addr (addresses and ports are
 * kept exactly as they appear on the wire, so the data path never swaps bytes).
 */
#ifndef MAGLEV_H
#define MAGLEV_H

#include <linux/types.h>

/* ---- sizes ------------------------------------------------------------------------------ */
#define MAX_VIPS 4096
#define MAX_BACKENDS 65537     /* ids 1..65536 are per (VIP, backend key) pair, see maps.py */
#define NAME_LEN 256           /* vip name, or "vip\0backend-key" (long keys are digested) */
#define DEFAULT_TABLE_CAPACITY 4194304 /* table entries in `tables` (16 MiB); settable at load */
#define TABLE_CHUNK 8          /* entries per `tables` element (see struct table_chunk) */
#define DEFAULT_CT_SIZE 1000000
#define DEFAULT_CT_SLOTS 1048576  /* "direct" entries: DEFAULT_CT_SIZE rounded up to a power of 2 */

/* ---- families, protocols, states -------------------------------------------------------- */
#define FAM_V4 4
#define FAM_V6 6

#define BE_STATE_UNUSED 0      /* free id */
#define BE_STATE_ACTIVE 1      /* takes new flows (appears in tables) and keeps old ones */
#define BE_STATE_DRAIN 2       /* keeps connection-tracked flows, takes no new ones */
#define BE_STATE_DOWN 3        /* unhealthy or disabled: conntrack hits are ignored */

/* A table entry whose backend is this VIP's but drains or is down stands for the next entry
 * (cyclically) whose backend is active: the stop-gap rule (node/maglev.py StopGapTable) read
 * by the data path itself. So one store of a backend's state takes it out of every table
 * that names it, at once, whatever the number of VIPs; the tables are rewritten behind. A run
 * longer than this is dropped until they are (node/stop_gaps.py sets up none: a VIP losing
 * more than half of its backends at once waits for its table patch instead). */
#define STOP_GAP_STEPS 32

/* ---- VIP lookup: vips (hash) key -> vip id ------------------------------------------------
 * port 0 = the "all ports" VIP of that address and protocol. An IPv4 address is in addr[0]
 * with addr[1..3] zero; family tells the two apart. */
struct vip_key {
	__u32 addr[4];
	__u16 port_be;
	__u8 proto;
	__u8 family;
};

struct vip_value {
	__u32 vip_id;
	__u32 flags;
};

/* Fragment keys, in the same vips map: {addr, port 0, proto, family | VIP_KEY_FRAG} -> the id
 * of the ONE port VIP of (addr, proto) when there is exactly one and no "all ports" VIP. Every
 * fragment of (addr, proto), the first included, then follows that VIP's table by the 3-tuple
 * hash, so a datagram too large for one packet (EDNS, IKE, SIP) meets one backend. With
 * several port VIPs user space writes no such key (a fragment cannot tell them apart). */
#define VIP_KEY_FRAG 0x80
#define VIP_KEYS_MAX (2 * MAX_VIPS) /* each VIP's key, plus at most one fragment key each */

/* ---- address pre-filter: vip_addrs (VIP_FILTER_WORDS __u64) --------------------------------
 * A global array of xdp_lb.c in the data section VIP_FILTER_SECTION: libbpf makes it an array
 * map of ONE element whose value is the whole filter (the loader pins it as vip_addrs), and
 * the data path reads its words at a fixed address, with no lookup.
 * One bit per hash of a destination address, set for every address that has a VIP (any
 * protocol, port or family). The data path tests it before any hash lookup, so a packet that
 * is not for a VIP address (the node's own BGP, BFD, health checks, SSH) costs one load and
 * no hash. A set bit only says "maybe": the vips lookup decides. Bit index (model.py,
 * maps.vip_filter_bit):
 *   i = ((addr[0] ^ addr[1] ^ addr[2] ^ addr[3]) * 0x9e3779b1) >> (32 - VIP_FILTER_LOG2)
 * over the address words as loaded (little-endian reads of wire bytes, IPv4 in addr[0]);
 * word i / 64, bit i % 64. 4096 addresses leave ~6 % of other addresses passing the filter. */
#define VIP_FILTER_LOG2 16
#define VIP_FILTER_WORDS ((1 << VIP_FILTER_LOG2) / 64)
#define VIP_FILTER_MUL 0x9e3779b1u
#define VIP_FILTER_SECTION ".data.vip_addrs"
/* ---- the only VIP of an address index: vip_only ((1 << VIP_FILTER_LOG2) __u16) ------------
 * Global data of xdp_lb.c in a section of its own (VIP_ONLY_SECTION; the loader pins it as
 * vip_only), indexed like the pre-filter's bits: 1 + the VIP's id where exactly one VIP has an
 * address with that index (whatever its protocol and port), else 0. A packet that goes to the
 * table (a new flow, a conntrack miss) and whose entry names a VIP owning its flow (vip_meta's
 * key, the check a conntrack hit makes) needs no vips hash lookup: ~35 ns of every new flow
 * (bench/forwarder.py). Any other packet, and every fragment, looks vips up as before. The only
 * VIP of an index has no port-VIP / "all ports" precedence to get wrong, and a hint that names
 * a VIP not owning the flow (stale, or another address) only costs the lookup it was to save. */
#define VIP_ONLY_SECTION ".data.vip_only"

/* ---- per-VIP metadata: vip_meta (array, mmapable) indexed by vip id ----------------------
 * Two table slots; the data path reads slot[active & 1]. User space writes the spare slot's
 * region of `tables`, then the spare slot's {offset,size}, then flips `active` with one
 * aligned 32-bit store, so a packet sees either the whole old or the whole new table.
 * size 0 = no serving backends: packets are dropped and counted (DROP_NO_BACKEND). */
struct table_slot {
	__u32 offset;          /* first entry in `tables` */
	__u32 size;            /* prime table size, or 0 */
};

struct vip_meta {
	__u32 active;          /* index of the live slot (0 or 1) */
	__u32 in_use;          /* 1 while the VIP exists; lets user space rebuild state */
	struct table_slot slot[2];
	struct vip_key key;    /* so a re-opening loader can find and delete the vips entry */
	__u32 pad;             /* 48 bytes: an mmapable array's element stride is 8-aligned */
};

/* ---- second chance: sc_meta (array, mmapable) indexed by vip id (second_chance.h) ---------
 * A map of its own, so VIPs, tables and programs without second chance keep their layouts.
 * prev[s]: 1 + the offset in `tables` of the region holding, for each entry of slot s's
 * table, the backend id it pointed to before the last change (0 = unchanged); 0 = slot s
 * has none. Written before the slot flip that publishes it, like the table itself.
 * until_ns: bpf_ktime_get_ns() (CLOCK_MONOTONIC) at which the VIP's window closes. */
struct sc_meta {
	__u32 prev[2];
	__u64 until_ns;
};

/* sc_stats: per-CPU array of __u64 indexed by these. */
enum sc_stat_reason {
	SC_HINTED = 0,             /* sent to an entry's new owner with its previous owner named in
	                            * the GRE key; such packets are not tracked in conntrack */
	SC_STAT_MAX,
};

/* ---- tables (array, mmapable): every VIP's two slots live in this one flat array --------
 * Entry i (a backend id) is chunk[i / TABLE_CHUNK].ids[i % TABLE_CHUNK]: an array element is
 * 8-byte aligned in the kernel, so one u32 per element would leave holes in the mmap; chunks
 * make the mmap a dense u32 array that user space writes in one copy. */
struct table_chunk {
	__u32 ids[TABLE_CHUNK];
};

/* ---- backends (array) indexed by backend id ---------------------------------------------- */
struct backend {
	__u32 addr[4];         /* wire order; IPv4 in addr[0] */
	__u8 family;
	__u8 state;            /* BE_STATE_* */
	__u16 pad;
	__u32 vip_id;          /* owner: a conntrack or table hit for another VIP is refused */
};

/* ---- name arrays (user-space bookkeeping only; the data path never reads them) ------------ */
struct name {
	char text[NAME_LEN];
};

/* ---- connection tracking: two designs, chosen per node (forwarder.conntrack) ---------------
 * One source, two objects (node/forwarder/build.py): xdp_lb (default) and xdp_lb_direct
 * (compiled with -DCT_DIRECT). Both key flows by struct flow_key and keep a struct ct_value;
 * they differ in what happens when a new flow arrives.
 *
 * "lru" (default): the kernel's LRU hash, one map per family: `conntrack_v4` (struct
 * flow_key_v4 -> ct_value) for IPv4 flows and `conntrack` (flow_key -> ct_value) for IPv6, each
 * of conntrack_size entries. The kernel hashes and compares the whole key on every lookup and
 * insert, so IPv4's 16-byte key instead of 40 makes an established IPv4 packet ~10-15 % and a
 * new flow ~10 % cheaper (bench/forwarder.py). Each map has one LRU
 * shared by the CPUs (no BPF_F_NO_COMMON_LRU): per-CPU lists would let each CPU hold only
 * max_entries / CPUs flows, so traffic that lands unevenly on the CPUs (one busy RSS queue)
 * would be displaced while the map is half empty, and their inserts measured no cheaper
 * here (bench/forwarder.py compares both). The shared LRU hands each CPU free entries 128 at a
 * time, so below max_entries - 128 x CPUs flows no tracked flow is ever displaced, however
 * they spread; above it the least recently used go. Exact, and slower than "direct": the
 * kernel's insert alone costs a few hundred ns above the test-run floor here.
 *
 * "direct": `conntrack` is an array (mmapable) of struct ct_entry, a direct-mapped hash
 * table. Entry i holds the flow whose flow hash (below) has i in its low bits
 * (i = hash & ct_mask, ct_mask = entries - 1, entries a power of two). A new flow REPLACES the
 * flow in its slot, whatever its age: the insert is one 64-byte store into one cache line,
 * with no lock, list or allocator. A flow pushed out falls back to the Maglev table, which
 * still sends it to the same backend unless the table changed for it meanwhile: with N live
 * flows a new flow replaces a live one with probability ~N/entries, so size conntrack well
 * above the expected live flows. Empty slots are all zero (family 0 matches no flow).
 *
 * seq lets CPUs share the direct table without a lock: a writer stores 1 (odd), the key and
 * the value, then (hash & ~1) of the new flow; a reader copies the entry and uses it only when
 * seq was even and unchanged (x86-64 keeps loads and stores in order, so compiler barriers
 * suffice; a weakly ordered CPU would need fences for the same guarantee).
 * Two flows in one slot share the hash's low bits, so a rewrite the reader overlaps goes
 * unnoticed only if their high bits agree too (1 in 4096 with a million slots); even then one
 * packet uses the other flow's entry, which ct_usable still checks (same VIP, backend in
 * service).
 *
 * In both designs a UDP hit refreshes last_seen_ns in place (one aligned 8-byte store), and a
 * TCP RST that hits removes the entry ("direct": the slot's family becomes 0). */
struct flow_key {
	__u32 src[4];
	__u32 dst[4];
	__u16 sport_be;
	__u16 dport_be;
	__u8 proto;
	__u8 family;
	__u16 pad;
};

/* conntrack_v4's key ("lru"): an IPv4 flow_key without the 24 zero address bytes; the 8 bytes
 * from sport_be on are laid out as in struct flow_key (conntrack.h copies them as one word) */
struct flow_key_v4 {
	__u32 src;
	__u32 dst;
	__u16 sport_be;
	__u16 dport_be;
	__u8 proto;
	__u8 family;           /* FAM_V4 */
	__u16 pad;
};

struct ct_value {
	__u32 backend_id;
	__u32 vip_id;          /* the VIP the flow was steered for: a hit needs no VIP lookup */
	__u64 last_seen_ns;    /* bpf_ktime_get_ns(); refreshed on UDP hits only */
};

/* An "lru" conntrack map (conntrack.h: conntrack_v4 and conntrack), defined once so the
 * bench's insert probe (xdp_floor.c) measures the forwarder's own map shape. max_entries is
 * set at load (conntrack_size). */
#define CT_LRU_MAP(key_type, flags)                              \
	struct {                                                  \
		__uint(type, BPF_MAP_TYPE_LRU_HASH);              \
		__uint(max_entries, DEFAULT_CT_SIZE);             \
		__uint(map_flags, flags);                         \
		__type(key, key_type);                            \
		__type(value, struct ct_value);                   \
	}
struct ct_entry {             /* "direct" only */
	__u32 seq;             /* even: stable; odd: being rewritten */
	__u32 pad;
	struct flow_key key;
	struct ct_value val;   /* 64 bytes in all: one cache line */
};

/* ---- configuration (array, one entry) ---------------------------------------------------- */
#define CFG_F_FIB_LOOKUP 1     /* no next-hop MAC: use bpf_fib_lookup (flags 0) */
#define CFG_F_HAVE_SRC_V4 2
#define CFG_F_HAVE_SRC_V6 4

struct config {
	__u32 flags;
	__u32 src_v4;          /* outer source, wire order */
	__u32 src_v6[4];
	__u8 next_hop_mac[6];
	__u16 mtu;             /* MTU towards the backends (outer packet incl. IP header) */
	__u64 udp_idle_ns;
	__u64 new_flow_rate;   /* new conntrack inserts per second per CPU; 0 = unlimited */
	__u32 ct_mask;         /* "direct": conntrack entries - 1 (a power of two minus one) */
	__u32 pad2;
};

/* ---- per-CPU rate limiter state (per-CPU array, one entry) ------------------------------- */
struct rate_state {
	__u64 window_start_ns;
	__u64 count;
};

/* ---- counters ------------------------------------------------------------------------------
 * be_stats: per-CPU array indexed by backend id (one id per (VIP, backend key) pair), the only
 * counter a forwarded packet touches (one lookup; per-packet stats cost 6-14 % of an
 * established packet when the VIP had a second copy, bench/forwarder.py). The rest are sums
 * user space makes (loader.counters):
 * - a VIP's figures = vip_stats[vip id] + be_stats of the VIP's backend ids. vip_stats (per-CPU
 *   array indexed by vip id) is written by user space only: when it frees a backend id it adds
 *   that id's counts there first, so a VIP's figures never go down;
 * - conntrack misses = packets - ct_hits (every forwarded packet is one or the other). */
struct flow_stats {
	__u64 packets;         /* forwarded (encapsulated) packets */
	__u64 bytes;           /* inner L3 bytes forwarded */
	__u64 new_flows;       /* conntrack entries inserted */
	__u64 ct_hits;         /* packets steered by a usable conntrack entry */
};

/* stats: per-CPU array of __u64 indexed by these reasons. DROP_* are drops; the rest count
 * events that are not drops. */
enum stat_reason {
	DROP_NO_BACKEND = 0,       /* VIP has an empty table */
	DROP_BAD_BACKEND,          /* table/CT pointed at a free or foreign id (never forwarded) */
	DROP_NO_ENCAP_SOURCE,      /* no outer source configured for the backend's family */
	DROP_TOO_BIG,              /* over the MTU, no ICMP answer possible: IPv4 without DF
	                            * (XDP cannot fragment) or an ICMP error being steered */
	DROP_FIB,                  /* bpf_fib_lookup found no route or neighbour */
	DROP_ADJUST,               /* bpf_xdp_adjust_head/tail refused */
	DROP_FRAGMENT,             /* first fragment to one of several port VIPs of its address */
	PASS_MALFORMED,            /* truncated or malformed: left to the kernel, which drops it */
	PASS_IPV6_EXT,             /* IPv6 extension header other than one fragment header */
	FRAG_FORWARDED,            /* fragment forwarded by the 3-tuple hash (see vip_key) */
	ICMP_TOO_BIG_SENT,         /* frag-needed / packet-too-big answered to a client */
	ICMP_STEERED,              /* inbound ICMP error sent to the backend owning the flow */
	CT_INSERT_BYPASSED,        /* new flow not tracked: per-CPU insert rate exceeded */
	SELF_TEST_PACKETS,         /* synthetic self-test packets (no CT insert, no VIP stats) */
	DROP_STOP_GAP_RUN,         /* the entry's backend stopped serving, and so had the next
	                            * STOP_GAP_STEPS entries' (until the tables are rewritten) */
	STAT_MAX,
};

/* ---- encapsulation -------------------------------------------------------------------------
 * GRE (RFC 2784) without options: 4 bytes {flags/version = 0, protocol = inner ethertype}.
 * Outer IPv4: ver/ihl 0x45, tos = inner DSCP/ECN byte, id 0, DF set, ttl 64, proto 47.
 * Outer IPv6: traffic class = inner's, flow label = flow hash & 0xfffff, hop limit 64, nh 47.
 * The outer Ethernet source is the received frame's destination MAC; the destination is the
 * configured next-hop MAC (or the fib lookup result). A VLAN tag, if any, is kept. */
#define GRE_V4_OVERHEAD 24
#define GRE_V6_OVERHEAD 44
/* Second chance (second_chance.h) adds the GRE key (K flag, RFC 2890): 4 more bytes, IPv4
 * outer only. Key = the previous owner's IPv4 address as on the wire; key 0 = "this packet
 * already had its second chance" (set by the backend that re-encapsulates it). */
#define GRE_F_KEY 0x2000
#define GRE_KEY_LEN 4
#define SC_KEY_SPENT 0
#define OUTER_TTL 64

/* ---- flow hash (identical in model.py: flow_hash) -------------------------------------------
 * murmur3-style 32-bit hash over 32-bit words, each word being 4 packet bytes read as a
 * little-endian integer (what x86-64 and arm64 loads give):
 *   IPv4: src, dst, ports, proto        IPv6: src[0..3], dst[0..3], ports, proto
 * ports = the 4 bytes {sport, dport} as on the wire; 0 for fragments (3-tuple hash, so all
 * pieces of a datagram meet the same backend). h = FLOW_HASH_SEED; per word k:
 *   k *= C1; k = rotl(k, 15); k *= C2; h ^= k; h = rotl(h, 13); h = h * 5 + 0xe6546b64
 * then h ^= 4 * nwords and the murmur3 finaliser. The table index is
 *   (h * table_size) >> 32  (64-bit product): Lemire's reduction, cheaper than a modulo. */
#define FLOW_HASH_SEED 0x4d414756u /* "MAGV" */
#define FH_C1 0xcc9e2d51u
#define FH_C2 0x1b873593u


/* ---- tunnel health checks (hc_tunnel.c, node/forwarder/hc_tunnel.py) -----------------------
 * The node probes a backend THROUGH the tunnel: the probe socket connects to the VIP and
 * carries SO_MARK = HC_MARK_BASE | id. An ip rule sends marked packets to a table whose only
 * route points at the node's probe device (a veth without ARP); hc_tunnel.c on that device's
 * tc egress looks the id up in hc_targets, wraps the packet in GRE to that backend (the outer
 * headers of the forwarder, see "encapsulation" below, DF set) and redirects it out of the
 * uplink with the kernel's neighbour resolution. The backend decapsulates and answers from the
 * VIP straight to the node (DSR): a reply proves the VIP and the decap, not just the host.
 * Mirrored by node/forwarder/hc_tunnel.py (HcTarget, HcConfig, HC_COUNTERS). */
#define HC_MAX_TARGETS 65536      /* ids 1..65535 (0 is never a target) */
#define HC_MARK_BASE 0x6d6c0000u  /* "ml" in the high 16 bits */
#define HC_MARK_MASK 0xffff0000u

struct hc_target {                /* hc_targets (array) indexed by mark & ~HC_MARK_MASK */
	__u32 addr[4];            /* the backend under test, wire order; IPv4 in addr[0] */
	__u8 family;              /* FAM_V4 / FAM_V6; 0 = free id: the probe is dropped */
	__u8 pad[3];
};

struct hc_config {                /* hc_config (array, one entry) */
	__u32 flags;              /* CFG_F_HAVE_SRC_V4 / CFG_F_HAVE_SRC_V6 */
	__u32 src_v4;             /* outer source, wire order */
	__u32 src_v6[4];
	__u32 out_ifindex;        /* the uplink the backends are reached through */
	__u32 pad;
};

enum hc_stat {                    /* hc_stats: per-CPU array of __u64 */
	HC_ENCAP_V4 = 0,          /* probe packets sent through the tunnel, outer IPv4 */
	HC_ENCAP_V6,              /* ... outer IPv6 */
	HC_PASS_UNMARKED,         /* not a probe (no HC mark): left alone */
	HC_DROP_NO_TARGET,        /* marked, but its id names no backend (stale mark) */
	HC_DROP_NO_SOURCE,        /* no encap source configured for the backend's family */
	HC_DROP_MALFORMED,        /* not IPv4/IPv6 of the backend's family, or truncated */
	HC_DROP_ADJUST,           /* bpf_skb_adjust_room or a header store refused */
	HC_STAT_MAX,
};

/* ---- the backend's GRE decapsulation program (decap.c) -------------------------------------
 * Mirrored by node/forwarder/tc.py (DecapVipKey, DECAP_COUNTERS). */
/* Debian's uapi linux/bpf.h (6.1) predates these adjust_room flags; the kernels we run (>= 6.3)
 * have them with these values. They make the kernel update skb->protocol and the header offsets
 * when the outer L3 header is popped. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#define DECAP_MAX_VIPS 4096

/* Key of decap_vips: the inner destination addresses this backend serves. IPv4 addresses use the
 * first 4 bytes of addr and leave the rest zero, so one map serves both families. */
struct decap_vip_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16];
};

/* Value of decap_vips; non-zero means "decapsulate GRE whose inner packet is for this VIP". */
struct decap_vip_value {
	__u32 enabled;
};

/* Index of decap_stats (a per-CPU array of struct decap_counter). Every packet the program sees
 * lands in exactly one of them, so their sum is the number of packets seen. */
enum decap_counter_index {
	DECAP_OK_V4 = 0,          /* decapsulated, inner IPv4 */
	DECAP_OK_V6 = 1,          /* decapsulated, inner IPv6 */
	DECAP_PASS_NOT_IP = 2,    /* not IPv4/IPv6 (ARP, VLAN-tagged in-band, ...) */
	DECAP_PASS_NOT_GRE = 3,   /* IP but not GRE (the normal traffic of the host) */
	DECAP_PASS_GRE_FLAGS = 4, /* GRE with checksum/key/sequence/routing or version != 0 */
	DECAP_PASS_GRE_PROTO = 5, /* GRE carrying something other than IPv4/IPv6 */
	DECAP_PASS_NOT_VIP = 6,   /* GRE whose inner destination is not a configured VIP */
	DECAP_PASS_FRAGMENT = 7,  /* outer IPv4 fragment or IPv6 extension headers: not ours */
	DECAP_PASS_TRUNCATED = 8, /* too short to hold the headers it claims */
	DECAP_DROP_ADJUST = 9,    /* for a VIP but bpf_skb_adjust_room (or the re-encapsulation
	                           * of a second chance) refused: dropped */
	/* Second chance (GRE with a key, see GRE_F_KEY): */
	DECAP_SC_LOCAL = 10,      /* names a previous owner, but it is a SYN or a local socket owns
	                           * the flow: decapsulated here */
	DECAP_SC_REDIRECTED = 11, /* names a previous owner and no local socket owns the flow:
	                           * re-encapsulated to the previous owner (key spent) */
	DECAP_SC_ACCEPTED = 12,   /* second chance spent, a local socket owns the flow: decapsulated */
	DECAP_SC_DROPPED = 13,    /* second chance spent, no local socket either: dropped */
	DECAP_COUNTER_MAX = 14,
};

struct decap_counter {
	__u64 packets;
	__u64 bytes;
};

#endif
