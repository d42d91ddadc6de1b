package tracing

import (
	"go.opentelemetry.io/otel/attribute"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/metrics"
)

// SyscallDecoder makes a span of a slow syscall, named after it, linked
// from its latency histogram.
func SyscallDecoder(name func(nr uint32) string) Decoder {
	return func(b []byte) (Span, error) {
		e, err := sysprobe.DecodeEvent(b)
		if err != nil {
			return Span{}, err
		}
		n := name(e.Nr)
		return Span{
			Name:    "syscall " + n,
			StartNs: e.StartNs,
			EndNs:   e.EndNs,
			Attrs: append(taskAttrs(e.Pid, e.Tid, e.Comm, e.ProcessComm),
				attribute.String("ktel.syscall.name", n),
				attribute.Int("ktel.syscall.number", int(e.Nr)),
				attribute.Int("ktel.syscall.return", int(e.Ret)),
			),
			Metric:      metrics.SyscallLatency,
			LabelValues: []string{n},
		}, nil
	}
}

// taskAttrs describe the task an event belongs to, in OpenTelemetry's
// semantic conventions. comm is the thread's name, pcomm its process's
// (the main thread's name: the executable's unless renamed, truncated to 15
// bytes by the kernel). Unknown values (0, "") are left out.
func taskAttrs(pid, tid uint32, comm, pcomm string) []attribute.KeyValue {
	attrs := []attribute.KeyValue{semconv.ThreadID(int(tid)), semconv.ThreadName(comm)}
	if pid != 0 {
		attrs = append(attrs, semconv.ProcessPID(int(pid)))
	}
	if pcomm != "" {
		attrs = append(attrs, semconv.ProcessExecutableName(pcomm))
	}
	return attrs
}
