//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * TCP retransmits by address family, TCP state and kind (SYN, SYN-ACK,
 * data), counted in segments exactly as the kernel's TcpRetransSegs counts
 * them, and, when user space asks for it, by peer.
 *
 * BTF-enabled raw tracepoints (5.5+; ktel needs 5.8 with BTF), which need
 * no tracefs: every supported kernel loads them, so there is no other
 * flavour.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "ktel_events.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define EEXIST 17

/* Families, states and kinds index tcp_retransmits; user space decodes the
 * index with the same constants (tcpretrans.go). */
enum rt_family { RT_IPV4, RT_IPV6, RT_FAMILIES };
#define RT_STATES 16 /* TCP states are 1..13; 0 stands for anything else */
enum rt_kind { RT_SYN, RT_SYNACK, RT_DATA, RT_KINDS };

/* A retransmit, for a span (ktel_events.h), when spans are on. */
struct tcpretrans_event {
	__u64 ts_ns; /* CLOCK_MONOTONIC */
	__u8 family; /* enum rt_family */
	__u8 state;
	__u8 kind; /* enum rt_kind */
	__u8 _pad;
	__u16 sport; /* host byte order */
	__u16 dport;
	__u32 segs;
	__u32 _pad2;
	__u8 saddr[16]; /* network byte order; IPv4 in the first 4 */
	__u8 daddr[16];
	__u64 cgroup; /* the socket's cgroup v2 id (the listener's for a SYN-ACK); 0 if unknown */
};

/* Keeps the type in BTF for bpf2go -type. */
const struct tcpretrans_event *unused_tcpretrans_event __attribute__((unused));

/* Whether to count by peer; set by user space before loading. */
volatile const __u32 track_peers = 0;
/* Whether to count by the socket's cgroup v2 id (workload attribution);
 * set by user space, never together with track_peers. */
volatile const __u32 per_cgroup = 0;

struct cgroup_key {
	__u64 cgroup; /* the socket's cgroup v2 id: its creator's at creation */
	__u32 idx;    /* the index into tcp_retransmits */
	__u32 _pad;
};

/*
 * With per_cgroup: segments by (cgroup, family, state, kind), shared by
 * CPUs (atomic adds), allocated as keys appear (a 16 B key, an 8 B value
 * and the hash element: the kernel's 96 B size class): at most 768 KiB for
 * the 8192 entries whatever the CPU count. User space deletes
 * the keys of cgroups idle for the label TTL. When full, a retransmit
 * whose key is not in it is counted in tcp_retransmits (exported with
 * unit="other" and in ktel_label_overflow_total{probe="tcpretrans",
 * label="cgroup"}).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 8192);
	__type(key, struct cgroup_key);
	__type(value, __u64);
} tcp_rtx_cgroups SEC(".maps");

/* Before 5.15, sk_cgrp_data was a word holding the cgroup pointer unless
 * its low bit was set (then it held a net_cls/net_prio id instead). */
struct sock_cgroup_data___pre515 {
	__u64 val;
} __attribute__((preserve_access_index));

struct sock___pre515 {
	struct sock_cgroup_data___pre515 sk_cgrp_data;
} __attribute__((preserve_access_index));

/* sock_cgroup is the cgroup v2 id of sk, 0 if unknown. Retransmits run in
 * softirq or timer context: the current task is not the socket's. */
static __always_inline __u64 sock_cgroup(const struct sock *sk)
{
	struct cgroup *cg;
	__u64 val;

	if (!sk)
		return 0;
	if (bpf_core_field_exists(sk->sk_cgrp_data.cgroup)) {
		cg = BPF_CORE_READ(sk, sk_cgrp_data.cgroup);
	} else {
		val = BPF_CORE_READ((struct sock___pre515 *)sk, sk_cgrp_data.val);
		if (val & 1)
			return 0;
		cg = (struct cgroup *)(unsigned long)val;
	}
	if (!cg)
		return 0;
	return BPF_CORE_READ(cg, kn, id);
}

struct peer_key {
	__u8 family; /* enum rt_family */
	__u8 state;
	__u8 kind;   /* enum rt_kind */
	__u8 _pad;
	__u16 port;  /* remote port, host byte order */
	__u16 _pad2;
	__u8 addr[16]; /* remote address, network byte order; IPv4 in the first 4 */
};

/*
 * Segments by (family, state, kind) at index
 * (family * RT_STATES + state) * RT_KINDS + kind. Without peers this counts
 * every retransmit. With peers it holds, per (family, state, kind), the
 * reserved "no peer" key of tcp_rtx_peers: the retransmits that map had
 * no room for, exported as peer="other". Being an array it always has room,
 * and since it then counts nothing else, its sum is also the count of
 * retransmits the peer map had no room for.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, RT_FAMILIES * RT_STATES * RT_KINDS);
	__type(key, __u32);
	__type(value, __u64);
} tcp_retransmits SEC(".maps");

/*
 * With peers: segments by (family, state, kind, peer). User space sizes it
 * at load time (one key when peers are off). Keys are never deleted. When
 * it is full, a retransmit whose key is not in it yet is counted in
 * tcp_retransmits under its (family, state, kind), that is as peer="other"
 * (and in ktel_tcp_retransmits_peer_map_full_total). Its fill is exported
 * as ktel_bpf_map_entries.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1);
	__type(key, struct peer_key);
	__type(value, __u64);
} tcp_rtx_peers SEC(".maps");

/* add_peer counts n segments under k; it fails only when the map is full. */
static __always_inline int add_peer(const struct peer_key *k, __u64 n)
{
	__u64 *v;
	long err;

	/* Plain increments of per-CPU values: the kernel never nests runs of
	 * a program on one CPU (it skips the inner run and counts a recursion
	 * miss, exported as ktel_bpf_program_recursion_misses_total). */
	v = bpf_map_lookup_elem(&tcp_rtx_peers, k);
	if (v) {
		*v += n;
		return 0;
	}
	/* A new key starts at n on this CPU and 0 on the others. */
	err = bpf_map_update_elem(&tcp_rtx_peers, k, &n, BPF_NOEXIST);
	if (!err)
		return 0;
	if (err == -EEXIST) { /* another CPU inserted it first */
		v = bpf_map_lookup_elem(&tcp_rtx_peers, k);
		if (v) {
			*v += n;
			return 0;
		}
	}
	return -1; /* E2BIG: full (preallocated, so no ENOMEM) */
}

/* add_cgroup counts n segments of index idx for sk's cgroup; it fails
 * only when the map is full. */
static __always_inline int add_cgroup(const struct sock *sk, __u32 idx, __u64 n)
{
	struct cgroup_key ck = { .cgroup = sock_cgroup(sk), .idx = idx };
	__u64 *v, zero = 0;

	v = bpf_map_lookup_elem(&tcp_rtx_cgroups, &ck);
	if (!v) {
		bpf_map_update_elem(&tcp_rtx_cgroups, &ck, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&tcp_rtx_cgroups, &ck);
	}
	if (!v)
		return -1;
	__sync_fetch_and_add(v, n);
	return 0;
}

/* count counts n segments under k; sk is the socket whose cgroup they are
 * of (the listener for a SYN-ACK). */
static __always_inline void count(const struct sock *sk, const struct peer_key *k, __u64 n)
{
	__u32 idx;
	__u64 *v;

	if (track_peers && !add_peer(k, n))
		return;
	idx = ((__u32)k->family * RT_STATES + k->state) * RT_KINDS + k->kind;
	if (per_cgroup && !add_cgroup(sk, idx, n))
		return;
	v = bpf_map_lookup_elem(&tcp_retransmits, &idx);
	if (v)
		*v += n;
}

/* fill_remote fills in the family and, with peers, the remote end of skc.
 * Sockets of other families (none in practice) are skipped. */
static __always_inline int fill_remote(struct peer_key *k, const struct sock_common *skc)
{
	__u16 family = BPF_CORE_READ(skc, skc_family);
	__be32 daddr;

	if (family == AF_INET) {
		k->family = RT_IPV4;
		if (track_peers) {
			daddr = BPF_CORE_READ(skc, skc_daddr);
			__builtin_memcpy(k->addr, &daddr, sizeof(daddr));
		}
	} else if (family == AF_INET6) {
		k->family = RT_IPV6;
		if (track_peers)
			BPF_CORE_READ_INTO(&k->addr, skc, skc_v6_daddr);
	} else {
		return -1;
	}
	if (track_peers)
		k->port = __builtin_bswap16(BPF_CORE_READ(skc, skc_dport)); /* bpfel only */
	return 0;
}

/* emit_event records a retransmit of skc for a span. Spans of retransmits
 * have no threshold: ktel_span_wanted(0) is true exactly when they are on. */
static __always_inline void emit_event(const struct sock *sk, const struct sock_common *skc, __u8 state, __u8 kind,
				       __u64 n)
{
	struct tcpretrans_event *e;
	__u64 now;
	__u16 family;
	__be32 a;

	if (!ktel_span_wanted(0))
		return;
	now = bpf_ktime_get_ns();
	if (!ktel_span_allow(now))
		return;
	e = ktel_span_reserve(sizeof(*e));
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = now;
	e->state = state;
	e->kind = kind;
	e->segs = n;
	e->cgroup = sock_cgroup(sk);
	family = BPF_CORE_READ(skc, skc_family);
	if (family == AF_INET) {
		e->family = RT_IPV4;
		a = BPF_CORE_READ(skc, skc_rcv_saddr);
		__builtin_memcpy(e->saddr, &a, sizeof(a));
		a = BPF_CORE_READ(skc, skc_daddr);
		__builtin_memcpy(e->daddr, &a, sizeof(a));
	} else {
		e->family = RT_IPV6;
		BPF_CORE_READ_INTO(&e->saddr, skc, skc_v6_rcv_saddr);
		BPF_CORE_READ_INTO(&e->daddr, skc, skc_v6_daddr);
	}
	e->sport = BPF_CORE_READ(skc, skc_num);
	e->dport = __builtin_bswap16(BPF_CORE_READ(skc, skc_dport)); /* bpfel only */
	ktel_span_submit(e);
}

/* segs is tcp_skb_pcount(skb), the number of segments a GSO skb stands for:
 * what the kernel adds to TcpRetransSegs for one tracepoint hit. */
static __always_inline __u64 segs(const struct sk_buff *skb)
{
	const struct tcp_skb_cb *cb = (const void *)skb->cb;
	__u16 n = BPF_CORE_READ(cb, tcp_gso_segs);

	return n ? n : 1;
}

static __always_inline int retransmit_skb(const struct sock *sk, const struct sk_buff *skb)
{
	struct peer_key k = {};
	__u8 state;
	__u64 n;

	if (fill_remote(&k, &sk->__sk_common))
		return 0;
	state = BPF_CORE_READ(sk, __sk_common.skc_state);
	k.state = state < RT_STATES ? state : 0;
	k.kind = state == TCP_SYN_SENT ? RT_SYN : RT_DATA;
	n = segs(skb);
	count(sk, &k, n);
	emit_event(sk, &sk->__sk_common, k.state, k.kind, n);
	return 0;
}

/* The SYN-ACK of a request socket; the listener's state is irrelevant. */
static __always_inline int retransmit_synack(const struct sock *sk, const struct request_sock *req)
{
	struct peer_key k = { .state = TCP_SYN_RECV, .kind = RT_SYNACK };

	if (fill_remote(&k, &req->__req_common))
		return 0;
	count(sk, &k, 1);
	emit_event(sk, &req->__req_common, k.state, k.kind, 1);
	return 0;
}

/*
 * Newer kernels (6.18 among them; upstream commit "tcp: trace retransmit
 * failures in tcp_retransmit_skb") fire tcp_retransmit_skb for failed
 * retransmits too, with the error as a new last argument; older ones fire
 * for successful retransmits only and have no such argument. The same
 * commit added the err field to the trace record, whose existence therefore
 * tells the two apart. On older kernels the branch is dead code and the
 * verifier never sees the read of the missing argument or field.
 */
static __always_inline bool tracepoint_has_err(void)
{
	return bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err);
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(rtx_skb_btf, const struct sock *sk, const struct sk_buff *skb)
{
	if (tracepoint_has_err() && (int)ctx[2] != 0)
		return 0;
	return retransmit_skb(sk, skb);
}

SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(rtx_synack_btf, const struct sock *sk, const struct request_sock *req)
{
	return retransmit_synack(sk, req);
}
