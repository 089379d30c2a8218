/* Map layouts of the backend's GRE decapsulation program (decap.c).
 *
 * The Python side (node/forwarder/tc.py: DecapVipKey, DECAP_COUNTERS) mirrors this file; change
 * both together. Kept apart from maglev.h (the node's XDP layouts) until the two are merged.
 */
#ifndef MAGLEV_DECAP_H
#define MAGLEV_DECAP_H

#include <linux/types.h>

/* Debian's uapi linux/bpf.h (6.1) predates these adjust_room flags; the kernels we run (>= 6.3)
 * have them with these values. They make the kernel update skb->protocol and the header offsets
 * when the outer L3 header is popped. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#define DECAP_MAX_VIPS 4096

/* Key of decap_vips: the inner destination addresses this backend serves. IPv4 addresses use the
 * first 4 bytes of addr and leave the rest zero, so one map serves both families. */
struct decap_vip_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16];
};

/* Value of decap_vips; non-zero means "decapsulate GRE whose inner packet is for this VIP". */
struct decap_vip_value {
	__u32 enabled;
};

/* Index of decap_stats (a per-CPU array of struct decap_counter). Every packet the program sees
 * lands in exactly one of them, so their sum is the number of packets seen. */
enum decap_counter_index {
	DECAP_OK_V4 = 0,          /* decapsulated, inner IPv4 */
	DECAP_OK_V6 = 1,          /* decapsulated, inner IPv6 */
	DECAP_PASS_NOT_IP = 2,    /* not IPv4/IPv6 (ARP, VLAN-tagged in-band, ...) */
	DECAP_PASS_NOT_GRE = 3,   /* IP but not GRE (the normal traffic of the host) */
	DECAP_PASS_GRE_FLAGS = 4, /* GRE with checksum/key/sequence/routing or version != 0 */
	DECAP_PASS_GRE_PROTO = 5, /* GRE carrying something other than IPv4/IPv6 */
	DECAP_PASS_NOT_VIP = 6,   /* GRE whose inner destination is not a configured VIP */
	DECAP_PASS_FRAGMENT = 7,  /* outer IPv4 fragment or IPv6 extension headers: not ours */
	DECAP_PASS_TRUNCATED = 8, /* too short to hold the headers it claims */
	DECAP_DROP_ADJUST = 9,    /* for a VIP but bpf_skb_adjust_room refused: dropped */
	DECAP_COUNTER_MAX = 10,
};

struct decap_counter {
	__u64 packets;
	__u64 bytes;
};

#endif /* MAGLEV_DECAP_H */
