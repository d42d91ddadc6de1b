//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Per-interface packet and byte counters, by direction and protocol class,
 * per CPU. Attached by user space to chosen interfaces at TC (tcx, or a
 * clsact qdisc with a direct-action cls_bpf filter) for both directions, or
 * at XDP for ingress. The programs only read: they return TC_ACT_UNSPEC
 * (tcx: "next program"; cls_bpf: "next filter") and XDP_PASS, so traffic
 * and other programs on the same hook are unaffected.
 *
 * Bytes are the frame length the hook sees: from the Ethernet header (or
 * the network header on L3 devices) to the end of the packet, without FCS.
 * A GSO packet counts once, with its full length, as in the interface's
 * own statistics on veth.
 *
 * Per packet: a few bounds-checked header reads, two array lookups the
 * verifier inlines (no helper call), and two or three adds. Measured by
 * BenchmarkPrograms in bench_test.go; keep it that way.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TC_ACT_UNSPEC (-1)

/* -target bpfel only: network byte order is the swapped constant. */
#define be16(x) ((__u16)__builtin_bswap16(x))
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100
#define ETH_P_8021AD 0x88A8
#define ETH_P_IPV6 0x86DD

/* IPv6 next-header values (macros in the UAPI, hence not in vmlinux.h). */
#define NH_HOPOPTS 0
#define NH_ROUTING 43
#define NH_FRAGMENT 44
#define NH_ICMPV6 58
#define NH_DSTOPTS 60

#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT 4

enum netdev_dir {
	NETDEV_INGRESS = 0,
	NETDEV_EGRESS,
	NETDEV_DIRS,
};

/* Protocol classes, in the order of Protocols in netdev.go (the tests
 * check the count, and the class of real traffic). L4 classes follow
 * their L3 in the order tcp, udp, icmp, other: class = base + l4_class(). */
enum netdev_proto {
	NETDEV_IPV4_TCP = 0,
	NETDEV_IPV4_UDP,
	NETDEV_IPV4_ICMP,
	NETDEV_IPV4_OTHER,
	NETDEV_IPV6_TCP,
	NETDEV_IPV6_UDP,
	NETDEV_IPV6_ICMP,
	NETDEV_IPV6_OTHER,
	NETDEV_ARP,
	NETDEV_OTHER,
	NETDEV_PROTOS,
};

/* Frame sizes in powers of two: slot k counts lengths in (2^(k+5), 2^(k+6)]
 * (slot 0: up to 64 bytes); the last slot counts longer frames (GSO). */
#define NETDEV_SIZES 12

struct netdev_counter {
	__u64 packets;
	__u64 bytes;
};

struct netdev_value {
	struct netdev_counter c[NETDEV_DIRS][NETDEV_PROTOS];
	__u64 sizes[NETDEV_DIRS][NETDEV_SIZES];
};

/* Set by user space before loading: count frame sizes too. */
const volatile __u8 netdev_sizes = 0;

/*
 * Interfaces are counted in slots. One program object serves every
 * interface, so it finds the slot from the ifindex (of the network
 * namespace user space attaches in): through an array indexed by ifindex,
 * a bounds check and an add once the verifier has inlined the lookup. A
 * per-CPU hash keyed by ifindex, as this used to be, costs a hash and a
 * bucket walk per packet: about 30 ns, most of what the program cost.
 *
 * Slot 0 belongs to no interface: packets on an interface without a slot
 * are counted there, and user space reports them as missed. That happens
 * only in the moment between an interface's removal and user space
 * noticing it (or by a bug), and costs the programs no extra branch.
 */

/* ifindex -> slot for an ifindex below NETDEV_DIRECT_IFINDEX; 0: none.
 * Only user space writes: the slot before it attaches to the interface, 0
 * after it detaches. An array element takes 8 bytes: 512 KiB in all. */
#define NETDEV_DIRECT_IFINDEX 65536
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, NETDEV_DIRECT_IFINDEX);
	__type(key, __u32);
	__type(value, __u32);
} netdev_slots SEC(".maps");

/* ifindex -> slot of every attached interface. The programs read it only
 * for an ifindex beyond netdev_slots (a host, or namespace, that has
 * created 65536 interfaces since it began): such packets cost a hash
 * lookup, and are counted all the same. User space inserts before it
 * attaches and deletes after it detaches; max_entries is the number of
 * slots (set by user space), so it is never full. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} netdev_ifaces SEC(".maps");

/* The counters by slot. max_entries is the number of slots plus slot 0
 * (set by user space), so every slot netdev_slots or netdev_ifaces names
 * exists. User space zeroes a slot before it gives it to an interface. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 257);
	__type(key, __u32);
	__type(value, struct netdev_value);
} netdev_counters SEC(".maps");

static __always_inline __u32 l4_class(__u8 proto, __u8 icmp)
{
	if (proto == IPPROTO_TCP)
		return 0;
	if (proto == IPPROTO_UDP)
		return 1;
	if (proto == icmp)
		return 2;
	return 3;
}

/* classify_l3 classifies from the network header at data + off, given the
 * ethertype (network byte order). Every read is bounds-checked; a header
 * cut short classifies as "other" of its L3. */
static __always_inline __u32 classify_l3(void *data, void *data_end, __u32 off, __u16 proto)
{
	if (proto == be16(ETH_P_IP)) {
		struct iphdr *ip = data + off;

		if ((void *)(ip + 1) > data_end)
			return NETDEV_IPV4_OTHER;
		/* Non-first fragments carry no L4 header but still belong to
		 * the protocol field's class. */
		return NETDEV_IPV4_TCP + l4_class(ip->protocol, IPPROTO_ICMP);
	}
	if (proto == be16(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;
		__u8 nh;

		if ((void *)(ip6 + 1) > data_end)
			return NETDEV_IPV6_OTHER;
		nh = ip6->nexthdr;
		off += sizeof(*ip6);
		for (int i = 0; i < MAX_IPV6_EXT; i++) {
			__u8 *h;

			if (nh != NH_HOPOPTS && nh != NH_ROUTING && nh != NH_FRAGMENT && nh != NH_DSTOPTS)
				break;
			off &= 0x3fff; /* keeps the verifier's range small; real offsets are far below */
			h = data + off;
			if ((void *)(h + 2) > data_end)
				return NETDEV_IPV6_OTHER;
			/* The fragment header's second byte is reserved: 8 bytes. */
			off += nh == NH_FRAGMENT ? 8 : ((__u32)h[1] + 1) * 8;
			nh = h[0];
		}
		return NETDEV_IPV6_TCP + l4_class(nh, NH_ICMPV6);
	}
	if (proto == be16(ETH_P_ARP))
		return NETDEV_ARP;
	return NETDEV_OTHER;
}

/* classify_eth classifies an Ethernet frame, skipping up to two VLAN tags
 * carried in the packet (a tag the driver took out is not in the data). */
static __always_inline __u32 classify_eth(void *data, void *data_end)
{
	struct ethhdr *eth = data;
	__u32 off = sizeof(*eth);
	__u16 proto;

	if ((void *)(eth + 1) > data_end)
		return NETDEV_OTHER;
	proto = eth->h_proto;
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		struct vlan_hdr *vh;

		if (proto != be16(ETH_P_8021Q) && proto != be16(ETH_P_8021AD))
			break;
		vh = data + off;
		if ((void *)(vh + 1) > data_end)
			return NETDEV_OTHER;
		proto = vh->h_vlan_encapsulated_proto;
		off += sizeof(*vh);
	}
	return classify_l3(data, data_end, off, proto);
}

/* netdev_size_slots[j] is the size slot of frames of 64(j-1)+1 to 64j
 * bytes: one load, where computing the bit length of (len - 1) >> 6 takes
 * a chain of dependent compares and branches (BPF has no clz). */
static const __u8 netdev_size_slots[1025] = {
	[2] = 1,
	[3 ... 4] = 2,
	[5 ... 8] = 3,
	[9 ... 16] = 4,
	[17 ... 32] = 5,
	[33 ... 64] = 6,
	[65 ... 128] = 7,
	[129 ... 256] = 8,
	[257 ... 512] = 9,
	[513 ... 1024] = 10,
};

static __always_inline __u32 size_slot(__u32 len)
{
	__u64 j = ((__u64)len + 63) >> 6;
	__u32 s;

	if (j >= sizeof(netdev_size_slots))
		return NETDEV_SIZES - 1;
	s = netdev_size_slots[j];
	return s < NETDEV_SIZES ? s : NETDEV_SIZES - 1; /* for the verifier */
}

/* slot_of returns the counters of ifindex's slot, or slot 0's if it has
 * none; NULL only for the verifier. */
static __always_inline struct netdev_value *slot_of(__u32 ifindex)
{
	__u32 *s, slot = 0;

	if (ifindex < NETDEV_DIRECT_IFINDEX) {
		s = bpf_map_lookup_elem(&netdev_slots, &ifindex);
	} else {
		s = bpf_map_lookup_elem(&netdev_ifaces, &ifindex);
		/* Keeps clang from merging the two lookups into one call on
		 * a map chosen at run time, which the verifier cannot inline. */
		asm volatile("" ::: "memory");
	}
	if (s)
		slot = *s;
	return bpf_map_lookup_elem(&netdev_counters, &slot);
}

static __always_inline void count(__u32 ifindex, __u32 dir, __u32 proto, __u32 len)
{
	struct netdev_value *v = slot_of(ifindex);

	if (!v || dir >= NETDEV_DIRS || proto >= NETDEV_PROTOS)
		return;
	v->c[dir][proto].packets++;
	v->c[dir][proto].bytes += len;
	if (netdev_sizes)
		v->sizes[dir][size_slot(len)]++;
}

static __always_inline void count_skb(struct __sk_buff *skb, __u32 dir, bool l2)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 proto;

	if (l2)
		proto = classify_eth(data, data_end);
	else /* L3 devices (tun, wireguard, ipip): no link-layer header */
		proto = classify_l3(data, data_end, 0, (__u16)skb->protocol);
	count(skb->ifindex, dir, proto, skb->len);
}

SEC("tc")
int netdev_tc_ingress(struct __sk_buff *skb)
{
	count_skb(skb, NETDEV_INGRESS, true);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int netdev_tc_egress(struct __sk_buff *skb)
{
	count_skb(skb, NETDEV_EGRESS, true);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int netdev_tc_ingress_l3(struct __sk_buff *skb)
{
	count_skb(skb, NETDEV_INGRESS, false);
	return TC_ACT_UNSPEC;
}

SEC("tc")
int netdev_tc_egress_l3(struct __sk_buff *skb)
{
	count_skb(skb, NETDEV_EGRESS, false);
	return TC_ACT_UNSPEC;
}

/* Ethernet devices only; user space uses tc ingress on others. Without the
 * frags flag the kernel hands this program linear frames only, so
 * data_end - data is the whole frame. */
SEC("xdp")
int netdev_xdp_ingress(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	count(ctx->ingress_ifindex, NETDEV_INGRESS, classify_eth(data, data_end), data_end - data);
	return XDP_PASS;
}
