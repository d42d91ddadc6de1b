//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Run-queue delay: how long a runnable task waits for a CPU, from the moment
 * it becomes runnable (woken, newly created, or preempted while still
 * runnable) until it is switched in. Aggregated per CPU into native-histogram
 * slots (ktel_hist.h); the CPU is the one the task ran on after the wait.
 *
 * Counted: waits after sched_wakeup and sched_wakeup_new, and after an
 * involuntary switch-out (preemption, or a yield) of a task that is still
 * runnable. Not counted: the idle task (pid 0), and waits that began before
 * the probe was attached.
 *
 * Flavours, loaded as sets by user space:
 *   tp_btf     BTF-enabled raw tracepoints (5.5+), either
 *              - reading the kernel's own run-queue delay accounting
 *                (sched_info, 5.14+) at switch-out only: the "sched_info"
 *                variant, below; or
 *              - with timestamps in task storage (5.11+) or in a hash;
 *   raw_tp     raw tracepoints, timestamps in a hash;
 *   tracepoint classic tracepoints, timestamps in a hash.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "ktel_hist.h"
#include "ktel_events.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TASK_RUNNING 0
/* Classic sched_switch reports a preempted task's state as TASK_REPORT_MAX
 * (0x100 since 4.14) whatever its real state: it is still runnable. */
#define TASK_REPORT_MAX 0x100

/* A long wait, for a span (ktel_events.h). Times are CLOCK_MONOTONIC. */
struct runqlat_event {
	__u64 start_ns;
	__u64 end_ns;
	__u32 pid; /* thread group id; 0 where the hook does not give it */
	__u32 tid;
	__u32 cpu;
	__u32 _pad;
	__u64 cgroup;   /* the task's cgroup v2 id; 0 where the hook does not give the task */
	char comm[16];  /* the thread's */
	char pcomm[16]; /* the process's: its main thread's */
};

/* Keeps the type in BTF for bpf2go -type. */
const struct runqlat_event *unused_runqlat_event __attribute__((unused));

enum drop_reason {
	DROP_START_FULL = 0, /* no room to store a start: that wait is not timed */
	DROP_CGROUP_FULL,    /* runqueue_latency_cgroup full: counted node-level */
	DROP_REASONS,
};

/* Set by user space: key the histogram by the waiting task's cgroup v2 id
 * (workload attribution) instead of keeping one per CPU. */
volatile const __u32 per_cgroup = 0;

/* Start of the current wait, per task; freed with the task. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} runqlat_start_task SEC(".maps");

/* Fallback keyed by pid. An entry is removed when its task is switched in;
 * one whose task was woken while running and then blocked stays until that
 * task's next wakeup overwrites it. When full, new waits are not timed and
 * are counted in runqlat_drops[DROP_START_FULL]. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u64);
} runqlat_start_hash SEC(".maps");

/* One histogram per CPU: ktel_slots counters then the sum in ns. The value
 * size depends on the schema and is set by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} runqueue_latency SEC(".maps");

/*
 * With per_cgroup: one histogram per cgroup v2 id, shared by all CPUs and
 * updated with atomic adds, so that its memory does not grow with the
 * number of CPUs. Entries are allocated as cgroups first wait (no
 * prealloc): 8*(ktel_slots+1) bytes of value (2,200 at schema 3) plus the
 * hash element, from the kernel's 4 KiB size class at schema 3 (8 KiB at
 * 4): at most 8 MiB (16 at schema 4) when all 2048 are in use, whatever
 * the CPU count (the kernel reports 4.5 MiB); a node of 110 pods has about
 * 330 cgroups with tasks (a container or two and a sandbox per pod, and
 * system units), 1.3 MiB at most (0.74 reported).
 * User space deletes the entries of cgroups idle for the label TTL. When
 * full, a new cgroup's waits go to runqueue_latency (exported as
 * unit="other") and are counted in runqlat_drops[DROP_CGROUP_FULL]. The
 * value size is set by user space.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 2048);
	__uint(key_size, sizeof(__u64));
	__uint(value_size, sizeof(__u64));
} runqueue_latency_cgroup SEC(".maps");

/* An all-zero histogram, to insert a cgroup's first one from. Never
 * written. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} runqlat_zero SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DROP_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} runqlat_drops SEC(".maps");

static __always_inline void count_drop(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&runqlat_drops, &reason);

	if (v)
		(*v)++;
}

/* task_cgroup is the cgroup v2 id of task (the inode number of its
 * directory), 0 if task is NULL. */
static __always_inline __u64 task_cgroup(struct task_struct *task)
{
	if (!task)
		return 0;
	return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

/* hist_add records wait v of task: in its cgroup's histogram with
 * per_cgroup, else (or when the cgroup map is full) in this CPU's. */
static __always_inline void hist_add(struct task_struct *task, __u64 v)
{
	__u32 zero = 0;
	__u64 *hist, *z, id;

	if (per_cgroup) {
		id = task_cgroup(task);
		hist = bpf_map_lookup_elem(&runqueue_latency_cgroup, &id);
		if (!hist) {
			z = bpf_map_lookup_elem(&runqlat_zero, &zero);
			if (z)
				bpf_map_update_elem(&runqueue_latency_cgroup, &id, z, BPF_NOEXIST);
			hist = bpf_map_lookup_elem(&runqueue_latency_cgroup, &id);
		}
		if (hist) {
			ktel_hist_add_atomic(hist, v);
			return;
		}
		count_drop(DROP_CGROUP_FULL);
	}
	hist = bpf_map_lookup_elem(&runqueue_latency, &zero);
	if (hist)
		ktel_hist_add(hist, v);
}

/* emit_event records a wait from start to end for a span; now is the
 * current time, for the rate limiter. */
static __always_inline void emit_event(__u64 now, __u64 start, __u64 end, __u32 pid, __u32 tid, const char *comm,
				       struct task_struct *task)
{
	struct runqlat_event *e;

	if (!ktel_span_allow(now))
		return;
	e = ktel_span_reserve(sizeof(*e));
	if (!e)
		return;
	e->start_ns = start;
	e->end_ns = end;
	e->pid = pid;
	e->tid = tid;
	e->cpu = bpf_get_smp_processor_id();
	e->_pad = 0;
	e->cgroup = task_cgroup(task);
	bpf_probe_read_kernel_str(e->comm, sizeof(e->comm), comm);
	e->pcomm[0] = 0;
	if (task)
		BPF_CORE_READ_STR_INTO(&e->pcomm, task, group_leader, comm);
	ktel_span_submit(e);
}

/* record ends the wait that began at start for the task switched in; task
 * is NULL where the hook does not give it (classic tracepoint). */
static __always_inline void record(__u64 start, __u32 pid, __u32 tid, const char *comm,
				   struct task_struct *task)
{
	__u64 now = bpf_ktime_get_ns();

	if (now < start)
		return;
	hist_add(task, now - start);
	if (ktel_span_wanted(now - start))
		emit_event(now, start, now, pid, tid, comm, task);
}

/* Kernels before 5.14 call the state field "state". */
struct task_struct___pre514 {
	long state;
} __attribute__((preserve_access_index));

/* task_state reads through a probe helper, for untrusted pointers (raw_tp). */
static __always_inline long task_state(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return BPF_CORE_READ(t, __state);
	return BPF_CORE_READ((struct task_struct___pre514 *)t, state);
}

/* task_state_btf loads directly, for BTF pointers (tp_btf): no helper call. */
static __always_inline long task_state_btf(struct task_struct *t)
{
	if (bpf_core_field_exists(t->__state))
		return t->__state;
	return ((struct task_struct___pre514 *)t)->state;
}

/* --- the kernel's sched_info (tp_btf, 5.14+) --- */

/*
 * The scheduler itself adds every wait of a task to
 * task->sched_info.run_delay (CONFIG_SCHED_INFO, unconditional since 5.14)
 * when the task is switched in, including the parts of a wait spent queued
 * on other CPUs before a migration. So a task's last wait is how much
 * run_delay grew between its two latest switch-outs, and one program at
 * switch-out times it: no wakeup programs, no clock reads, one task-storage
 * lookup per context switch. The wait is recorded when the task leaves the
 * CPU it got, on that CPU, rather than when it got it.
 */
struct delay_base {
	__u64 run_delay; /* run_delay at the task's previous switch-out */
	__u32 seen;      /* 0: storage just created */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct delay_base);
} runqlat_delay_task SEC(".maps");

/* on_cpu_for is how long prev has been on this CPU, from its switch-in
 * (sched_info.last_arrival) to now, both on this run queue's clock, which
 * is reached through the task's CFS run queue (CONFIG_FAIR_GROUP_SCHED; 0
 * without it). Only outliers pay for it. */
static __always_inline __u64 on_cpu_for(struct task_struct *prev)
{
	struct cfs_rq *cfs;
	struct rq *rq;
	__u64 clock, arrived = prev->sched_info.last_arrival;

	if (!bpf_core_field_exists(prev->se.cfs_rq) || !bpf_core_field_exists(struct cfs_rq, rq))
		return 0;
	cfs = prev->se.cfs_rq;
	if (!cfs)
		return 0;
	rq = cfs->rq;
	if (!rq)
		return 0;
	clock = rq->clock;
	return clock > arrived ? clock - arrived : 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch_btf_info, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	struct delay_base *b;
	__u64 delay, wait, ran, now;

	if (!prev->pid)
		return 0;
	delay = prev->sched_info.run_delay;
	b = bpf_task_storage_get(&runqlat_delay_task, prev, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!b) {
		count_drop(DROP_START_FULL);
		return 0;
	}
	if (b->seen) {
		wait = delay - b->run_delay;
	} else if (prev->sched_info.pcount == 1) {
		/* First run of the task: all its delay so far is this wait. */
		wait = delay;
	} else {
		/* Seen first after many runs: its last wait is not known. */
		b->run_delay = delay;
		b->seen = 1;
		return 0;
	}
	b->run_delay = delay;
	b->seen = 1;

	hist_add(prev, wait);
	if (!ktel_span_wanted(wait))
		return 0;
	/* The wait ended when the task got the CPU, on_cpu_for ago (or, where
	 * that is unknown, the span ends at the switch-out). */
	now = bpf_ktime_get_ns();
	ran = on_cpu_for(prev);
	if (ran + wait > now)
		ran = 0;
	emit_event(now, now - ran - wait, now - ran, prev->tgid, prev->pid, prev->comm, prev);
	return 0;
}

/* --- task storage (tp_btf) --- */

/*
 * The start-keeping variants below follow one rule. A task switched out
 * while runnable (preempted, or yielding) is queued from then: its start
 * is set. A wakeup sets it only if it has none: a task preempted after it
 * announced a sleep (state set, schedule() not yet reached) can be woken
 * while it waits on the run queue, and its wait began at the preemption.
 * A task switched out to sleep, or dead, has its start cleared: a wakeup
 * that found it still running (it then did not sleep) would otherwise
 * leave a start for its next wakeup, or for good once it exits.
 */
static __always_inline void enqueue_task(struct task_struct *t, bool keep)
{
	__u64 *ts;

	if (!t->pid)
		return;
	ts = bpf_task_storage_get(&runqlat_start_task, t, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!ts) {
		count_drop(DROP_START_FULL);
		return;
	}
	if (keep && *ts)
		return;
	*ts = bpf_ktime_get_ns();
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(sched_wakeup_btf_task, struct task_struct *p)
{
	enqueue_task(p, true);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(sched_wakeup_new_btf_task, struct task_struct *p)
{
	enqueue_task(p, true);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch_btf_task, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	__u64 *ts, start;

	if (preempt || task_state_btf(prev) == TASK_RUNNING) {
		enqueue_task(prev, false);
	} else if (prev->pid) {
		ts = bpf_task_storage_get(&runqlat_start_task, prev, 0, 0);
		if (ts)
			*ts = 0;
	}
	if (!next->pid)
		return 0;
	ts = bpf_task_storage_get(&runqlat_start_task, next, 0, 0);
	if (!ts || !*ts)
		return 0;
	start = *ts;
	*ts = 0;
	record(start, next->tgid, next->pid, next->comm, next);
	return 0;
}

/* --- hash keyed by pid (tp_btf, raw_tp, tracepoint) --- */

/* enqueue_pid sets pid's start (BPF_ANY), or only if it has none
 * (BPF_NOEXIST: a wakeup). */
static __always_inline void enqueue_pid(__u32 pid, __u64 flags)
{
	__u64 ts;
	long err;

	if (!pid)
		return;
	ts = bpf_ktime_get_ns();
	err = bpf_map_update_elem(&runqlat_start_hash, &pid, &ts, flags);
	if (err && err != -17 /* EEXIST: a wakeup of a queued task */)
		count_drop(DROP_START_FULL);
}

/* switch_out_pid applies the rule above to prev at a switch. */
static __always_inline void switch_out_pid(__u32 pid, bool runnable)
{
	if (runnable)
		enqueue_pid(pid, BPF_ANY);
	else if (pid)
		bpf_map_delete_elem(&runqlat_start_hash, &pid);
}

static __always_inline void switch_in_pid(__u32 pid, __u32 tgid, const char *comm, struct task_struct *task)
{
	__u64 *ts;

	if (!pid)
		return;
	ts = bpf_map_lookup_elem(&runqlat_start_hash, &pid);
	if (!ts)
		return;
	record(*ts, tgid, pid, comm, task);
	bpf_map_delete_elem(&runqlat_start_hash, &pid);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(sched_wakeup_btf_hash, struct task_struct *p)
{
	enqueue_pid(p->pid, BPF_NOEXIST);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(sched_wakeup_new_btf_hash, struct task_struct *p)
{
	enqueue_pid(p->pid, BPF_NOEXIST);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(sched_switch_btf_hash, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	switch_out_pid(prev->pid, preempt || task_state_btf(prev) == TASK_RUNNING);
	switch_in_pid(next->pid, next->tgid, next->comm, next);
	return 0;
}

SEC("raw_tp/sched_wakeup")
int BPF_PROG(sched_wakeup_raw_hash, struct task_struct *p)
{
	enqueue_pid(BPF_CORE_READ(p, pid), BPF_NOEXIST);
	return 0;
}

SEC("raw_tp/sched_wakeup_new")
int BPF_PROG(sched_wakeup_new_raw_hash, struct task_struct *p)
{
	enqueue_pid(BPF_CORE_READ(p, pid), BPF_NOEXIST);
	return 0;
}

SEC("raw_tp/sched_switch")
int BPF_PROG(sched_switch_raw_hash, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	switch_out_pid(BPF_CORE_READ(prev, pid), preempt || task_state(prev) == TASK_RUNNING);
	switch_in_pid(BPF_CORE_READ(next, pid), BPF_CORE_READ(next, tgid), next->comm, next);
	return 0;
}

SEC("tracepoint/sched/sched_wakeup")
int sched_wakeup_tp_hash(struct trace_event_raw_sched_wakeup_template *ctx)
{
	enqueue_pid(ctx->pid, BPF_NOEXIST);
	return 0;
}

SEC("tracepoint/sched/sched_wakeup_new")
int sched_wakeup_new_tp_hash(struct trace_event_raw_sched_wakeup_template *ctx)
{
	enqueue_pid(ctx->pid, BPF_NOEXIST);
	return 0;
}

SEC("tracepoint/sched/sched_switch")
int sched_switch_tp_hash(struct trace_event_raw_sched_switch *ctx)
{
	long state = ctx->prev_state;

	switch_out_pid(ctx->prev_pid, state == TASK_RUNNING || (state & TASK_REPORT_MAX));
	switch_in_pid(ctx->next_pid, 0, ctx->next_comm, NULL);
	return 0;
}
