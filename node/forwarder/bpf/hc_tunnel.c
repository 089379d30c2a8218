// SPDX-License-Identifier: GPL-2.0
/* Tunnel health checks: GRE-encapsulate the node's own probe packets to the backend under test
 * (tc egress of the node's probe device; the design is in maglev.h, "tunnel health checks").
 *
 * XDP never sees packets the node itself sends, so the probe takes the stack's path: a socket
 * marked HC_MARK_BASE | id connects to the VIP, an ip rule routes marked packets to the probe
 * device, and this program turns each one into the packet the forwarder would have sent for a
 * client: outer IP (node -> backend) + GRE + the untouched probe packet. The backend's decap
 * and its server on the VIP then answer exactly as they answer clients, so a backend that lost
 * either fails its check. Unmarked packets pass untouched (the device carries nothing else).
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
#include "csum.h"

#define GRE_PROTO 47

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HC_MAX_TARGETS);
	__type(key, __u32);
	__type(value, struct hc_target);
} hc_targets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hc_config);
} hc_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HC_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} hc_stats SEC(".maps");

struct outer_v4 {
	struct iphdr ip;
	__be16 gre_flags;
	__be16 gre_proto;
} __attribute__((packed));

struct outer_v6 {
	struct ipv6hdr ip;
	__be16 gre_flags;
	__be16 gre_proto;
} __attribute__((packed));

static __always_inline int verdict(__u32 idx, int action)
{
	__u64 *c = bpf_map_lookup_elem(&hc_stats, &idx);

	if (c)
		*c += 1;
	return action;
}

/* Inner IPv4 probe -> outer IPv4 + GRE. tos: the inner byte; DF, as the forwarder sets it. */
static __always_inline int encap_v4(struct __sk_buff *skb, const struct hc_target *t,
				    const struct hc_config *cfg, __u8 tos)
{
	struct outer_v4 o = {};
	__u32 inner_len = skb->len - ETH_HLEN;

	if (!(cfg->flags & CFG_F_HAVE_SRC_V4))
		return verdict(HC_DROP_NO_SOURCE, TC_ACT_SHOT);
	o.ip.version = 4;
	o.ip.ihl = 5;
	o.ip.tos = tos;
	o.ip.tot_len = bpf_htons(inner_len + GRE_V4_OVERHEAD);
	o.ip.frag_off = bpf_htons(0x4000);
	o.ip.ttl = OUTER_TTL;
	o.ip.protocol = GRE_PROTO;
	o.ip.saddr = cfg->src_v4;
	o.ip.daddr = t->addr[0];
	o.ip.check = iph_csum(&o.ip);
	o.gre_proto = bpf_htons(ETH_P_IP);
	if (bpf_skb_adjust_room(skb, GRE_V4_OVERHEAD, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_GRE))
		return verdict(HC_DROP_ADJUST, TC_ACT_SHOT);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &o, sizeof(o), 0))
		return verdict(HC_DROP_ADJUST, TC_ACT_SHOT);
	return verdict(HC_ENCAP_V4, TC_ACT_OK);
}

/* Inner IPv6 probe -> outer IPv6 + GRE. Flow label 0: a backend's probes are few and may all
 * take one path; the traffic class is the inner one. */
static __always_inline int encap_v6(struct __sk_buff *skb, const struct hc_target *t,
				    const struct hc_config *cfg, __u32 first_word)
{
	struct outer_v6 o = {};
	__u32 inner_len = skb->len - ETH_HLEN;
	__u32 *w = (__u32 *)&o.ip;

	if (!(cfg->flags & CFG_F_HAVE_SRC_V6))
		return verdict(HC_DROP_NO_SOURCE, TC_ACT_SHOT);
	/* version 6 and the inner traffic class, no flow label */
	w[0] = first_word & bpf_htonl(0xfff00000);
	o.ip.payload_len = bpf_htons(inner_len + 4);
	o.ip.nexthdr = GRE_PROTO;
	o.ip.hop_limit = OUTER_TTL;
	__builtin_memcpy(&o.ip.saddr, cfg->src_v6, 16);
	__builtin_memcpy(&o.ip.daddr, t->addr, 16);
	o.gre_proto = bpf_htons(ETH_P_IPV6);
	if (bpf_skb_adjust_room(skb, GRE_V6_OVERHEAD, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_ENCAP_L4_GRE))
		return verdict(HC_DROP_ADJUST, TC_ACT_SHOT);
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &o, sizeof(o), 0))
		return verdict(HC_DROP_ADJUST, TC_ACT_SHOT);
	return verdict(HC_ENCAP_V6, TC_ACT_OK);
}

SEC("tc")
int mlb_hc_tunnel(struct __sk_buff *skb)
{
	__u32 mark = skb->mark, zero = 0, id;
	struct hc_target *t;
	struct hc_config *cfg;
	int action;

	if ((mark & HC_MARK_MASK) != HC_MARK_BASE)
		return verdict(HC_PASS_UNMARKED, TC_ACT_OK);
	id = mark & ~HC_MARK_MASK;
	t = bpf_map_lookup_elem(&hc_targets, &id);
	cfg = bpf_map_lookup_elem(&hc_config, &zero);
	if (!t || !cfg || !t->family)
		return verdict(HC_DROP_NO_TARGET, TC_ACT_SHOT);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	/* Bounds per family: the smallest IPv4 probe (a 4-byte datagram) is 32 bytes of L3. */
	if ((void *)(eth + 1) > data_end)
		return verdict(HC_DROP_MALFORMED, TC_ACT_SHOT);
	if (t->family == FAM_V4 && eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end)
			return verdict(HC_DROP_MALFORMED, TC_ACT_SHOT);
		action = encap_v4(skb, t, cfg, ip->tos);
	} else if (t->family == FAM_V6 && eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return verdict(HC_DROP_MALFORMED, TC_ACT_SHOT);
		action = encap_v6(skb, t, cfg, *(__u32 *)ip6);
	} else {
		return verdict(HC_DROP_MALFORMED, TC_ACT_SHOT);
	}
	if (action != TC_ACT_OK)
		return action;
	/* The outer packet is routed by the main table (towards the backend), not by the probe
	 * table again: clear the mark before the kernel looks the route up. */
	skb->mark = 0;
	return bpf_redirect_neigh(cfg->out_ifindex, NULL, 0, 0);
}

char _license[] SEC("license") = "GPL";
