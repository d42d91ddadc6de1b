//go:build ignore
// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Empty sys_enter/sys_exit programs: the cost floor of any syscall probe,
 * against which `make bench` compares the syscall probe.
 */
#include "vmlinux.h"
#include "bpf_helpers.h"
#include "bpf_tracing.h"

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
