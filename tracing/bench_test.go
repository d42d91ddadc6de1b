package tracing

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"golang.org/x/sys/unix"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
	"github.com/ktel-dev/ktel/metrics"
)

// countingExporter accepts everything and counts it: the cost of the OTLP
// exporter itself (serialization, network) is the collector's side of the
// throughput and is left out.
type countingExporter struct{ n atomic.Int64 }

func (c *countingExporter) ExportSpans(_ context.Context, s []sdktrace.ReadOnlySpan) error {
	c.n.Add(int64(len(s)))
	return nil
}
func (c *countingExporter) Shutdown(context.Context) error { return nil }

// BenchmarkDecodeAndEmit is the user-space cost of one record: decode,
// clock conversion, span creation, exemplar, queueing.
func BenchmarkDecodeAndEmit(b *testing.B) {
	exp := &countingExporter{}
	p := newPipeline(exp, resource.Empty(), Options{QueueSize: 1 << 16}, metrics.NewExemplars(), discard())
	defer p.Close(context.Background())
	dec := SyscallDecoder(sysprobe.NativeName)
	tr := p.provider.Tracer("syscall")
	rec := record(1e9, 1e9+2e8, 1, 2, 230, 0, "worker", "app")
	b.ReportAllocs()
	for b.Loop() {
		s, err := dec(rec)
		if err != nil {
			b.Fatal(err)
		}
		p.emit(tr, s)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "spans/s")
}

// TestKernelStormThroughput (privileged; run with -v to see the figures)
// measures spans per second from the kernel's ring buffer through to the
// exporter under a storm of getpid calls with the rate limit lifted, and
// checks that nothing is lost silently: every event is exported or counted
// as dropped.
func TestKernelStormThroughput(t *testing.T) {
	testenv.Privileged(t)
	p, err := sysprobe.Load(sysprobe.Options{Schema: 3, Spans: probe.SpanOptions{Threshold: 1, RingSize: 16 << 20}}, discard())
	if err != nil {
		t.Fatalf("%+v", err)
	}
	defer p.Close()
	exp := &countingExporter{}
	pl := newPipeline(exp, resource.Empty(), Options{QueueSize: 1 << 16, Batch: 4096, Interval: 100 * time.Millisecond}, metrics.NewExemplars(), discard())
	if err := pl.Add("syscall", p.Events(), SyscallDecoder(sysprobe.NativeName)); err != nil {
		t.Fatal(err)
	}

	// Every syscall on the host is an event at a 1 ns threshold, the
	// reader's own included: the figure is the pipeline's saturation rate.
	const storm = 2 * time.Second
	start := time.Now()
	var calls int
	for time.Since(start) < storm {
		for range 1000 {
			unix.Getpid()
		}
		calls += 1000
	}
	// Close reads what the ring buffer still holds, for up to a second.
	if err := pl.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	elapsed := time.Since(start)
	s, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	exported := exp.n.Load()
	c := pl.Counts()["syscall"]
	t.Logf("%d getpid calls in %v; %d spans exported (%.0f spans/s), kernel dropped %d (ring full), queue dropped %d",
		calls, storm, exported, float64(exported)/elapsed.Seconds(), s.SpanDrops.RingbufFull, c.QueueFull)
	// Every getpid is an event (threshold 1 ns): exported, counted as
	// dropped, or still in the ring when the final drain gave up.
	left := int64(rdAvailable(p) / (sysprobe.EventSize + 8)) // 8-byte record headers
	if accounted := exported + int64(s.SpanDrops.RingbufFull+c.QueueFull) + left; accounted < int64(calls) {
		t.Errorf("%d events accounted for (exported, dropped or left), fewer than the %d getpid calls", accounted, calls)
	}
}

// rdAvailable is how many bytes of records the probe's ring buffer holds.
func rdAvailable(p *sysprobe.Probe) int {
	rd, err := ringbuf.NewReader(p.Events())
	if err != nil {
		return 0
	}
	defer rd.Close()
	return rd.AvailableBytes()
}
