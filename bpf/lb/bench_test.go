package lb

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	ctl "github.com/ktel-dev/ktel/internal/lb"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// BenchmarkSnapshot is the read a scrape of the load balancer makes
// (Snapshot: the applied state, both per-CPU counter arrays, the sums) at
// 10,000 services of 3 backends each.
func BenchmarkSnapshot(b *testing.B) {
	testenv.Privileged(b)
	const n = 10000
	sb := testenv.NewSandbox(b, fmt.Sprintf("ktel-lbbench-%d", os.Getpid()))
	data, err := ctl.Marshal(manyServices(n, 8000))
	if err != nil {
		b.Fatal(err)
	}
	file := filepath.Join(b.TempDir(), "services.json")
	if err := os.WriteFile(file, data, 0o644); err != nil {
		b.Fatal(err)
	}
	p, err := Load(Options{Cgroup: sb.Cgroup, ServicesFile: file}, discard())
	if err != nil {
		b.Fatalf("load: %+v", err)
	}
	b.Cleanup(func() { p.Close() })
	b.ReportAllocs()
	for b.Loop() {
		s, err := p.Snapshot()
		if err != nil {
			b.Fatal(err)
		}
		if len(s.Services) != n {
			b.Fatalf("%d services", len(s.Services))
		}
	}
}
