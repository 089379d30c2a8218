// SPDX-License-Identifier: GPL-2.0
/* xdp_floor.c: the bench's floor. It bounces every frame (XDP_TX) and does nothing else, so
 * bench/forwarder.py can subtract the fixed cost of a BPF_PROG_TEST_RUN call. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("xdp")
int xdp_floor(struct xdp_md *ctx)
{
	return XDP_TX;
}
