// SPDX-License-Identifier: GPL-2.0
/* icmp.h: the ICMP answers the forwarder sends itself: fragmentation-needed (IPv4 with DF) and
 * packet-too-big (IPv6) back to the client when a packet would exceed the MTU once
 * encapsulated (model.py: _too_big_v4/_v6). Each answer is built in place: grow the head by
 * the new headers, so the quoted original starts right after them, then cut the tail.
 * Inbound ICMP errors about a VIP flow are not answered but steered: parse.h reads the
 * quoted flow, xdp_lb.c steers it like the flow it quotes.
 */
#ifndef ICMP_H
#define ICMP_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maglev.h"
#include "parse.h"
#include "csum.h"
#include "counters.h"

#define ICMP6_PTB_QUOTE 1232 /* 1280 - 40 - 8: as much as the minimum IPv6 MTU allows */

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

#endif
