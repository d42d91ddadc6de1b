package lb

import (
	"fmt"
	"net/netip"
	"testing"

	"gopkg.in/yaml.v3"
)

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
	for b.Loop() {
		if _, err := Parse("f", data); err != nil {
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

func BenchmarkApply10k(b *testing.B) {
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
