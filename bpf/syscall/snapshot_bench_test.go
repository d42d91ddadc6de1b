package syscall

import (
	"io"
	"log/slog"
	"os"
	"testing"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// BenchmarkSnapshot reads the probe's maps as a scrape does, after the
// syscalls of this test and of the machine.
func BenchmarkSnapshot(b *testing.B) {
	testenv.Privileged(b)
	p, err := Load(Options{Schema: 3}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	for range 100 {
		_, _ = os.ReadDir("/proc/self")
		_, _ = os.Stat("/nonexistent")
	}
	b.ReportAllocs()
	for b.Loop() {
		s, err := p.Snapshot()
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64(len(s.Latency)), "syscalls")
	}
}
