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
 * - Ethernet with at most one 802.1Q tag; the tag is kept on the encapsulated frame.
 * - Truncated/malformed IP headers, or TCP/UDP without 4 bytes of ports: XDP_PASS, counted
 *   PASS_MALFORMED (the kernel drops them). Never forwarded.
 * - IPv4 options are allowed (skipped). IPv6: only a fragment header directly after the fixed
 *   header is understood; hop-by-hop/routing/destination options: XDP_PASS, PASS_IPV6_EXT.
 * - Fragments (IPv4 MF or offset, any IPv6 fragment header): forwarded by the 3-tuple hash
 *   (ports 0), without conntrack, when an "all ports" VIP owns (dst, proto). A first fragment
 *   whose ports match a port VIP is dropped (DROP_FRAGMENT): the rest of the datagram could not
 *   follow it. Any other fragment goes to the kernel.
 * - Conntrack (two designs, see maglev.h; CT_DIRECT picks one at build time): a TCP SYN (SYN
 *   set, ACK clear) skips the lookup and goes to the table, then inserts (Katran does the same).
 *   "lru" (default): the kernel's LRU hash; no tracked flow is displaced below capacity.
 *   "direct": an insert replaces whatever flow held the flow's slot. TCP entries never expire
 *   by time, UDP entries after config.udp_idle_ns without packets.
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

#define ETH_P_8021Q_ 0x8100
#define IPPROTO_GRE_ 47
#define NEXTHDR_FRAGMENT 44
#define ICMP6_PTB_QUOTE 1232 /* 1280 - 40 - 8: as much as the minimum IPv6 MTU allows */

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VIPS);
	__type(key, struct vip_key);
	__type(value, struct vip_value);
} vips SEC(".maps");

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

/* conntrack is defined further down, next to its lookup and insert (one map, two designs). */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rate_state);
} rate SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_VIPS);
	__type(key, __u32);
	__type(value, struct flow_stats);
} vip_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct flow_stats);
} be_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* What the parser learnt about a packet that may belong to a VIP. */
struct parsed {
	/* the client's flow (for ICMP errors: the quoted flow reversed); 8-aligned because
	 * "direct" conntrack compares keys 8 bytes at a time */
	struct flow_key fk __attribute__((aligned(8)));
	__u32 l3_len;          /* length of the IP packet to encapsulate */
	__u16 frag_dport_be;   /* first fragment: its destination port (policy check) */
	__u8 tos;              /* IPv4 tos / IPv6 traffic class */
	__u8 is_frag;
	__u8 df;
	__u8 is_icmp_err;
	__u8 syn;              /* TCP SYN without ACK: a new connection, conntrack not consulted */
	__u8 ihl;              /* IPv4 header length in bytes (ICMP frag-needed quote) */
	__u8 hashed;           /* hash below is valid (flow_hash_of computes it at most once) */
	__u32 hash;            /* flow_hash(&fk) */
};

static __always_inline void count(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &reason);

	if (v)
		*v += 1;
}

static __always_inline __u32 rotl32(__u32 x, int r)
{
	return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 fh_mix(__u32 h, __u32 k)
{
	k *= FH_C1;
	k = rotl32(k, 15);
	k *= FH_C2;
	h ^= k;
	h = rotl32(h, 13);
	return h * 5 + 0xe6546b64;
}

static __always_inline __u32 fh_final(__u32 h, __u32 nbytes)
{
	h ^= nbytes;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The flow hash documented in maglev.h. */
static __always_inline __u32 flow_hash(const struct flow_key *fk)
{
	__u32 ports = (__u32)fk->sport_be | ((__u32)fk->dport_be << 16);
	__u32 h = FLOW_HASH_SEED;

	if (fk->family == FAM_V4) {
		h = fh_mix(h, fk->src[0]);
		h = fh_mix(h, fk->dst[0]);
		h = fh_mix(h, ports);
		h = fh_mix(h, fk->proto);
		return fh_final(h, 16);
	}
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = fh_mix(h, fk->src[i]);
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = fh_mix(h, fk->dst[i]);
	h = fh_mix(h, ports);
	h = fh_mix(h, fk->proto);
	return fh_final(h, 40);
}

/* The packet's flow hash, computed on first use: conntrack ("direct"), the table index and the
 * IPv6 flow label all need it, an established "lru" flow to an IPv4 backend never does. */
static __always_inline __u32 flow_hash_of(struct parsed *p)
{
	if (!p->hashed) {
		p->hash = flow_hash(&p->fk);
		p->hashed = 1;
	}
	return p->hash;
}

static __always_inline __u16 csum_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

static __always_inline __u16 iph_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 s = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	return csum_fold(s);
}

/* ---- parsing ---------------------------------------------------------------------------- */

#define P_NOT_OURS 0   /* XDP_PASS, uncounted */
#define P_OK 1
#define P_MALFORMED 2  /* XDP_PASS, PASS_MALFORMED */
#define P_V6_EXT 3     /* XDP_PASS, PASS_IPV6_EXT */

static __always_inline int is_l4(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

/* An ICMPv4 error quoting an IPv4 TCP/UDP packet: fill p with the quoted flow reversed. */
static __always_inline int parse_icmp4_err(void *icmp, void *end, struct parsed *p)
{
	__u8 *t = icmp;
	struct iphdr *in;
	__u16 *ports;
	__u32 ihl;

	if ((void *)(t + 8) > end)
		return P_MALFORMED;
	if (t[0] != 3 && t[0] != 11)
		return P_NOT_OURS;
	in = icmp + 8;
	if ((void *)(in + 1) > end)
		return P_MALFORMED;
	ihl = in->ihl * 4;
	if (in->version != 4 || ihl < 20 || !is_l4(in->protocol))
		return P_NOT_OURS;
	if (in->frag_off & bpf_htons(0x1fff))
		return P_NOT_OURS; /* a non-first fragment quotes no ports */
	ports = (void *)in + ihl;
	if ((void *)(ports + 2) > end)
		return P_MALFORMED;
	p->fk.src[0] = in->daddr;
	p->fk.dst[0] = in->saddr;
	p->fk.sport_be = ports[1];
	p->fk.dport_be = ports[0];
	p->fk.proto = in->protocol;
	p->is_icmp_err = 1;
	return P_OK;
}

static __always_inline int parse_v4(void *data, void *end, __u32 l3, struct parsed *p)
{
	struct iphdr *ip = data + l3;
	__u32 ihl, tot;
	__u16 *ports;

	if ((void *)(ip + 1) > end)
		return P_MALFORMED;
	ihl = ip->ihl * 4;
	tot = bpf_ntohs(ip->tot_len);
	if (ip->version != 4 || ihl < 20 || tot < ihl || data + l3 + tot > end)
		return P_MALFORMED;
	p->fk.family = FAM_V4;
	p->l3_len = tot;
	p->tos = ip->tos;
	p->ihl = ihl;
	p->df = !!(ip->frag_off & bpf_htons(0x4000));
	if (ip->protocol == IPPROTO_ICMP) {
		if (ip->frag_off & bpf_htons(0x3fff))
			return P_NOT_OURS;
		return parse_icmp4_err((void *)ip + ihl, end, p);
	}
	if (!is_l4(ip->protocol))
		return P_NOT_OURS;
	p->fk.src[0] = ip->saddr;
	p->fk.dst[0] = ip->daddr;
	p->fk.proto = ip->protocol;
	ports = (void *)ip + ihl;
	if (ip->frag_off & bpf_htons(0x3fff)) {
		p->is_frag = 1;
		if (!(ip->frag_off & bpf_htons(0x1fff)) && tot >= ihl + 4 && (void *)(ports + 2) <= end)
			p->frag_dport_be = ports[1];
		return P_OK;
	}
	if (tot < ihl + 4 || (void *)(ports + 2) > end)
		return P_MALFORMED;
	p->fk.sport_be = ports[0];
	p->fk.dport_be = ports[1];
	if (ip->protocol == IPPROTO_TCP && tot >= ihl + 14 && (void *)ports + 14 <= end)
		p->syn = (((__u8 *)ports)[13] & 0x12) == 0x02;
	return P_OK;
}

static __always_inline void copy6(__u32 *dst, const struct in6_addr *a)
{
	dst[0] = a->in6_u.u6_addr32[0];
	dst[1] = a->in6_u.u6_addr32[1];
	dst[2] = a->in6_u.u6_addr32[2];
	dst[3] = a->in6_u.u6_addr32[3];
}

static __always_inline int parse_icmp6_err(void *icmp, void *end, struct parsed *p)
{
	__u8 *t = icmp;
	struct ipv6hdr *in;
	__u16 *ports;

	if ((void *)(t + 8) > end)
		return P_MALFORMED;
	if (t[0] != 1 && t[0] != 2 && t[0] != 3)
		return P_NOT_OURS;
	in = icmp + 8;
	if ((void *)(in + 1) > end)
		return P_MALFORMED;
	if (in->version != 6 || !is_l4(in->nexthdr))
		return P_NOT_OURS;
	ports = (void *)(in + 1);
	if ((void *)(ports + 2) > end)
		return P_MALFORMED;
	copy6(p->fk.src, &in->daddr);
	copy6(p->fk.dst, &in->saddr);
	p->fk.sport_be = ports[1];
	p->fk.dport_be = ports[0];
	p->fk.proto = in->nexthdr;
	p->is_icmp_err = 1;
	return P_OK;
}

static __always_inline int parse_v6(void *data, void *end, __u32 l3, struct parsed *p)
{
	struct ipv6hdr *ip = data + l3;
	__u32 plen, l4off = sizeof(*ip);
	__u8 nh;
	__u16 *ports;

	if ((void *)(ip + 1) > end)
		return P_MALFORMED;
	plen = bpf_ntohs(ip->payload_len);
	if (ip->version != 6 || (void *)(ip + 1) + plen > end)
		return P_MALFORMED;
	p->fk.family = FAM_V6;
	p->l3_len = plen + sizeof(*ip);
	p->tos = (ip->priority << 4) | (ip->flow_lbl[0] >> 4);
	nh = ip->nexthdr;
	if (nh == NEXTHDR_FRAGMENT) {
		__u8 *fh = (void *)(ip + 1);

		if ((void *)(fh + 8) > end || plen < 8)
			return P_MALFORMED;
		nh = fh[0];
		p->is_frag = 1;
		l4off += 8;
		if (!is_l4(nh))
			return P_NOT_OURS;
		copy6(p->fk.src, &ip->saddr);
		copy6(p->fk.dst, &ip->daddr);
		p->fk.proto = nh;
		ports = (void *)(fh + 8);
		/* offset 0: the first fragment, which carries the ports */
		if (!(*(__u16 *)(fh + 2) & bpf_htons(0xfff8)) && plen >= 12 && (void *)(ports + 2) <= end)
			p->frag_dport_be = ports[1];
		return P_OK;
	}
	if (nh == 0 || nh == 43 || nh == 60)
		return P_V6_EXT;
	if (nh == 58)
		return parse_icmp6_err((void *)(ip + 1), end, p);
	if (!is_l4(nh))
		return P_NOT_OURS;
	ports = (void *)(ip + 1);
	if (plen < 4 || (void *)(ports + 2) > end)
		return P_MALFORMED;
	copy6(p->fk.src, &ip->saddr);
	copy6(p->fk.dst, &ip->daddr);
	p->fk.sport_be = ports[0];
	p->fk.dport_be = ports[1];
	p->fk.proto = nh;
	if (nh == IPPROTO_TCP && plen >= 14 && (void *)ports + 14 <= end)
		p->syn = (((__u8 *)ports)[13] & 0x12) == 0x02;
	return P_OK;
}

/* ---- steering --------------------------------------------------------------------------- */

/* now is only read when a limit is configured (bpf_ktime_get_ns costs ~40 ns here). */
static __always_inline int rate_allows(const struct config *cfg, __u64 now)
{
	__u32 zero = 0;
	struct rate_state *r;

	if (!cfg->new_flow_rate)
		return 1;
	r = bpf_map_lookup_elem(&rate, &zero);
	if (!r)
		return 1;
	if (now - r->window_start_ns >= 1000000000ull) {
		r->window_start_ns = now;
		r->count = 0;
	}
	if (r->count >= cfg->new_flow_rate)
		return 0;
	r->count++;
	return 1;
}

/* ICMP frag-needed (v4) / packet-too-big (v6) back to the client. The answer is built in
 * place: grow the head by the new headers, so the quoted original starts right after them,
 * then cut the tail. Returns the XDP verdict. */
static __always_inline __u64 csum_words(void *start, __u32 nwords, void *end, __u32 max)
{
	__u16 *w = start;
	__u64 s = 0;

	for (__u32 i = 0; i < max; i++) {
		if (i >= nwords || (void *)(w + i + 1) > end)
			break;
		s += w[i];
	}
	return s;
}

/* Bytes to add (negative: cut) so the frame is want bytes long. 64-bit on purpose: with
 * -mcpu=v3 clang would otherwise do 32-bit arithmetic on packet pointers, which the verifier
 * refuses. */
static __always_inline int tail_delta(void *data, void *end, __u32 want)
{
	__s64 have = (__s64)((long)end - (long)data);

	asm volatile("" : "+r"(have));
	return (int)((__s64)want - have);
}

/* The Ethernet header of an ICMP answer to the client: the received frame's MACs swapped, its
 * VLAN tag (if any) kept. The caller has checked that l2 <= 18 bytes lie within the frame. */
static __always_inline void reply_eth(void *data, const __u8 *mac, const __u8 *tag, __u32 l2, __u16 proto)
{
	__builtin_memcpy(data, mac + 6, 6);
	__builtin_memcpy(data + 6, mac, 6);
	if (l2 == 18) {
		*(__u16 *)(data + 12) = bpf_htons(ETH_P_8021Q_);
		__builtin_memcpy(data + 14, tag + 2, 2);
		*(__u16 *)(data + 16) = bpf_htons(proto);
	} else {
		*(__u16 *)(data + 12) = bpf_htons(proto);
	}
}

static __always_inline int too_big_v4(struct xdp_md *ctx, __u32 l2, struct parsed *p, __u16 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u8 mac[12], tag[4] = {};
	__u32 quote = p->ihl + 8, outlen;
	struct iphdr *ip;
	__u8 *icmp;

	if (data + 18 > end)
		return XDP_DROP;
	__builtin_memcpy(mac, data, 12);
	if (l2 == 18)
		__builtin_memcpy(tag, data + 12, 4);
	if (bpf_xdp_adjust_head(ctx, -28))
		goto adjust_fail;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	outlen = l2 + 28 + quote;
	if (bpf_xdp_adjust_tail(ctx, tail_delta(data, end, outlen)))
		goto adjust_fail;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + l2 + 28 + 28 > end || l2 > 18)
		return XDP_DROP;
	reply_eth(data, mac, tag, l2, ETH_P_IP);
	ip = data + l2;
	if ((void *)(ip + 1) > end)
		return XDP_DROP;
	{
		struct iphdr *orig = data + l2 + 28;

		if ((void *)(orig + 1) > end)
			return XDP_DROP;
		ip->saddr = orig->daddr;
		ip->daddr = orig->saddr;
	}
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(28 + quote);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = OUTER_TTL;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->check = iph_csum(ip);
	icmp = (void *)(ip + 1);
	if ((void *)(icmp + 8) > end)
		return XDP_DROP;
	icmp[0] = 3;
	icmp[1] = 4;
	*(__u16 *)(icmp + 2) = 0;
	*(__u16 *)(icmp + 4) = 0;
	*(__u16 *)(icmp + 6) = bpf_htons(mtu);
	*(__u16 *)(icmp + 2) = csum_fold(csum_words(icmp, (8 + quote) / 2, end, 38));
	count(ICMP_TOO_BIG_SENT);
	return XDP_TX;
adjust_fail:
	count(DROP_ADJUST);
	return XDP_DROP;
}

static __always_inline int too_big_v6(struct xdp_md *ctx, __u32 l2, struct parsed *p, __u16 mtu)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u8 mac[12], tag[4] = {};
	__u32 quote, outlen;
	struct ipv6hdr *ip, *orig;
	__u8 *icmp;
	__u64 s;

	if (data + 18 > end)
		return XDP_DROP;
	__builtin_memcpy(mac, data, 12);
	if (l2 == 18)
		__builtin_memcpy(tag, data + 12, 4);
	quote = p->l3_len < ICMP6_PTB_QUOTE ? p->l3_len & ~1u : ICMP6_PTB_QUOTE;
	if (bpf_xdp_adjust_head(ctx, -48))
		goto adjust_fail;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	outlen = l2 + 48 + quote;
	if (bpf_xdp_adjust_tail(ctx, tail_delta(data, end, outlen)))
		goto adjust_fail;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (l2 > 18 || data + l2 + 48 + 40 > end)
		return XDP_DROP;
	reply_eth(data, mac, tag, l2, ETH_P_IPV6);
	ip = data + l2;
	orig = data + l2 + 48;
	if ((void *)(orig + 1) > end)
		return XDP_DROP;
	*(__u32 *)ip = bpf_htonl(0x60000000);
	ip->payload_len = bpf_htons(8 + quote);
	ip->nexthdr = 58;
	ip->hop_limit = OUTER_TTL;
	ip->saddr = orig->daddr;
	ip->daddr = orig->saddr;
	icmp = (void *)(ip + 1);
	if ((void *)(icmp + 8) > end)
		return XDP_DROP;
	icmp[0] = 2;
	icmp[1] = 0;
	*(__u16 *)(icmp + 2) = 0;
	*(__u32 *)(icmp + 4) = bpf_htonl(mtu);
	/* pseudo header: addresses, upper-layer length, next header */
	s = csum_words(&ip->saddr, 16, end, 16);
	s += bpf_htons(8 + quote) + bpf_htons(58);
	s += csum_words(icmp, (8 + quote) / 2, end, (8 + ICMP6_PTB_QUOTE) / 2);
	*(__u16 *)(icmp + 2) = csum_fold(s);
	count(ICMP_TOO_BIG_SENT);
	return XDP_TX;
adjust_fail:
	count(DROP_ADJUST);
	return XDP_DROP;
}

/* Prepend Ethernet (+ the original VLAN tag) + outer IP + GRE. l2 is a constant (14 or 18) at
 * each call site so every offset below is constant for the verifier. */
static __always_inline int encap(struct xdp_md *ctx, const __u32 l2, struct parsed *p,
				 const struct backend *be, const struct config *cfg,
				 const __u8 *dmac, __u32 hash)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 overhead = be->family == FAM_V4 ? GRE_V4_OVERHEAD : GRE_V6_OVERHEAD;
	__u16 inner_type = p->fk.family == FAM_V4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
	__u8 smac[6], tag[2];

	if (data + l2 > end)
		return XDP_DROP;
	__builtin_memcpy(smac, data, 6);
	if (l2 == 18)
		__builtin_memcpy(tag, data + 14, 2);
	if (bpf_xdp_adjust_head(ctx, -(int)overhead)) {
		count(DROP_ADJUST);
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + l2 + GRE_V6_OVERHEAD > end)
		return XDP_DROP;
	__builtin_memcpy(data, dmac, 6);
	__builtin_memcpy(data + 6, smac, 6);
	if (l2 == 18) {
		*(__u16 *)(data + 12) = bpf_htons(ETH_P_8021Q_);
		__builtin_memcpy(data + 14, tag, 2);
	}
	if (be->family == FAM_V4) {
		struct iphdr *o = data + l2;

		*(__u16 *)(data + l2 - 2) = bpf_htons(ETH_P_IP);
		o->version = 4;
		o->ihl = 5;
		o->tos = p->tos;
		o->tot_len = bpf_htons(p->l3_len + GRE_V4_OVERHEAD);
		o->id = 0;
		o->frag_off = bpf_htons(0x4000);
		o->ttl = OUTER_TTL;
		o->protocol = IPPROTO_GRE_;
		o->check = 0;
		o->saddr = cfg->src_v4;
		o->daddr = be->addr[0];
		o->check = iph_csum(o);
		*(__u32 *)(o + 1) = (__u32)inner_type << 16;
	} else {
		struct ipv6hdr *o = data + l2;
		__u32 *w = (__u32 *)o;

		*(__u16 *)(data + l2 - 2) = bpf_htons(ETH_P_IPV6);
		w[0] = bpf_htonl(0x60000000 | ((__u32)p->tos << 20) | (hash & 0xfffff));
		o->payload_len = bpf_htons(p->l3_len + 4);
		o->nexthdr = IPPROTO_GRE_;
		o->hop_limit = OUTER_TTL;
		w[2] = cfg->src_v6[0];
		w[3] = cfg->src_v6[1];
		w[4] = cfg->src_v6[2];
		w[5] = cfg->src_v6[3];
		w[6] = be->addr[0];
		w[7] = be->addr[1];
		w[8] = be->addr[2];
		w[9] = be->addr[3];
		*(__u32 *)(o + 1) = (__u32)inner_type << 16;
	}
	return XDP_TX;
}

static __always_inline void add_stats(void *map, __u32 id, __u32 bytes, int hit, int inserted)
{
	struct flow_stats *s = bpf_map_lookup_elem(map, &id);

	if (!s)
		return;
	s->packets++;
	s->bytes += bytes;
	s->ct_hits += hit;
	s->ct_misses += !hit;
	s->new_flows += inserted;
}

/* ---- conntrack: the map, ct_lookup and ct_insert for the design this object is built for
 * (maglev.h explains both). The rest of the program sees only these two functions:
 *   ct_lookup(p, cfg, copy): the map's value for p's flow (to refresh last_seen in place), or
 *     NULL; *copy then holds a consistent copy of it.
 *   ct_insert(p, cfg, old, v): track p's flow with value v; old is ct_lookup's result for this
 *     packet (NULL when it missed or was skipped). 1 when the flow is now tracked. */
#ifdef CT_DIRECT

/* An array, not the kernel's LRU hash: the loader sets max_entries (a power of two) and
 * config.ct_mask; mmapable so user space can count, read and clear a million entries in one
 * pass. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_CT_SLOTS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct ct_entry);
} conntrack SEC(".maps");

#define compiler_barrier() asm volatile("" ::: "memory")

static __always_inline int key_eq(const struct flow_key *a, const struct flow_key *b)
{
	const __u64 *x = (const void *)a, *y = (const void *)b;

	return !((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]));
}

/* The flow's slot holds it when the key matches and seq was even and unchanged around the
 * copy (the seq protocol in maglev.h). */
static __always_inline struct ct_value *ct_lookup(struct parsed *p, const struct config *cfg,
						  struct ct_value *copy)
{
	__u32 slot = flow_hash_of(p) & cfg->ct_mask, seq;
	struct ct_entry *e = bpf_map_lookup_elem(&conntrack, &slot);

	if (!e)
		return 0;
	seq = *(volatile __u32 *)&e->seq;
	if (seq & 1)
		return 0;
	compiler_barrier();
	if (!key_eq(&e->key, &p->fk))
		return 0;
	copy->backend_id = e->val.backend_id;
	copy->vip_id = e->val.vip_id;
	copy->last_seen_ns = e->val.last_seen_ns;
	compiler_barrier();
	if (*(volatile __u32 *)&e->seq != seq)
		return 0;
	return &e->val;
}

/* Put the flow into its slot, replacing whatever was there (old is not needed: the slot is
 * the same). Stores only: loading the (cold) slot first would stall on the cache miss, while
 * stores retire into the store buffer and the miss overlaps the rest of the packet's work
 * (~80 ns less per new flow, measured with bench/forwarder.py). So the writer does not read
 * the old seq: it marks the slot odd, writes, then stores an even seq taken from the flow
 * hash (see maglev.h for what that leaves). */
static __always_inline int ct_insert(struct parsed *p, const struct config *cfg,
				     struct ct_value *old, const struct ct_value *v)
{
	__u32 hash = flow_hash_of(p), slot = hash & cfg->ct_mask;
	struct ct_entry *e = bpf_map_lookup_elem(&conntrack, &slot);

	if (!e)
		return 0; /* only if config.ct_mask exceeds the map */
	*(volatile __u32 *)&e->seq = 1;
	compiler_barrier();
	__builtin_memcpy(&e->key, &p->fk, sizeof(p->fk));
	e->val = *v;
	compiler_barrier();
	*(volatile __u32 *)&e->seq = hash & ~1u;
	return 1;
}

#else /* the kernel's LRU hash (default) */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_CT_SIZE);
	__uint(map_flags, BPF_F_NO_COMMON_LRU); /* per-CPU LRU lists: inserts do not contend */
	__type(key, struct flow_key);
	__type(value, struct ct_value);
} conntrack SEC(".maps");

static __always_inline struct ct_value *ct_lookup(struct parsed *p, const struct config *cfg,
						  struct ct_value *copy)
{
	struct ct_value *v = bpf_map_lookup_elem(&conntrack, &p->fk);

	if (v)
		*copy = *v;
	return v;
}

/* An entry that was found (but not usable) is rewritten in place: cheaper than a second
 * hash insert, and it keeps the entry's place in the LRU. */
static __always_inline int ct_insert(struct parsed *p, const struct config *cfg,
				     struct ct_value *old, const struct ct_value *v)
{
	if (old) {
		old->backend_id = v->backend_id;
		old->vip_id = v->vip_id;
		old->last_seen_ns = v->last_seen_ns;
		return 1;
	}
	return bpf_map_update_elem(&conntrack, &p->fk, v, BPF_ANY) == 0;
}

#endif /* CT_DIRECT */

/* Does the VIP described by meta own this flow? (The conntrack fast path checks this instead
 * of a second hash lookup: a compare of fields already in cache.) */
static __always_inline int vip_owns(const struct vip_meta *meta, const struct flow_key *fk)
{
	const struct vip_key *k = &meta->key;

	return meta->in_use && k->family == fk->family && k->proto == fk->proto &&
	       (k->port_be == 0 || k->port_be == fk->dport_be) &&
	       k->addr[0] == fk->dst[0] && k->addr[1] == fk->dst[1] &&
	       k->addr[2] == fk->dst[2] && k->addr[3] == fk->dst[3];
}

/* A conntrack entry is usable while its VIP still owns the flow and its backend belongs to
 * that VIP and is in service (active or draining); UDP entries also expire when idle. */
static __always_inline int ct_usable(const struct ct_value *ct, struct ct_value *live,
				     struct parsed *p, const struct config *cfg, int selftest,
				     struct vip_meta **meta_out, struct backend **be_out)
{
	__u32 vip_id = ct->vip_id, be_id = ct->backend_id;
	struct vip_meta *meta = bpf_map_lookup_elem(&vip_meta, &vip_id);
	struct backend *be = bpf_map_lookup_elem(&backends, &be_id);

	if (!meta || !be || !vip_owns(meta, &p->fk) || be->vip_id != vip_id ||
	    (be->state != BE_STATE_ACTIVE && be->state != BE_STATE_DRAIN))
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

static __always_inline int steer(struct xdp_md *ctx, const __u32 l2, struct parsed *p, int selftest)
{
	struct vip_key vk;
	struct vip_value *vv;
	struct vip_meta *meta = 0;
	struct config *cfg;
	struct backend *be = 0;
	struct ct_value *ct = 0, cv;
	__u32 zero = 0, vip_id, be_id = 0, hash, active;
	__u8 dmac[6];
	int hit = 0, inserted = 0, rc;

	cfg = bpf_map_lookup_elem(&config, &zero);
	if (!cfg)
		return XDP_PASS;
	/* Conntrack first: an established flow needs no VIP hash lookup. A SYN opens a new
	 * connection and skips it (as Katran does); the insert below overwrites whatever an
	 * earlier connection on the same 5-tuple left. Fragments never use conntrack. */
	if (!p->is_frag && !p->syn) {
		ct = ct_lookup(p, cfg, &cv);
		if (ct && ct_usable(&cv, ct, p, cfg, selftest, &meta, &be)) {
			hit = 1;
			vip_id = cv.vip_id;
			be_id = cv.backend_id;
			goto chosen;
		}
	}

	__builtin_memcpy(vk.addr, p->fk.dst, 16);
	vk.port_be = p->fk.dport_be;
	vk.proto = p->fk.proto;
	vk.family = p->fk.family;
	vv = bpf_map_lookup_elem(&vips, &vk);
	if (!vv) {
		if (!vk.port_be && !p->frag_dport_be)
			return XDP_PASS;
		vk.port_be = 0;
		vv = bpf_map_lookup_elem(&vips, &vk);
		if (!vv && p->is_frag) {
			vk.port_be = p->frag_dport_be;
			if (bpf_map_lookup_elem(&vips, &vk)) {
				count(DROP_FRAGMENT);
				return XDP_DROP;
			}
			return XDP_PASS;
		}
		if (!vv)
			return XDP_PASS;
	}
	vip_id = vv->vip_id;
	meta = bpf_map_lookup_elem(&vip_meta, &vip_id);
	if (!meta)
		return XDP_PASS;

	{
		struct table_slot slot;
		struct table_chunk *c;
		__u32 idx, chunk;

		active = *(volatile __u32 *)&meta->active & 1;
		slot = meta->slot[active];
		if (!slot.size) {
			count(DROP_NO_BACKEND);
			return XDP_DROP;
		}
		idx = slot.offset + (__u32)(((__u64)flow_hash_of(p) * slot.size) >> 32);
		chunk = idx / TABLE_CHUNK;
		c = bpf_map_lookup_elem(&tables, &chunk);
		if (!c)
			goto bad_backend;
		be_id = c->ids[idx % TABLE_CHUNK];
		be = bpf_map_lookup_elem(&backends, &be_id);
		if (!be || be->vip_id != vip_id || be->state != BE_STATE_ACTIVE)
			goto bad_backend;
		if (!p->is_frag && !p->is_icmp_err && !selftest) {
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
chosen:
	if (!be)
		goto bad_backend;
	if (be->family == FAM_V4 ? !(cfg->flags & CFG_F_HAVE_SRC_V4) : !(cfg->flags & CFG_F_HAVE_SRC_V6)) {
		count(DROP_NO_ENCAP_SOURCE);
		return XDP_DROP;
	}
	{
		__u32 overhead = be->family == FAM_V4 ? GRE_V4_OVERHEAD : GRE_V6_OVERHEAD;

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

		fib.ifindex = ctx->ingress_ifindex;
		if (be->family == FAM_V4) {
			fib.family = AF_INET;
			fib.tos = p->tos;
			fib.tot_len = p->l3_len + GRE_V4_OVERHEAD;
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
		rc = encap(ctx, l2, p, be, cfg, dmac, hash);
		if (rc == XDP_TX) {
			void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;

			if (data + 12 > end)
				return XDP_DROP;
			__builtin_memcpy(data + 6, fib.smac, 6);
			if (fib.ifindex != ctx->ingress_ifindex)
				rc = bpf_redirect(fib.ifindex, 0);
		}
	} else {
		rc = encap(ctx, l2, p, be, cfg, cfg->next_hop_mac, hash);
	}
	if (rc == XDP_DROP)
		return rc;
	if (selftest) {
		count(SELF_TEST_PACKETS);
	} else {
		if (p->is_frag)
			count(FRAG_FORWARDED);
		if (p->is_icmp_err)
			count(ICMP_STEERED);
		add_stats(&vip_stats, vip_id, p->l3_len, hit, inserted);
		add_stats(&be_stats, be_id, p->l3_len, hit, inserted);
	}
	return rc;
bad_backend:
	count(DROP_BAD_BACKEND);
	return XDP_DROP;
}

static __always_inline int run(struct xdp_md *ctx, const __u32 l2, __u16 proto, int selftest)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct parsed p = {};
	int r;

	if (proto == bpf_htons(ETH_P_IP))
		r = parse_v4(data, end, l2, &p);
	else if (proto == bpf_htons(ETH_P_IPV6))
		r = parse_v6(data, end, l2, &p);
	else
		return XDP_PASS;
	if (r == P_OK)
		return steer(ctx, l2, &p, selftest);
	if (r == P_MALFORMED)
		count(PASS_MALFORMED);
	else if (r == P_V6_EXT)
		count(PASS_IPV6_EXT);
	return XDP_PASS;
}

SEC("xdp")
int xdp_lb(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	/* Self-test packets carry 4 bytes of XDP metadata (set through BPF_PROG_TEST_RUN), which
	 * received frames never have here: they are checked without touching conntrack/stats. */
	int selftest = ctx->data_meta < ctx->data;
	struct ethhdr *eth = data;

	/* Materialise the flag now: otherwise clang keeps the meta pointer alive and spills it
	 * as 32 bits, which the verifier refuses. */
	asm volatile("" : "+r"(selftest));

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_8021Q_)) {
		__u16 *inner = data + 16;

		if ((void *)(inner + 1) > end)
			return XDP_PASS;
		return run(ctx, 18, *inner, selftest);
	}
	return run(ctx, 14, eth->h_proto, selftest);
}
