// SPDX-License-Identifier: GPL-2.0
/* xdp_floor.c: reference programs for bench/forwarder.py.
 *
 * xdp_floor bounces every frame (XDP_TX) and does nothing else: the fixed cost of a
 * BPF_PROG_TEST_RUN call, subtracted from every measurement. xdp_pass_floor returns XDP_PASS
 * and does nothing else: the test run then hands the frame to the kernel's stack, which costs
 * more than a bounce, so a non-VIP packet is compared with this floor, not with xdp_floor.
 * xdp_lru_insert and xdp_lru_insert_percpu only insert 16 bytes of the frame (its addresses,
 * ports and 4 more bytes: distinct for the bench's distinct flows) into an LRU hash of the
 * forwarder's IPv4 conntrack map (conntrack_v4: CT_LRU_MAP, same key and value sizes), the
 * first with one LRU shared by the CPUs (what the forwarder uses), the second with per-CPU LRU
 * lists (BPF_F_NO_COMMON_LRU): the kernel's own cost of the insert every new IPv4 flow pays,
 * both ways, printed for scale next to the forwarder's new-flow figures.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "maglev.h"

char LICENSE[] SEC("license") = "GPL";

CT_LRU_MAP(struct flow_key_v4, 0) lru_probe SEC(".maps");
CT_LRU_MAP(struct flow_key_v4, BPF_F_NO_COMMON_LRU) lru_probe_percpu SEC(".maps");

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
	struct flow_key_v4 k;

	if (data + 26 + sizeof(k) > end)
		return XDP_PASS;
	__builtin_memcpy(&k, data + 26, sizeof(k));
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
