package lb

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type svc_key -type svc_val -type backend -type rev_key -type rev_val -type svc_stats -type member -type aff_key -type aff_val lb lb.bpf.c -- -I../headers
//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type gone_key sockdestroy sockdestroy.bpf.c -- -I../headers
