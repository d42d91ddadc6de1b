// Package probe holds what the tracing probes (bpf/syscall, bpf/runqlat,
// bpf/tcpretrans) share, by concern:
//
//   - variant.go: a probe's variants (hook and storage), the candidates a
//     hook setting tries (tp_btf unless forced), loading the first that
//     the kernel takes, and attaching their programs;
//   - load.go: loading one variant with LoadAndAssign into the probe's
//     typed objects, detaching and closing what it loaded;
//   - hist.go: the latency histograms' slot bounds and per-CPU values;
//   - spans.go: outlier events (ring buffer, threshold, rate limit) and
//     their drops;
//   - maps.go: summing per-CPU maps, CPU counts, C strings in records;
//   - errors.go: "unsupported on this kernel" against "failed", and the
//     words and log attributes that explain a load error.
package probe
