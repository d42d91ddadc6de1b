// Package tracing turns outlier kernel events, read from the probes' ring
// buffers, into OTLP spans with the events' own kernel timestamps. Export
// never blocks the readers: spans wait in a bounded queue, and what cannot
// be queued or exported is counted by reason.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/ktel-dev/ktel/metrics"
)

// Drop reasons, as in ktel_spans_dropped_total{reason}. The kernel's own
// (rate_limited, ringbuf_full) are counted by the probes.
const (
	ReasonQueueFull    = "queue_full"
	ReasonExportFailed = "export_failed"
)

type counters struct{ exported, queueFull, exportFailed atomic.Uint64 }

// exporter queues ended spans in a bounded queue and exports them in
// batches from one goroutine. Unlike the SDK's batch processor it counts,
// per probe, every span it could not queue or export, and tells the caller
// whether a span was queued.
type exporter struct {
	exp      sdktrace.SpanExporter
	log      *slog.Logger
	queue    chan sdktrace.ReadOnlySpan
	batch    int
	interval time.Duration
	// Exports run under ctx, which Shutdown cancels when its own deadline
	// passes; their timeout is the OTLP exporter's own
	// (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default).
	ctx           context.Context
	cancelExports context.CancelFunc

	mu     sync.Mutex
	counts map[string]*counters // by instrumentation scope = probe

	stop chan struct{}
	done chan struct{}
}

func newExporter(exp sdktrace.SpanExporter, queueSize, batch int, interval time.Duration, log *slog.Logger) *exporter {
	e := &exporter{
		exp: exp, log: log,
		queue: make(chan sdktrace.ReadOnlySpan, queueSize),
		batch: batch, interval: interval,
		counts: map[string]*counters{},
		stop:   make(chan struct{}), done: make(chan struct{}),
	}
	e.ctx, e.cancelExports = context.WithCancel(context.Background())
	go e.run()
	return e
}

func (e *exporter) counter(probe string) *counters {
	e.mu.Lock()
	defer e.mu.Unlock()
	c := e.counts[probe]
	if c == nil {
		c = &counters{}
		e.counts[probe] = c
	}
	return c
}

// Counts returns the counters of every probe that produced spans.
func (e *exporter) Counts() map[string]metrics.SpanCounts {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := make(map[string]metrics.SpanCounts, len(e.counts))
	for p, c := range e.counts {
		out[p] = metrics.SpanCounts{Exported: c.exported.Load(), QueueFull: c.queueFull.Load(), ExportFailed: c.exportFailed.Load()}
	}
	return out
}

// enqueue queues the span, or counts it as dropped if the queue is full.
func (e *exporter) enqueue(s sdktrace.ReadOnlySpan) bool {
	select {
	case e.queue <- s:
		return true
	default:
		e.counter(s.InstrumentationScope().Name).queueFull.Add(1)
		return false
	}
}

func (e *exporter) run() {
	defer close(e.done)
	tick := time.NewTicker(e.interval)
	defer tick.Stop()
	buf := make([]sdktrace.ReadOnlySpan, 0, e.batch)
	for {
		select {
		case s := <-e.queue:
			if buf = append(buf, s); len(buf) >= e.batch {
				buf = e.export(buf)
			}
		case <-tick.C:
			buf = e.export(buf)
		case <-e.stop:
			for drained := false; !drained; {
				select {
				case s := <-e.queue:
					if buf = append(buf, s); len(buf) >= e.batch {
						buf = e.export(buf)
					}
				default:
					drained = true
				}
			}
			e.export(buf)
			return
		}
	}
}

// export sends buf and returns it emptied.
func (e *exporter) export(buf []sdktrace.ReadOnlySpan) []sdktrace.ReadOnlySpan {
	if len(buf) == 0 {
		return buf
	}
	err := e.exp.ExportSpans(e.ctx, buf)
	for _, s := range buf {
		c := e.counter(s.InstrumentationScope().Name)
		if err != nil {
			c.exportFailed.Add(1)
		} else {
			c.exported.Add(1)
		}
	}
	if err != nil {
		e.log.Warn("span export failed", "spans", len(buf), "err", err)
	}
	clear(buf)
	return buf[:0]
}

// Shutdown exports what is queued and shuts the exporter down. Once ctx
// is done, it still shuts the exporter down (closing its connections),
// and the export in progress ends with ctx's error.
func (e *exporter) Shutdown(ctx context.Context) error {
	select {
	case <-e.stop:
		return nil
	default:
	}
	context.AfterFunc(ctx, e.cancelExports)
	close(e.stop)
	var errs []error
	select {
	case <-e.done:
	case <-ctx.Done():
		errs = append(errs, fmt.Errorf("flush spans: %w", ctx.Err()))
	}
	return errors.Join(append(errs, e.exp.Shutdown(ctx))...)
}

var errDisabled = errors.New("tracing disabled: no OTLP endpoint configured")
