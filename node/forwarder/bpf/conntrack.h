// SPDX-License-Identifier: GPL-2.0
/* conntrack.h: connection tracking, both designs (maglev.h explains them; CT_DIRECT picks one at
 * build time), and the per-CPU rate limiter that guards its inserts. The steering decision in
 * xdp_lb.c sees only ct_lookup, ct_insert and rate_allows; whether an entry it found is still
 * usable (VIP, backend state, UDP idle time) is the decision's business, not this file's.
 */
#ifndef CONNTRACK_H
#define CONNTRACK_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maglev.h"
#include "parse.h"
#include "flow_hash.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rate_state);
} rate SEC(".maps");

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

/* ---- conntrack: the map, ct_lookup and ct_insert for the design this object is built for
 * (maglev.h explains both). The rest of the program sees only these three functions:
 *   ct_lookup(p, cfg, copy): the map's value for p's flow (to refresh last_seen in place), or
 *     NULL; *copy then holds a consistent copy of it.
 *   ct_insert(p, cfg, old, v): track p's flow with value v; old is ct_lookup's result for this
 *     packet (NULL when it missed or was skipped). 1 when the flow is now tracked.
 *   ct_forget(p, cfg): stop tracking p's flow.
 * and CT_SYN_LOOKUP: whether a SYN, which the table steers and whose insert replaces any entry
 * of its 5-tuple, looks that entry up first (never to steer by it; xdp_lb.c). */
#ifdef CT_DIRECT

/* A SYN's slot is overwritten with stores alone: nothing to look up first. */
#define CT_SYN_LOOKUP 0

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

/* Stop tracking p's flow (a RST ended it): its slot goes back to empty (family 0). A flow
 * that another CPU put into the same slot meanwhile would go too; it then follows the table. */
static __always_inline void ct_forget(struct parsed *p, const struct config *cfg)
{
	__u32 hash = flow_hash_of(p), slot = hash & cfg->ct_mask;
	struct ct_entry *e = bpf_map_lookup_elem(&conntrack, &slot);

	if (!e)
		return;
	*(volatile __u32 *)&e->seq = 1;
	compiler_barrier();
	e->key.family = 0;
	compiler_barrier();
	*(volatile __u32 *)&e->seq = hash & ~1u;
}

#else /* the kernel's LRU hash (default) */

/* A SYN looks its 5-tuple up: a found entry (a retransmitted SYN, a reused port) is rewritten
 * in place, where the kernel's insert over it would take a new element and free the old one
 * (a SYN on the same 5-tuple ~40 % cheaper, bench/forwarder.py); a new flow's miss costs
 * little, as it brings in the hash bucket the insert then needs. */
#define CT_SYN_LOOKUP 1

/* Two maps, one per family (maglev.h): the kernel hashes and compares the whole key on every
 * lookup, and an IPv4 flow's 16-byte key costs much less than the 40 bytes IPv6 needs. */
#ifdef CT_LRU_PERCPU
/* per-CPU LRU lists: each CPU holds max_entries / CPUs flows. Only for the bench's
 * comparison (bench/forwarder.py): slower inserts and an uneven-traffic displacement. */
#define CT_LRU_FLAGS BPF_F_NO_COMMON_LRU
#else
#define CT_LRU_FLAGS 0
#endif

CT_LRU_MAP(struct flow_key, CT_LRU_FLAGS) conntrack SEC(".maps");
CT_LRU_MAP(struct flow_key_v4, CT_LRU_FLAGS) conntrack_v4 SEC(".maps");

/* An IPv4 flow's key in conntrack_v4, as two 8-byte stores: the addresses, then the 8 bytes
 * from sport_be to pad, which struct flow_key lays out exactly as struct flow_key_v4 does
 * (maglev.h; fk is 8-aligned in struct parsed). (The map pointer must be a constant at each
 * call, so the callers branch on the family themselves.) */
_Static_assert(__builtin_offsetof(struct flow_key, sport_be) == 32 &&
	       __builtin_offsetof(struct flow_key_v4, sport_be) == 8 && sizeof(struct flow_key_v4) == 16,
	       "ct_key_v4 copies flow_key's last 8 bytes into flow_key_v4's");

static __always_inline void ct_key_v4(const struct parsed *p, struct flow_key_v4 *k4)
{
	__u64 *w = (__u64 *)k4;

	w[0] = (__u64)p->fk.src[0] | (__u64)p->fk.dst[0] << 32;
	w[1] = *(const __u64 *)&p->fk.sport_be;
}

static __always_inline struct ct_value *ct_lookup(struct parsed *p, const struct config *cfg,
						  struct ct_value *copy)
{
	struct flow_key_v4 k4 __attribute__((aligned(8)));
	struct ct_value *v;

	if (p->fk.family == FAM_V4) {
		ct_key_v4(p, &k4);
		v = bpf_map_lookup_elem(&conntrack_v4, &k4);
	} else {
		v = bpf_map_lookup_elem(&conntrack, &p->fk);
	}
	if (v)
		*copy = *v;
	return v;
}

/* An entry that was found (but not usable) is rewritten in place: cheaper than a second
 * hash insert, and it keeps the entry's place in the LRU. */
static __always_inline int ct_insert(struct parsed *p, const struct config *cfg,
				     struct ct_value *old, const struct ct_value *v)
{
	struct flow_key_v4 k4 __attribute__((aligned(8)));

	if (old) {
		old->backend_id = v->backend_id;
		old->vip_id = v->vip_id;
		old->last_seen_ns = v->last_seen_ns;
		return 1;
	}
	if (p->fk.family == FAM_V4) {
		ct_key_v4(p, &k4);
		return bpf_map_update_elem(&conntrack_v4, &k4, v, BPF_ANY) == 0;
	}
	return bpf_map_update_elem(&conntrack, &p->fk, v, BPF_ANY) == 0;
}

/* Stop tracking p's flow (a RST ended it): the slot returns to the free list at once instead
 * of waiting to be the least recently used. */
static __always_inline void ct_forget(struct parsed *p, const struct config *cfg)
{
	struct flow_key_v4 k4 __attribute__((aligned(8)));

	if (p->fk.family == FAM_V4) {
		ct_key_v4(p, &k4);
		bpf_map_delete_elem(&conntrack_v4, &k4);
	} else {
		bpf_map_delete_elem(&conntrack, &p->fk);
	}
}

#endif /* CT_DIRECT */

#endif
