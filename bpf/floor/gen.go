// Package floor holds empty programs used by the benchmarks as the cost
// floor of attaching anything to the hooks the probes use.
package floor

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel Floor floor.bpf.c -- -I../headers
