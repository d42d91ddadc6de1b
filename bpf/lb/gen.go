package lb

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type svc_key -type svc_val -type backend -type rev_key -type rev_val -type svc_stats lb lb.bpf.c -- -I../headers
