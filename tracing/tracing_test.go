package tracing

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/k8smeta"
	"github.com/ktel-dev/ktel/metrics"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestClock(t *testing.T) {
	c := NewClock(time.Hour)
	mono := int64(1_000_000_000)
	c.mono = func() int64 { mono += 10; return mono } // each read advances 10 ns
	c.wall = func() int64 { return 1_700_000_000_000_000_000 }
	got := c.Wall(2_000_000_000)
	// After one read of each clock to decide, wall was read between monos
	// m1 and m1+10: offset = wall - (m1+5).
	want := time.Unix(0, 1_700_000_000_000_000_000+(2_000_000_000-1_000_000_025))
	if !got.Equal(want) {
		t.Errorf("Wall = %v, want %v", got, want)
	}
	// A suspend: the monotonic clock stood still while the wall clock went
	// on for two hours; the next conversion measures again.
	c.wall = func() int64 { return 1_700_000_000_000_000_000 + int64(2*time.Hour) }
	if got := c.Wall(2_000_000_000); got.Sub(want.Add(2*time.Hour)).Abs() > time.Microsecond {
		t.Errorf("after a suspend: Wall = %v, want %v", got, want.Add(2*time.Hour))
	}
	// Real clocks: a timestamp taken now converts to now.
	c = NewClock(time.Hour)
	if d := time.Since(c.Wall(uint64(monotonicNow()))); d < 0 || d > 100*time.Millisecond {
		t.Errorf("now converts %v away from now", d)
	}
}

func TestEnabledAndProtocol(t *testing.T) {
	env := func(kv map[string]string) func(string) string { return func(k string) string { return kv[k] } }
	for _, tc := range []struct {
		env     map[string]string
		enabled bool
		proto   string
	}{
		{nil, false, "http/protobuf"},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, true, "http/protobuf"},
		{map[string]string{"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, true, "grpc"},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_SDK_DISABLED": "true"}, false, "http/protobuf"},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_TRACES_EXPORTER": "none"}, false, "http/protobuf"},
		{map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, false, "http/protobuf"},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_TRACES_EXPORTER": "console"}, false, "http/protobuf"},
		{map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_TRACES_EXPORTER": "console, otlp"}, true, "http/protobuf"},
	} {
		if got := Enabled(env(tc.env)); got != tc.enabled {
			t.Errorf("Enabled(%v) = %v", tc.env, got)
		}
		if got, err := Protocol(env(tc.env)); err != nil || got != tc.proto {
			t.Errorf("Protocol(%v) = %q, %v", tc.env, got, err)
		}
	}
	if _, err := Protocol(env(map[string]string{"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})); err == nil {
		t.Error("http/json accepted")
	}
	if _, err := Protocol(env(map[string]string{"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})); err == nil || !strings.Contains(err.Error(), "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
		t.Errorf("error does not name the variable set: %v", err)
	}
}

// record builds a syscall ring-buffer record as the kernel writes it.
func record(start, end uint64, pid, tid, nr uint32, ret int32, comm, pcomm string) []byte {
	b := make([]byte, sysprobe.EventSize)
	binary.NativeEndian.PutUint64(b[0:], start)
	binary.NativeEndian.PutUint64(b[8:], end)
	binary.NativeEndian.PutUint32(b[16:], pid)
	binary.NativeEndian.PutUint32(b[20:], tid)
	binary.NativeEndian.PutUint32(b[24:], nr)
	binary.NativeEndian.PutUint32(b[28:], uint32(ret))
	copy(b[32:48], comm)
	copy(b[48:64], pcomm)
	return b
}

func TestSyscallDecoder(t *testing.T) {
	dec := SyscallDecoder(func(nr uint32) string { return sysprobe.Name("amd64", nr) })
	s, err := dec(record(100, 200_000_100, 42, 43, 230, 0, "worker", "myapp"))
	if err != nil {
		t.Fatal(err)
	}
	if s.Name != "syscall clock_nanosleep" || s.StartNs != 100 || s.EndNs != 200_000_100 {
		t.Errorf("span %+v", s)
	}
	want := map[attribute.Key]attribute.Value{
		"process.pid": attribute.IntValue(42), "thread.id": attribute.IntValue(43),
		"thread.name": attribute.StringValue("worker"), "process.executable.name": attribute.StringValue("myapp"),
		"ktel.syscall.name": attribute.StringValue("clock_nanosleep"), "ktel.syscall.return": attribute.IntValue(0),
	}
	got := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attrs {
		got[kv.Key] = kv.Value
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k].Emit(), v.Emit())
		}
	}
	if s.Metric != metrics.SyscallLatency || len(s.LabelValues) != 1 || s.LabelValues[0] != "clock_nanosleep" {
		t.Errorf("exemplar target %q %v", s.Metric, s.LabelValues)
	}
	if _, err := dec([]byte{1, 2}); err == nil {
		t.Error("short record accepted")
	}
}

// fakeExporter fails while fail is set and records what it exported.
type fakeExporter struct {
	mu      sync.Mutex
	fail    bool
	got     int
	block   chan struct{}
	entered chan struct{} // receives when an export starts, if not nil (buffered)
}

func (f *fakeExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	if f.entered != nil {
		select {
		case f.entered <- struct{}{}:
		default:
		}
	}
	if f.block != nil {
		<-f.block
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail {
		return errors.New("collector down")
	}
	f.got += len(spans)
	return nil
}
func (f *fakeExporter) Shutdown(context.Context) error { return nil }

func emitN(p *Pipeline, n int) {
	tr := p.provider.Tracer("syscall")
	for range n {
		p.emit(tr, Span{Name: "syscall read", StartNs: 1, EndNs: 2})
	}
}

func TestExporterAccounting(t *testing.T) {
	f := &fakeExporter{block: make(chan struct{})}
	p := newPipeline(f, resource.Empty(), Options{QueueSize: 10, Batch: 5, Interval: 10 * time.Millisecond}, metrics.NewExemplars(), discard())
	// The exporter is stuck on its first batch: the queue fills, the rest
	// is dropped and counted, memory stays bounded. enqueue counts a span
	// it drops before it returns, so the count is final once emitN is.
	emitN(p, 100)
	c := p.Counts()["syscall"]
	if c.QueueFull < 100-10-5 || c.QueueFull > 100-10 {
		t.Errorf("queue_full %d, want about 85..90 (queue 10, batch 5 in flight)", c.QueueFull)
	}
	// Collector down: exports fail and are counted.
	f.mu.Lock()
	f.fail = true
	f.mu.Unlock()
	close(f.block)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if c = p.Counts()["syscall"]; c.ExportFailed+c.QueueFull == 100 {
			break
		}
	}
	if c.ExportFailed+c.QueueFull != 100 || c.Exported != 0 {
		t.Errorf("counts %+v, want failed + queue_full = 100", c)
	}
	// Back up: spans flow again.
	f.mu.Lock()
	f.fail = false
	f.mu.Unlock()
	emitN(p, 7)
	if err := p.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if c = p.Counts()["syscall"]; c.Exported != 7 || f.got != 7 {
		t.Errorf("after recovery: %+v, exporter got %d, want 7", c, f.got)
	}
}

func TestExemplarFromSpan(t *testing.T) {
	ex := metrics.NewExemplars()
	f := &fakeExporter{}
	p := newPipeline(f, resource.Empty(), Options{}, ex, discard())
	defer p.Close(context.Background())
	p.emit(p.provider.Tracer("syscall"), Span{Name: "syscall read", StartNs: 0, EndNs: 3e8,
		Metric: metrics.SyscallLatency, LabelValues: []string{"read"}})
	got := ex.Lookup(metrics.SyscallLatency, []string{"read"})
	e, ok := got[0.5] // 300 ms is in the le=0.5 classic bucket
	if !ok || len(e.TraceID) != 32 || len(e.SpanID) != 16 || e.Value < 0.29 || e.Value > 0.31 {
		t.Errorf("exemplars %+v", got)
	}
}

// No exemplar points at a span that is not exported: one the sampler
// leaves out, or one the full queue drops.
func TestNoExemplarWithoutSpan(t *testing.T) {
	read := Span{Name: "syscall read", StartNs: 0, EndNs: 3e8, Metric: metrics.SyscallLatency, LabelValues: []string{"read"}}
	write := read
	write.LabelValues = []string{"write"}

	t.Run("unsampled", func(t *testing.T) {
		t.Setenv("OTEL_TRACES_SAMPLER", "always_off")
		ex, f := metrics.NewExemplars(), &fakeExporter{}
		p := newPipeline(f, resource.Empty(), Options{}, ex, discard())
		p.emit(p.provider.Tracer("syscall"), read)
		if err := p.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
		if got := ex.Lookup(metrics.SyscallLatency, []string{"read"}); len(got) != 0 || f.got != 0 {
			t.Errorf("%d spans exported, exemplars %+v; want none", f.got, got)
		}
	})
	t.Run("queue full", func(t *testing.T) {
		ex, f := metrics.NewExemplars(), &fakeExporter{block: make(chan struct{}), entered: make(chan struct{}, 1)}
		p := newPipeline(f, resource.Empty(), Options{QueueSize: 1, Batch: 1, Interval: time.Hour}, ex, discard())
		tr := p.provider.Tracer("syscall")
		// One in flight (the exporter has taken it, and blocks), then one
		// queued and the rest dropped. Without the wait, the exporter may
		// take the first span only after the queue filled, and the queue
		// then has room for the write span.
		p.emit(tr, read)
		select {
		case <-f.entered:
		case <-time.After(10 * time.Second):
			t.Fatal("the exporter never received the first span")
		}
		for range 9 {
			p.emit(tr, read)
		}
		p.emit(tr, write)
		if c := p.Counts()["syscall"]; c.QueueFull < 9 {
			t.Fatalf("counts %+v, want the queue full", c)
		}
		if got := ex.Lookup(metrics.SyscallLatency, []string{"write"}); len(got) != 0 {
			t.Errorf("exemplar of a dropped span: %+v", got)
		}
		if got := ex.Lookup(metrics.SyscallLatency, []string{"read"}); len(got) != 1 {
			t.Errorf("exemplars of queued spans: %+v, want one", got)
		}
		close(f.block)
		p.Close(context.Background())
	})
}

type fakeWorkloads map[uint64]k8smeta.Labels

func (f fakeWorkloads) Resolve(id uint64) k8smeta.Labels { return f[id] }

// Spans of a known pod's cgroup carry its namespace, pod and container;
// others nothing.
func TestWithWorkloads(t *testing.T) {
	res := fakeWorkloads{
		1: {Namespace: "ns", Pod: "web", Container: "nginx"},
		2: {Namespace: "ns", Pod: "web"},
		3: {Unit: "sshd.service"},
		4: {Namespace: k8smeta.Unknown, Pod: k8smeta.Unknown, Container: k8smeta.Unknown},
		5: {Namespace: k8smeta.Overflow, Pod: k8smeta.Overflow, Container: k8smeta.Overflow},
	}
	for id, want := range map[uint64]map[attribute.Key]string{
		0: {}, 1: {"k8s.namespace.name": "ns", "k8s.pod.name": "web", "k8s.container.name": "nginx"},
		2: {"k8s.namespace.name": "ns", "k8s.pod.name": "web"}, 3: {}, 4: {}, 5: {},
	} {
		dec := WithWorkloads(func([]byte) (Span, error) { return Span{Name: "x", Cgroup: id}, nil }, res)
		s, err := dec(nil)
		if err != nil {
			t.Fatal(err)
		}
		got := map[attribute.Key]string{}
		for _, kv := range s.Attrs {
			got[kv.Key] = kv.Value.AsString()
		}
		if !maps.Equal(got, want) {
			t.Errorf("cgroup %d: %v, want %v", id, got, want)
		}
	}
}

// A span ByWorkload (a run-queue wait) takes its workload's label values,
// whatever the workload, so that its exemplar lands on that workload's
// series; other spans keep theirs.
func TestWithWorkloadsExemplarSeries(t *testing.T) {
	res := fakeWorkloads{
		1: {Namespace: "ns", Pod: "web", Container: "nginx"},
		3: {Unit: "sshd.service"},
		0: {Unit: k8smeta.Unknown},
	}
	for _, tc := range []struct {
		span Span
		want []string
	}{
		{Span{Cgroup: 1, ByWorkload: true}, []string{"ns", "web", "nginx", ""}},
		{Span{Cgroup: 3, ByWorkload: true}, []string{"", "", "", "sshd.service"}},
		{Span{Cgroup: 0, ByWorkload: true}, []string{"", "", "", k8smeta.Unknown}},
		{Span{Cgroup: 1, LabelValues: []string{"read"}}, []string{"read"}},
	} {
		s, err := WithWorkloads(func([]byte) (Span, error) { return tc.span, nil }, res)(nil)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(s.LabelValues, tc.want) {
			t.Errorf("%+v: label values %q, want %q", tc.span, s.LabelValues, tc.want)
		}
	}
	if s, _ := RunqlatDecoder(make([]byte, runqlat.EventSize)); !s.ByWorkload {
		t.Error("run-queue spans are not by workload")
	}
}
