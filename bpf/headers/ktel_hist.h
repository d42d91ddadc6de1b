/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Latency histogram slots whose boundaries are exactly those of a Prometheus
 * native histogram (see internal/histogram). User space computes the bucket
 * upper bounds in nanoseconds, floor(1e9 * 2^(i/2^schema)), exactly, and
 * writes them into ktel_bounds before loading; the kernel only searches that
 * sorted table. Because observed values are integral nanoseconds, "ns <=
 * floor(bound)" is equivalent to "seconds <= bound": the conversion to native
 * buckets is lossless.
 */
#pragma once

/* Size of the bounds table; a power of two so that the binary search below
 * is a fixed number of steps. Unused tail entries hold ~0ULL. */
#define KTEL_MAX_BOUNDS 1024

volatile const __u64 ktel_bounds[KTEL_MAX_BOUNDS];
/* Number of slots: one per bound (the first is the zero bucket) plus one for
 * values above the last bound. */
volatile const __u32 ktel_slots = 1;

/*
 * ktel_slot returns the index of the first bound >= v, in 10 comparisons
 * whatever the schema. Because ktel_bounds[KTEL_MAX_BOUNDS-1] is ~0ULL the
 * result is < ktel_slots.
 */
static __always_inline __u32 ktel_slot(__u64 v)
{
	__u32 k = 0;

#pragma unroll
	for (__u32 step = KTEL_MAX_BOUNDS / 2; step > 0; step >>= 1) {
		if (ktel_bounds[k + step - 1] < v)
			k += step;
	}
	/* Redundant for a well-formed table; keeps the verifier (and a bad
	 * table) inside the value. */
	if (k >= ktel_slots)
		k = ktel_slots - 1;
	return k;
}

/*
 * ktel_hist_add records v in a histogram value laid out as ktel_slots
 * counters followed by their sum. The value must be 8*(ktel_slots+1) bytes,
 * which user space sets as the map's value size.
 */
static __always_inline void ktel_hist_add(__u64 *hist, __u64 v)
{
	hist[ktel_slot(v)]++;
	hist[ktel_slots] += v;
}

/* ktel_hist_add_atomic is ktel_hist_add for a value shared by CPUs. */
static __always_inline void ktel_hist_add_atomic(__u64 *hist, __u64 v)
{
	__sync_fetch_and_add(&hist[ktel_slot(v)], 1);
	__sync_fetch_and_add(&hist[ktel_slots], v);
}
