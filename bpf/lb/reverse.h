/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The load balancer's reverse map, shared by lb.bpf.c, which writes it at
 * connect/sendmsg, and sockdestroy.bpf.c, which reads it to find the
 * sockets of a backend that left (user space loads sockdestroy with
 * lb_reverse replaced by lb's map).
 */
#ifndef KTEL_LB_REVERSE_H
#define KTEL_LB_REVERSE_H

struct rev_key {
	__u64 cookie;  /* socket cookie */
	__u32 addr[4]; /* backend, as in struct backend */
	__u16 port;
	__u8 family;
	__u8 _pad[5];
};

struct rev_val {
	__u32 addr[4]; /* VIP, as in struct svc_key */
	__u16 port;
	__u8 family;
	__u8 _pad;
};

/* When full, the least recently used entry is evicted: that socket's
 * getpeername (or UDP reply source) then shows the backend, not the VIP.
 * Cookies are never reused, so entries of closed sockets only age out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1);
	__type(key, struct rev_key);
	__type(value, struct rev_val);
} lb_reverse SEC(".maps");

#endif
