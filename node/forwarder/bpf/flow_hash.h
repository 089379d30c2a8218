// SPDX-License-Identifier: GPL-2.0
/* flow_hash.h: the flow hash documented in maglev.h (model.py: flow_hash), over a struct flow_key.
 * It picks the Maglev table entry, the "direct" conntrack slot and the IPv6 outer flow label,
 * so the model and the program must agree on it bit for bit.
 */
#ifndef FLOW_HASH_H
#define FLOW_HASH_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include "maglev.h"

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

#endif
