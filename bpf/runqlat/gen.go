package runqlat

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type runqlat_event runqlat runqlat.bpf.c -- -I../headers
