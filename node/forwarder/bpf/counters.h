// SPDX-License-Identifier: GPL-2.0
/* counters.h: the forwarder's counters and their maps (layouts and reasons in maglev.h): stats,
 * per-CPU event/drop counts by enum stat_reason; vip_stats and be_stats, per-CPU packets,
 * bytes, new flows and conntrack hits/misses by VIP id and by backend id. Per-CPU, so an
 * increment is a plain add with no atomic; user space sums the CPUs (loader.counters).
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

static __always_inline void count(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &reason);

	if (v)
		*v += 1;
}

static __always_inline void add_stats(void *map, __u32 id, __u32 bytes, int hit, int inserted)
{
	struct flow_stats *s = bpf_map_lookup_elem(map, &id);

	if (!s)
		return;
	s->packets++;
	s->bytes += bytes;
	if (hit)
		s->ct_hits++;
	else
		s->ct_misses++;
	if (inserted)
		s->new_flows++;
}

#endif
