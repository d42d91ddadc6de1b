package lb

import (
	"errors"
	"log/slog"
	"net/netip"
	"testing"
	"time"
)

func TestSourceManager(t *testing.T) {
	now := time.Unix(0, 0)
	s, err := NewState(newFake(t, &now), Limits{MaxServices: 2, MaxSlots: 4, MaxCounters: 4})
	if err != nil {
		t.Fatal(err)
	}
	m := NewSourceManager("kubernetes", s, slog.New(slog.DiscardHandler))
	svc := func(name, vip string, backends ...string) Service {
		sv := Service{Name: name, VIP: netip.MustParseAddrPort(vip), Protocol: TCP}
		for _, b := range backends {
			sv.Backends = append(sv.Backends, Backend{Addr: netip.MustParseAddrPort(b), Weight: 1})
		}
		return sv
	}
	if err := m.ApplyServices([]Service{svc("ns/a:http", "10.96.0.1:80", "10.0.0.1:8080", "10.0.0.2:8080"), svc("ns/b:http", "10.96.0.2:80")}); err != nil {
		t.Fatal(err)
	}
	st, nb := m.Services()
	if len(st) != 2 || nb != 2 {
		t.Fatalf("applied %v, %d backends; want 2 services, 2 backends", st, nb)
	}
	// Too many services: rejected, counted, the previous ones stay.
	err = m.ApplyServices([]Service{svc("x", "10.96.0.3:80"), svc("y", "10.96.0.4:80"), svc("z", "10.96.0.5:80")})
	if !errors.Is(err, ErrFull) {
		t.Fatalf("3 services in a map of 2: %v, want ErrFull", err)
	}
	if st, _ := m.Services(); len(st) != 2 || st[0].Name != "ns/a:http" {
		t.Errorf("after a rejected apply: %v, want the previous services", st)
	}
	if rs := m.Stats(); rs.Success != 1 || rs.Error != 1 || rs.LastSuccess.IsZero() {
		t.Errorf("stats %+v, want 1 success, 1 error", rs)
	}
}
