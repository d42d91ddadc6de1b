package tracing

import (
	"go.opentelemetry.io/otel/attribute"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	"github.com/ktel-dev/ktel/metrics"
)

// RunqlatDecoder makes a span of a long run-queue wait, linked from the
// run-queue histogram (its workload's series with workload attribution).
func RunqlatDecoder(b []byte) (Span, error) {
	e, err := runqlat.DecodeEvent(b)
	if err != nil {
		return Span{}, err
	}
	return Span{
		Name:    "runqueue wait",
		StartNs: e.StartNs,
		EndNs:   e.EndNs,
		Attrs:   append(taskAttrs(e.Pid, e.Tid, e.Comm, e.ProcessComm), attribute.Int("cpu.logical_number", int(e.CPU))),
		Metric:  metrics.RunqueueLatency,
		Cgroup:  e.Cgroup,
		// The histogram is per workload whenever attribution is on.
		ByWorkload: true,
	}, nil
}
