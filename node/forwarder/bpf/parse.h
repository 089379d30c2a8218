// SPDX-License-Identifier: GPL-2.0
/* parse.h: Ethernet/IPv4/IPv6/TCP/UDP parsing into struct parsed, what the steering decision
 * needs of a packet. Every bound is checked against data_end here, once; the policies (what
 * is malformed, which extension headers are understood, what a fragment carries) are listed
 * at the top of xdp_lb.c and mirrored in model.py's _parse_*.
 *
 * ICMP errors are parsed here too: an error quoting a VIP flow is steered like that flow, so
 * the parser fills p with the quoted flow reversed (the client's direction) and sets
 * is_icmp_err; the steering decision does the rest.
 */
#ifndef PARSE_H
#define PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maglev.h"
#include "flow_hash.h"

#define ETH_P_8021Q_ 0x8100
#define NEXTHDR_FRAGMENT 44

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
	__u8 rst;              /* TCP RST: the connection ends, its conntrack entry goes */
	__u8 ihl;              /* IPv4 header length in bytes (ICMP frag-needed quote) */
	__u8 hashed;           /* hash below is valid (flow_hash_of computes it at most once) */
	__u32 hash;            /* flow_hash(&fk) */
};

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

#define P_NOT_OURS 0   /* XDP_PASS, uncounted */
#define P_OK 1
#define P_MALFORMED 2  /* XDP_PASS, PASS_MALFORMED */
#define P_V6_EXT 3     /* XDP_PASS, PASS_IPV6_EXT */

/* What the TCP flags byte tells conntrack: SYN without ACK opens a connection, RST ends it. */
static __always_inline void tcp_flags(struct parsed *p, __u8 flags)
{
	p->syn = (flags & 0x12) == 0x02;
	p->rst = !!(flags & 0x04);
}

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
		tcp_flags(p, ((__u8 *)ports)[13]);
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
	__u32 plen;
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
		tcp_flags(p, ((__u8 *)ports)[13]);
	return P_OK;
}

#endif
