/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Outlier events: a probe that sees an event above its threshold writes a
 * compact record into its ring buffer, where user space turns it into an
 * OTLP span. A per-CPU token bucket bounds the rate under storms; what it
 * refuses, and what finds the ring buffer full, is counted in
 * ktel_span_drops, never silently lost.
 *
 * Under the threshold the cost is one comparison (ktel_span_wanted).
 */
#pragma once

/* Events lasting at least this long become spans; ~0 disables them. */
volatile const __u64 ktel_span_threshold_ns = ~0ULL;
/* Credit, in ns, one event costs on one CPU: 1e9 * online CPUs / rate, so
 * that the CPUs together send at most rate events per second. 0: no limit. */
volatile const __u64 ktel_span_cost_ns = 0;
/* Most credit a CPU can save up: how large a burst it may send. User space
 * sets it to a second, or to one event's cost where that is more (a rate
 * below the number of CPUs), so that every CPU can send. */
volatile const __u64 ktel_span_burst_ns = 1000000000ULL;
/* The reader is woken only once this many bytes are pending; it also polls,
 * so that records below the mark wait at most one poll interval. */
volatile const __u64 ktel_span_wakeup_bytes = 16384;

enum ktel_span_drop {
	KTEL_SPAN_RATE_LIMITED = 0,
	KTEL_SPAN_RINGBUF_FULL = 1,
	KTEL_SPAN_DROP_REASONS,
};

struct ktel_token_bucket {
	__u64 credit;
	__u64 last;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ktel_token_bucket);
} ktel_span_limiter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KTEL_SPAN_DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} ktel_span_drops SEC(".maps");

/* Sized by user space: a page when spans are off. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} ktel_events SEC(".maps");

static __always_inline int ktel_span_wanted(__u64 duration)
{
	return duration >= ktel_span_threshold_ns;
}

static __always_inline void ktel_span_drop(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&ktel_span_drops, &reason);

	if (v)
		(*v)++;
}

/* ktel_span_allow takes one event's credit from this CPU's bucket; now is
 * the current time (bpf_ktime_get_ns), never an event's own timestamp. A now
 * before the bucket's last (a program that read the clock, then was
 * interrupted by one that used the bucket) earns no credit, and does not
 * move last back. */
static __always_inline int ktel_span_allow(__u64 now)
{
	struct ktel_token_bucket *b;
	__u32 zero = 0;
	__u64 credit;

	if (!ktel_span_cost_ns)
		return 1;
	b = bpf_map_lookup_elem(&ktel_span_limiter, &zero);
	if (!b)
		return 0;
	credit = b->credit;
	if (now > b->last) {
		credit += now - b->last;
		b->last = now;
	}
	if (credit > ktel_span_burst_ns)
		credit = ktel_span_burst_ns;
	if (credit < ktel_span_cost_ns) {
		b->credit = credit;
		ktel_span_drop(KTEL_SPAN_RATE_LIMITED);
		return 0;
	}
	b->credit = credit - ktel_span_cost_ns;
	return 1;
}

/* ktel_span_reserve returns room for a record, or NULL (counted). */
static __always_inline void *ktel_span_reserve(__u64 size)
{
	void *rec = bpf_ringbuf_reserve(&ktel_events, size, 0);

	if (!rec)
		ktel_span_drop(KTEL_SPAN_RINGBUF_FULL);
	return rec;
}

/* ktel_span_submit publishes a record, waking the reader only in batches. */
static __always_inline void ktel_span_submit(void *rec)
{
	__u64 pending = bpf_ringbuf_query(&ktel_events, BPF_RB_AVAIL_DATA);

	bpf_ringbuf_submit(rec, pending >= ktel_span_wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}
