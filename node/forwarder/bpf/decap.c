// SPDX-License-Identifier: GPL-2.0
/* GRE decapsulation for load-balanced backends (tc clsact ingress, direct action).
 *
 * The forwarder wraps client packets in GRE (outer IPv4 or IPv6, no key/sequence/checksum) and
 * sends them to a backend, which answers the client directly (DSR). A backend normally lets a
 * kernel gre/ip6gre device strip the outer header; this program does the same on kernels built
 * without GRE. It only decapsulates packets whose inner destination is one of the VIPs in
 * decap_vips, so it never turns arbitrary GRE into local traffic; everything else passes through
 * unmodified. Each packet is counted in exactly one decap_stats slot.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maglev.h"

#define GRE_HLEN 4
/* Ethernet + IPv4 with the largest options + keyed GRE + inner IPv4 with the largest options
 * + TCP up to its flags: the most this program reads. */
#define MAX_PARSE (ETH_HLEN + 60 + GRE_HLEN + GRE_KEY_LEN + 60 + 14)
#define IP_FRAG_MASK 0x3fff /* MF flag and fragment offset */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DECAP_MAX_VIPS);
	__type(key, struct decap_vip_key);
	__type(value, struct decap_vip_value);
} decap_vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DECAP_COUNTER_MAX);
	__type(key, __u32);
	__type(value, struct decap_counter);
} decap_stats SEC(".maps");

/* The fixed part of a GRE header (RFC 2784): flags+version, then the payload's EtherType. */
struct grehdr {
	__be16 flags;
	__be16 proto;
};

static __always_inline void count(__u32 idx, __u32 len)
{
	struct decap_counter *c = bpf_map_lookup_elem(&decap_stats, &idx);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

#include "sc_decap.h"

static __always_inline int pass(struct __sk_buff *skb, __u32 idx, __u32 len)
{
	count(idx, len);
	return TC_ACT_OK;
}

static __always_inline int is_vip4(__be32 daddr)
{
	struct decap_vip_key key = { .family = 4 };

	__builtin_memcpy(key.addr, &daddr, 4);
	return bpf_map_lookup_elem(&decap_vips, &key) != NULL;
}

static __always_inline int is_vip6(const struct in6_addr *daddr)
{
	struct decap_vip_key key = { .family = 6 };

	__builtin_memcpy(key.addr, daddr, 16);
	return bpf_map_lookup_elem(&decap_vips, &key) != NULL;
}

SEC("tc")
int mlb_decap(struct __sk_buff *skb)
{
	__u32 len = skb->len;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	/* Headers of a non-linear skb may sit outside the directly readable area. */
	if (data + MAX_PARSE > data_end && skb->len > (__u32)(data_end - data)) {
		/* a keyed (second chance) packet may need up to MAX_PARSE bytes */
		bpf_skb_pull_data(skb, skb->len < MAX_PARSE ? skb->len : MAX_PARSE);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	struct ethhdr *eth = data;
	struct iphdr *outer4 = 0;
	if ((void *)(eth + 1) > data_end)
		return pass(skb, DECAP_PASS_TRUNCATED, len);

	void *outer = eth + 1;
	__u32 outer_len; /* outer IP header + GRE: the bytes to pop */
	struct grehdr *gre;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = outer;

		if ((void *)(iph + 1) > data_end)
			return pass(skb, DECAP_PASS_TRUNCATED, len);
		if (iph->protocol != IPPROTO_GRE)
			return pass(skb, DECAP_PASS_NOT_GRE, len);
		if (iph->version != 4 || iph->ihl < 5)
			return pass(skb, DECAP_PASS_TRUNCATED, len);
		/* A fragment cannot be decapsulated on its own; the kernel reassembles it and,
		 * without a GRE device, rejects it. Not ours to guess. */
		if (iph->frag_off & bpf_htons(IP_FRAG_MASK))
			return pass(skb, DECAP_PASS_FRAGMENT, len);
		outer_len = iph->ihl * 4;
		outer4 = iph;
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = outer;

		if ((void *)(ip6 + 1) > data_end)
			return pass(skb, DECAP_PASS_TRUNCATED, len);
		/* The forwarder never adds extension headers; anything with them is not its GRE. */
		if (ip6->nexthdr != IPPROTO_GRE)
			return pass(skb, DECAP_PASS_NOT_GRE, len);
		outer_len = sizeof(*ip6);
	} else {
		return pass(skb, DECAP_PASS_NOT_IP, len);
	}

	gre = outer + outer_len;
	if ((void *)(gre + 1) > data_end)
		return pass(skb, DECAP_PASS_TRUNCATED, len);
	/* The plain 4-byte header, or (IPv4 outer) with a key only: second chance (sc_decap.h).
	 * Any other flag (C, R, S, s, recursion) or a non-zero version means a header this
	 * program does not strip, so leave the packet alone. */
	__u32 key_off = 0;
	__be32 key = 0;

	if (gre->flags == bpf_htons(GRE_F_KEY) && outer4) {
		__be32 *k = (void *)(gre + 1);

		if ((void *)(k + 1) > data_end)
			return pass(skb, DECAP_PASS_TRUNCATED, len);
		key = *k;
		key_off = (void *)k - data;
		outer_len += GRE_KEY_LEN;
	} else if (gre->flags != 0) {
		return pass(skb, DECAP_PASS_GRE_FLAGS, len);
	}
	outer_len += GRE_HLEN;

	void *inner = outer + outer_len;
	void *l4 = 0;
	__u8 l4_proto = 0;
	__u64 flags;
	__be16 inner_proto = gre->proto;

	if (inner_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *in4 = inner;

		if ((void *)(in4 + 1) > data_end)
			return pass(skb, DECAP_PASS_TRUNCATED, len);
		if (in4->version != 4 || !is_vip4(in4->daddr))
			return pass(skb, DECAP_PASS_NOT_VIP, len);
		flags = BPF_F_ADJ_ROOM_DECAP_L3_IPV4;
		l4 = inner + in4->ihl * 4;
		l4_proto = in4->protocol;
	} else if (inner_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *in6 = inner;

		if ((void *)(in6 + 1) > data_end)
			return pass(skb, DECAP_PASS_TRUNCATED, len);
		if (in6->version != 6 || !is_vip6(&in6->daddr))
			return pass(skb, DECAP_PASS_NOT_VIP, len);
		flags = BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
		l4 = in6 + 1;
		l4_proto = in6->nexthdr;
	} else {
		return pass(skb, DECAP_PASS_GRE_PROTO, len);
	}

	if (key_off) {
		int v = sc_decide(skb, outer4, key, key_off, inner, l4, data_end,
				  flags == BPF_F_ADJ_ROOM_DECAP_L3_IPV6, l4_proto, len);

		if (v == SC_REDIRECT)
			return TC_ACT_REDIRECT;
		if (v != SC_KEEP)
			return TC_ACT_SHOT;
	}

	/* Pop outer IP + GRE right after the Ethernet header. The DECAP_L3 flag makes the kernel
	 * set skb->protocol to the inner family. FIXED_GSO keeps gso_size of a GRO-merged packet:
	 * it is the inner TCP payload per segment, which popping outer headers does not change
	 * (letting the kernel grow it makes re-segmentation drop the packet). A packet for a VIP
	 * that cannot be decapsulated is dropped: the kernel could not deliver it anyway, and the
	 * counter says why. */
	if (bpf_skb_adjust_room(skb, -(__s32)outer_len, BPF_ADJ_ROOM_MAC,
				flags | BPF_F_ADJ_ROOM_FIXED_GSO)) {
		count(DECAP_DROP_ADJUST, len);
		return TC_ACT_SHOT;
	}

	/* The Ethernet header still names the outer family; make it match the inner packet so
	 * anything reading the frame later (packet sockets, tcpdump) parses it right. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &inner_proto,
				sizeof(inner_proto), 0)) {
		count(DECAP_DROP_ADJUST, len);
		return TC_ACT_SHOT;
	}

	if (!key_off) /* a keyed packet was counted by sc_decide */
		count(flags == BPF_F_ADJ_ROOM_DECAP_L3_IPV4 ? DECAP_OK_V4 : DECAP_OK_V6, len);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
