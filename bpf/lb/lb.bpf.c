//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level service load balancer for clients in one cgroup (v2), in the
 * manner of Cilium's socket LB: a connect() or an unconnected UDP sendmsg()
 * to a service address (VIP:port) is rewritten to a backend before any
 * packet exists, and getpeername() and UDP recvmsg() show the VIP again, so
 * the application never sees the backend.
 *
 * Maps, written by user space (internal/lb) and read here:
 *   lb_services  (family, VIP, port, protocol) -> service id and a range of
 *                backend slots [base, base+count).
 *   lb_backends  slot -> backend address, port and counter index.
 *   lb_maglev    slot base -> Maglev lookup table of the service whose range
 *                starts there (consistent mode only).
 *   lb_members   backend counter index -> the backend and the service it
 *                belongs to now, for session affinity.
 * and by the programs:
 *   lb_reverse   (socket cookie, backend) -> VIP, for getpeername/recvmsg.
 *   lb_affinity  (client, service id) -> backend counter index and when it
 *                was last chosen (ClientIP session affinity).
 *   lb_service_stats, lb_backend_stats, lb_drops: per-CPU counters,
 *                added to atomically: cgroup hooks run with migration,
 *                not preemption, disabled, so two connects may interleave
 *                on one CPU.
 *
 * Updates are atomic per service: user space writes the backends (and
 * Maglev table) of a new configuration into fresh slots, then replaces the
 * service entry (one hash-map update, which readers see whole), and frees
 * the old slots only after programs that could still hold the old entry
 * have finished.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "reverse.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define ECONNREFUSED 111
/* ::ffff:0:0/96, third word, in network order (bpfel only). */
#define V4MAPPED_WORD __builtin_bswap32(0xffff)

/* Set by user space at load time. */
/* Whether bpf_set_retval exists for cgroup sock_addr programs (5.18+); when
 * it does not, a refused connect fails with EPERM instead of ECONNREFUSED. */
volatile const __u8 has_set_retval = 1;
/* Entries of every Maglev table (a prime). */
volatile const __u32 maglev_size = 1;

/* Families in keys: 4 or 6, so that an IPv4 service is found from both
 * connect4 and, through its v4-mapped form, connect6. */
struct svc_key {
	__u32 addr[4]; /* network order; IPv4 in addr[0], the rest zero */
	__u16 port;    /* network order */
	__u8 proto;    /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 family;   /* 4 or 6 */
};

#define SVC_F_MAGLEV 1 /* pick through lb_maglev, keyed by the range base */

struct svc_val {
	__u32 id;	/* index into lb_service_stats */
	__u32 base;	/* first slot in lb_backends */
	__u32 count;	/* slots; 0: no backend, the connect is refused */
	__u32 flags;
	__u32 affinity; /* ClientIP affinity timeout, seconds; 0: none */
};

struct backend {
	__u32 addr[4]; /* network order; IPv4 in addr[0] */
	__u16 port;    /* network order */
	__u8 family;
	__u8 _pad;
	__u32 counter; /* index into lb_backend_stats */
};

/* A backend as a member of a service: lb_members[counter]. */
struct member {
	struct backend b;
	__u32 svc; /* service id + 1; 0: the counter is not in use */
};

/* The client of socket LB is the network namespace of the socket: a pod,
 * or the host (Cilium's socket-LB affinity keys on it the same way). The
 * source address is not known at connect time yet. */
struct aff_key {
	__u64 netns; /* bpf_get_netns_cookie */
	__u32 svc;   /* service id */
	__u32 _pad;
};

struct aff_val {
	__u64 last;    /* bpf_ktime_get_ns of the last connect that used it */
	__u32 counter; /* the backend, by its counter index (see lb_members) */
	__u32 _pad;
};

struct svc_stats {
	__u64 connections; /* connects and unconnected UDP datagrams sent */
	__u64 no_backend;  /* of those, refused: the service had no backend */
};

enum drop_reason {
	DROP_REVERSE_FAILED = 0, /* lb_reverse update failed (not LRU eviction) */
	DROP_SLOT_MISSING,	 /* a slot outside lb_backends: not rewritten */
	DROP_MAGLEV_MISSING,	 /* no Maglev table for the range: picked at random */
	DROP_AFFINITY_FAILED,	 /* lb_affinity update failed (not LRU eviction) */
	DROP_REASONS,
};

/* Sizes are set by user space (Options); these are placeholders. When the
 * services or backends maps are full, user space rejects the configuration
 * that does not fit (a failed reload) and keeps the previous one. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	/* No prealloc: memory for the services present only. A replaced
	 * element may be reused at once (since 5.19/6.1 hash maps recycle
	 * elements through a per-CPU cache), so translate copies the value
	 * in one read and uses only the copy. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
} lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct backend);
} lb_backends SEC(".maps");

struct maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1); /* maglev_size, set by user space */
	__type(key, __u32);
	__type(value, __u32); /* index into the service's slot range */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct maglev_inner);
} lb_maglev SEC(".maps");

/* Indexed like lb_backend_stats. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct member);
} lb_members SEC(".maps");

/* When full, the least recently used client loses its affinity: its next
 * connect picks afresh. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1);
	__type(key, struct aff_key);
	__type(value, struct aff_val);
} lb_affinity SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct svc_stats);
} lb_service_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lb_backend_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} lb_drops SEC(".maps");

static __always_inline void count_drop(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&lb_drops, &reason);

	if (v)
		__sync_fetch_and_add(v, 1);
}

/* mix64 is the murmur3 finalizer: a socket cookie is a counter, its low
 * bits alone would spread poorly. */
static __always_inline __u32 mix64(__u64 c)
{
	c ^= c >> 33;
	c *= 0xff51afd7ed558ccdULL;
	c ^= c >> 33;
	c *= 0xc4ceb9fe1a85ec53ULL;
	c ^= c >> 33;
	return (__u32)c;
}

/*
 * pick chooses a backend of sv. Random mode: connect picks at random;
 * sendmsg hashes the socket cookie so that one socket's datagrams stay on
 * one backend while the backends do not change. Maglev mode: both hash the
 * cookie through the service's Maglev table, so a backend change moves only
 * the sockets whose backend went away (and about 1/N of the rest when one
 * is added).
 */
static __always_inline struct backend *pick(const struct svc_val *sv, __u64 cookie, bool sticky)
{
	__u32 count = sv->count, base = sv->base, idx, slot;
	struct backend *b;

	if (sv->flags & SVC_F_MAGLEV) {
		void *table = bpf_map_lookup_elem(&lb_maglev, &base);
		__u32 h = mix64(cookie) % maglev_size, *e = 0;

		if (table)
			e = bpf_map_lookup_elem(table, &h);
		if (e) {
			idx = *e;
		} else {
			count_drop(DROP_MAGLEV_MISSING);
			idx = bpf_get_prandom_u32();
		}
	} else if (sticky) {
		idx = mix64(cookie);
	} else {
		idx = bpf_get_prandom_u32();
	}
	slot = base + idx % count;
	b = bpf_map_lookup_elem(&lb_backends, &slot);
	if (!b)
		count_drop(DROP_SLOT_MISSING);
	return b;
}

static __always_inline void remember(__u64 cookie, const struct backend *b, const struct svc_key *k)
{
	struct rev_key rk = { .cookie = cookie, .port = b->port, .family = b->family };
	struct rev_val rv = { .port = k->port, .family = k->family };
	struct rev_val *old;

	__builtin_memcpy(rk.addr, b->addr, sizeof(rk.addr));
	__builtin_memcpy(rv.addr, k->addr, sizeof(rv.addr));
	old = bpf_map_lookup_elem(&lb_reverse, &rk);
	if (old && old->port == rv.port && old->addr[0] == rv.addr[0] && old->addr[1] == rv.addr[1] &&
	    old->addr[2] == rv.addr[2] && old->addr[3] == rv.addr[3])
		return; /* repeated sendmsg: skip the write */
	if (bpf_map_update_elem(&lb_reverse, &rk, &rv, BPF_ANY))
		count_drop(DROP_REVERSE_FAILED);
}

/*
 * affine copies to out the backend the client of ctx was last sent to by
 * service sv, if that was less than sv->affinity seconds ago and the
 * backend is still one of the service's, as kube-proxy's ClientIP affinity
 * does. The caller records the choice with remember_affinity.
 */
static __always_inline bool affine(void *ctx, const struct svc_val *sv, struct aff_key *ak,
				   struct backend *out)
{
	struct aff_val *av;
	struct member *m, mc;
	__u32 counter;

	ak->netns = bpf_get_netns_cookie(ctx);
	ak->svc = sv->id;
	av = bpf_map_lookup_elem(&lb_affinity, ak);
	if (!av || bpf_ktime_get_ns() - av->last >= (__u64)sv->affinity * 1000000000ULL)
		return false;
	counter = av->counter;
	m = bpf_map_lookup_elem(&lb_members, &counter);
	if (!m)
		return false;
	/* User space writes a member with svc 0 first and then again with
	 * its service, both times with the same backend, so a copy with a
	 * matching svc holds a whole backend. */
	__builtin_memcpy(&mc, m, sizeof(mc));
	if (mc.svc != sv->id + 1)
		return false; /* the backend left the service */
	__builtin_memcpy(out, &mc.b, sizeof(*out));
	return true;
}

static __always_inline void remember_affinity(const struct aff_key *ak, __u32 counter)
{
	struct aff_val av = { .last = bpf_ktime_get_ns(), .counter = counter };

	if (bpf_map_update_elem(&lb_affinity, ak, &av, BPF_ANY))
		count_drop(DROP_AFFINITY_FAILED);
}

enum verdict {
	PASS,	 /* not a service: leave the address alone */
	REWRITE, /* *out is the backend */
	REFUSE,	 /* a service without backends */
};

/* translate looks up k and, for a service, picks and counts a backend. */
static __always_inline enum verdict translate(void *ctx, const struct svc_key *k, bool sticky,
					      struct backend *out)
{
	struct svc_val *found = bpf_map_lookup_elem(&lb_services, k), sv;
	struct aff_key ak = {};
	struct svc_stats *st;
	struct backend *b;
	__u64 cookie, *bc;
	__u32 id;

	if (!found)
		return PASS;
	/* One copy, read once: id, base, count and flags of one version. */
	__builtin_memcpy(&sv, found, sizeof(sv));
	id = sv.id;
	st = bpf_map_lookup_elem(&lb_service_stats, &id);
	if (st)
		__sync_fetch_and_add(&st->connections, 1);
	if (sv.count == 0) {
		if (st)
			__sync_fetch_and_add(&st->no_backend, 1);
		return REFUSE;
	}
	cookie = bpf_get_socket_cookie(ctx);
	if (!sv.affinity || !affine(ctx, &sv, &ak, out)) {
		b = pick(&sv, cookie, sticky);
		if (!b)
			return PASS;
		__builtin_memcpy(out, b, sizeof(*out));
	}
	id = out->counter;
	if (sv.affinity)
		remember_affinity(&ak, id);
	bc = bpf_map_lookup_elem(&lb_backend_stats, &id);
	if (bc)
		__sync_fetch_and_add(bc, 1);
	remember(cookie, out, k);
	return REWRITE;
}

static __always_inline int refuse(void)
{
	if (has_set_retval)
		bpf_set_retval(-ECONNREFUSED);
	return 0; /* EPERM without bpf_set_retval */
}

static __always_inline int xlate4(struct bpf_sock_addr *ctx, bool sticky)
{
	struct svc_key k = {
		.addr = { ctx->user_ip4 },
		.port = (__u16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
		.family = 4,
	};
	struct backend b;

	switch (translate(ctx, &k, sticky, &b)) {
	case REFUSE:
		return refuse();
	case REWRITE:
		ctx->user_ip4 = b.addr[0];
		ctx->user_port = b.port;
		break;
	default:
		break;
	}
	return 1;
}

/* v4mapped reports whether a is ::ffff:a.b.c.d. */
static __always_inline bool v4mapped(const __u32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == V4MAPPED_WORD;
}

/* xlate6 serves IPv6 services and, for dual-stack sockets, IPv4 services
 * addressed in their v4-mapped form. */
static __always_inline int xlate6(struct bpf_sock_addr *ctx, bool sticky)
{
	struct svc_key k = {
		.port = (__u16)ctx->user_port,
		.proto = (__u8)ctx->protocol,
		.family = 6,
	};
	struct backend b;

	k.addr[0] = ctx->user_ip6[0];
	k.addr[1] = ctx->user_ip6[1];
	k.addr[2] = ctx->user_ip6[2];
	k.addr[3] = ctx->user_ip6[3];
	if (v4mapped(k.addr)) {
		k.addr[0] = k.addr[3];
		k.addr[2] = k.addr[3] = 0;
		k.family = 4;
	}
	switch (translate(ctx, &k, sticky, &b)) {
	case REFUSE:
		return refuse();
	case REWRITE:
		if (b.family == 4) {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = V4MAPPED_WORD;
			ctx->user_ip6[3] = b.addr[0];
		} else {
			ctx->user_ip6[0] = b.addr[0];
			ctx->user_ip6[1] = b.addr[1];
			ctx->user_ip6[2] = b.addr[2];
			ctx->user_ip6[3] = b.addr[3];
		}
		ctx->user_port = b.port;
		break;
	default:
		break;
	}
	return 1;
}

/* The reverse direction: if the peer in ctx is a backend this socket was
 * sent to, show the VIP instead. */
static __always_inline struct rev_val *reverse(void *ctx, const __u32 addr[4], __u16 port, __u8 family)
{
	struct rev_key rk = { .port = port, .family = family };

	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, addr, sizeof(rk.addr));
	return bpf_map_lookup_elem(&lb_reverse, &rk);
}

static __always_inline int rev4(struct bpf_sock_addr *ctx)
{
	__u32 a[4] = { ctx->user_ip4 };
	struct rev_val *v = reverse(ctx, a, (__u16)ctx->user_port, 4);

	if (v && v->family == 4) {
		ctx->user_ip4 = v->addr[0];
		ctx->user_port = v->port;
	}
	return 1;
}

static __always_inline int rev6(struct bpf_sock_addr *ctx)
{
	__u32 a[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	__u8 family = 6;
	struct rev_val *v;

	if (v4mapped(a)) {
		a[0] = a[3];
		a[2] = a[3] = 0;
		family = 4;
	}
	v = reverse(ctx, a, (__u16)ctx->user_port, family);
	if (!v)
		return 1;
	if (v->family == 4) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = V4MAPPED_WORD;
		ctx->user_ip6[3] = v->addr[0];
	} else {
		ctx->user_ip6[0] = v->addr[0];
		ctx->user_ip6[1] = v->addr[1];
		ctx->user_ip6[2] = v->addr[2];
		ctx->user_ip6[3] = v->addr[3];
	}
	ctx->user_port = v->port;
	return 1;
}

SEC("cgroup/connect4")
int lb_connect4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx, false);
}

SEC("cgroup/sendmsg4")
int lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return xlate4(ctx, true);
}

SEC("cgroup/recvmsg4")
int lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return rev4(ctx);
}

SEC("cgroup/getpeername4")
int lb_getpeername4(struct bpf_sock_addr *ctx)
{
	return rev4(ctx);
}

SEC("cgroup/connect6")
int lb_connect6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx, false);
}

SEC("cgroup/sendmsg6")
int lb_sendmsg6(struct bpf_sock_addr *ctx)
{
	return xlate6(ctx, true);
}

SEC("cgroup/recvmsg6")
int lb_recvmsg6(struct bpf_sock_addr *ctx)
{
	return rev6(ctx);
}

SEC("cgroup/getpeername6")
int lb_getpeername6(struct bpf_sock_addr *ctx)
{
	return rev6(ctx);
}
