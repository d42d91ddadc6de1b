package lb

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
	"gopkg.in/yaml.v3"
)

// cpuTime reports, when the benchmark ends, the CPU time of the process per
// operation (user and system, every thread, the garbage collector's
// included): on a shared machine it varies less than the time it took.
func cpuTime(b *testing.B) {
	used := func() float64 {
		var ru unix.Rusage
		if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e6
	}
	start := used()
	b.Cleanup(func() { b.ReportMetric((used()-start)/float64(b.N), "cpu-ms/op") })
}

func benchServices(n int) []Service {
	svcs := make([]Service, n)
	for i := range svcs {
		vip := netip.AddrFrom4([4]byte{10, 100, byte(i >> 8), byte(i)})
		svcs[i] = Service{Name: fmt.Sprintf("svc-%d", i), VIP: netip.AddrPortFrom(vip, 80), Protocol: TCP}
		for b := range 3 {
			svcs[i].Backends = append(svcs[i].Backends, Backend{
				Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(3*i + b)}), 8080), Weight: 1})
		}
	}
	return svcs
}

func BenchmarkParse10k(b *testing.B) {
	data, _ := Marshal(benchServices(10000))
	b.SetBytes(int64(len(data)))
	cpuTime(b)
	for b.Loop() {
		if _, err := Parse("f", data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReload10k: a reload of a JSON file of 10,000 services, every one
// of them changed, end to end but for the writes to BPF maps: reading the
// file, parsing it, and planning and applying the change.
func BenchmarkReload10k(b *testing.B) {
	file := filepath.Join(b.TempDir(), "services.json")
	var files [2][]byte
	for i := range files {
		svcs := benchServices(10000)
		for j := range svcs {
			for k := range svcs[j].Backends {
				svcs[j].Backends[k].Addr = netip.AddrPortFrom(svcs[j].Backends[k].Addr.Addr(), uint16(8080+i))
			}
		}
		var err error
		if files[i], err = Marshal(svcs); err != nil {
			b.Fatal(err)
		}
	}
	s, err := NewState(nopDatapath{}, Limits{MaxServices: 65536, MaxSlots: 1 << 18, MaxCounters: 1 << 18})
	if err != nil {
		b.Fatal(err)
	}
	s.quarantine = 0
	m := NewManager(file, s, discardLog())
	i := 0
	cpuTime(b)
	for b.Loop() {
		b.StopTimer()
		if err := os.WriteFile(file, files[i%2], 0o600); err != nil {
			b.Fatal(err)
		}
		i++
		b.StartTimer()
		if err := m.Reload(); err != nil {
			b.Fatal(err)
		}
	}
}

type nopDatapath struct{}

func (nopDatapath) ResetCounters(services, backends []uint32) error { return nil }
func (nopDatapath) WriteSlots(idx []uint32, slots []Slot) error     { return nil }
func (nopDatapath) WriteMaglev(base uint32, table []uint32) error   { return nil }
func (nopDatapath) DeleteMaglev(bases []uint32) error               { return nil }
func (nopDatapath) WriteServices(entries []Entry) error             { return nil }
func (nopDatapath) DeleteServices(keys []Key) error                 { return nil }
func (nopDatapath) WriteMembers(idx []uint32, ms []Member) error    { return nil }
func (nopDatapath) ClearMembers(idx []uint32, a []netip.AddrPort) error {
	return nil
}
func (nopDatapath) DisconnectUDP(removed []Removed) (int, error) { return 0, nil }

func BenchmarkApply10k(b *testing.B) {
	cpuTime(b)
	a, c := benchServices(10000), benchServices(10000)
	for i := range c {
		for j := range c[i].Backends {
			c[i].Backends[j].Addr = netip.AddrPortFrom(c[i].Backends[j].Addr.Addr(), 9090)
		}
	}
	for b.Loop() {
		s, err := NewState(nopDatapath{}, Limits{MaxServices: 65536, MaxSlots: 1 << 18, MaxCounters: 1 << 18})
		if err != nil {
			b.Fatal(err)
		}
		s.quarantine = 0
		if _, err := s.Apply(a); err != nil {
			b.Fatal(err)
		}
		if _, err := s.Apply(c); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParse10kYAML(b *testing.B) {
	js, _ := Marshal(benchServices(10000))
	var v any
	if err := yaml.Unmarshal(js, &v); err != nil {
		b.Fatal(err)
	}
	data, err := yaml.Marshal(v)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Parse("f", data); err != nil {
			b.Fatal(err)
		}
	}
}
