// SPDX-License-Identifier: GPL-2.0
/* second_chance.h: name an entry's previous owner to its new owner (issue 17).
 *
 * When a VIP's table changes, the controller writes, next to the new table, a region of the
 * same size holding for each entry the backend id it pointed to before (0: unchanged), and a
 * monotonic deadline (sc_meta, maglev.h). While the window is open, a
 * packet that is steered by the table (no usable conntrack entry: typically a flow whose node
 * died) and whose entry changed goes to the new owner with the previous owner's IPv4 address
 * in the GRE key. The backend's decap program (decap.c) keeps the packet if a local socket
 * owns the flow, else hands it once to the previous owner.
 *
 * Such a packet is not tracked in conntrack: the next one must carry the hint too, and only
 * the table (identical on every node) knows it. A packet steered by conntrack never looks;
 * one steered by the table of a VIP outside a window pays one array load and a test.
 *
 * No hint (the packet goes as before) for: self-test packets (xdp_lb.c), SYNs (a new connection belongs to the new owner),
 * fragments, ICMP errors, IPv6-outer backends (the key holds 32 bits), a previous owner that
 * is no longer in service for the VIP (down, removed, or its id reused), or the same address.
 */
#ifndef SECOND_CHANCE_H
#define SECOND_CHANCE_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maglev.h"
#include "parse.h"
#include "counters.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_VIPS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct sc_meta);
} sc_meta SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SC_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} sc_stats SEC(".maps");

static __always_inline void sc_count(__u32 reason)
{
	count_in(&sc_stats, reason);
}

/* The previous owner's address (wire order) for the packet's entry, or 0 for no hint. rel is
 * the entry's index within the table (the same index in the previous-owner region). */
static __always_inline __u32 sc_hint(__u32 vip_id, __u32 active, __u32 rel,
				     const struct backend *be, const struct parsed *p)
{
	struct sc_meta *sc;
	__u32 off, idx, chunk, prev_id;
	struct table_chunk *c;
	struct backend *pb;

	/* packet facts first: a new flow (the common table-path packet) costs one byte test */
	if (p->syn || p->is_frag || p->is_icmp_err || be->family != FAM_V4)
		return 0;
	sc = bpf_map_lookup_elem(&sc_meta, &vip_id);
	if (!sc)
		return 0;
	off = sc->prev[active & 1];
	if (!off)
		return 0;
	idx = off - 1 + rel;
	chunk = idx / TABLE_CHUNK;
	c = bpf_map_lookup_elem(&tables, &chunk);
	if (!c)
		return 0;
	prev_id = c->ids[idx % TABLE_CHUNK];
	if (!prev_id)
		return 0; /* an unchanged entry: no clock read */
	if (bpf_ktime_get_ns() >= sc->until_ns)
		return 0;
	pb = bpf_map_lookup_elem(&backends, &prev_id);
	if (!pb || pb->vip_id != vip_id || pb->family != FAM_V4 ||
	    (pb->state != BE_STATE_ACTIVE && pb->state != BE_STATE_DRAIN) ||
	    pb->addr[0] == be->addr[0] || pb->addr[0] == SC_KEY_SPENT)
		return 0;
	return pb->addr[0];
}

#endif
