// SPDX-License-Identifier: GPL-2.0
/* xdp_floor.c: reference programs for bench/forwarder.py.
 *
 * xdp_floor bounces every frame (XDP_TX) and does nothing else: the fixed cost of a
 * BPF_PROG_TEST_RUN call, subtracted from every measurement. xdp_pass_floor returns XDP_PASS
 * and does nothing else: the test run then hands the frame to the kernel's stack, which costs
 * more than a bounce, so a non-VIP packet is compared with this floor, not with xdp_floor.
 * xdp_lru_insert and xdp_lru_insert_percpu only insert 40 bytes of the frame into an LRU hash
 * shaped like the forwarder's IPv6 conntrack map (same key/value sizes; IPv4 flows have a
 * 16-byte key, a little cheaper), the first with one LRU
 * shared by the CPUs (what the forwarder uses), the second with per-CPU LRU lists
 * (BPF_F_NO_COMMON_LRU): the kernel's own cost of the insert every new flow pays, both ways,
 * printed for scale next to the forwarder's new-flow figures.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maglev.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_CT_SIZE);
	__type(key, struct flow_key);
	__type(value, struct ct_value);
} lru_probe SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_CT_SIZE);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__type(key, struct flow_key);
	__type(value, struct ct_value);
} lru_probe_percpu SEC(".maps");

SEC("xdp")
int xdp_floor(struct xdp_md *ctx)
{
	return XDP_TX;
}

SEC("xdp")
int xdp_pass_floor(struct xdp_md *ctx)
{
	return XDP_PASS;
}

static __always_inline int insert(struct xdp_md *ctx, void *map)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ct_value v = {.backend_id = 1};
	struct flow_key k;

	if (data + 14 + sizeof(k) > end)
		return XDP_PASS;
	__builtin_memcpy(&k, data + 14, sizeof(k));
	bpf_map_update_elem(map, &k, &v, BPF_ANY);
	return XDP_TX;
}

SEC("xdp")
int xdp_lru_insert(struct xdp_md *ctx)
{
	return insert(ctx, &lru_probe);
}

SEC("xdp")
int xdp_lru_insert_percpu(struct xdp_md *ctx)
{
	return insert(ctx, &lru_probe_percpu);
}
