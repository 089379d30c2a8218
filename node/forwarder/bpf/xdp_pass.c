// SPDX-License-Identifier: GPL-2.0
/* xdp_pass.c: a trivial XDP program for the receiving peer of a veth.
 *
 * Native XDP_TX (or redirect) on a veth only arrives if the peer runs an XDP program of its
 * own; with none there the frames are dropped silently (see the datapath field notes). The lab
 * and the live forwarder tests attach this to the router-side port of every node link.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
