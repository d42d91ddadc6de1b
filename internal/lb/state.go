package lb

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"time"
)

// Algorithm is how a backend is chosen.
type Algorithm string

const (
	// AlgRandom picks a backend at random for each connect, and by a hash
	// of the socket for each unconnected UDP datagram.
	AlgRandom Algorithm = "random"
	// AlgMaglev picks through a per-service Maglev table indexed by a hash
	// of the socket, so that a backend change moves as few sockets as
	// possible.
	AlgMaglev Algorithm = "maglev"
)

// Limits are the capacities of the datapath's maps.
type Limits struct {
	MaxServices int       // lb_services and lb_service_stats entries
	MaxSlots    int       // lb_backends entries (and lb_maglev)
	MaxCounters int       // lb_backend_stats entries
	Algorithm   Algorithm // "" is AlgRandom
	MaglevSize  int       // entries of each Maglev table (AlgMaglev)
}

// MaxSlotsPerService bounds the slots one service takes in random mode,
// where a backend of weight w takes w slots after dividing all weights of
// the service by their greatest common divisor.
const MaxSlotsPerService = 4096

// Slot is one entry of lb_backends.
type Slot struct {
	Addr    netip.AddrPort
	Counter uint32 // index into lb_backend_stats
}

// Entry is one entry of lb_services.
type Entry struct {
	Key    Key
	ID     uint32 // index into lb_service_stats
	Base   uint32 // first slot
	Count  uint32 // slots; 0 refuses connections
	Maglev bool
	// Affinity is the ClientIP session affinity timeout in seconds; 0 is
	// none.
	Affinity uint32
}

// Member is a backend of a service, by its counter index: what session
// affinity remembers a client's backend by, and checks is still there.
type Member struct {
	Service uint32 // index into lb_service_stats
	Addr    netip.AddrPort
}

// Removed is a backend that left a UDP service (or whose service went
// away): connected UDP sockets the datapath sent to it should be closed,
// or they would keep sending to it.
type Removed struct {
	Key     Key
	Backend netip.AddrPort
}

// Datapath is what a configuration is applied to: the BPF maps, or a fake
// in tests. Writes of services must replace each entry whole.
type Datapath interface {
	// ResetCounters zeroes the counters of indexes about to be reused.
	ResetCounters(services, backends []uint32) error
	// WriteSlots writes slots[i] at index idx[i] of lb_backends.
	WriteSlots(idx []uint32, slots []Slot) error
	// WriteMaglev installs the Maglev table of the range starting at base.
	WriteMaglev(base uint32, table []uint32) error
	// DeleteMaglev removes the tables of ranges no longer used.
	DeleteMaglev(bases []uint32) error
	// WriteServices creates or replaces service entries.
	WriteServices(entries []Entry) error
	// DeleteServices removes service entries.
	DeleteServices(keys []Key) error
	// WriteMembers records that counter idx[i] is backend ms[i].Addr of
	// service ms[i].Service, before any entry points at it.
	WriteMembers(idx []uint32, ms []Member) error
	// ClearMembers records that counter idx[i], backend addrs[i], left its
	// service.
	ClearMembers(idx []uint32, addrs []netip.AddrPort) error
	// DisconnectUDP closes the connected UDP sockets sent to removed
	// backends, after the entries without them are written, and returns
	// how many it closed.
	DisconnectUDP(removed []Removed) (int, error)
}

// affinitySeconds is d in whole seconds, rounded up; 0 is no affinity.
func affinitySeconds(d time.Duration) uint32 {
	if d <= 0 {
		return 0
	}
	return uint32(min((d+time.Second-1)/time.Second, 1<<31))
}

// ErrFull means a configuration does not fit the maps.
var ErrFull = errors.New("does not fit the maps")

// ErrNotRemoved means an apply wrote its services but could not delete
// all of those it removed: they keep their old backends until a later
// apply deletes them.
var ErrNotRemoved = errors.New("removed services not deleted (they keep their old backends)")

// FailureMessage is the message to log when an apply of what (such as
// "services file") failed with err: what serves now.
func FailureMessage(what string, err error) string {
	if errors.Is(err, ErrNotRemoved) {
		return what + " applied, but the services removed still serve with their old backends"
	}
	return what + " rejected; the previous services keep serving"
}

// DefaultQuarantine is how long freed slots and indexes stay unused:
// programs that read a service entry before it was replaced may still read
// its old slots for the few microseconds they run.
const DefaultQuarantine = time.Second

// live is a service as applied.
type live struct {
	svc      Service
	id       uint32
	base     uint32
	count    uint32
	maglev   bool
	counters []uint32 // of svc.Backends[i]
	slots    []Slot
	table    []uint32
	index    map[netip.AddrPort]int // of svc.Backends, built for large services
}

type retired struct {
	at           time.Time
	base, count  uint32
	maglev       bool
	svcID        uint32
	freeID       bool
	counters     []uint32
	freeCounters bool
}

// State is the applied configuration and the allocation of map entries.
// It is not safe for concurrent use (Manager serializes it).
type State struct {
	lim        Limits
	dp         Datapath
	now        func() time.Time
	sleep      func(time.Duration)
	quarantine time.Duration

	live     map[string]*live
	backends int // of all live services
	slots    *rangeAlloc
	svcIDs   *idAlloc
	counters *idAlloc
	retired  []retired
	// orphans are removed services whose entries a failed delete left in
	// the services map: still balanced, so what they point to is kept.
	// Every apply deletes them again, and retires what they held once
	// they are gone (or once a new service's entry replaced theirs).
	orphans []orphan
}

// orphan is a removed service still in the services map.
type orphan struct {
	key Key
	r   retired
}

// NewState returns an empty State over dp.
func NewState(dp Datapath, lim Limits) (*State, error) {
	if lim.Algorithm == "" {
		lim.Algorithm = AlgRandom
	}
	if err := lim.Validate(); err != nil {
		return nil, err
	}
	return &State{
		lim:        lim,
		dp:         dp,
		now:        time.Now,
		sleep:      time.Sleep,
		quarantine: DefaultQuarantine,
		live:       map[string]*live{},
		slots:      newRangeAlloc(uint32(lim.MaxSlots)),
		svcIDs:     &idAlloc{limit: uint32(lim.MaxServices)},
		counters:   &idAlloc{limit: uint32(lim.MaxCounters)},
	}, nil
}

// Validate checks the limits.
func (l Limits) Validate() error {
	var errs []error
	if l.MaxServices < 1 || l.MaxServices > 1<<24 {
		errs = append(errs, fmt.Errorf("max services %d: want 1..%d", l.MaxServices, 1<<24))
	}
	if l.MaxSlots < 1 || l.MaxSlots > 1<<25 {
		errs = append(errs, fmt.Errorf("max backend slots %d: want 1..%d", l.MaxSlots, 1<<25))
	}
	if l.MaxCounters < 1 || l.MaxCounters > 1<<24 {
		errs = append(errs, fmt.Errorf("max backend counters %d: want 1..%d", l.MaxCounters, 1<<24))
	}
	switch l.Algorithm {
	case AlgRandom, "":
	case AlgMaglev:
		if !slices.Contains(MaglevSizes, l.MaglevSize) {
			errs = append(errs, fmt.Errorf("maglev table size %d: want one of %v", l.MaglevSize, MaglevSizes))
		}
	default:
		errs = append(errs, fmt.Errorf("algorithm %q: want random or maglev", l.Algorithm))
	}
	return errors.Join(errs...)
}

// layout is the content of a service's slots, and its Maglev table.
func (s *State) layout(svc Service, counters []uint32) ([]Slot, []uint32, error) {
	if len(svc.Backends) == 0 {
		return nil, nil, nil
	}
	if s.lim.Algorithm == AlgMaglev {
		slots := make([]Slot, len(svc.Backends))
		for i, b := range svc.Backends {
			slots[i] = Slot{Addr: b.Addr, Counter: counters[i]}
		}
		table, err := Maglev(svc.Backends, s.lim.MaglevSize)
		if err != nil {
			return nil, nil, fmt.Errorf("service %s (line %d): %w (KTEL_LB_MAGLEV_TABLE_SIZE)", svc.Name, svc.Line, err)
		}
		return slots, table, nil
	}
	g := uint32(0)
	for _, b := range svc.Backends {
		g = gcd(g, weight(b))
	}
	var slots []Slot
	for i, b := range svc.Backends {
		for range weight(b) / g {
			slots = append(slots, Slot{Addr: b.Addr, Counter: counters[i]})
		}
	}
	if len(slots) > MaxSlotsPerService {
		return nil, nil, fmt.Errorf("service %s (line %d): weights need %d slots, more than %d; use smaller or more even weights",
			svc.Name, svc.Line, len(slots), MaxSlotsPerService)
	}
	return slots, nil, nil
}

func gcd(a, b uint32) uint32 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// release frees what was retired at least a quarantine ago.
func (s *State) release() error {
	now := s.now()
	var bases []uint32
	keep := s.retired[:0]
	for _, r := range s.retired {
		if now.Sub(r.at) < s.quarantine {
			keep = append(keep, r)
			continue
		}
		s.slots.release(r.base, r.count)
		if r.maglev {
			bases = append(bases, r.base)
		}
		if r.freeID {
			s.svcIDs.put(r.svcID)
		}
		for _, c := range r.counters {
			s.counters.put(c)
		}
	}
	s.retired = keep
	if len(bases) > 0 {
		return s.dp.DeleteMaglev(bases)
	}
	return nil
}

// Applied summarizes what Apply changed.
type Applied struct {
	Written int // service entries created or replaced
	Deleted int // service entries removed
	Slots   int // backend slots written
	// UDPRemoved are backends that left UDP services, UDPClosed the
	// connected sockets to them closed, and UDPCloseErr why not all could
	// be: the configuration is applied regardless. Apply leaves the
	// closing to CloseUDP, which the caller runs without the lock that
	// serializes applies: it walks network namespaces and sockets.
	UDPRemoved, UDPClosed int
	UDPCloseErr           error

	udpRemoved []Removed // for CloseUDP
}

// CloseUDP closes the connected UDP sockets sent to the backends that the
// apply a removed from UDP services, and records the result in a. Of the
// State it reads only the datapath, which no Apply changes: it may run
// while another Apply does, though CloseUDP calls must not overlap each
// other.
func (s *State) CloseUDP(a *Applied) {
	if len(a.udpRemoved) == 0 {
		return
	}
	a.UDPClosed, a.UDPCloseErr = s.dp.DisconnectUDP(a.udpRemoved)
	a.udpRemoved = nil
}

// Apply makes svcs the configuration, atomically per service: a connect
// sees either a service's old entry and backends or its new ones. Services
// whose backends did not change are not rewritten. When svcs does not fit,
// nothing changes and the error wraps ErrFull.
func (s *State) Apply(svcs []Service) (Applied, error) {
	return s.applyRetry(svcs, nil, true)
}

// ApplyChanges changes the configuration by svcs and remove alone: each
// service of upsert is added or replaces the one of its name, each name of
// remove (and not in upsert) is removed, and every other service stays as
// it is, untouched and unread, so that its cost is that of the change, not
// of the whole configuration. The result is that of Apply with the whole
// new configuration: the same entries, slots and counters are written,
// atomically per service, and nothing changes when it does not fit. The
// caller keeps VIP:ports unique across the whole configuration, as Apply's
// callers do within theirs.
func (s *State) ApplyChanges(upsert []Service, remove []string) (Applied, error) {
	return s.applyRetry(upsert, remove, false)
}

func (s *State) applyRetry(svcs []Service, remove []string, full bool) (Applied, error) {
	if err := s.release(); err != nil {
		return Applied{}, fmt.Errorf("delete maglev tables: %w", err)
	}
	a, err := s.apply(svcs, remove, full)
	if errors.Is(err, ErrFull) && len(s.retired) > 0 {
		// What was freed by recent reloads may make room once its
		// quarantine is over.
		s.sleep(s.quarantine - s.now().Sub(s.retired[len(s.retired)-1].at))
		if err := s.release(); err != nil {
			return Applied{}, fmt.Errorf("delete maglev tables: %w", err)
		}
		a, err = s.apply(svcs, remove, full)
	}
	return a, err
}

// apply makes svcs the configuration (full), or changes it by svcs and
// remove (ApplyChanges). Only the services named in svcs or remove are
// touched, and with full every applied one is.
func (s *State) apply(svcs []Service, remove []string, full bool) (_ Applied, err error) {
	// touched are the applied services that svcs replaces or removes.
	var touched []string
	if full {
		touched = make([]string, 0, len(s.live))
		for name := range s.live {
			touched = append(touched, name)
		}
	} else {
		seen := make(map[string]bool, len(svcs)+len(remove))
		for _, svc := range svcs {
			seen[svc.Name] = true
			if s.live[svc.Name] != nil {
				touched = append(touched, svc.Name)
			}
		}
		for _, name := range remove {
			if s.live[name] != nil && !seen[name] {
				seen[name] = true
				touched = append(touched, name)
			}
		}
	}
	total := len(svcs)
	if !full {
		total += len(s.live) - len(touched)
	}
	if total > s.lim.MaxServices {
		return Applied{}, fmt.Errorf("%d services: more than the %d the services map holds: %w", total, s.lim.MaxServices, ErrFull)
	}
	// What this call allocates, freed again if it fails.
	var (
		gotIDs, gotCounters []uint32
		gotRanges           [][2]uint32
		gotTables           []uint32
	)
	defer func() {
		if err == nil {
			return
		}
		if len(gotTables) > 0 {
			_ = s.dp.DeleteMaglev(gotTables)
		}
		for _, r := range gotRanges {
			s.slots.release(r[0], r[1])
		}
		for _, id := range gotIDs {
			s.svcIDs.put(id)
		}
		for _, c := range gotCounters {
			s.counters.put(c)
		}
	}()

	var (
		next             = make(map[string]*live, len(svcs))
		resetSvc, resetB []uint32
		newMembers       []Member
		slotIdx          []uint32
		slotVals         []Slot
		tables           []*live
		entries          []Entry
		newKeys          = make(map[Key]bool, len(svcs))
	)
	for _, svc := range svcs {
		old := s.live[svc.Name]
		l := &live{svc: svc, counters: make([]uint32, len(svc.Backends))}
		if old != nil {
			l.id = old.id
		} else {
			id, ok := s.svcIDs.get()
			if !ok {
				return Applied{}, fmt.Errorf("service %s: no free service index (%d in use or quarantined): %w", svc.Name, s.lim.MaxServices, ErrFull)
			}
			gotIDs = append(gotIDs, id)
			l.id = id
			resetSvc = append(resetSvc, id)
		}
		for i, b := range svc.Backends {
			if c, ok := old.counter(b.Addr); ok {
				l.counters[i] = c
				continue
			}
			c, ok := s.counters.get()
			if !ok {
				return Applied{}, fmt.Errorf("service %s: no free backend counter (%d in use or quarantined): %w", svc.Name, s.lim.MaxCounters, ErrFull)
			}
			gotCounters = append(gotCounters, c)
			l.counters[i] = c
			resetB = append(resetB, c)
			newMembers = append(newMembers, Member{Service: l.id, Addr: b.Addr})
		}
		if l.slots, l.table, err = s.layout(svc, l.counters); err != nil {
			return Applied{}, err
		}
		l.maglev = l.table != nil
		if old != nil && old.maglev == l.maglev && slices.Equal(old.slots, l.slots) && slices.Equal(old.table, l.table) {
			l.base, l.count = old.base, old.count
		} else if n := uint32(len(l.slots)); n > 0 {
			base, ok := s.slots.alloc(n)
			if !ok {
				return Applied{}, fmt.Errorf("service %s: %d backend slots needed, %d free of %d: %w",
					svc.Name, n, s.slots.available(), s.lim.MaxSlots, ErrFull)
			}
			gotRanges = append(gotRanges, [2]uint32{base, n})
			l.base, l.count = base, n
			for i, sl := range l.slots {
				slotIdx = append(slotIdx, base+uint32(i))
				slotVals = append(slotVals, sl)
			}
			if l.maglev {
				tables = append(tables, l)
			}
		}
		if old == nil || old.id != l.id || old.base != l.base || old.count != l.count || old.maglev != l.maglev ||
			old.svc.Key() != svc.Key() || old.svc.Affinity != svc.Affinity {
			entries = append(entries, l.entry())
		}
		next[svc.Name] = l
		newKeys[svc.Key()] = true
	}

	// Publish: counters and backends first, then the entries that point
	// at them, then deletions.
	if err := s.dp.ResetCounters(resetSvc, resetB); err != nil {
		return Applied{}, fmt.Errorf("reset counters: %w", err)
	}
	if len(resetB) > 0 {
		if err := s.dp.WriteMembers(resetB, newMembers); err != nil {
			return Applied{}, fmt.Errorf("write backend members: %w", err)
		}
	}
	if len(slotIdx) > 0 {
		if err := s.dp.WriteSlots(slotIdx, slotVals); err != nil {
			return Applied{}, fmt.Errorf("write backends: %w", err)
		}
	}
	for _, l := range tables {
		if err := s.dp.WriteMaglev(l.base, l.table); err != nil {
			return Applied{}, fmt.Errorf("write maglev table of %s: %w", l.svc.Name, err)
		}
		gotTables = append(gotTables, l.base)
	}
	if len(entries) > 0 {
		if err := s.dp.WriteServices(entries); err != nil {
			s.restore(entries)
			return Applied{}, fmt.Errorf("write services: %w", err)
		}
	}

	var (
		del      []Key
		leak     = map[string]bool{}
		now      = s.now()
		toRetire []retired
	)
	for _, name := range touched {
		if k := s.live[name].svc.Key(); !newKeys[k] {
			del = append(del, k)
			leak[name] = true
		}
	}
	var orphans []orphan
	for _, o := range s.orphans {
		if newKeys[o.key] {
			// The write above replaced its entry.
			o.r.at = now
			toRetire = append(toRetire, o.r)
			continue
		}
		del = append(del, o.key)
		orphans = append(orphans, o)
	}
	sort.Slice(del, func(i, j int) bool { return del[i].VIP.String() < del[j].VIP.String() })
	var delErr error
	if len(del) > 0 {
		if delErr = s.dp.DeleteServices(del); delErr == nil {
			clear(leak)
			for _, o := range orphans {
				o.r.at = now
				toRetire = append(toRetire, o.r)
			}
			orphans = nil
		}
	}
	var (
		cleared     []uint32
		clearedAddr []netip.AddrPort
	)
	for _, name := range touched {
		old, l := s.live[name], next[name]
		r := retired{at: now}
		if l == nil {
			r.svcID, r.freeID = old.id, true
		}
		for i, c := range old.counters {
			if _, ok := l.counter(old.svc.Backends[i].Addr); !ok {
				r.counters = append(r.counters, c)
				cleared = append(cleared, c)
				clearedAddr = append(clearedAddr, old.svc.Backends[i].Addr)
			}
		}
		if old.count > 0 && (l == nil || l.base != old.base || l.count != old.count) {
			r.base, r.count, r.maglev = old.base, old.count, old.maglev
		}
		if leak[name] {
			// Its entry may still be in the map: keep what it points to
			// until a later apply deletes it.
			orphans = append(orphans, orphan{key: old.svc.Key(), r: r})
			continue
		}
		if r.freeID || len(r.counters) > 0 || r.count > 0 {
			toRetire = append(toRetire, r)
		}
	}
	s.retired = append(s.retired, toRetire...)
	s.orphans = orphans
	removed := removedUDP(s.live, touched, next)
	for _, name := range touched {
		s.backends -= len(s.live[name].svc.Backends)
	}
	for _, l := range next {
		s.backends += len(l.svc.Backends)
	}
	if full {
		s.live = next
	} else {
		for _, name := range touched {
			delete(s.live, name)
		}
		for name, l := range next {
			s.live[name] = l
		}
	}
	a := Applied{Written: len(entries), Deleted: len(del), Slots: len(slotIdx), UDPRemoved: len(removed), udpRemoved: removed}
	// A counter is reused only after the quarantine, so clearing now is
	// never late for a new owner.
	if len(cleared) > 0 {
		if err := s.dp.ClearMembers(cleared, clearedAddr); err != nil {
			delErr = errors.Join(delErr, fmt.Errorf("clear backend members (affinity may still choose them): %w", err))
		}
	}
	if delErr != nil {
		return a, fmt.Errorf("%w: %w", ErrNotRemoved, delErr)
	}
	return a, nil
}

// removedUDP lists the backends of UDP services of old named in touched
// (the others are unchanged) that the service at the same address in next
// lacks (all of them if it has none).
func removedUDP(old map[string]*live, touched []string, next map[string]*live) []Removed {
	byKey := make(map[Key]*live, len(next))
	for _, l := range next {
		byKey[l.svc.Key()] = l
	}
	var out []Removed
	for _, name := range touched {
		o := old[name]
		if o.svc.Protocol != UDP {
			continue
		}
		k := o.svc.Key()
		n := byKey[k]
		for _, b := range o.svc.Backends {
			if _, ok := n.counter(b.Addr); !ok {
				out = append(out, Removed{Key: k, Backend: b.Addr})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Key.VIP != out[j].Key.VIP {
			return out[i].Key.VIP.String() < out[j].Key.VIP.String()
		}
		return out[i].Backend.String() < out[j].Backend.String()
	})
	return out
}

// restore puts back the entries of services that entries replaced, and
// deletes the ones it created, after a failed write.
func (s *State) restore(entries []Entry) {
	var back []Entry
	var del []Key
	old := make(map[Key]*live, len(s.live))
	for _, l := range s.live {
		old[l.svc.Key()] = l
	}
	for _, e := range entries {
		if l := old[e.Key]; l != nil {
			back = append(back, l.entry())
		} else {
			del = append(del, e.Key)
		}
	}
	if len(back) > 0 {
		_ = s.dp.WriteServices(back)
	}
	if len(del) > 0 {
		_ = s.dp.DeleteServices(del)
	}
}

// counter returns the counter index of backend addr of l, if l has it.
func (l *live) counter(addr netip.AddrPort) (uint32, bool) {
	if l == nil {
		return 0, false
	}
	const small = 16 // backends searched in order; an index past that
	if len(l.svc.Backends) <= small {
		for i, b := range l.svc.Backends {
			if b.Addr == addr {
				return l.counters[i], true
			}
		}
		return 0, false
	}
	if l.index == nil {
		l.index = make(map[netip.AddrPort]int, len(l.svc.Backends))
		for i, b := range l.svc.Backends {
			l.index[b.Addr] = i
		}
	}
	i, ok := l.index[addr]
	if !ok {
		return 0, false
	}
	return l.counters[i], true
}

func (l *live) entry() Entry {
	return Entry{Key: l.svc.Key(), ID: l.id, Base: l.base, Count: l.count, Maglev: l.maglev, Affinity: affinitySeconds(l.svc.Affinity)}
}

// Len returns the number of applied services and of their backends.
func (s *State) Len() (services, backends int) { return len(s.live), s.backends }

// ServiceStatus is one applied service and the indexes of its counters.
type ServiceStatus struct {
	Name     string
	Key      Key
	ID       uint32 // lb_service_stats index
	Backends []BackendStatus
}

// BackendStatus is one backend of a service.
type BackendStatus struct {
	Addr    netip.AddrPort
	Weight  uint32
	Counter uint32 // lb_backend_stats index
}

// Services returns the applied services, sorted by name.
func (s *State) Services() []ServiceStatus {
	out := make([]ServiceStatus, 0, len(s.live))
	// All services' backends in one slice: a scrape reads this.
	backends := make([]BackendStatus, 0, s.backends)
	for _, l := range s.live {
		st := ServiceStatus{Name: l.svc.Name, Key: l.svc.Key(), ID: l.id}
		first := len(backends)
		for i, b := range l.svc.Backends {
			backends = append(backends, BackendStatus{Addr: b.Addr, Weight: b.Weight, Counter: l.counters[i]})
		}
		if len(backends) > first {
			st.Backends = backends[first:len(backends):len(backends)]
		}
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b ServiceStatus) int { return strings.Compare(a.Name, b.Name) })
	return out
}
