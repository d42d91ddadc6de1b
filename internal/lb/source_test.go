package lb

import (
	"bytes"
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
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

// slowCloser is a datapath whose UDP closing waits for release.
type slowCloser struct {
	*fakeDatapath
	entered, release chan struct{}
}

func (d slowCloser) DisconnectUDP(removed []Removed) (int, error) {
	close(d.entered)
	<-d.release
	return len(removed), nil
}

// Closing UDP sockets to removed backends happens after the Manager's lock
// is released: Services (what a scrape reads) does not wait for it. Its
// result is logged.
func TestApplyServicesClosesUDPUnlocked(t *testing.T) {
	now := time.Unix(0, 0)
	d := slowCloser{newFake(t, &now), make(chan struct{}), make(chan struct{})}
	s, err := NewState(d, Limits{MaxServices: 2, MaxSlots: 4, MaxCounters: 4})
	if err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	m := NewSourceManager("kubernetes", s, slog.New(slog.NewTextHandler(&logs, nil)))
	dns := udpSvc("ns/dns:dns", "10.96.0.10:53", "10.0.0.1:53", "10.0.0.2:53")
	if err := m.ApplyServices([]Service{dns}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- m.ApplyServices([]Service{udpSvc("ns/dns:dns", "10.96.0.10:53", "10.0.0.2:53")}) }()
	select {
	case <-d.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("UDP closing not started")
	}
	got := make(chan int, 1)
	go func() { _, n := m.Services(); _ = m.Stats(); got <- n }()
	select {
	case n := <-got:
		if n != 1 {
			t.Errorf("%d backends while closing, want the new set's 1", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Services blocked by UDP closing")
	}
	close(d.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if out := logs.String(); !strings.Contains(out, "udp_backends_removed=1 udp_sockets_closed=1") {
		t.Errorf("UDP closing not logged:\n%s", out)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// An apply that fails only to delete a removed service has still changed
// the services: the backend count Services reports is that of the
// services it returns.
func TestManagerBackendsAfterFailedDelete(t *testing.T) {
	now := time.Unix(0, 0)
	f := newFake(t, &now)
	s, err := NewState(f, Limits{MaxServices: 4, MaxSlots: 8, MaxCounters: 8})
	if err != nil {
		t.Fatal(err)
	}
	m := NewSourceManager("kubernetes", s, slog.New(slog.DiscardHandler))
	a, b := svc("a", "10.96.0.1:80", "10.0.0.1:80"), svc("b", "10.96.0.2:80", "10.0.0.2:80")
	if err := m.ApplyServices([]Service{a, b}); err != nil {
		t.Fatal(err)
	}
	f.failOn = "DeleteServices"
	a = svc("a", "10.96.0.1:80", "10.0.0.1:80", "10.0.0.3:80", "10.0.0.4:80")
	if err := m.ApplyServices([]Service{a}); err == nil {
		t.Fatal("failed delete not reported")
	}
	st, nb := m.Services()
	n := 0
	for _, sv := range st {
		n += len(sv.Backends)
	}
	if len(st) != 1 || nb != n || nb != 3 {
		t.Errorf("services %v with %d backends, reported %d backends; want a's 3", st, n, nb)
	}
}
