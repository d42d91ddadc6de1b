package metrics

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/bpf/lb"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/histogram"
)

// syntheticSyscalls is a syscall source with 100 active syscalls, 40
// buckets each, at schema 3.
func syntheticSyscalls() *fakeSyscalls {
	l, _ := histogram.NewLayout(3)
	snap := &sysprobe.Snapshot{Latency: map[uint32]sysprobe.Hist{}, Errors: map[sysprobe.ErrorKey]uint64{}}
	for nr := range uint32(100) {
		slots := make([]uint64, l.Slots())
		for k := 20 + int(nr); k < 60+int(nr); k++ {
			slots[k] = uint64(k)
		}
		snap.Latency[nr] = sysprobe.Hist{Slots: slots, SumNs: 1e9}
	}
	return &fakeSyscalls{layout: l, snap: snap}
}

// BenchmarkSyscallCollector is the user-space cost of one scrape of the
// syscall collector with 100 active syscalls (the map read excluded):
// gathering a registry with it, as the daemon does.
func BenchmarkSyscallCollector(b *testing.B) {
	f := syntheticSyscalls()
	c := NewSyscallCollector(f, names, nil)
	c.snap = NewCached(f.Snapshot, 0)
	reg := prometheus.NewRegistry()
	reg.MustRegister(&collectorAdapter{c})
	b.ReportAllocs()
	for b.Loop() {
		if _, err := reg.Gather(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkScrape is one /metrics request over 100 active syscalls (the
// map read excluded), per format and compression, served by Handler as the
// daemon serves it.
func BenchmarkScrape(b *testing.B) {
	f := syntheticSyscalls()
	cs := map[string]Collector{"syscall": NewSyscallCollector(f, names, nil)}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewExporter(cs, nil))
	h := Handler(prometheus.ToTransactionalGatherer(reg), HandlerOpts{})
	for _, accept := range []string{"text/plain;version=0.0.4", "application/openmetrics-text;version=1.0.0", "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"} {
		for _, enc := range []string{"identity", "gzip"} {
			b.Run(strings.Split(accept, ";")[0]+"/"+enc, func(b *testing.B) {
				req := httptest.NewRequest("GET", "/metrics", nil)
				req.Header.Set("Accept", accept)
				req.Header.Set("Accept-Encoding", enc)
				for b.Loop() {
					w := httptest.NewRecorder()
					h.ServeHTTP(w, req)
					if w.Code != 200 {
						b.Fatal(w.Code)
					}
					b.SetBytes(int64(w.Body.Len()))
				}
			})
		}
	}
}

// syntheticLB is a load balancer with n services of one backend each, as
// internal/kubebench's Services have.
func syntheticLB(n int) *fakeLB {
	s := &lb.Snapshot{Backends: n, ReloadSuccess: 1}
	for i := range n {
		s.Services = append(s.Services, lb.ServiceStats{
			Name: fmt.Sprintf("bench/svc-%05d:http", i), Connections: uint64(i), NoBackend: 1,
			Backends: []lb.BackendStats{{Address: fmt.Sprintf("10.%d.%d.%d:8080", 1+i>>16, i>>8&255, i&255), Connections: uint64(i)}},
		})
	}
	return &fakeLB{snap: s}
}

// BenchmarkLBCollector is the user-space cost of one scrape of the load
// balancer's collector at 10,000 services (the map read excluded):
// update (the collector's metrics, drained), and a /metrics request in
// the text format served by Handler, to a writer that discards it.
func BenchmarkLBCollector(b *testing.B) {
	f := syntheticLB(10000)
	b.Run("update", func(b *testing.B) {
		c := NewLBCollector(f).(*lbCollector)
		c.snap = NewCached(f.Snapshot, 0)
		ch := make(chan prometheus.Metric, 64)
		done := make(chan struct{})
		go func() {
			for range ch {
			}
			close(done)
		}()
		b.ReportAllocs()
		for b.Loop() {
			if err := c.Update(ch); err != nil {
				b.Fatal(err)
			}
		}
		close(ch)
		<-done
	})
	b.Run("scrape", func(b *testing.B) {
		reg := prometheus.NewRegistry()
		reg.MustRegister(NewExporter(map[string]Collector{"lb": NewLBCollector(f)}, nil))
		h := Handler(prometheus.ToTransactionalGatherer(reg), HandlerOpts{})
		req := httptest.NewRequest("GET", "/metrics", nil)
		b.ReportAllocs()
		for b.Loop() {
			var w discardWriter
			h.ServeHTTP(&w, req)
			if w.code != 200 || w.n == 0 {
				b.Fatal(w.code, w.n)
			}
			b.SetBytes(int64(w.n))
		}
	})
}

// discardWriter counts what a handler writes, as a socket would take it:
// without keeping it.
type discardWriter struct {
	h    http.Header
	code int
	n    int
}

func (w *discardWriter) Header() http.Header {
	if w.h == nil {
		w.h = http.Header{}
	}
	return w.h
}

func (w *discardWriter) WriteHeader(code int) { w.code = code }

func (w *discardWriter) Write(p []byte) (int, error) {
	if w.code == 0 {
		w.code = 200
	}
	w.n += len(p)
	return len(p), nil
}
