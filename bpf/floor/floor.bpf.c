//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Empty programs: the cost floor of attaching anything to the hooks the
 * probes use, against which `make bench` compares the probes.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tp_btf/sys_enter")
int BPF_PROG(floor_enter_btf, struct pt_regs *regs, long id)
{
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(floor_exit_btf, struct pt_regs *regs, long ret)
{
	return 0;
}

/* The least a latency probe must do: read the clock on entry and on exit.
 * The difference is written where nothing reads it, so that neither read
 * is optimised away. */
__u64 floor_clock_start, floor_clock_sink;

SEC("tp_btf/sys_enter")
int BPF_PROG(floor_enter_clock, struct pt_regs *regs, long id)
{
	floor_clock_start = bpf_ktime_get_ns();
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(floor_exit_clock, struct pt_regs *regs, long ret)
{
	floor_clock_sink = bpf_ktime_get_ns() - floor_clock_start;
	return 0;
}

SEC("raw_tp/sys_enter")
int BPF_PROG(floor_enter_raw, struct pt_regs *regs, long id)
{
	return 0;
}

SEC("raw_tp/sys_exit")
int BPF_PROG(floor_exit_raw, struct pt_regs *regs, long ret)
{
	return 0;
}

/* Scheduler tracepoints: the floor of the runqlat probe. */
SEC("tp_btf/sched_wakeup")
int BPF_PROG(floor_wakeup_btf, struct task_struct *p)
{
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(floor_wakeup_new_btf, struct task_struct *p)
{
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(floor_switch_btf, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	return 0;
}
