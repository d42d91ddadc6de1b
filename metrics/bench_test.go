package metrics

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

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
