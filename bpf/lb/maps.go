package lb

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	ctl "github.com/ktel-dev/ktel/internal/lb"
)

// maps is the ctl.Datapath over the BPF maps.
type maps struct {
	ncpu         int
	services     *ebpf.Map
	backends     *ebpf.Map
	maglev       *ebpf.Map
	maglevInner  *ebpf.MapSpec
	reverse      *ebpf.Map
	serviceStats *ebpf.Map
	backendStats *ebpf.Map
	drops        *ebpf.Map
	members      *ebpf.Map
	affinity     *ebpf.Map
	udp          *udpCloser
}

var _ ctl.Datapath = (*maps)(nil)

// addr4 is an address as the datapath stores it: network order, IPv4 in
// the first word.
func addrWords(a netip.Addr) (w [4]uint32, family uint8) {
	if a.Is4() {
		b := a.As4()
		w[0] = nativeWord(b[:])
		return w, 4
	}
	b := a.As16()
	for i := range 4 {
		w[i] = nativeWord(b[4*i : 4*i+4])
	}
	return w, 6
}

// nativeWord reinterprets 4 bytes in network order as the host-order u32
// the kernel compares, the way the C struct stores them.
func nativeWord(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// netPort is a port in network order as a little-endian u16 (bpfel only).
func netPort(p uint16) uint16 { return p>>8 | p<<8 }

func svcKey(k ctl.Key) lbSvcKey {
	w, fam := addrWords(k.VIP.Addr())
	return lbSvcKey{Addr: w, Port: netPort(k.VIP.Port()), Proto: uint8(k.Protocol), Family: fam}
}

func (m *maps) ResetCounters(services, backends []uint32) error {
	if len(services) > 0 {
		if err := batchUpdate(m.serviceStats, services, make([]lbSvcStats, len(services)*m.ncpu)); err != nil {
			return fmt.Errorf("lb_service_stats: %w", err)
		}
	}
	if len(backends) > 0 {
		if err := batchUpdate(m.backendStats, backends, make([]uint64, len(backends)*m.ncpu)); err != nil {
			return fmt.Errorf("lb_backend_stats: %w", err)
		}
	}
	return nil
}

func (m *maps) WriteSlots(idx []uint32, slots []ctl.Slot) error {
	vals := make([]lbBackend, len(slots))
	for i, s := range slots {
		w, fam := addrWords(s.Addr.Addr())
		vals[i] = lbBackend{Addr: w, Port: netPort(s.Addr.Port()), Family: fam, Counter: s.Counter}
	}
	return batchUpdate(m.backends, idx, vals)
}

func (m *maps) WriteMaglev(base uint32, table []uint32) error {
	inner, err := ebpf.NewMap(m.maglevInner)
	if err != nil {
		return fmt.Errorf("create table: %w", err)
	}
	defer inner.Close() // the outer map holds its own reference
	keys := make([]uint32, len(table))
	for i := range keys {
		keys[i] = uint32(i)
	}
	if err := batchUpdate(inner, keys, table); err != nil {
		return fmt.Errorf("fill table: %w", err)
	}
	return m.maglev.Update(base, inner, ebpf.UpdateAny)
}

func (m *maps) DeleteMaglev(bases []uint32) error {
	var errs []error
	for _, b := range bases {
		if err := m.maglev.Delete(b); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *maps) WriteServices(entries []ctl.Entry) error {
	keys := make([]lbSvcKey, len(entries))
	vals := make([]lbSvcVal, len(entries))
	for i, e := range entries {
		keys[i] = svcKey(e.Key)
		vals[i] = lbSvcVal{Id: e.ID, Base: e.Base, Count: e.Count, Affinity: e.Affinity}
		if e.Maglev {
			vals[i].Flags = 1 // SVC_F_MAGLEV
		}
	}
	return batchUpdate(m.services, keys, vals)
}

func (m *maps) DeleteServices(keys []ctl.Key) error {
	ks := make([]lbSvcKey, len(keys))
	for i, k := range keys {
		ks[i] = svcKey(k)
	}
	_, err := m.services.BatchDelete(ks, nil)
	if errors.Is(err, ebpf.ErrNotSupported) {
		var errs []error
		for _, k := range ks {
			if err := m.services.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	return err
}

func (m *maps) WriteMembers(idx []uint32, ms []ctl.Member) error {
	vals := make([]lbMember, len(ms))
	for i, mb := range ms {
		w, fam := addrWords(mb.Addr.Addr())
		vals[i] = lbMember{B: lbBackend{Addr: w, Port: netPort(mb.Addr.Port()), Family: fam, Counter: idx[i]}}
	}
	// First without a service, then with it: a program that copies a
	// member while it is written and finds its service copied a backend
	// written whole (see affine in lb.bpf.c).
	if err := batchUpdate(m.members, idx, vals); err != nil {
		return err
	}
	for i, mb := range ms {
		vals[i].Svc = mb.Service + 1
	}
	return batchUpdate(m.members, idx, vals)
}

func (m *maps) ClearMembers(idx []uint32, addrs []netip.AddrPort) error {
	vals := make([]lbMember, len(idx))
	for i, a := range addrs {
		w, fam := addrWords(a.Addr())
		vals[i] = lbMember{B: lbBackend{Addr: w, Port: netPort(a.Port()), Family: fam, Counter: idx[i]}}
	}
	return batchUpdate(m.members, idx, vals)
}

func (m *maps) DisconnectUDP(removed []ctl.Removed) (int, error) {
	if m.udp == nil {
		return 0, nil
	}
	return m.udp.disconnect(removed)
}

// batchUpdate writes keys and values (for per-CPU maps, ncpu values per
// key) with one BPF_MAP_UPDATE_BATCH per 4096 keys, or key by key where
// the kernel lacks batch operations.
func batchUpdate[K, V any](m *ebpf.Map, keys []K, vals []V) error {
	const chunk = 4096
	per := len(vals) / max(len(keys), 1) // values per key: 1, or ncpu
	for i := 0; i < len(keys); i += chunk {
		j := min(i+chunk, len(keys))
		_, err := m.BatchUpdate(keys[i:j], vals[i*per:j*per], nil)
		if errors.Is(err, ebpf.ErrNotSupported) {
			for k := i; k < j; k++ {
				var v any = vals[k*per : (k+1)*per]
				if per == 1 {
					v = vals[k]
				}
				if err := m.Update(keys[k], v, ebpf.UpdateAny); err != nil {
					return err
				}
			}
			continue
		}
		if err != nil {
			return err
		}
	}
	return nil
}
