package syscall

//go:generate go tool bpf2go -cc $BPF_CLANG -cflags $BPF_CFLAGS -target bpfel -type start -type errors_key -type cgroup_key -type syscall_event syscall syscall.bpf.c -- -I../headers
//go:generate go run ./internal/gennames -cc $BPF_CLANG -o names_gen.go
