package metrics

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/histogram"
)

// BenchmarkSyscallCollector is the user-space cost of one scrape of the
// syscall collector with 100 active syscalls (the map read excluded).
func BenchmarkSyscallCollector(b *testing.B) {
	l, _ := histogram.NewLayout(3)
	snap := &sysprobe.Snapshot{Latency: map[uint32]sysprobe.Hist{}, Errors: map[sysprobe.ErrorKey]uint64{}}
	for nr := range uint32(100) {
		slots := make([]uint64, l.Slots())
		for k := 20 + int(nr); k < 60+int(nr); k++ {
			slots[k] = uint64(k)
		}
		snap.Latency[nr] = sysprobe.Hist{Slots: slots, SumNs: 1e9}
	}
	f := &fakeSyscalls{layout: l, snap: snap}
	c := NewSyscallCollector(f, names, nil).(*syscallCollector)
	ch := make(chan prometheus.Metric, 256)
	go func() {
		for range ch {
		}
	}()
	b.ReportAllocs()
	for b.Loop() {
		c.snap = NewCached(f.Snapshot, 0)
		if err := c.Update(ch); err != nil {
			b.Fatal(err)
		}
	}
}
