// SPDX-License-Identifier: GPL-2.0
/* counters.h: the forwarder's counters and their maps (layouts and reasons in maglev.h): stats,
 * per-CPU event/drop counts by enum stat_reason; be_stats, per-CPU packets, bytes, new flows
 * and conntrack hits by backend id, the one counter a forwarded packet touches; vip_stats,
 * which only user space writes (maglev.h: struct flow_stats). Per-CPU, so an increment is a
 * plain add with no atomic; user space sums the CPUs (loader.counters).
 */
#ifndef COUNTERS_H
#define COUNTERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maglev.h"

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

/* One more event in entry key of a per-CPU array of __u64 (stats here, sc_stats in
 * second_chance.h). Always inlined, so map is a constant at each call, as the verifier needs. */
static __always_inline void count_in(void *map, __u32 key)
{
	__u64 *v = bpf_map_lookup_elem(map, &key);

	if (v)
		*v += 1;
}

static __always_inline void count(__u32 reason)
{
	count_in(&stats, reason);
}

/* A forwarded packet: one lookup and three adds (a fourth for a new flow). Its VIP's figures
 * and the conntrack misses are sums user space makes (maglev.h), not work per packet. */
static __always_inline void count_forwarded(__u32 be_id, __u32 bytes, int hit, int inserted)
{
	struct flow_stats *s = bpf_map_lookup_elem(&be_stats, &be_id);

	if (!s)
		return;
	s->packets++;
	s->bytes += bytes;
	s->ct_hits += hit;
	if (inserted)
		s->new_flows++;
}

#endif
