package netdev

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type netdev_value netdev netdev.bpf.c -- -I../headers
