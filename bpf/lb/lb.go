// Package lb loads the socket-level service load balancer: cgroup
// connect/sendmsg/recvmsg/getpeername programs that send connections to a
// service address (VIP:port) to one of its backends, configured from a
// services file (internal/lb), and typed readers of its per-CPU counters.
// It knows nothing of Prometheus.
package lb

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"

	"github.com/ktel-dev/ktel/internal/cgroups"
	ctl "github.com/ktel-dev/ktel/internal/lb"
	"github.com/ktel-dev/ktel/internal/probe"
)

// Defaults of Options.
const (
	DefaultMaxServices = 16384
	DefaultMaxBackends = 65536
	DefaultMaxSockets  = 65536
)

// Options configure Load.
type Options struct {
	// Cgroup is the cgroup v2 directory whose processes (and their
	// descendants') are load balanced; "" is the root of the hierarchy.
	Cgroup string
	// ServicesFile is the services file (YAML or JSON); required unless
	// Source is given.
	ServicesFile string
	// Source, instead of a services file, gives the services: the
	// Kubernetes API (internal/kubelb).
	Source Source
	// MaxServices bounds lb_services; 0 is DefaultMaxServices.
	MaxServices int
	// MaxBackends bounds lb_backends, the backend slots of all services,
	// and the per-backend counters; 0 is DefaultMaxBackends. In random mode
	// a backend takes weight/gcd(weights) slots, in Maglev mode one.
	MaxBackends int
	// MaxSockets bounds lb_reverse, the sockets whose peer is shown as the
	// VIP, and lb_affinity, the (client, service) pairs of session
	// affinity; 0 is DefaultMaxSockets.
	MaxSockets int
	// Algorithm is "random" (default) or "maglev".
	Algorithm string
	// MaglevSize is the entries of each Maglev table, a prime of
	// ctl.MaglevSizes; 0 is ctl.DefaultMaglevSize.
	MaglevSize int

	// noSetRetval loads the programs as for a kernel without
	// bpf_set_retval (tests).
	noSetRetval bool
	// noSockDestroy closes UDP sockets through sock_diag, as on a kernel
	// without bpf_sock_destroy (tests).
	noSockDestroy bool
}

func (o *Options) defaults() {
	if o.MaxServices == 0 {
		o.MaxServices = DefaultMaxServices
	}
	if o.MaxBackends == 0 {
		o.MaxBackends = DefaultMaxBackends
	}
	if o.MaxSockets == 0 {
		o.MaxSockets = DefaultMaxSockets
	}
	if o.Algorithm == "" {
		o.Algorithm = string(ctl.AlgRandom)
	}
	if o.MaglevSize == 0 {
		o.MaglevSize = ctl.DefaultMaglevSize
	}
}

// Source gives the services when there is no services file. Load closes
// it if it fails past checking its options. Start is called once the
// programs are attached: apply must then be given each complete set of
// services (ApplyServices), or the difference from the last one
// (ApplyChanges), from one goroutine at a time; until the first call no
// service is balanced. Close stops the calls; it may be called more than
// once.
type Source interface {
	Start(apply ctl.Applier) error
	Close() error
}

// hooks are the programs and where they attach. Reverse translation is
// attached first, so that no rewritten socket misses it.
var hooks = []struct {
	name   string
	attach ebpf.AttachType
	prog   func(*lbPrograms) *ebpf.Program
}{
	{lbProgLbGetpeername4, ebpf.AttachCgroupInet4GetPeername, func(p *lbPrograms) *ebpf.Program { return p.LbGetpeername4 }},
	{lbProgLbRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg, func(p *lbPrograms) *ebpf.Program { return p.LbRecvmsg4 }},
	{lbProgLbGetpeername6, ebpf.AttachCgroupInet6GetPeername, func(p *lbPrograms) *ebpf.Program { return p.LbGetpeername6 }},
	{lbProgLbRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg, func(p *lbPrograms) *ebpf.Program { return p.LbRecvmsg6 }},
	{lbProgLbConnect4, ebpf.AttachCGroupInet4Connect, func(p *lbPrograms) *ebpf.Program { return p.LbConnect4 }},
	{lbProgLbSendmsg4, ebpf.AttachCGroupUDP4Sendmsg, func(p *lbPrograms) *ebpf.Program { return p.LbSendmsg4 }},
	{lbProgLbConnect6, ebpf.AttachCGroupInet6Connect, func(p *lbPrograms) *ebpf.Program { return p.LbConnect6 }},
	{lbProgLbSendmsg6, ebpf.AttachCGroupUDP6Sendmsg, func(p *lbPrograms) *ebpf.Program { return p.LbSendmsg6 }},
}

// Probe is the loaded and attached load balancer.
type Probe struct {
	cgroup string
	ncpu   int
	refuse string // errno of a connect to a service without backends

	maps  *maps
	mgr   *ctl.Manager
	src   Source
	progs map[string]*ebpf.Program
	links []link.Link
}

// replaceRoom is how many times the limits the slot maps and the services
// map hold. A reload writes a changed service's backends into fresh slots
// (and a changed VIP's entry) before it frees the old ones, so that no
// connect sees half a service: with room for two files, any file within
// the limits can replace any other. Counters and service indexes are kept
// for backends and services that stay, and come from the retired ones
// after a second.
const replaceRoom = 2

// Load checks opts, loads the programs, applies the services file and
// attaches to the cgroup, then watches the file. An invalid services file
// fails Load.
func Load(opts Options, log *slog.Logger) (_ *Probe, err error) {
	opts.defaults()
	if (opts.ServicesFile == "") == (opts.Source == nil) {
		return nil, errors.New("want a services file or a source of services, one of them")
	}
	lim := ctl.Limits{
		MaxServices: opts.MaxServices,
		MaxSlots:    replaceRoom * opts.MaxBackends,
		MaxCounters: opts.MaxBackends,
		Algorithm:   ctl.Algorithm(opts.Algorithm),
		MaglevSize:  opts.MaglevSize,
	}
	if err := lim.Validate(); err != nil {
		return nil, err
	}
	if opts.MaxSockets < 1 || opts.MaxSockets > 1<<24 {
		return nil, fmt.Errorf("max sockets %d: want 1..%d", opts.MaxSockets, 1<<24)
	}
	if opts.Cgroup == "" {
		if opts.Cgroup, err = cgroups.V2Root(); err != nil {
			return nil, fmt.Errorf("%w: %w", probe.ErrUnsupported, err)
		}
	}
	if fi, err := os.Stat(opts.Cgroup); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("cgroup %s: not a directory: %v", opts.Cgroup, err)
	}
	// Options checked: the Source is closed if Load fails from here on,
	// by p.Close once p holds it.
	srcHeld := false
	defer func() {
		if err != nil && !srcHeld && opts.Source != nil {
			_ = opts.Source.Close()
		}
	}()
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("possible CPUs: %w", err)
	}

	spec, err := loadLb()
	if err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	// Kernels before 5.18 lack bpf_set_retval here: refused connects then
	// fail with EPERM, the default of a cgroup hook that rejects.
	setRetval := !opts.noSetRetval && features.HaveProgramHelper(ebpf.CGroupSockAddr, asm.FnSetRetval) == nil
	refuse := "ECONNREFUSED"
	if !setRetval {
		refuse = "EPERM"
		log.Warn("kernel lacks bpf_set_retval for cgroup sock_addr programs (5.18+): connects to services without backends fail with EPERM, not ECONNREFUSED")
	}
	var specs lbSpecs
	if err := spec.Assign(&specs); err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	if err := specs.HasSetRetval.Set(boolByte(setRetval)); err != nil {
		return nil, fmt.Errorf("set has_set_retval: %w", err)
	}
	if err := specs.MaglevSize.Set(uint32(opts.MaglevSize)); err != nil {
		return nil, fmt.Errorf("set maglev_size: %w", err)
	}
	specs.LbServices.MaxEntries = uint32(replaceRoom * opts.MaxServices)
	specs.LbServiceStats.MaxEntries = uint32(opts.MaxServices)
	specs.LbBackends.MaxEntries = uint32(lim.MaxSlots)
	specs.LbBackendStats.MaxEntries = uint32(opts.MaxBackends)
	specs.LbReverse.MaxEntries = uint32(opts.MaxSockets)
	specs.LbMembers.MaxEntries = uint32(opts.MaxBackends)
	specs.LbAffinity.MaxEntries = uint32(opts.MaxSockets)
	mg := specs.LbMaglev
	mg.InnerMap.MaxEntries = uint32(opts.MaglevSize)
	if lim.Algorithm == ctl.AlgMaglev {
		mg.MaxEntries = uint32(lim.MaxSlots) // keyed by range base
	}

	var objs struct {
		lbMaps
		lbPrograms
	}
	if err := spec.LoadAndAssign(&objs, nil); err != nil {
		return nil, fmt.Errorf("load programs: %w", err)
	}

	p := &Probe{
		cgroup: opts.Cgroup,
		ncpu:   ncpu,
		refuse: refuse,
		progs:  map[string]*ebpf.Program{},
		maps: &maps{
			ncpu:         ncpu,
			services:     objs.LbServices,
			backends:     objs.LbBackends,
			maglev:       objs.LbMaglev,
			maglevInner:  mg.InnerMap.Copy(),
			reverse:      objs.LbReverse,
			serviceStats: objs.LbServiceStats,
			backendStats: objs.LbBackendStats,
			drops:        objs.LbDrops,
			members:      objs.LbMembers,
			affinity:     objs.LbAffinity,
		},
	}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	for _, h := range hooks {
		p.progs[h.name] = h.prog(&objs.lbPrograms)
	}
	p.maps.udp = newUDPCloser(opts.Cgroup, objs.LbReverse, opts.MaxBackends, opts.noSockDestroy, log)
	p.src, srcHeld = opts.Source, true // closed with p, from here on even if Load fails

	state, err := ctl.NewState(p.maps, lim)
	if err != nil {
		return nil, err
	}
	if opts.Source != nil {
		p.mgr = ctl.NewSourceManager("kubernetes", state, log)
	} else {
		p.mgr = ctl.NewManager(opts.ServicesFile, state, log)
		if err := p.mgr.Reload(); err != nil {
			return nil, fmt.Errorf("services file: %w", err)
		}
	}
	for _, h := range hooks {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: opts.Cgroup, Attach: h.attach, Program: p.progs[h.name]})
		if err != nil {
			return nil, fmt.Errorf("attach %s to %s: %w", h.name, opts.Cgroup, err)
		}
		p.links = append(p.links, l)
	}
	if opts.Source != nil {
		if err := opts.Source.Start(p.mgr); err != nil {
			return nil, fmt.Errorf("start source of services: %w", err)
		}
		return p, nil
	}
	if err := p.mgr.Watch(); err != nil {
		return nil, fmt.Errorf("watch services file: %w", err)
	}
	return p, nil
}

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// Cgroup is the cgroup the programs are attached to.
func (p *Probe) Cgroup() string { return p.cgroup }

// UDPCloseMode is how connected UDP sockets of removed backends are closed:
// "bpf_sock_destroy" (Linux 6.5+) or "sock_diag".
func (p *Probe) UDPCloseMode() string { return p.maps.udp.mode() }

// RefuseErrno is the errno ("ECONNREFUSED", or "EPERM" before Linux 5.18)
// of a connect to a service without backends.
func (p *Probe) RefuseErrno() string { return p.refuse }

// Reload reads and applies the services file now (on SIGHUP). An invalid
// file is logged, counted and returned; the previous configuration keeps
// serving. With a Source, there is nothing to reload.
func (p *Probe) Reload() error {
	if p.src != nil {
		return nil
	}
	return p.mgr.Reload()
}

// Programs are the loaded programs by name, for run-time statistics.
func (p *Probe) Programs() map[string]*ebpf.Program { return p.progs }

// BoundedMaps are the hash maps whose fill is worth watching.
func (p *Probe) BoundedMaps() map[string]*ebpf.Map {
	if p.maps == nil {
		return map[string]*ebpf.Map{}
	}
	return map[string]*ebpf.Map{"lb_services": p.maps.services, "lb_reverse": p.maps.reverse, "lb_affinity": p.maps.affinity}
}

// Close stops the watcher, detaches the programs and releases every map.
// It is safe to call on a partly built Probe, and more than once.
func (p *Probe) Close() error {
	var cs []interface{ Close() error }
	if p.src != nil {
		cs = append(cs, p.src) // stops applying before the maps go
	}
	if p.mgr != nil {
		cs = append(cs, p.mgr)
	}
	// In reverse order of attach: connect stops being rewritten before
	// getpeername and recvmsg stop showing the VIP.
	for _, l := range slices.Backward(p.links) {
		cs = append(cs, l)
	}
	for _, prog := range p.progs {
		cs = append(cs, prog)
	}
	p.src, p.mgr, p.links, p.progs = nil, nil, nil, nil
	if m := p.maps; m != nil {
		cs = append(cs, m.services, m.backends, m.maglev, m.reverse, m.serviceStats, m.backendStats, m.drops, m.members, m.affinity)
		if m.udp != nil {
			cs = append(cs, m.udp)
		}
		p.maps = nil
	}
	return probe.CloseAll(cs...)
}

// Snapshot is one read of the probe's counters and configuration.
type Snapshot struct {
	// Services are the applied services, sorted by name.
	Services []ServiceStats
	// Backends is the number of backends of all services.
	Backends int
	// Reloads of the services file, by result; the first load counts.
	ReloadSuccess, ReloadError uint64
	// LastReloadSuccess is when the file was last applied, and
	// LastApply how long writing the maps took then (parsing excluded).
	LastReloadSuccess time.Time
	LastApply         time.Duration
	// Kernel-side anomalies (see enum drop_reason in lb.bpf.c).
	ReverseFailed, SlotMissing, MaglevMissing, AffinityFailed uint64
	// UDPSocketsClosed counts connected UDP sockets closed because their
	// backend left the service.
	UDPSocketsClosed uint64
	// UDPCloseMissed counts processes of the cgroup, per closing pass,
	// whose network namespace could not be read or entered: their
	// sockets were not looked at.
	UDPCloseMissed uint64
}

// ServiceStats are one service's counters.
type ServiceStats struct {
	Name string
	// Connections counts connects and unconnected UDP datagrams sent to
	// the service, including refused ones.
	Connections uint64
	// NoBackend counts those refused because the service had no backend.
	NoBackend uint64
	Backends  []BackendStats
}

// BackendStats are one backend's counters within a service.
type BackendStats struct {
	Address     string // ip:port, [ip6]:port
	Connections uint64
}

// Snapshot reads and sums the per-CPU counters of the applied services.
func (p *Probe) Snapshot() (*Snapshot, error) {
	svcs, nb := p.mgr.Services()
	rs := p.mgr.Stats()
	s := &Snapshot{Backends: nb, ReloadSuccess: rs.Success, ReloadError: rs.Error, LastReloadSuccess: rs.LastSuccess, LastApply: rs.LastApply}
	if p.maps.udp != nil {
		s.UDPSocketsClosed = p.maps.udp.closed.Load()
		s.UDPCloseMissed = p.maps.udp.missed.Load()
	}

	var maxSvc, maxB uint32
	for _, sv := range svcs {
		maxSvc = max(maxSvc, sv.ID+1)
		for _, b := range sv.Backends {
			maxB = max(maxB, b.Counter+1)
		}
	}
	svcStats, err := readPerCPU[lbSvcStats](p.maps.serviceStats, maxSvc, p.ncpu)
	if err != nil {
		return nil, fmt.Errorf("read lb_service_stats: %w", err)
	}
	bStats, err := readPerCPU[uint64](p.maps.backendStats, maxB, p.ncpu)
	if err != nil {
		return nil, fmt.Errorf("read lb_backend_stats: %w", err)
	}
	// One slice for the services and one for all their backends: a
	// scrape of 10,000 services allocates a handful of times, not per
	// service.
	s.Services = make([]ServiceStats, len(svcs))
	backends := make([]BackendStats, 0, nb)
	for i, sv := range svcs {
		st := &s.Services[i]
		st.Name = sv.Name
		for _, v := range svcStats[int(sv.ID)*p.ncpu : int(sv.ID+1)*p.ncpu] {
			st.Connections += v.Connections
			st.NoBackend += v.NoBackend
		}
		first := len(backends)
		for _, b := range sv.Backends {
			bs := BackendStats{Address: b.Addr.String()}
			for _, v := range bStats[int(b.Counter)*p.ncpu : int(b.Counter+1)*p.ncpu] {
				bs.Connections += v
			}
			backends = append(backends, bs)
		}
		if len(backends) > first {
			st.Backends = backends[first:len(backends):len(backends)]
		}
	}

	var drops []uint64
	for reason, dst := range []*uint64{&s.ReverseFailed, &s.SlotMissing, &s.MaglevMissing, &s.AffinityFailed} {
		if err := p.maps.drops.Lookup(uint32(reason), &drops); err != nil {
			return nil, fmt.Errorf("read lb_drops: %w", err)
		}
		for _, d := range drops {
			*dst += d
		}
	}
	return s, nil
}

// readPerCPU reads indexes 0..n-1 of a per-CPU array, index i's values
// at [i*ncpu, (i+1)*ncpu) of the result (one allocation, not one per
// index), in batches of at most what is left to read: the kernel copies
// every value a batch asks for, at ~1 us each (the arrays have room for
// 16384 services and 65536 backends).
func readPerCPU[T any](m *ebpf.Map, n uint32, ncpu int) ([]T, error) {
	out := make([]T, int(n)*ncpu)
	chunk := min(n, 1024)
	var cursor ebpf.MapBatchCursor
	keys := make([]uint32, chunk)
	vals := make([]T, int(chunk)*ncpu)
	for got := uint32(0); got < n; {
		want := min(chunk, n-got)
		k, err := m.BatchLookup(&cursor, keys[:want], vals[:int(want)*ncpu], nil)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return readPerCPUSlow[T](m, n, ncpu)
			}
			return nil, err
		}
		for i := range k {
			if idx := int(keys[i]); idx < int(n) {
				copy(out[idx*ncpu:(idx+1)*ncpu], vals[i*ncpu:(i+1)*ncpu])
			}
		}
		got += uint32(k)
		if k == 0 || err != nil {
			break
		}
	}
	return out, nil
}

func readPerCPUSlow[T any](m *ebpf.Map, n uint32, ncpu int) ([]T, error) {
	out := make([]T, int(n)*ncpu)
	var per []T
	for i := range n {
		if err := m.Lookup(i, &per); err != nil {
			return nil, err
		}
		copy(out[int(i)*ncpu:int(i+1)*ncpu], per)
	}
	return out, nil
}

// Sizes of the generated structs, for the layout check in tests.
const (
	svcKeySize   = unsafe.Sizeof(lbSvcKey{})
	svcValSize   = unsafe.Sizeof(lbSvcVal{})
	backendSize  = unsafe.Sizeof(lbBackend{})
	revKeySize   = unsafe.Sizeof(lbRevKey{})
	revValSize   = unsafe.Sizeof(lbRevVal{})
	svcStatsSize = unsafe.Sizeof(lbSvcStats{})
	memberSize   = unsafe.Sizeof(lbMember{})
	affKeySize   = unsafe.Sizeof(lbAffKey{})
	affValSize   = unsafe.Sizeof(lbAffVal{})
	goneKeySize  = unsafe.Sizeof(sockdestroyGoneKey{})
)
