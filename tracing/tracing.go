package tracing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/ktel-dev/ktel/internal/k8smeta"
	"github.com/ktel-dev/ktel/internal/version"
	"github.com/ktel-dev/ktel/metrics"
)

// Enabled reports whether the environment configures an OTLP endpoint for
// traces, and does not disable them: OTEL_SDK_DISABLED=true, or an
// OTEL_TRACES_EXPORTER list without "otlp" (the only exporter ktel has;
// "none" included). getenv is os.Getenv outside tests.
func Enabled(getenv func(string) string) bool {
	if strings.EqualFold(getenv("OTEL_SDK_DISABLED"), "true") {
		return false
	}
	if list := getenv("OTEL_TRACES_EXPORTER"); list != "" {
		otlp := false
		for e := range strings.SplitSeq(list, ",") {
			otlp = otlp || strings.TrimSpace(e) == "otlp"
		}
		if !otlp {
			return false
		}
	}
	return getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" || getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") != ""
}

// Protocol is the OTLP protocol the environment asks for: "grpc" or
// "http/protobuf" (the specification's default).
func Protocol(getenv func(string) string) (string, error) {
	name := "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
	p := getenv(name)
	if p == "" {
		name = "OTEL_EXPORTER_OTLP_PROTOCOL"
		p = getenv(name)
	}
	switch p {
	case "", "http/protobuf":
		return "http/protobuf", nil
	case "grpc":
		return "grpc", nil
	}
	return "", fmt.Errorf("invalid %s %q; accepted values: grpc, http/protobuf", name, p)
}

// Options configure the pipeline.
type Options struct {
	QueueSize int // spans waiting for export; beyond, they are dropped
	Batch     int // spans per export request
	Interval  time.Duration
}

// Pipeline reads events from probes' ring buffers and exports spans.
type Pipeline struct {
	log       *slog.Logger
	provider  *sdktrace.TracerProvider
	exporter  *exporter
	clock     *Clock
	exemplars *metrics.Exemplars

	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	readers []*ringbuf.Reader
}

// New builds the OTLP exporter from the standard OTEL_* variables and a
// resource with service.name (default ktel, or OTEL_SERVICE_NAME), host.name
// and whatever OTEL_RESOURCE_ATTRIBUTES adds (k8s.node.name and k8s.pod.name
// from the downward API, for instance).
func New(ctx context.Context, opts Options, ex *metrics.Exemplars, log *slog.Logger) (*Pipeline, error) {
	if !Enabled(os.Getenv) {
		return nil, errDisabled
	}
	proto, err := Protocol(os.Getenv)
	if err != nil {
		return nil, err
	}
	var exp sdktrace.SpanExporter
	if proto == "grpc" {
		exp, err = otlptracegrpc.New(ctx)
	} else {
		exp, err = otlptracehttp.New(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("OTLP %s exporter: %w", proto, err)
	}
	v, _, _ := version.Info()
	detected, err := resource.New(ctx, resource.WithHost(), resource.WithFromEnv(), resource.WithTelemetrySDK())
	if err != nil {
		// A partial resource is still useful; err names what is missing.
		log.Warn("span resource incomplete", "err", err)
	}
	if detected == nil {
		detected = resource.Empty()
	}
	// Later resources win: OTEL_SERVICE_NAME overrides the default name.
	res, err := resource.Merge(resource.NewSchemaless(semconv.ServiceName("ktel"), semconv.ServiceVersion(v)), detected)
	if err != nil {
		return nil, fmt.Errorf("resource: %w", err)
	}
	return newPipeline(exp, res, opts, ex, log), nil
}

func newPipeline(exp sdktrace.SpanExporter, res *resource.Resource, opts Options, ex *metrics.Exemplars, log *slog.Logger) *Pipeline {
	if opts.QueueSize <= 0 {
		opts.QueueSize = 4096
	}
	if opts.Batch <= 0 {
		opts.Batch = 512
	}
	if opts.Interval <= 0 {
		opts.Interval = time.Second
	}
	e := newExporter(exp, opts.QueueSize, opts.Batch, opts.Interval, log)
	p := &Pipeline{
		log:      log,
		exporter: e,
		// No span processor: emit hands each ended span to the exporter,
		// so that it knows whether the span was queued before pointing an
		// exemplar at it. The provider applies OTEL_TRACES_SAMPLER.
		provider:  sdktrace.NewTracerProvider(sdktrace.WithResource(res)),
		clock:     NewClock(10 * time.Second),
		exemplars: ex,
	}
	p.ctx, p.cancel = context.WithCancel(context.Background())
	return p
}

// Span is what a probe's decoder makes of one record.
type Span struct {
	Name           string
	StartNs, EndNs uint64 // CLOCK_MONOTONIC
	Attrs          []attribute.KeyValue
	// Exemplar, if Metric is set: the histogram series the event was
	// observed in, which gets an exemplar pointing at this span.
	Metric      string
	LabelValues []string
	// Cgroup is the cgroup v2 id of the task or socket, 0 if unknown;
	// WithWorkloads names its workload.
	Cgroup uint64
	// ByWorkload says that Metric is per workload when workload
	// attribution is on: WithWorkloads then appends the workload's label
	// values (metrics.WorkloadLabelValues) to LabelValues, so that the
	// exemplar lands on the series of the span's own workload.
	ByWorkload bool
}

// Decoder turns one ring-buffer record into a span.
type Decoder func(record []byte) (Span, error)

// Workloads names the workload of a cgroup v2 id from caches only
// (k8smeta.Resolver).
type Workloads interface {
	Resolve(cgroupID uint64) k8smeta.Labels
}

// WithWorkloads adds to the spans of dec the Kubernetes attributes of
// their cgroup's workload (k8s.namespace.name, k8s.pod.name,
// k8s.container.name) when it is a known pod's; nothing for cgroups
// outside pods, unknown ones, and workloads beyond the label-set cap. The
// exemplar of a span ByWorkload goes to its workload's series, whatever
// the workload (unit, unknown, other included), as the collector names it.
func WithWorkloads(dec Decoder, res Workloads) Decoder {
	return func(b []byte) (Span, error) {
		s, err := dec(b)
		if err != nil || s.Cgroup == 0 && !s.ByWorkload {
			return s, err
		}
		// Cgroup 0 (a hook that does not give the task) is resolved as the
		// collector resolves the kernel's key 0: unknown.
		l := res.Resolve(s.Cgroup)
		if s.ByWorkload {
			s.LabelValues = append(slices.Clip(s.LabelValues), metrics.WorkloadLabelValues(l)...)
		}
		known := func(v string) bool { return v != "" && v != k8smeta.Unknown && v != k8smeta.Overflow }
		if !known(l.Pod) || !known(l.Namespace) {
			return s, nil
		}
		s.Attrs = append(s.Attrs, semconv.K8SNamespaceName(l.Namespace), semconv.K8SPodName(l.Pod))
		if known(l.Container) {
			s.Attrs = append(s.Attrs, semconv.K8SContainerName(l.Container))
		}
		return s, nil
	}
}

// Add starts reading events of probe from ring. Records that do not
// decode are logged and skipped.
func (p *Pipeline) Add(probe string, ring *ebpf.Map, decode Decoder) error {
	rd, err := ringbuf.NewReader(ring)
	if err != nil {
		return fmt.Errorf("%s ring buffer: %w", probe, err)
	}
	p.readers = append(p.readers, rd)
	tracer := p.provider.Tracer(probe)
	log := p.log.With("probe", probe)
	p.wg.Go(func() { p.read(rd, tracer, decode, log) })
	return nil
}

// pollInterval bounds how long a record waits when the kernel did not wake
// the reader (wakeups are batched); drainTime bounds the final read of what
// the ring buffers hold when stopping.
const (
	pollInterval = 200 * time.Millisecond
	drainTime    = time.Second
)

func (p *Pipeline) read(rd *ringbuf.Reader, tracer trace.Tracer, decode Decoder, log *slog.Logger) {
	var (
		rec        ringbuf.Record
		drainUntil time.Time
	)
	for {
		// Once stopping, read only what is already there, so that records
		// written before the stop are exported, not lost; for at most
		// drainTime, since outliers may keep coming.
		deadline := time.Now().Add(pollInterval)
		if p.ctx.Err() != nil {
			if drainUntil.IsZero() {
				drainUntil = time.Now().Add(drainTime)
			}
			if time.Now().After(drainUntil) {
				return
			}
			deadline = time.Now()
		}
		rd.SetDeadline(deadline)
		if err := rd.ReadInto(&rec); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if p.ctx.Err() != nil {
					return
				}
				continue
			}
			if !errors.Is(err, ringbuf.ErrClosed) {
				log.Error("read ring buffer", "err", err)
			}
			return
		}
		s, err := decode(rec.RawSample)
		if err != nil {
			log.Warn("bad event record", "err", err)
			continue
		}
		p.emit(tracer, s)
	}
}

func (p *Pipeline) emit(tracer trace.Tracer, s Span) {
	start, end := p.clock.Wall(s.StartNs), p.clock.Wall(s.EndNs)
	_, span := tracer.Start(p.ctx, s.Name, trace.WithTimestamp(start), trace.WithAttributes(s.Attrs...),
		trace.WithSpanKind(trace.SpanKindInternal), trace.WithNewRoot())
	span.End(trace.WithTimestamp(end))
	// A span the sampler left out is neither recorded nor exported, and
	// one the queue had no room for is counted as dropped: no exemplar
	// points at either.
	ro, ok := span.(sdktrace.ReadOnlySpan)
	if !ok || !ro.SpanContext().IsSampled() || !p.exporter.enqueue(ro) || s.Metric == "" {
		return
	}
	sc := ro.SpanContext()
	p.exemplars.Observe(s.Metric, s.LabelValues, metrics.Exemplar{
		Value: float64(s.EndNs-s.StartNs) / 1e9, TraceID: sc.TraceID().String(), SpanID: sc.SpanID().String(), Time: end,
	})
}

// Counts are the per-probe export counters.
func (p *Pipeline) Counts() map[string]metrics.SpanCounts { return p.exporter.Counts() }

// Close stops the readers once they have read what the ring buffers hold,
// exports what is queued (within ctx) and shuts the exporter down.
func (p *Pipeline) Close(ctx context.Context) error {
	p.cancel()
	p.wg.Wait()
	var errs []error
	for _, rd := range p.readers {
		errs = append(errs, rd.Close())
	}
	errs = append(errs, p.exporter.Shutdown(ctx), p.provider.Shutdown(ctx))
	return errors.Join(errs...)
}
