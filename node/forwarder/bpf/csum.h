// SPDX-License-Identifier: GPL-2.0
/* csum.h: Internet checksum helpers shared by the encapsulation (outer IPv4 header) and the
 * ICMP answers (model.py: checksum).
 */
#ifndef CSUM_H
#define CSUM_H

#include <linux/types.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>

static __always_inline __u16 csum_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

static __always_inline __u16 iph_csum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 s = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		s += w[i];
	return csum_fold(s);
}

static __always_inline __u64 csum_words(void *start, __u32 nwords, void *end, __u32 max)
{
	__u16 *w = start;
	__u64 s = 0;

	for (__u32 i = 0; i < max; i++) {
		if (i >= nwords || (void *)(w + i + 1) > end)
			break;
		s += w[i];
	}
	return s;
}

#endif
