//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * A UDP socket iterator that closes the connected UDP sockets the load
 * balancer (lb.bpf.c) sent to a backend that has since left the service:
 * without it they would keep sending to the old backend (the best-known
 * trap of socket-level load balancing, as Cilium's socket LB documents).
 * bpf_sock_destroy aborts such a socket: its next receive (or SO_ERROR)
 * gives ECONNABORTED and a send EDESTADDRREQ (it is no longer connected),
 * and a new socket is balanced afresh.
 *
 * A separate object from lb.bpf.c because bpf_sock_destroy needs Linux
 * 6.5: where it does not load, user space falls back to sock_diag's
 * SOCK_DESTROY and the load balancer itself is unaffected.
 *
 * User space fills lb_destroy with the (backend, VIP) pairs that went away,
 * then reads the iterator, which writes the cookie of each socket it
 * destroyed to its output.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "reverse.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10
#define TCP_ESTABLISHED 1 /* a connected UDP socket */
/* ::ffff:0:0/96, third word, in network order (bpfel only). */
#define V4MAPPED_WORD __builtin_bswap32(0xffff)

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* A backend that left the service at a VIP (UDP). */
struct gone_key {
	struct rev_val backend;
	struct rev_val vip;
};

/* Sized by user space; refilled before each run. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__type(key, struct gone_key);
	__type(value, __u8);
} lb_destroy SEC(".maps");

SEC("iter/udp")
int lb_udp_destroy(struct bpf_iter__udp *ctx)
{
	struct udp_sock *udp = ctx->udp_sk;
	struct sock_common *skc;
	struct gone_key gk = {};
	struct rev_key rk = {};
	struct rev_val *vip;
	struct sock *sk;
	__u64 cookie;

	if (!udp)
		return 0;
	sk = (struct sock *)udp;
	skc = &sk->__sk_common;
	if (skc->skc_state != TCP_ESTABLISHED)
		return 0; /* not connected: each sendmsg is balanced anew */
	if (skc->skc_family == AF_INET) {
		rk.addr[0] = skc->skc_daddr;
		rk.family = 4;
	} else if (skc->skc_family == AF_INET6) {
		rk.addr[0] = skc->skc_v6_daddr.in6_u.u6_addr32[0];
		rk.addr[1] = skc->skc_v6_daddr.in6_u.u6_addr32[1];
		rk.addr[2] = skc->skc_v6_daddr.in6_u.u6_addr32[2];
		rk.addr[3] = skc->skc_v6_daddr.in6_u.u6_addr32[3];
		rk.family = 6;
		if (rk.addr[0] == 0 && rk.addr[1] == 0 && rk.addr[2] == V4MAPPED_WORD) {
			rk.addr[0] = rk.addr[3];
			rk.addr[2] = rk.addr[3] = 0;
			rk.family = 4;
		}
	} else {
		return 0;
	}
	rk.port = skc->skc_dport;
	cookie = bpf_get_socket_cookie(sk);
	rk.cookie = cookie;
	/* Only sockets the load balancer connected, and to that VIP. */
	vip = bpf_map_lookup_elem(&lb_reverse, &rk);
	if (!vip)
		return 0;
	__builtin_memcpy(gk.backend.addr, rk.addr, sizeof(rk.addr));
	gk.backend.port = rk.port;
	gk.backend.family = rk.family;
	__builtin_memcpy(&gk.vip, vip, sizeof(gk.vip));
	gk.vip._pad = 0;
	if (!bpf_map_lookup_elem(&lb_destroy, &gk))
		return 0;
	if (bpf_sock_destroy(skc) == 0)
		bpf_seq_write(ctx->meta->seq, &cookie, sizeof(cookie));
	return 0;
}
