//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Per-syscall latency: time from raw_syscalls:sys_enter to sys_exit on the
 * same thread, aggregated in the kernel into native-histogram slots.
 *
 * Three hook flavours share the same logic; user space loads one set:
 *   tp_btf     BTF-enabled raw tracepoint (5.5+), with the start time
 *              - in a per-CPU slot, moved to task storage (5.11+) when its
 *                thread is switched out inside the syscall (the "cpu"
 *                variant, below);
 *              - where task storage is missing (5.8-5.10), in a hash.
 *   raw_tp     raw tracepoint (4.17+), start time in a hash; only when
 *              forced (KTEL_SYSCALL_HOOK=raw_tp).
 *   tracepoint classic tracepoint, start time in a hash; only when forced.
 *
 * Every syscall is counted (syscall_count), exactly. Which are timed is the
 * timing mode's choice (syscall_timing, below), made on entry before the
 * clock is read: an untimed syscall costs a count and the mode's check on
 * entry, and on exit no clock read either.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "ktel_hist.h"
#include "ktel_events.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* Syscall numbers at or above this are ignored (x86_64 and arm64 both end
 * below 470). */
#define MAX_SYSCALLS 512

#define MAX_ERRNO 4095

struct start {
	__u64 ts; /* 0: no timed syscall in flight */
	__u32 nr;
	/* Per-CPU slot only: a syscall, timed or not, entered on this CPU and
	 * has neither returned nor been switched out. */
	__u32 inflight;
};

/* An outlier syscall, for a span (ktel_events.h). Times are CLOCK_MONOTONIC. */
struct syscall_event {
	__u64 start_ns;
	__u64 end_ns;
	__u32 pid; /* thread group id */
	__u32 tid;
	__u32 nr;
	__s32 ret;
	char comm[16];  /* the thread's */
	char pcomm[16]; /* the process's: its main thread's */
};

/* Keeps the type in BTF for bpf2go -type. */
const struct syscall_event *unused_syscall_event __attribute__((unused));

enum drop_reason {
	DROP_ERRORS_FULL = 0, /* syscall_errors had no room for a new key */
	DROP_START_FULL = 1,  /* no task storage for a switched-out start: not timed */
	DROP_CGROUP_FULL = 2, /* syscall_latency_cgroup full: timed node-level */
	DROP_REASONS,
};

/* Start of the syscall in flight, per thread. Freed by the kernel with the
 * task. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct start);
} syscall_start_task SEC(".maps");

/*
 * The syscall in flight on this CPU, for the "cpu" variant. A syscall that
 * returns without leaving the CPU (most of them) costs a per-CPU array
 * lookup, which the kernel inlines, instead of two task-storage lookups.
 *
 * A started slot always belongs to the thread running on its CPU: a thread
 * sets it on entry and clears it on exit, and if it is switched out between
 * the two, sched_switch moves the start into that thread's task storage and
 * clears the slot. So the exit path needs no thread id: a started slot is
 * its own syscall's; an empty one means the start is in task storage, or
 * was never seen (the syscall began before the probe was attached, or it
 * is a new thread's first return from fork or clone).
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct start);
} syscall_start_cpu SEC(".maps");

/* Fallback for kernels without task storage, keyed by thread id. LRU so that
 * entries of threads that died inside a syscall (exit_group, a kill) do not
 * fill it: when full, the least recently used start is evicted and that
 * syscall is not measured. Its fill is exported as ktel_bpf_map_entries. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct start);
} syscall_start_hash SEC(".maps");

/* Histogram per CPU and syscall number, at key cpu * MAX_SYSCALLS + nr:
 * ktel_slots counters, then the sum of latencies in nanoseconds. A plain
 * array with one value per CPU rather than a per-CPU map, because a plain
 * array can be mapped into user space's memory (BPF_F_MMAPABLE): a scrape
 * reads the seen syscalls' counters in place, without a syscall and without
 * copying the unseen ones. Each CPU writes only its own MAX_SYSCALLS values,
 * so CPUs share no cache line but at the border of two CPUs' ranges, where
 * syscall 511 (never used) meets syscall 0. The value size (schema) and the
 * number of entries (possible CPUs x MAX_SYSCALLS) are set by user space at
 * load time, hence no BTF value type. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, MAX_SYSCALLS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} syscall_latency SEC(".maps");

/* A container's (cgroup's) syscall, in syscall_latency_cgroup. */
struct cgroup_key {
	__u64 cgroup; /* cgroup v2 id of the calling thread */
	__u32 nr;
	__u32 _pad;
};

/*
 * Per container (KTEL_SYSCALL_PER_CONTAINER): the histograms of the timed
 * syscalls by cgroup v2 id of the calling thread and syscall number,
 * written by the exit programs of the "_cg" variants only (the default
 * ones never touch it, and user space does not create it then). Shared by
 * all CPUs and updated with atomic adds, so that its memory does not grow
 * with the number of CPUs; entries are allocated as a cgroup first makes
 * a timed syscall of a kind (no prealloc): 8*(ktel_slots+1) bytes of value
 * (2,200 at schema 3) plus the hash element, from the kernel's 4 KiB size
 * class at schema 3 (8 KiB at 4): at most 8 MiB (16 at schema 4) with all
 * 2048 in use, whatever the CPU count. User space deletes the entries idle
 * for the label TTL. When full, a new (cgroup, syscall)'s timed calls go
 * to syscall_latency (exported as unit="other") and are counted in
 * syscall_drops[DROP_CGROUP_FULL]. The value size is set by user space.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2048);
	__type(key, struct cgroup_key);
	__uint(value_size, sizeof(__u64));
} syscall_latency_cgroup SEC(".maps");

/* An all-zero histogram, to insert a (cgroup, syscall)'s first one from:
 * it is larger than the stack. Never written. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} syscall_zero SEC(".maps");

struct errors_key {
	__u32 nr;
	__u32 err;
};

/* Failed syscalls by (number, errno). Touched only on the error path. When
 * full, new keys are counted in syscall_drops[DROP_ERRORS_FULL]. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct errors_key);
	__type(value, __u64);
} syscall_errors SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} syscall_drops SEC(".maps");

/* Syscall numbers seen since load, written once per number, so that a
 * scrape reads the histograms of these only: syscall_latency holds
 * MAX_SYSCALLS x CPUs x slots counters (2.2 MiB with 2 CPUs at schema 3). */
__u8 syscall_seen[MAX_SYSCALLS];

/* Every syscall entered, timed or not, at key cpu * MAX_SYSCALLS + nr; laid
 * out, sized and read as syscall_latency is. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, MAX_SYSCALLS);
	__type(key, __u32);
	__type(value, __u64);
} syscall_count SEC(".maps");

/*
 * Timing modes: which syscalls are timed (ktel_syscall_latency_seconds and
 * spans). Set by user space before load; the verifier knows the constant and
 * drops the other modes' code, so a mode costs only its own check.
 */
enum timing {
	TIMING_ALL = 0,    /* every syscall */
	TIMING_SAMPLE = 1, /* about 1 in syscall_sample_rate, per CPU */
	TIMING_LIST = 2,   /* the syscalls marked in syscall_timed */
	TIMING_CGROUP = 3, /* syscalls of threads in a cgroup of syscall_cgroups */
};

volatile const __u32 syscall_timing = TIMING_ALL;
volatile const __u32 syscall_sample_rate = 1;
volatile const __u8 syscall_timed[MAX_SYSCALLS];

/* Syscalls until the next timed one on this CPU (TIMING_SAMPLE). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} syscall_sample_skip SEC(".maps");

/* Cgroup v2 ids whose threads' syscalls are timed (TIMING_CGROUP), filled
 * by user space at load. A thread counts by the cgroup it is directly in,
 * not by that cgroup's ancestors. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u8);
} syscall_cgroups SEC(".maps");

/*
 * count_and_pick counts syscall id (0 <= id < MAX_SYSCALLS) on this CPU and
 * tells whether to time it. Nothing here reads the clock.
 *
 * Sampling skips a random number of syscalls between two timed ones,
 * uniform in 0..2(N-1), so 1 in N on average: a fixed stride of N would
 * alias with a workload that repeats a cycle of syscalls whose length
 * divides N (timing, say, only the reads of a read-write loop). The random
 * number is drawn once per timed syscall. Each syscall is timed with the
 * same probability whatever its kind, so the histograms are an unbiased
 * sample of each syscall's latency, with relative errors that grow for rare
 * syscalls; the exact counts come from syscall_count.
 */
static __always_inline bool count_and_pick(long id)
{
	__u32 key = bpf_get_smp_processor_id() * MAX_SYSCALLS + (id & (MAX_SYSCALLS - 1));
	__u64 *n = bpf_map_lookup_elem(&syscall_count, &key);

	if (n)
		(*n)++; /* this CPU's own counter: no atomic needed */
	if (!syscall_seen[id & (MAX_SYSCALLS - 1)])
		syscall_seen[id & (MAX_SYSCALLS - 1)] = 1;

	if (syscall_timing == TIMING_SAMPLE) {
		__u32 zero = 0;
		__u64 *skip = bpf_map_lookup_elem(&syscall_sample_skip, &zero);

		if (!skip)
			return false;
		if (*skip) {
			(*skip)--;
			return false;
		}
		if (syscall_sample_rate > 1)
			*skip = bpf_get_prandom_u32() % (2 * syscall_sample_rate - 1);
		return true;
	}
	if (syscall_timing == TIMING_LIST)
		return syscall_timed[id & (MAX_SYSCALLS - 1)];
	if (syscall_timing == TIMING_CGROUP) {
		__u64 cg = bpf_get_current_cgroup_id();

		return bpf_map_lookup_elem(&syscall_cgroups, &cg) != NULL;
	}
	return true;
}

/* The syscall number at sys_exit, for the error count of an untimed
 * syscall: the tracepoint passes only the return value. Read from the
 * registers on the error path only. pt_regs differs by architecture. */
struct pt_regs___x86 {
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

struct pt_regs___arm64 {
	int syscallno;
} __attribute__((preserve_access_index));

static __always_inline long regs_nr(struct pt_regs *regs)
{
	if (bpf_core_field_exists(struct pt_regs___x86, orig_ax))
		return BPF_CORE_READ((struct pt_regs___x86 *)regs, orig_ax);
	if (bpf_core_field_exists(struct pt_regs___arm64, syscallno))
		return BPF_CORE_READ((struct pt_regs___arm64 *)regs, syscallno);
	return -1;
}


static __always_inline void count_drop(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&syscall_drops, &reason);

	if (v)
		(*v)++;
}

static __always_inline void record_error(__u32 nr, long ret)
{
	struct errors_key key = { .nr = nr, .err = (__u32)-ret };
	__u64 one = 1, *v;
	long err;

	v = bpf_map_lookup_elem(&syscall_errors, &key);
	if (v) {
		(*v)++;
		return;
	}
	err = bpf_map_update_elem(&syscall_errors, &key, &one, BPF_NOEXIST);
	if (err == -17 /* EEXIST: another CPU inserted it first */) {
		v = bpf_map_lookup_elem(&syscall_errors, &key);
		if (v)
			(*v)++;
	} else if (err) {
		count_drop(DROP_ERRORS_FULL);
	}
}

static __always_inline void emit_event(__u32 nr, __u64 start, __u64 end, long ret)
{
	struct syscall_event *e;
	struct task_struct *task;
	__u64 id;

	if (!ktel_span_allow(end))
		return;
	e = ktel_span_reserve(sizeof(*e));
	if (!e)
		return;
	id = bpf_get_current_pid_tgid();
	e->start_ns = start;
	e->end_ns = end;
	e->pid = id >> 32;
	e->tid = (__u32)id;
	e->nr = nr;
	e->ret = ret;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	task = (struct task_struct *)bpf_get_current_task();
	BPF_CORE_READ_STR_INTO(&e->pcomm, task, group_leader, comm);
	ktel_span_submit(e);
}

static __always_inline bool is_error(long ret)
{
	return ret < 0 && ret >= -MAX_ERRNO;
}

/* untimed counts the failure of a syscall that was not timed. */
static __always_inline void untimed(long nr, long ret)
{
	if (nr >= 0 && nr < MAX_SYSCALLS)
		record_error(nr, ret);
}

/* record_cgroup adds delta to the calling thread's cgroup's histogram of
 * syscall nr, and returns false if syscall_latency_cgroup has no room for
 * it. */
static __always_inline bool record_cgroup(__u32 nr, __u64 delta)
{
	struct cgroup_key key = { .cgroup = bpf_get_current_cgroup_id(), .nr = nr };
	__u32 zero = 0;
	__u64 *hist, *z;

	hist = bpf_map_lookup_elem(&syscall_latency_cgroup, &key);
	if (!hist) {
		z = bpf_map_lookup_elem(&syscall_zero, &zero);
		if (z)
			bpf_map_update_elem(&syscall_latency_cgroup, &key, z, BPF_NOEXIST);
		hist = bpf_map_lookup_elem(&syscall_latency_cgroup, &key);
	}
	if (!hist) {
		count_drop(DROP_CGROUP_FULL);
		return false;
	}
	ktel_hist_add_atomic(hist, delta);
	return true;
}

/* record sorts a timed syscall into its histogram: this CPU's, or with cg
 * (the per-container programs, a constant) its cgroup's. */
static __always_inline void record(__u32 nr, __u64 start, __u64 end, long ret, bool cg)
{
	__u64 delta = end - start;

	if (!cg || !record_cgroup(nr, delta)) {
		__u32 key = bpf_get_smp_processor_id() * MAX_SYSCALLS + (nr & (MAX_SYSCALLS - 1));
		__u64 *hist = bpf_map_lookup_elem(&syscall_latency, &key);

		if (!hist)
			return;
		ktel_hist_add(hist, delta);
	}
	if (ktel_span_wanted(delta))
		emit_event(nr, start, end, ret);

	if (is_error(ret))
		record_error(nr, ret);
}

static __always_inline void enter(struct start *s, long id)
{
	s->nr = (__u32)id;
	s->ts = bpf_ktime_get_ns();
}

/* finish measures the syscall that s started; ts is cleared so that an exit
 * without a matching enter (a syscall that began before attach) is skipped. */
static __always_inline void finish(struct start *s, long ret, bool cg)
{
	__u64 ts = s->ts;

	if (!ts)
		return;
	s->ts = 0;
	record(s->nr, ts, bpf_ktime_get_ns(), ret, cg);
}

/* The syscalls that never return (exit, exit_group), numbered by user
 * space for the architecture. A thread ends in one: the hash variant, whose
 * entries outlive their threads, does not keep a start for them (the LRU
 * would fill with dead threads' starts and evict live ones, and a new
 * thread reusing the tid would inherit one). Task storage goes with its
 * task and needs no such care. */
volatile const __u32 syscall_nr_exit = ~0U;
volatile const __u32 syscall_nr_exit_group = ~0U;

static __always_inline int enter_hash(long id)
{
	__u32 tid;
	struct start s = {};

	if (id < 0 || id >= MAX_SYSCALLS)
		return 0;
	if (!count_and_pick(id) || id == syscall_nr_exit || id == syscall_nr_exit_group)
		return 0;
	tid = (__u32)bpf_get_current_pid_tgid();
	enter(&s, id);
	bpf_map_update_elem(&syscall_start_hash, &tid, &s, BPF_ANY);
	return 0;
}

/* exit_hash: the exiting syscall's number is read from regs, or is tp_nr
 * when regs is NULL (classic tracepoint). An untimed syscall's entry leaves
 * the thread's entry alone, so a start whose exit was missed could linger:
 * it is finished only by the exit of the syscall it started, and dropped
 * at any other. A number of -1 (rt_sigreturn on x86 resets it) matches
 * any start. */
static __always_inline int exit_hash(struct pt_regs *regs, long tp_nr, long ret, bool cg)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	long nr = regs ? regs_nr(regs) : tp_nr;
	struct start *s;

	s = bpf_map_lookup_elem(&syscall_start_hash, &tid);
	if (s && (nr < 0 || s->nr == (__u32)nr)) {
		finish(s, ret, cg);
		bpf_map_delete_elem(&syscall_start_hash, &tid);
		return 0;
	}
	if (s) /* stale: its syscall's exit was missed */
		bpf_map_delete_elem(&syscall_start_hash, &tid);
	if (is_error(ret))
		untimed(nr, ret);
	return 0;
}

static __always_inline int exit_task(struct pt_regs *regs, long ret, bool cg)
{
	struct start *s;

	s = bpf_task_storage_get(&syscall_start_task, bpf_get_current_task_btf(), 0, 0);
	if (s && s->ts)
		finish(s, ret, cg);
	else if (is_error(ret))
		untimed(regs_nr(regs), ret);
	return 0;
}

/* --- per-CPU slot, spilled to task storage on switch-out (tp_btf) --- */

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_btf_cpu, struct pt_regs *regs, long id)
{
	__u32 zero = 0;
	struct start *c;

	if (id < 0 || id >= MAX_SYSCALLS)
		return 0;
	c = bpf_map_lookup_elem(&syscall_start_cpu, &zero);
	if (!c)
		return 0;
	c->inflight = 1;
	if (count_and_pick(id)) {
		enter(c, id);
	} else {
		c->nr = id;
		c->ts = 0;
	}
	return 0;
}

static __always_inline int exit_cpu(struct pt_regs *regs, long ret, bool cg)
{
	__u32 zero = 0;
	struct start *c;

	c = bpf_map_lookup_elem(&syscall_start_cpu, &zero);
	if (!c)
		return 0;
	if (c->inflight) {
		c->inflight = 0;
		if (c->ts)
			finish(c, ret, cg);
		else if (is_error(ret))
			untimed(c->nr, ret);
		return 0;
	}
	/* Switched out since its entry: a timed start is in task storage. */
	return exit_task(regs, ret, cg);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit_btf_cpu, struct pt_regs *regs, long ret)
{
	return exit_cpu(regs, ret, false);
}

/* The per-container exit programs: each variant's, with cg set. Their
 * enter programs are the variant's own. */
SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit_btf_cpu_cg, struct pt_regs *regs, long ret)
{
	return exit_cpu(regs, ret, true);
}

/* syscall_switch_btf_cpu moves the start of the syscall in flight on this
 * CPU, if any, which is prev's, into prev's task storage. */
SEC("tp_btf/sched_switch")
int BPF_PROG(syscall_switch_btf_cpu, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u32 zero = 0;
	struct start *c, *s;

	c = bpf_map_lookup_elem(&syscall_start_cpu, &zero);
	if (!c || !c->inflight)
		return 0;
	c->inflight = 0;
	if (!c->ts)
		return 0; /* untimed: exit_task reads its number from regs */
	s = bpf_task_storage_get(&syscall_start_task, prev, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (s) {
		s->ts = c->ts;
		s->nr = c->nr;
	} else {
		count_drop(DROP_START_FULL);
	}
	c->ts = 0;
	return 0;
}

/* --- hash keyed by thread id --- */

SEC("tp_btf/sys_enter")
int BPF_PROG(sys_enter_btf_hash, struct pt_regs *regs, long id)
{
	return enter_hash(id);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit_btf_hash, struct pt_regs *regs, long ret)
{
	return exit_hash(regs, -1, ret, false);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(sys_exit_btf_hash_cg, struct pt_regs *regs, long ret)
{
	return exit_hash(regs, -1, ret, true);
}

SEC("raw_tp/sys_enter")
int BPF_PROG(sys_enter_raw_hash, struct pt_regs *regs, long id)
{
	return enter_hash(id);
}

SEC("raw_tp/sys_exit")
int BPF_PROG(sys_exit_raw_hash, struct pt_regs *regs, long ret)
{
	return exit_hash(regs, -1, ret, false);
}

SEC("raw_tp/sys_exit")
int BPF_PROG(sys_exit_raw_hash_cg, struct pt_regs *regs, long ret)
{
	return exit_hash(regs, -1, ret, true);
}

SEC("tracepoint/raw_syscalls/sys_enter")
int sys_enter_tp_hash(struct trace_event_raw_sys_enter *ctx)
{
	return enter_hash(ctx->id);
}

SEC("tracepoint/raw_syscalls/sys_exit")
int sys_exit_tp_hash(struct trace_event_raw_sys_exit *ctx)
{
	return exit_hash(NULL, ctx->id, ctx->ret, false);
}

SEC("tracepoint/raw_syscalls/sys_exit")
int sys_exit_tp_hash_cg(struct trace_event_raw_sys_exit *ctx)
{
	return exit_hash(NULL, ctx->id, ctx->ret, true);
}
