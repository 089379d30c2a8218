// SPDX-License-Identifier: GPL-2.0
/* xdp_lb.c: the Maglev forwarder's data path.
 *
 * VIP traffic (TCP/UDP to a configured address/protocol/port, or an "all ports" VIP) is
 * steered to a backend by connection tracking or, on a miss, by the VIP's Maglev table, then
 * GRE-encapsulated and sent back out (XDP_TX). Everything else goes to the kernel untouched.
 * Layouts and the flow hash are defined in maglev.h; node/forwarder/model.py is the reference
 * model and must stay byte-for-byte identical (tests/integration/test_forwarder_diff.py).
 *
 * Policies (mirrored in model.py):
 * - Address pre-filter first (maglev.h): a packet whose destination address has no VIP goes
 *   to the kernel after one load, before any parse or hash lookup, uncounted. A packet for
 *   the table whose address index has one VIP (vip_only, maglev.h) that owns its flow needs
 *   no vips lookup; the others look vips up.
 * - Ethernet with at most one 802.1Q tag; the tag is kept on the encapsulated frame.
 * - Truncated/malformed IP headers, or TCP/UDP without 4 bytes of ports: XDP_PASS, counted
 *   PASS_MALFORMED (the kernel drops them). Never forwarded.
 * - IPv4 options are allowed (skipped). IPv6: only a fragment header directly after the fixed
 *   header is understood; hop-by-hop/routing/destination options: XDP_PASS, PASS_IPV6_EXT.
 * - Fragments (IPv4 MF or offset, any IPv6 fragment header) are forwarded by the 3-tuple hash
 *   (ports 0), without conntrack, so every piece of a datagram meets one backend: by the
 *   "all ports" VIP of (dst, proto) if there is one, else by the one port VIP of (dst, proto)
 *   if there is exactly one (a fragment key, maglev.h), the first fragment included. With
 *   several port VIPs a first fragment whose port has a VIP is dropped (DROP_FRAGMENT): the
 *   rest of the datagram could not follow it. Any other fragment goes to the kernel.
 * - Conntrack (two designs, see maglev.h; CT_DIRECT picks one at build time): a TCP SYN (SYN
 *   set, ACK clear) goes to the table whatever conntrack holds, then inserts, replacing any
 *   entry of its 5-tuple (Katran does the same; "lru" looks that entry up to rewrite it in
 *   place, conntrack.h: CT_SYN_LOOKUP).
 *   "lru" (default): the kernel's LRU hash, one LRU shared by the CPUs. "direct": an insert
 *   replaces whatever flow held the flow's slot. TCP entries never expire by time, UDP entries
 *   after config.udp_idle_ns without packets. A TCP RST is steered like its flow, then its
 *   entry is removed (a RST that misses inserts none). A FIN changes nothing: the forwarder
 *   sees only the client's half of the connection, and after the client's FIN the server may
 *   still send for as long as it likes, each of the client's ACKs needing the same backend.
 * - Second chance (second_chance.h): a non-SYN packet steered by the table whose entry moved
 *   within the VIP's window goes to the new owner with the previous owner in a GRE key, and
 *   inserts no conntrack entry (the next packet needs the hint too).
 * - ICMP errors (v4 type 3/11, v6 type 1/2/3) quoting a packet from a VIP flow are steered to
 *   the backend that owns the flow (conntrack, else table; no insert).
 * - Over the MTU after encapsulation: ICMP frag-needed (IPv4 with DF) / packet-too-big (IPv6)
 *   back to the client with mtu - overhead; IPv4 without DF and ICMP errors: DROP_TOO_BIG.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maglev.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, VIP_KEYS_MAX);
	__type(key, struct vip_key);
	__type(value, struct vip_value);
} vips SEC(".maps");

/* The address pre-filter (maglev.h): global data in a section of its own, which libbpf makes
 * a one-element array map (VIP_FILTER_SECTION). The data path reads a word at a fixed address:
 * no lookup call, bounds check or null test on the path of every packet. Not static, so the
 * compiler cannot assume it keeps its initial zeros. */
__u64 vip_addrs[VIP_FILTER_WORDS] SEC(VIP_FILTER_SECTION);

/* The only VIP of each pre-filter index (maglev.h), global data read the same way. */
__u16 vip_only[1 << VIP_FILTER_LOG2] SEC(VIP_ONLY_SECTION);

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_VIPS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct vip_meta);
} vip_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_TABLE_CAPACITY / TABLE_CHUNK);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct table_chunk);
} tables SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_VIPS);
	__type(key, __u32);
	__type(value, struct name);
} vip_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct name);
} be_names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/* One header per concern, as the data path reads: parse, hash, track, encapsulate, answer,
 * count. They define their own maps (counters.h: stats, vip_stats, be_stats; conntrack.h:
 * rate, conntrack); the VIP, backend and config maps above belong to the steering decision. */
#include "flow_hash.h"
#include "parse.h"
#include "counters.h"
#include "csum.h"
#include "icmp.h"
#include "encap.h"
#include "conntrack.h"
#include "second_chance.h"

/* ---- steering --------------------------------------------------------------------------- */

/* The pre-filter's index of an address (maglev.h), from the XOR of its words. */
static __always_inline __u32 vip_addr_index(__u32 folded)
{
	return (folded * VIP_FILTER_MUL) >> (32 - VIP_FILTER_LOG2);
}

/* May the destination address have a VIP? The address pre-filter of maglev.h: one multiply
 * and one load, so traffic for the node itself never pays for a hash lookup. */
static __always_inline int vip_addr_maybe(__u32 folded)
{
	__u32 i = vip_addr_index(folded);

	return (vip_addrs[i / 64] >> (i % 64)) & 1;
}

/* Does the VIP described by meta own this flow? (The conntrack fast path checks this instead
 * of a second hash lookup: a compare of fields already in cache.) The differences are ORed
 * together and tested once: a chain of eight compare-and-branch steps cost an established
 * packet ~10 % (bench/forwarder.py). The port matches when the VIP's is 0 ("all ports") or
 * equal: the product of the VIP's port and the difference (each < 2^16) is 0 exactly then. */
static __always_inline __u32 vip_mismatch(const struct vip_meta *meta, const struct flow_key *fk)
{
	const struct vip_key *k = &meta->key;
	__u32 port = k->port_be;

	return (k->addr[0] ^ fk->dst[0]) | (k->addr[1] ^ fk->dst[1]) | (k->addr[2] ^ fk->dst[2]) |
	       (k->addr[3] ^ fk->dst[3]) | (k->family ^ fk->family) | (k->proto ^ fk->proto) |
	       (port * (port ^ fk->dport_be)) | !meta->in_use;
}

/* A conntrack entry is usable while its VIP still owns the flow and its backend belongs to
 * that VIP and is in service (active or draining: state - 1 is 0 or 1); UDP entries also
 * expire when idle. */
static __always_inline int ct_usable(const struct ct_value *ct, struct ct_value *live,
				     struct parsed *p, const struct config *cfg, int selftest,
				     struct vip_meta **meta_out, struct backend **be_out)
{
	__u32 vip_id = ct->vip_id, be_id = ct->backend_id;
	struct vip_meta *meta = bpf_map_lookup_elem(&vip_meta, &vip_id);
	struct backend *be = bpf_map_lookup_elem(&backends, &be_id);

	if (!meta || !be)
		return 0;
	if (vip_mismatch(meta, &p->fk) | (be->vip_id ^ vip_id) | ((__u8)(be->state - BE_STATE_ACTIVE) > 1))
		return 0;
	if (p->fk.proto == IPPROTO_UDP) {
		__u64 now = bpf_ktime_get_ns();

		if (now - ct->last_seen_ns > cfg->udp_idle_ns)
			return 0;
		if (!selftest && !p->is_icmp_err)
			live->last_seen_ns = now; /* one aligned 8-byte store */
	}
	*meta_out = meta;
	*be_out = be;
	return 1;
}

/* Encapsulate and send the packet to be (be_id) and count it: the conntrack hit and the table
 * path each inline their own copy, so the hit's (no second-chance key, no insert) is compiled
 * with those known to be 0. */
static __always_inline int forward(struct xdp_md *ctx, const __u32 l2, struct parsed *p,
				   const struct config *cfg, const struct backend *be, __u32 be_id,
				   int hit, int inserted, __u32 hint, int selftest)
{
	__u8 dmac[8] __attribute__((aligned(4))); /* encap reads it as 4 + 2 bytes */
	__u32 hash;
	int rc;

	if (be->family == FAM_V4 ? !(cfg->flags & CFG_F_HAVE_SRC_V4) : !(cfg->flags & CFG_F_HAVE_SRC_V6)) {
		count(DROP_NO_ENCAP_SOURCE);
		return XDP_DROP;
	}
	{
		__u32 overhead = (be->family == FAM_V4 ? GRE_V4_OVERHEAD : GRE_V6_OVERHEAD) +
				 (hint ? GRE_KEY_LEN : 0);

		if (p->l3_len + overhead > cfg->mtu) {
			if (p->is_icmp_err || (p->fk.family == FAM_V4 && !p->df)) {
				count(DROP_TOO_BIG);
				return XDP_DROP;
			}
			if (p->fk.family == FAM_V4)
				return too_big_v4(ctx, l2, p, cfg->mtu - overhead);
			return too_big_v6(ctx, l2, p, cfg->mtu - overhead);
		}
	}
	/* only an IPv6 outer header carries the hash (its flow label) */
	hash = be->family == FAM_V6 ? flow_hash_of(p) : 0;

	if (cfg->flags & CFG_F_FIB_LOOKUP) {
		struct bpf_fib_lookup fib = {};
		/* read once: clang would otherwise keep &ctx->ingress_ifindex in a register, a
		 * modified ctx pointer the verifier refuses */
		__u32 in_ifindex = ctx->ingress_ifindex;

		fib.ifindex = in_ifindex;
		if (be->family == FAM_V4) {
			fib.family = AF_INET;
			fib.tos = p->tos;
			fib.tot_len = p->l3_len + GRE_V4_OVERHEAD + (hint ? GRE_KEY_LEN : 0);
			fib.ipv4_src = cfg->src_v4;
			fib.ipv4_dst = be->addr[0];
		} else {
			fib.family = AF_INET6;
			fib.tot_len = p->l3_len + GRE_V6_OVERHEAD;
			__builtin_memcpy(fib.ipv6_src, cfg->src_v6, 16);
			__builtin_memcpy(fib.ipv6_dst, be->addr, 16);
		}
		fib.l4_protocol = IPPROTO_GRE_;
		rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
		if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
			count(DROP_FIB);
			return XDP_DROP;
		}
		__builtin_memcpy(dmac, fib.dmac, 6);
		rc = encap(ctx, l2, p, be, cfg, dmac, hash, hint);
		if (rc == XDP_TX) {
			void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;

			if (data + 12 > end)
				return XDP_DROP;
			__builtin_memcpy(data + 6, fib.smac, 6);
			if (fib.ifindex != in_ifindex)
				rc = bpf_redirect(fib.ifindex, 0);
		}
	} else {
		rc = encap(ctx, l2, p, be, cfg, cfg->next_hop_mac, hash, hint);
	}
	if (rc == XDP_DROP)
		return rc;
	if (selftest) {
		count(SELF_TEST_PACKETS);
	} else {
		if (hit && p->rst)
			ct_forget(p, cfg);
		if (p->is_frag)
			count(FRAG_FORWARDED);
		if (p->is_icmp_err)
			count(ICMP_STEERED);
		if (hint)
			sc_count(SC_HINTED);
		count_forwarded(be_id, p->l3_len, hit, inserted);
	}
	return rc;
}

/* The entry rel of a VIP's live table names one of its backends that drains or is down: the
 * id of the backend of the next entry that is active takes the packet (maglev.h:
 * STOP_GAP_STEPS); 0: none within STOP_GAP_STEPS entries; -1: an entry names a free or foreign
 * id. A function of its own (a BPF-to-BPF call, ids in and out): off the common path, an
 * active backend never gets here, and inlined it moved the common path's code around. */
static __attribute__((noinline)) long next_serving(__u32 offset, __u32 size, __u32 rel, __u32 vip_id)
{
	for (__u32 i = 1; i <= STOP_GAP_STEPS; i++) {
		__u32 idx = offset + (rel + i) % size, chunk = idx / TABLE_CHUNK, id;
		struct table_chunk *c = bpf_map_lookup_elem(&tables, &chunk);
		struct backend *be;

		if (!c)
			return -1;
		id = c->ids[idx % TABLE_CHUNK];
		be = bpf_map_lookup_elem(&backends, &id);
		if (!be || be->vip_id != vip_id)
			return -1;
		if (be->state == BE_STATE_ACTIVE)
			return id;
		if ((__u8)(be->state - BE_STATE_DRAIN) > 1)
			return -1;
	}
	return 0;
}

static __always_inline int steer(struct xdp_md *ctx, const __u32 l2, struct parsed *p, int selftest)
{
	struct vip_key vk;
	struct vip_value *vv;
	struct vip_meta *meta = 0;
	struct config *cfg;
	struct backend *be = 0;
	struct ct_value *ct = 0, cv;
	__u32 zero = 0, vip_id, be_id = 0, active, hint = 0;
	int inserted = 0;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_PASS;
	/* Conntrack first: an established flow needs no VIP hash lookup. A SYN opens a new
	 * connection and goes to the table whatever conntrack holds (as Katran does); the insert
	 * below overwrites what an earlier connection on the same 5-tuple left ("lru" finds that
	 * entry first to rewrite it in place: CT_SYN_LOOKUP). Fragments never use conntrack. */
	if (!p->is_frag && (!p->syn || CT_SYN_LOOKUP)) {
		ct = ct_lookup(p, cfg, &cv);
		if (ct && !p->syn && ct_usable(&cv, ct, p, cfg, selftest, &meta, &be)) {
			return forward(ctx, l2, p, cfg, be, cv.backend_id, 1, 0, 0, selftest);
		}
	}

	/* The address's only VIP, if it owns the flow, saves the hash lookup (maglev.h). */
	if (!p->is_frag) {
		const __u32 *d = p->fk.dst;
		__u32 only = vip_only[vip_addr_index(d[0] ^ d[1] ^ d[2] ^ d[3])];

		vip_id = only - 1;
		if (only && (meta = bpf_map_lookup_elem(&vip_meta, &vip_id)) && !vip_mismatch(meta, &p->fk))
			goto vip_found;
	}
	__builtin_memcpy(vk.addr, p->fk.dst, 16);
	vk.port_be = p->fk.dport_be;
	vk.proto = p->fk.proto;
	vk.family = p->fk.family;
	/* the port's VIP, else the "all ports" VIP (a fragment's port is 0: that one first) */
	vv = bpf_map_lookup_elem(&vips, &vk);
	if (!vv && vk.port_be) {
		vk.port_be = 0;
		vv = bpf_map_lookup_elem(&vips, &vk);
	}
	if (!vv && p->is_frag) {
		/* the one port VIP of (addr, proto), if there is exactly one (maglev.h) */
		vk.family |= VIP_KEY_FRAG;
		vv = bpf_map_lookup_elem(&vips, &vk);
		if (!vv && p->frag_dport_be) {
			vk.family = p->fk.family;
			vk.port_be = p->frag_dport_be;
			if (bpf_map_lookup_elem(&vips, &vk)) {
				count(DROP_FRAGMENT);
				return XDP_DROP;
			}
		}
	}
	if (!vv)
		return XDP_PASS;
	vip_id = vv->vip_id;
	meta = bpf_map_lookup_elem(&vip_meta, &vip_id);
	if (!meta)
		return XDP_PASS;
vip_found:
	{
		struct table_slot slot;
		struct table_chunk *c;
		__u32 idx, chunk, rel;

		active = *(volatile __u32 *)&meta->active & 1;
		slot = meta->slot[active];
		if (!slot.size) {
			count(DROP_NO_BACKEND);
			return XDP_DROP;
		}
		rel = (__u32)(((__u64)flow_hash_of(p) * slot.size) >> 32);
		idx = slot.offset + rel;
		chunk = idx / TABLE_CHUNK;
		c = bpf_map_lookup_elem(&tables, &chunk);
		if (!c)
			goto bad_backend;
		be_id = c->ids[idx % TABLE_CHUNK];
		be = bpf_map_lookup_elem(&backends, &be_id);
		if (!be || be->vip_id != vip_id)
			goto bad_backend;
		if (__builtin_expect(be->state != BE_STATE_ACTIVE, 0)) {
			long next;

			if ((__u8)(be->state - BE_STATE_DRAIN) > 1)
				goto bad_backend;
			next = next_serving(slot.offset, slot.size, rel, vip_id);
			if (next < 0)
				goto bad_backend;
			if (!next) {
				count(DROP_STOP_GAP_RUN);
				return XDP_DROP;
			}
			be_id = next;
			be = bpf_map_lookup_elem(&backends, &be_id);
			if (!be)
				goto bad_backend;
		}
		/* self-test packets are never hinted: their expected output must not depend on
		 * which side of a window's deadline the check ran */
		hint = selftest ? 0 : sc_hint(vip_id, active, rel, be, p);
		if (!p->is_frag && !p->is_icmp_err && !selftest && !p->rst && !hint) {
			/* last_seen matters for UDP expiry only: TCP entries store 0 and save
			 * the clock read unless the rate limiter needs it. */
			__u64 now = 0;

			if (p->fk.proto == IPPROTO_UDP || cfg->new_flow_rate)
				now = bpf_ktime_get_ns();
			if (rate_allows(cfg, now)) {
				struct ct_value nv = {.backend_id = be_id, .vip_id = vip_id};

				if (p->fk.proto == IPPROTO_UDP)
					nv.last_seen_ns = now;
				inserted = ct_insert(p, cfg, ct, &nv);
			} else {
				count(CT_INSERT_BYPASSED);
			}
		}
	}
	if (!be)
		goto bad_backend;
	return forward(ctx, l2, p, cfg, be, be_id, 0, inserted, hint, selftest);
bad_backend:
	count(DROP_BAD_BACKEND);
	return XDP_DROP;
}

/* The pre-filter comes before the parse: a packet whose destination address has no VIP (the
 * node's own BGP, BFD, SSH, health checks) costs a bounds check and two loads, and goes to the
 * kernel (untagged IPv4 met it in xdp_lb already). ICMP errors about a VIP flow are addressed to the VIP (the
 * quoted packet came from it), so they pass the filter too. The filter's "no" is marked as
 * the likely outcome so the compiler lays that path out straight, entry to exit, in a few
 * cache lines: on a non-VIP packet the instruction fetches cost more than the instructions. */
static __always_inline int run(struct xdp_md *ctx, const __u32 l2, __u16 proto)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	int r, selftest;

	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + l2;

		if ((void *)(ip + 1) > end)
			goto malformed;
		/* untagged IPv4 met the filter in xdp_lb already (a shorter frame is malformed) */
		if (l2 != 14 && __builtin_expect(!vip_addr_maybe(ip->daddr), 1))
			return XDP_PASS;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip = data + l2;
		const __u32 *d;

		if ((void *)(ip + 1) > end)
			goto malformed;
		d = ip->daddr.in6_u.u6_addr32;
		if (__builtin_expect(!vip_addr_maybe(d[0] ^ d[1] ^ d[2] ^ d[3]), 1))
			return XDP_PASS;
	} else {
		return XDP_PASS;
	}
	/* Self-test packets carry 4 bytes of XDP metadata (set through BPF_PROG_TEST_RUN), which
	 * received frames never have here: they are checked without touching conntrack/stats.
	 * Materialise the flag now: otherwise clang keeps the meta pointer alive and spills it
	 * as 32 bits, which the verifier refuses. */
	selftest = ctx->data_meta < ctx->data;
	asm volatile("" : "+r"(selftest));
	{
		struct parsed p = {};

		if (proto == bpf_htons(ETH_P_IP))
			r = parse_v4(data, end, l2, &p);
		else
			r = parse_v6(data, end, l2, &p);
		if (r == P_OK)
			return steer(ctx, l2, &p, selftest);
	}
	if (r == P_V6_EXT) {
		count(PASS_IPV6_EXT);
		return XDP_PASS;
	}
	if (r != P_MALFORMED)
		return XDP_PASS;
malformed:
	count(PASS_MALFORMED);
	return XDP_PASS;
}

/* Untagged IPv4 meets the pre-filter first, here, before any other branch: a non-VIP packet
 * then runs a straight line of about twenty instructions and five branches from the entry to
 * the exit (the kernel puts each JIT image at a random offset, and a longer path with more
 * branches measured 5-18 ns above the XDP_PASS floor depending on where it landed). A frame
 * too short for the check takes the general path, which finds it malformed. */
SEC("xdp")
int xdp_lb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if (data + 14 + sizeof(struct iphdr) <= end && *(__u16 *)(data + 12) == bpf_htons(ETH_P_IP) &&
	    __builtin_expect(!vip_addr_maybe(*(__u32 *)(data + 30)), 1))
		return XDP_PASS;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_8021Q_)) {
		__u16 *inner = data + 16;

		if ((void *)(inner + 1) > end)
			return XDP_PASS;
		return run(ctx, 18, *inner);
	}
	return run(ctx, 14, eth->h_proto);
}
