// SPDX-License-Identifier: GPL-2.0
/* sc_decap.h: the backend's half of second chance (issue 17; the forwarder's half is
 * second_chance.h). Included by decap.c, whose maps and count() it uses.
 *
 * A keyed GRE packet (IPv4 outer, GRE_F_KEY, maglev.h) comes from a forwarder whose table
 * entry for the flow changed recently: the key is the entry's previous owner. The packet
 * stays here when it opens a connection (a TCP SYN) or when a local socket owns its flow
 * (bpf_skc_lookup_tcp, a listener does not count; bpf_sk_lookup_udp, any socket); otherwise it
 * is sent, unchanged inside, to the previous owner, with the outer source set to this backend
 * and the key set to SC_KEY_SPENT. A packet whose key is spent is never sent on again: it is
 * kept when a local socket owns the flow and dropped otherwise (counted), so a packet crosses
 * at most one extra hop and no loop is possible, whatever the two tables say.
 */
#ifndef SC_DECAP_H
#define SC_DECAP_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "maglev.h"

enum sc_verdict {
	SC_KEEP,      /* decapsulate here */
	SC_REDIRECT,  /* re-encapsulated towards the previous owner: return TC_ACT_REDIRECT */
	SC_DROP,      /* second chance spent, nobody owns the flow */
	SC_FAILED,    /* a helper refused: drop */
};

/* Does a local socket own the inner flow? l4 points at the inner TCP/UDP header. A SYN without ACK counts as owned (a new
 * connection belongs here). Anything that is not TCP/UDP is owned (nothing to look up). */
static __always_inline int sc_owned(struct __sk_buff *skb, void *inner, void *l4, void *end,
				    int v6, __u8 proto)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;
	__u16 *ports = l4;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	if (l4 + 8 > end)
		return 1; /* truncated: the kernel will drop it, wherever it is */
	if (proto == IPPROTO_TCP) {
		if (l4 + 14 > end)
			return 1;
		if ((((__u8 *)l4)[13] & 0x12) == 0x02)
			return 1;
	}
	if (v6) {
		struct ipv6hdr *ip6 = inner;

		__builtin_memcpy(t.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &ip6->daddr, 16);
		t.ipv6.sport = ports[0];
		t.ipv6.dport = ports[1];
		size = sizeof(t.ipv6);
	} else {
		struct iphdr *ip4 = inner;

		t.ipv4.saddr = ip4->saddr;
		t.ipv4.daddr = ip4->daddr;
		t.ipv4.sport = ports[0];
		t.ipv4.dport = ports[1];
		size = sizeof(t.ipv4);
	}
	if (proto == IPPROTO_TCP) {
		sk = bpf_skc_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return 0;
		if (sk->state == BPF_TCP_LISTEN) {
			bpf_sk_release(sk);
			return 0;
		}
	} else {
		sk = bpf_sk_lookup_udp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return 0;
	}
	bpf_sk_release(sk);
	return 1;
}

/* Send the packet to the previous owner: outer {saddr, daddr} = {this backend, key}, key
 * spent. The two address words and the header checksum change together, so their sum (and a
 * CHECKSUM_COMPLETE skb's csum over them) is unchanged; the key store updates skb->csum. The
 * route and the next hop's MAC come from the kernel (bpf_redirect_neigh). */
static __always_inline int sc_redirect(struct __sk_buff *skb, __be32 self, __be32 prev, __be32 old_src,
				       __u32 key_off)
{
	__be32 addrs[2] = {self, prev}, old[2] = {old_src, self}, spent = SC_KEY_SPENT;
	__s64 diff = bpf_csum_diff(old, sizeof(old), addrs, sizeof(addrs), 0);
	__u32 ip = ETH_HLEN;

	if (diff < 0)
		return SC_FAILED;
	if (bpf_skb_store_bytes(skb, ip + offsetof(struct iphdr, saddr), addrs, sizeof(addrs), 0) ||
	    bpf_l3_csum_replace(skb, ip + offsetof(struct iphdr, check), 0, diff, 0) ||
	    bpf_skb_store_bytes(skb, key_off, &spent, sizeof(spent), BPF_F_RECOMPUTE_CSUM))
		return SC_FAILED;
	return bpf_redirect_neigh(skb->ifindex, 0, 0, 0) == TC_ACT_REDIRECT ? SC_REDIRECT : SC_FAILED;
}

/* The decision for a keyed packet whose inner packet is for a local VIP. iph: the outer IPv4
 * header; key: the GRE key as on the wire; key_off: its offset in the frame. */
static __always_inline int sc_decide(struct __sk_buff *skb, struct iphdr *iph, __be32 key, __u32 key_off,
				     void *inner, void *l4, void *end, int v6, __u8 proto, __u32 len)
{
	int owned = sc_owned(skb, inner, l4, end, v6, proto);

	if (key == SC_KEY_SPENT) {
		count(owned ? DECAP_SC_ACCEPTED : DECAP_SC_DROPPED, len);
		return owned ? SC_KEEP : SC_DROP;
	}
	if (owned || key == iph->daddr) {
		count(DECAP_SC_LOCAL, len);
		return SC_KEEP;
	}
	{
		__be32 self = iph->daddr, src = iph->saddr;
		int r = sc_redirect(skb, self, key, src, key_off);

		count(r == SC_REDIRECT ? DECAP_SC_REDIRECTED : DECAP_DROP_ADJUST, len);
		return r;
	}
}

#endif
