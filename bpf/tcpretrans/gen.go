package tcpretrans

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type peer_key -type tcpretrans_event tcpretrans tcpretrans.bpf.c -- -I../headers
