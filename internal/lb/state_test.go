package lb

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// fakeDatapath is the maps in memory. It fails the test when a write could
// let a connect see a half-written service: slots written under a
// published entry, or under one unpublished less than a quarantine ago.
type fakeDatapath struct {
	t        *testing.T
	now      *time.Time
	slots    map[uint32]Slot
	services map[Key]Entry
	maglev   map[uint32][]uint32
	retired  []retiredRange
	calls    []string
	failOn   string
	members  map[uint32]Member
	removed  [][]Removed
}

type retiredRange struct {
	base, count uint32
	at          time.Time
}

func newFake(t *testing.T, now *time.Time) *fakeDatapath {
	return &fakeDatapath{t: t, now: now, slots: map[uint32]Slot{}, services: map[Key]Entry{}, maglev: map[uint32][]uint32{}, members: map[uint32]Member{}}
}

func (f *fakeDatapath) call(name string) error {
	f.calls = append(f.calls, name)
	if f.failOn == name {
		return errors.New("injected failure")
	}
	return nil
}

func (f *fakeDatapath) inUse(slot uint32) bool {
	for _, e := range f.services {
		if slot >= e.Base && slot < e.Base+e.Count {
			return true
		}
	}
	for _, r := range f.retired {
		if slot >= r.base && slot < r.base+r.count && f.now.Sub(r.at) < DefaultQuarantine {
			return true
		}
	}
	return false
}

func (f *fakeDatapath) ResetCounters(services, backends []uint32) error {
	return f.call("ResetCounters")
}

func (f *fakeDatapath) WriteSlots(idx []uint32, slots []Slot) error {
	if err := f.call("WriteSlots"); err != nil {
		return err
	}
	for i, s := range idx {
		if f.inUse(s) {
			f.t.Errorf("slot %d overwritten while in use", s)
		}
		f.slots[s] = slots[i]
	}
	return nil
}

func (f *fakeDatapath) WriteMaglev(base uint32, table []uint32) error {
	if err := f.call("WriteMaglev"); err != nil {
		return err
	}
	f.maglev[base] = table
	return nil
}

func (f *fakeDatapath) DeleteMaglev(bases []uint32) error {
	for _, b := range bases {
		delete(f.maglev, b)
	}
	return f.call("DeleteMaglev")
}

func (f *fakeDatapath) WriteServices(entries []Entry) error {
	if err := f.call("WriteServices"); err != nil {
		return err
	}
	for _, e := range entries {
		for s := e.Base; s < e.Base+e.Count; s++ {
			if _, ok := f.slots[s]; !ok {
				f.t.Errorf("service %v points at unwritten slot %d", e.Key, s)
			}
		}
		if e.Maglev && f.maglev[e.Base] == nil {
			f.t.Errorf("service %v published before its Maglev table", e.Key)
		}
		f.unpublish(e.Key)
		f.services[e.Key] = e
	}
	return nil
}

func (f *fakeDatapath) unpublish(k Key) {
	if old, ok := f.services[k]; ok {
		f.retired = append(f.retired, retiredRange{old.Base, old.Count, *f.now})
	}
}

func (f *fakeDatapath) DeleteServices(keys []Key) error {
	if err := f.call("DeleteServices"); err != nil {
		return err
	}
	for _, k := range keys {
		f.unpublish(k)
		delete(f.services, k)
	}
	return nil
}

func (f *fakeDatapath) WriteMembers(idx []uint32, ms []Member) error {
	if err := f.call("WriteMembers"); err != nil {
		return err
	}
	for i, c := range idx {
		f.members[c] = ms[i]
	}
	return nil
}

func (f *fakeDatapath) ClearMembers(idx []uint32, addrs []netip.AddrPort) error {
	if err := f.call("ClearMembers"); err != nil {
		return err
	}
	for i, c := range idx {
		if m, ok := f.members[c]; !ok || m.Addr != addrs[i] {
			f.t.Errorf("counter %d cleared as %s, is %+v", c, addrs[i], m)
		}
		delete(f.members, c)
	}
	return nil
}

func (f *fakeDatapath) DisconnectUDP(removed []Removed) (int, error) {
	if err := f.call("DisconnectUDP"); err != nil {
		return 0, err
	}
	for _, r := range removed {
		if e, ok := f.services[r.Key]; ok {
			for s := e.Base; s < e.Base+e.Count; s++ {
				if f.slots[s].Addr == r.Backend {
					f.t.Errorf("%s disconnected while still a backend of %v", r.Backend, r.Key)
				}
			}
		}
	}
	f.removed = append(f.removed, removed)
	return len(removed), nil
}

// backendsOf resolves a published service to its backends' addresses.
func (f *fakeDatapath) backendsOf(vip string) []string {
	e, ok := f.services[Key{VIP: netip.MustParseAddrPort(vip), Protocol: TCP}]
	if !ok {
		return nil
	}
	var out []string
	for s := e.Base; s < e.Base+e.Count; s++ {
		out = append(out, f.slots[s].Addr.String())
	}
	return out
}

func svc(name, vip string, bs ...string) Service {
	s := Service{Name: name, VIP: netip.MustParseAddrPort(vip), Protocol: TCP}
	for _, b := range bs {
		s.Backends = append(s.Backends, Backend{Addr: netip.MustParseAddrPort(b), Weight: 1})
	}
	return s
}

func newTestState(t *testing.T, lim Limits) (*State, *fakeDatapath, *time.Time) {
	now := time.Unix(1000, 0)
	f := newFake(t, &now)
	s, err := NewState(f, lim)
	if err != nil {
		t.Fatal(err)
	}
	s.now = func() time.Time { return now }
	s.sleep = func(d time.Duration) { now = now.Add(d) }
	return s, f, &now
}

func TestApply(t *testing.T) {
	s, f, now := newTestState(t, Limits{MaxServices: 10, MaxSlots: 20, MaxCounters: 20})
	a, err := s.Apply([]Service{
		svc("web", "10.96.0.10:80", "10.0.0.1:80", "10.0.0.2:80"),
		svc("api", "10.96.0.11:80", "10.0.0.3:80"),
		svc("none", "10.96.0.12:80"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if a.Written != 3 || a.Slots != 3 {
		t.Errorf("applied %+v", a)
	}
	if got := fmt.Sprint(f.backendsOf("10.96.0.10:80")); got != "[10.0.0.1:80 10.0.0.2:80]" {
		t.Errorf("web -> %s", got)
	}
	if e := f.services[Key{VIP: netip.MustParseAddrPort("10.96.0.12:80"), Protocol: TCP}]; e.Count != 0 {
		t.Errorf("service without backends has count %d", e.Count)
	}
	webCounter := must(s.live["web"].counter(netip.MustParseAddrPort("10.0.0.2:80")))
	apiID := s.live["api"].id

	// Same configuration: nothing written.
	if a, err := s.Apply(s.config()); err != nil || a.Written+a.Deleted+a.Slots != 0 {
		t.Errorf("reapply: %+v %v", a, err)
	}

	// web changes backends, api moves to a new VIP, none goes.
	*now = now.Add(10 * time.Millisecond)
	a, err = s.Apply([]Service{
		svc("web", "10.96.0.10:80", "10.0.0.2:80", "10.0.0.4:80"),
		svc("api", "10.96.0.21:80", "10.0.0.3:80"),
	})
	if err != nil {
		t.Fatal(err)
	}
	if a.Written != 2 || a.Deleted != 2 || a.Slots != 2 {
		t.Errorf("applied %+v", a)
	}
	if got := fmt.Sprint(f.backendsOf("10.96.0.10:80")); got != "[10.0.0.2:80 10.0.0.4:80]" {
		t.Errorf("web -> %s", got)
	}
	if f.backendsOf("10.96.0.11:80") != nil || f.backendsOf("10.96.0.21:80") == nil {
		t.Error("api did not move")
	}
	if got := must(s.live["web"].counter(netip.MustParseAddrPort("10.0.0.2:80"))); got != webCounter {
		t.Errorf("kept backend's counter changed from %d to %d", webCounter, got)
	}
	if s.live["api"].id != apiID {
		t.Error("service id changed with its VIP")
	}
	// Order of publication within one apply.
	want := []string{"ResetCounters", "WriteMembers", "WriteSlots", "WriteServices", "DeleteServices", "ClearMembers"}
	got := f.calls[len(f.calls)-6:]
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("calls %v, want %v", got, want)
	}

	// A new service with the key of a removed one is not deleted.
	if _, err := s.Apply([]Service{svc("web2", "10.96.0.10:80", "10.0.0.9:80")}); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(f.backendsOf("10.96.0.10:80")); got != "[10.0.0.9:80]" {
		t.Errorf("web2 -> %s", got)
	}
}

// config is the applied configuration, for re-applying.
func (s *State) config() []Service {
	var out []Service
	for _, st := range s.Services() {
		out = append(out, s.live[st.Name].svc)
	}
	return out
}

// A configuration that does not fit changes nothing; freed slots are
// reused only after the quarantine, waiting for it when needed.
func TestApplyFull(t *testing.T) {
	s, f, now := newTestState(t, Limits{MaxServices: 2, MaxSlots: 4, MaxCounters: 8})
	first := []Service{svc("a", "10.96.0.1:80", "10.0.0.1:80", "10.0.0.2:80")}
	if _, err := s.Apply(first); err != nil {
		t.Fatal(err)
	}
	calls := len(f.calls)
	for name, cfg := range map[string][]Service{
		"services": {svc("a", "10.96.0.1:80"), svc("b", "10.96.0.2:80"), svc("c", "10.96.0.3:80")},
		"slots":    {svc("a", "10.96.0.1:80", "10.0.0.1:80", "10.0.0.2:80"), svc("b", "10.96.0.2:80", "10.0.0.3:80", "10.0.0.4:80", "10.0.0.5:80")},
	} {
		if _, err := s.Apply(cfg); !errors.Is(err, ErrFull) {
			t.Errorf("%s: %v, want ErrFull", name, err)
		}
	}
	if got := fmt.Sprint(f.backendsOf("10.96.0.1:80")); got != "[10.0.0.1:80 10.0.0.2:80]" || len(f.services) != 1 {
		t.Errorf("after rejected applies: a -> %s, %d services", got, len(f.services))
	}
	for _, c := range f.calls[calls:] {
		if c != "DeleteMaglev" {
			t.Errorf("rejected apply wrote: %v", f.calls[calls:])
			break
		}
	}

	// Change a's two backends twice in a row: the second apply needs the
	// slots the first freed, so it waits out the quarantine.
	start := *now
	if _, err := s.Apply([]Service{svc("a", "10.96.0.1:80", "10.0.0.3:80", "10.0.0.4:80")}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Apply([]Service{svc("a", "10.96.0.1:80", "10.0.0.5:80", "10.0.0.6:80")}); err != nil {
		t.Fatal(err)
	}
	if waited := now.Sub(start); waited < DefaultQuarantine {
		t.Errorf("waited %v, want the quarantine", waited)
	}
	if got := fmt.Sprint(f.backendsOf("10.96.0.1:80")); got != "[10.0.0.5:80 10.0.0.6:80]" {
		t.Errorf("a -> %s", got)
	}
}

// A failed map write leaves the old configuration and allocations.
func TestApplyWriteFailure(t *testing.T) {
	s, f, _ := newTestState(t, Limits{MaxServices: 4, MaxSlots: 4, MaxCounters: 8})
	if _, err := s.Apply([]Service{svc("a", "10.96.0.1:80", "10.0.0.1:80")}); err != nil {
		t.Fatal(err)
	}
	avail := s.slots.available()
	for _, op := range []string{"WriteSlots", "WriteServices"} {
		f.failOn = op
		if _, err := s.Apply([]Service{svc("a", "10.96.0.1:80", "10.0.0.2:80"), svc("b", "10.96.0.2:80", "10.0.0.3:80")}); err == nil {
			t.Fatalf("%s failure not reported", op)
		}
		if got := fmt.Sprint(f.backendsOf("10.96.0.1:80")); got != "[10.0.0.1:80]" || len(f.services) != 1 {
			t.Errorf("%s failed: a -> %s, %d services", op, got, len(f.services))
		}
		if s.slots.available() != avail || s.svcIDs.inUse() != 1 || s.counters.inUse() != 1 {
			t.Errorf("%s failed: allocations leaked", op)
		}
	}
}

// A removed service whose delete failed keeps what it points to, and the
// next apply deletes it again and then frees it.
func TestApplyDeleteRetried(t *testing.T) {
	s, f, now := newTestState(t, Limits{MaxServices: 4, MaxSlots: 4, MaxCounters: 8})
	a, b := svc("a", "10.96.0.1:80", "10.0.0.1:80"), svc("b", "10.96.0.2:80", "10.0.0.2:80")
	if _, err := s.Apply([]Service{a, b}); err != nil {
		t.Fatal(err)
	}
	f.failOn = "DeleteServices"
	_, err := s.Apply([]Service{a})
	if !errors.Is(err, ErrNotRemoved) {
		t.Fatalf("failed delete: %v, want ErrNotRemoved", err)
	}
	if msg := FailureMessage("services", err); !strings.Contains(msg, "applied") {
		t.Errorf("logged as %q", msg)
	}
	if msg := FailureMessage("services", ErrFull); !strings.Contains(msg, "previous services keep serving") {
		t.Errorf("a rejected apply logged as %q", msg)
	}
	if s.svcIDs.inUse() != 2 || s.counters.inUse() != 2 || len(f.services) != 2 {
		t.Fatalf("after the failed delete: %d ids, %d counters, %d services; want b's kept", s.svcIDs.inUse(), s.counters.inUse(), len(f.services))
	}
	f.failOn = ""
	if _, err := s.Apply([]Service{a}); err != nil {
		t.Fatal(err)
	}
	if len(f.services) != 1 || f.backendsOf("10.96.0.2:80") != nil {
		t.Errorf("b still in the services map: %v", f.services)
	}
	// b's index and counter are retired: free after the quarantine.
	if err := s.release(); err != nil {
		t.Fatal(err)
	}
	if s.svcIDs.inUse() != 2 {
		t.Errorf("b's index freed before its quarantine")
	}
	*now = now.Add(DefaultQuarantine)
	if err := s.release(); err != nil {
		t.Fatal(err)
	}
	if s.svcIDs.inUse() != 1 || s.counters.inUse() != 1 || s.slots.available() != 3 {
		t.Errorf("after the quarantine: %d ids, %d counters, %d free slots; want b's freed", s.svcIDs.inUse(), s.counters.inUse(), s.slots.available())
	}
}

func TestApplyWeightsAndMaglev(t *testing.T) {
	s, f, _ := newTestState(t, Limits{MaxServices: 4, MaxSlots: 64, MaxCounters: 64})
	w := svc("w", "10.96.0.1:80", "10.0.0.1:80", "10.0.0.2:80")
	w.Backends[0].Weight, w.Backends[1].Weight = 20, 30
	if _, err := s.Apply([]Service{w}); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(f.backendsOf("10.96.0.1:80")); got != "[10.0.0.1:80 10.0.0.1:80 10.0.0.2:80 10.0.0.2:80 10.0.0.2:80]" {
		t.Errorf("weights 20:30 -> %s", got)
	}

	m, fm, _ := newTestState(t, Limits{MaxServices: 4, MaxSlots: 64, MaxCounters: 64, Algorithm: AlgMaglev, MaglevSize: 251})
	if _, err := m.Apply([]Service{svc("m", "10.96.0.1:80", "10.0.0.1:80", "10.0.0.2:80")}); err != nil {
		t.Fatal(err)
	}
	e := fm.services[Key{VIP: netip.MustParseAddrPort("10.96.0.1:80"), Protocol: TCP}]
	if !e.Maglev || e.Count != 2 || len(fm.maglev[e.Base]) != 251 {
		t.Errorf("maglev entry %+v, table of %d", e, len(fm.maglev[e.Base]))
	}
}

func TestLimits(t *testing.T) {
	for _, l := range []Limits{
		{MaxServices: 0, MaxSlots: 1, MaxCounters: 1},
		{MaxServices: 1, MaxSlots: 1, MaxCounters: 1, Algorithm: "rr"},
		{MaxServices: 1, MaxSlots: 1, MaxCounters: 1, Algorithm: AlgMaglev, MaglevSize: 250},
	} {
		if l.Validate() == nil {
			t.Errorf("%+v accepted", l)
		}
	}
}

func TestRangeAlloc(t *testing.T) {
	a := newRangeAlloc(10)
	x, _ := a.alloc(3)
	y, _ := a.alloc(3)
	z, _ := a.alloc(4)
	if x != 0 || y != 3 || z != 6 {
		t.Fatalf("%d %d %d", x, y, z)
	}
	if _, ok := a.alloc(1); ok {
		t.Error("allocated past the end")
	}
	a.release(y, 3)
	a.release(x, 3)
	if got, ok := a.alloc(6); !ok || got != 0 {
		t.Errorf("merged range: %d %v", got, ok)
	}
	a.release(0, 6)
	a.release(z, 4)
	if len(a.free) != 1 || a.available() != 10 {
		t.Errorf("free list %v", a.free)
	}
}

func must[T any](v T, ok bool) T {
	if !ok {
		panic("missing")
	}
	return v
}

func udpSvc(name, vip string, bs ...string) Service {
	s := svc(name, vip, bs...)
	s.Protocol = UDP
	return s
}

// Session affinity reaches the entry in whole seconds, members follow the
// backends, and the backends that leave UDP services (not TCP ones) are
// disconnected after the entries without them are written.
func TestApplyAffinityAndRemovedUDP(t *testing.T) {
	s, f, now := newTestState(t, Limits{MaxServices: 10, MaxSlots: 40, MaxCounters: 20})
	dns := udpSvc("dns", "10.96.0.10:53", "10.0.0.1:53", "10.0.0.2:53")
	dns.Affinity = 1500 * time.Millisecond
	web := svc("web", "10.96.0.11:80", "10.0.0.1:80", "10.0.0.2:80")
	gone := udpSvc("gone", "10.96.0.12:53", "10.0.0.5:53")
	if _, err := s.Apply([]Service{dns, web, gone}); err != nil {
		t.Fatal(err)
	}
	dnsKey := dns.Key()
	if e := f.services[dnsKey]; e.Affinity != 2 {
		t.Errorf("dns affinity %d s, want 2 (rounded up)", e.Affinity)
	}
	if e := f.services[web.Key()]; e.Affinity != 0 {
		t.Errorf("web affinity %d, want 0", e.Affinity)
	}
	if len(f.members) != 5 {
		t.Errorf("members %v, want 5", f.members)
	}
	for _, b := range dns.Backends {
		c := must(s.live["dns"].counter(b.Addr))
		if m := f.members[c]; m != (Member{Service: s.live["dns"].id, Addr: b.Addr}) {
			t.Errorf("member %d = %+v", c, m)
		}
	}
	if len(f.removed) != 0 {
		t.Errorf("first apply disconnected %v", f.removed)
	}

	// Only the timeout changes: the entry is rewritten, nothing else.
	*now = now.Add(10 * time.Millisecond)
	dns.Affinity = 10800 * time.Second
	f.calls = nil
	a, err := s.Apply([]Service{dns, web, gone})
	if err != nil || a.Written != 1 || a.Slots != 0 {
		t.Fatalf("affinity change: %+v %v", a, err)
	}
	if e := f.services[dnsKey]; e.Affinity != 10800 {
		t.Errorf("dns affinity %d", e.Affinity)
	}

	// 10.0.0.1 leaves dns and web, gone goes: the UDP ones are
	// disconnected, once, after the writes.
	*now = now.Add(10 * time.Millisecond)
	dns = udpSvc("dns", "10.96.0.10:53", "10.0.0.2:53", "10.0.0.3:53")
	web = svc("web", "10.96.0.11:80", "10.0.0.2:80")
	f.calls = nil
	a, err = s.Apply([]Service{dns, web})
	if err != nil {
		t.Fatal(err)
	}
	if len(f.removed) != 0 || a.UDPClosed != 0 {
		t.Errorf("Apply closed UDP sockets itself: %v", f.removed)
	}
	s.CloseUDP(&a)
	if a.UDPRemoved != 2 || a.UDPClosed != 2 || a.UDPCloseErr != nil {
		t.Errorf("applied %+v", a)
	}
	want := []Removed{
		{Key: dnsKey, Backend: netip.MustParseAddrPort("10.0.0.1:53")},
		{Key: gone.Key(), Backend: netip.MustParseAddrPort("10.0.0.5:53")},
	}
	if len(f.removed) != 1 || fmt.Sprint(f.removed[0]) != fmt.Sprint(want) {
		t.Errorf("disconnected %v, want %v", f.removed, want)
	}
	if got := fmt.Sprint(f.calls); got != "[ResetCounters WriteMembers WriteSlots WriteServices DeleteServices ClearMembers DisconnectUDP]" {
		t.Errorf("calls %s", got)
	}
	if e := f.services[dnsKey]; e.Affinity != 0 {
		t.Errorf("dns affinity %d after it was dropped", e.Affinity)
	}
	if len(f.members) != 3 { // dns: .2 .3; web: .2
		t.Errorf("members %v, want 3", f.members)
	}

	// A failed disconnect does not fail the apply.
	*now = now.Add(10 * time.Millisecond)
	f.failOn = "DisconnectUDP"
	a, err = s.Apply([]Service{web})
	s.CloseUDP(&a)
	if err != nil || a.UDPRemoved != 2 || a.UDPCloseErr == nil {
		t.Errorf("apply with a failing disconnect: %+v %v", a, err)
	}
}

// published is what the fake maps balance: per VIP:port, the backends
// in slot order and the affinity.
func (f *fakeDatapath) published() map[Key]string {
	out := map[Key]string{}
	for k, e := range f.services {
		var bs []string
		for s := e.Base; s < e.Base+e.Count; s++ {
			bs = append(bs, f.slots[s].Addr.String())
		}
		if e.Maglev {
			bs = append(bs, fmt.Sprint("maglev", len(f.maglev[e.Base])))
		}
		out[k] = fmt.Sprint(bs, e.Affinity)
	}
	return out
}

// TestApplyChangesMatchesApply changes a configuration at random, one
// State by ApplyChanges with the difference and another by Apply with the
// whole: the maps must balance the same, and the same UDP backends be
// reported removed.
func TestApplyChangesMatchesApply(t *testing.T) {
	for _, alg := range []Algorithm{AlgRandom, AlgMaglev} {
		t.Run(string(alg), func(t *testing.T) {
			lim := Limits{MaxServices: 40, MaxSlots: 400, MaxCounters: 400, Algorithm: alg, MaglevSize: 251}
			full, ff, fnow := newTestState(t, lim)
			inc, fi, inow := newTestState(t, lim)
			rng := rand.New(rand.NewPCG(1, uint64(len(alg))))
			cfg := map[string]Service{}
			for step := range 400 {
				next := maps.Clone(cfg)
				for range 1 + rng.IntN(3) {
					name := fmt.Sprint("s", rng.IntN(12))
					if rng.IntN(4) == 0 {
						delete(next, name)
						continue
					}
					s := Service{Name: name, VIP: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, 0, byte(rng.IntN(14))}), 80), Protocol: []Protocol{TCP, UDP}[rng.IntN(2)]}
					if rng.IntN(5) == 0 {
						s.Affinity = time.Duration(1+rng.IntN(3)) * time.Second
					}
					for b := range rng.IntN(5) {
						s.Backends = append(s.Backends, Backend{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 244, 0, byte(b + rng.IntN(3))}), 8080), Weight: uint32(1 + rng.IntN(2))})
					}
					slices.SortFunc(s.Backends, func(a, b Backend) int { return a.Addr.Compare(b.Addr) })
					s.Backends = slices.CompactFunc(s.Backends, func(a, b Backend) bool { return a.Addr == b.Addr })
					next[name] = s
				}
				// VIP:ports unique, as the callers keep them.
				keys := map[Key]bool{}
				for _, name := range slices.Sorted(maps.Keys(next)) {
					s := next[name]
					if k := s.Key(); keys[k] {
						delete(next, name)
					} else {
						keys[k] = true
					}
				}
				var upsert []Service
				var remove []string
				for name, s := range next {
					if old, ok := cfg[name]; !ok || !reflect.DeepEqual(old, s) || rng.IntN(8) == 0 {
						upsert = append(upsert, s)
					}
				}
				for name := range cfg {
					if _, ok := next[name]; !ok {
						remove = append(remove, name)
					}
				}
				af, errF := full.Apply(slices.Collect(maps.Values(next)))
				ai, errI := inc.ApplyChanges(upsert, remove)
				if (errF == nil) != (errI == nil) {
					t.Fatalf("step %d: Apply: %v, ApplyChanges: %v", step, errF, errI)
				}
				if errF != nil {
					// Both refused (full maps): both keep the old one.
					continue
				}
				cfg = next
				full.CloseUDP(&af)
				inc.CloseUDP(&ai)
				if af.Written != ai.Written || af.Deleted != ai.Deleted || af.Slots != ai.Slots || af.UDPRemoved != ai.UDPRemoved {
					t.Fatalf("step %d: Apply %+v, ApplyChanges %+v", step, af, ai)
				}
				if !reflect.DeepEqual(ff.published(), fi.published()) {
					t.Fatalf("step %d: maps differ:\nApply:        %v\nApplyChanges: %v", step, ff.published(), fi.published())
				}
				if len(ff.members) != len(fi.members) {
					t.Fatalf("step %d: %d members after Apply, %d after ApplyChanges", step, len(ff.members), len(fi.members))
				}
				n1, b1 := full.Len()
				n2, b2 := inc.Len()
				nb := 0
				for _, s := range cfg {
					nb += len(s.Backends)
				}
				if n1 != n2 || b1 != b2 || n1 != len(cfg) || b1 != nb {
					t.Fatalf("step %d: Len %d/%d after Apply, %d/%d after ApplyChanges, want %d/%d", step, n1, b1, n2, b2, len(cfg), nb)
				}
				d := time.Duration(rng.IntN(3)) * DefaultQuarantine / 2
				*fnow, *inow = fnow.Add(d), inow.Add(d)
			}
		})
	}
}
