// SPDX-License-Identifier: GPL-2.0
/* encap.h: GRE encapsulation towards the chosen backend (the outer headers are specified in
 * maglev.h; model.py: _encap).
 */
#ifndef ENCAP_H
#define ENCAP_H

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

#define IPPROTO_GRE_ 47

/* Prepend Ethernet (+ the original VLAN tag) + outer IP + GRE. l2 is a constant (14 or 18) at
 * each call site so every offset below is constant for the verifier. key != 0 (IPv4 outer
 * only): a GRE key naming the entry's previous owner (second_chance.h). */
static __always_inline int encap(struct xdp_md *ctx, const __u32 l2, struct parsed *p,
				 const struct backend *be, const struct config *cfg,
				 const __u8 *dmac, __u32 hash, __u32 key)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u32 extra = key ? GRE_KEY_LEN : 0;
	__u32 overhead = (be->family == FAM_V4 ? GRE_V4_OVERHEAD : GRE_V6_OVERHEAD) + extra;
	__u16 inner_type = p->fk.family == FAM_V4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
	/* MACs move as a 4-byte and a 2-byte word (x86-64 and arm64 take unaligned packet
	 * accesses): a 6-byte memcpy through a packet pointer compiles to byte loads, shifts and
	 * byte stores, ~30 instructions on every forwarded packet. dmac is 4-aligned. */
	__u32 smac_lo;
	__u16 smac_hi, tag = 0;

	if (data + l2 > end)
		return XDP_DROP;
	smac_lo = *(__u32 *)data;
	smac_hi = *(__u16 *)(data + 4);
	if (l2 == 18)
		tag = *(__u16 *)(data + 14);
	if (bpf_xdp_adjust_head(ctx, -(int)overhead)) {
		count(DROP_ADJUST);
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	if (data + l2 + GRE_V6_OVERHEAD > end)
		return XDP_DROP;
	*(__u32 *)data = *(const __u32 *)dmac;
	*(__u16 *)(data + 4) = *(const __u16 *)(dmac + 4);
	*(__u32 *)(data + 6) = smac_lo;
	*(__u16 *)(data + 10) = smac_hi;
	if (l2 == 18) {
		*(__u16 *)(data + 12) = bpf_htons(ETH_P_8021Q_);
		*(__u16 *)(data + 14) = tag;
	}
	if (be->family == FAM_V4) {
		/* Whole 16-bit words built in registers and the checksum summed from them: writing
		 * the byte fields one by one and reading the header back as words (iph_csum) made
		 * every established packet wait on store forwarding. Same bytes (model: _encap). */
		__u16 *o = data + l2;
		__u16 w0 = bpf_htons(0x4500 | p->tos);
		__u16 len = bpf_htons(p->l3_len + GRE_V4_OVERHEAD + extra);
		__u16 df = bpf_htons(0x4000);
		__u16 ttl_proto = bpf_htons((OUTER_TTL << 8) | IPPROTO_GRE_);
		__u32 src = cfg->src_v4, dst = be->addr[0];
		__u64 sum = (__u64)w0 + len + df + ttl_proto + (src & 0xffff) + (src >> 16) +
			    (dst & 0xffff) + (dst >> 16);

		*(__u16 *)(data + l2 - 2) = bpf_htons(ETH_P_IP);
		o[0] = w0;
		o[1] = len;
		o[2] = 0; /* id */
		o[3] = df;
		o[4] = ttl_proto;
		o[5] = csum_fold(sum);
		o[6] = src & 0xffff;
		o[7] = src >> 16;
		o[8] = dst & 0xffff;
		o[9] = dst >> 16;
		if (key) {
			__u32 *gre = (__u32 *)(o + 10);

			gre[0] = ((__u32)inner_type << 16) | bpf_htons(GRE_F_KEY);
			gre[1] = key;
		} else {
			*(__u32 *)(o + 10) = (__u32)inner_type << 16;
		}
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

#endif
