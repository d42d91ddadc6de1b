// Package floor holds empty syscall programs used by the benchmarks as the
// cost floor of attaching anything to raw_syscalls.
package floor

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel Floor floor.bpf.c -- -I../headers
