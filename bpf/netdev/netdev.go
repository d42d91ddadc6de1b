// Package netdev loads the network-device probe: TC (tcx or clsact) and
// optionally XDP programs that count packets and bytes per interface,
// direction and protocol class into per-CPU maps, attached to the
// interfaces whose names match the configured globs, including ones that
// appear later (netlink link updates). It knows nothing of Prometheus.
package netdev

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Hook is where ingress is counted. Egress is always counted at TC.
type Hook string

const (
	HookTC  Hook = "tc"  // TC for both directions (the default)
	HookXDP Hook = "xdp" // XDP for ingress on Ethernet devices; TC elsewhere
)

// TCMode is how programs attach to TC.
type TCMode string

const (
	TCAuto   TCMode = "auto"   // tcx where the kernel has it (6.6+), else clsact
	TCX      TCMode = "tcx"    // tcx links only
	TCClsact TCMode = "clsact" // a clsact qdisc with direct-action cls_bpf filters
)

// DefaultMaxInterfaces is the default number of interface slots.
const DefaultMaxInterfaces = 256

// maxSlots bounds MaxInterfaces: each slot is a per-CPU value of
// valueSize bytes in the kernel.
const maxSlots = 65536

// directIfindex bounds the ifindexes whose slot the programs find with an
// array lookup (netdev_slots, NETDEV_DIRECT_IFINDEX in the C). A larger
// ifindex, on a host or namespace that has created that many interfaces
// since it began, is counted too, at the price of a hash lookup
// (netdev_ifaces) per packet.
const directIfindex = 65536

// Options configure Load.
type Options struct {
	// Interfaces are names or path.Match globs ("eth0", "veth*"). Load
	// refuses an empty list: the daemon does not start the probe then.
	Interfaces []string
	// Hook is HookTC ("" too) or HookXDP.
	Hook Hook
	// TC is TCAuto ("" too), TCX or TCClsact (forces the fallback).
	TC TCMode
	// MaxInterfaces is the number of interface slots, 0 for
	// DefaultMaxInterfaces. Matching interfaces beyond it are not
	// attached until a slot frees; each refusal is logged and counted
	// (Snapshot.Overflow).
	MaxInterfaces int
	// PacketSizes also counts frame sizes in powers of two.
	PacketSizes bool
	// NetNS is the path of a network namespace file (/var/run/netns/NAME,
	// /proc/PID/ns/net) whose interfaces to watch and attach to; "" is
	// the namespace Load is called in.
	NetNS string
}

// ErrNoInterfaces is returned by Load for an empty Options.Interfaces.
var ErrNoInterfaces = errors.New("no interfaces to watch")

// ErrNothingAttached is returned by Load when interfaces matched but none
// could be attached. It wraps the first interface's error, which tells
// whether the kernel lacks what was asked for (ebpf.ErrNotSupported: tcx
// forced before 6.6).
var ErrNothingAttached = errors.New("attached nothing")

// ParseInterfaces splits a comma-separated list of names and globs and
// checks each glob.
func ParseInterfaces(s string) ([]string, error) {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p == "" || slices.Contains(out, p) {
			continue
		}
		if _, err := path.Match(p, ""); err != nil {
			return nil, fmt.Errorf("interface pattern %q: %w", p, err)
		}
		if len(p) >= unix.IFNAMSIZ && !strings.ContainsAny(p, "*?[") {
			return nil, fmt.Errorf("interface name %q: longer than %d bytes", p, unix.IFNAMSIZ-1)
		}
		out = append(out, p)
	}
	return out, nil
}

// Match reports whether name matches one of patterns (path.Match globs).
func Match(patterns []string, name string) bool {
	for _, p := range patterns {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

// Direction of a packet relative to the interface.
type Direction int

const (
	Ingress Direction = iota
	Egress
	NumDirections
)

func (d Direction) String() string {
	switch d {
	case Ingress:
		return "ingress"
	case Egress:
		return "egress"
	}
	return fmt.Sprintf("direction(%d)", int(d))
}

// Protocol is a protocol class: L3 and, for IP, L4 (ICMPv6 is ipv6_icmp).
type Protocol int

// Protocols names the classes in kernel order (enum netdev_proto).
var Protocols = [...]string{
	"ipv4_tcp", "ipv4_udp", "ipv4_icmp", "ipv4_other",
	"ipv6_tcp", "ipv6_udp", "ipv6_icmp", "ipv6_other",
	"arp", "other",
}

// NumProtocols is the number of protocol classes.
const NumProtocols = len(Protocols)

func (p Protocol) String() string {
	if p >= 0 && int(p) < NumProtocols {
		return Protocols[p]
	}
	return fmt.Sprintf("protocol(%d)", int(p))
}

// ProtocolByName returns the class named name.
func ProtocolByName(name string) (Protocol, bool) {
	i := slices.Index(Protocols[:], name)
	return Protocol(i), i >= 0
}

// NumSizes is the number of frame-size slots: slot k < NumSizes-1 counts
// frames of at most SizeBound(k) bytes (and more than SizeBound(k-1)),
// the last one longer frames.
const NumSizes = 12

// SizeBound is the inclusive upper bound in bytes of size slot k: 64 << k.
func SizeBound(k int) uint64 { return 64 << k }

// Counter is what was counted for one interface, direction and class.
type Counter struct {
	Packets, Bytes uint64
}

// Counters are one CPU's counters of one interface.
type Counters [NumDirections][NumProtocols]Counter

// Sizes are one CPU's frame-size slots of one interface.
type Sizes [NumDirections][NumSizes]uint64

// Interface is one attached interface's counters.
type Interface struct {
	Name  string
	Index int
	// IngressHook and EgressHook say how each direction is attached:
	// "tcx", "clsact" or "xdp".
	IngressHook, EgressHook string
	PerCPU                  []Counters // indexed by CPU
	// SizesPerCPU is indexed by CPU; nil unless Options.PacketSizes.
	SizesPerCPU []Sizes
}

// Total sums the per-CPU counters.
func (i *Interface) Total() Counters {
	var t Counters
	for _, c := range i.PerCPU {
		for d := range c {
			for p := range c[d] {
				t[d][p].Packets += c[d][p].Packets
				t[d][p].Bytes += c[d][p].Bytes
			}
		}
	}
	return t
}

// Snapshot is one read of the probe's maps.
type Snapshot struct {
	Interfaces []Interface // attached interfaces, by name
	// Overflow counts matching interfaces that were not attached because
	// every slot was taken (once per interface and refusal).
	Overflow uint64
	// Missed counts packets seen on an interface without a slot: only in
	// the moment between an interface's removal and the probe noticing.
	// The kernel counts them in slot 0, which no interface gets.
	Missed uint64
}

// Probe is the loaded network-device probe and its interface watcher.
type Probe struct {
	log      *slog.Logger
	patterns []string
	hook     Hook
	tc       TCMode
	slots    int
	sizes    bool
	ncpu     int
	nsFD     int // -1: the caller's namespace

	counters *ebpf.Map // per-CPU counters by slot; slot 0: missed
	slotMap  *ebpf.Map // ifindex -> slot, for ifindex < directIfindex
	ifaces   *ebpf.Map // ifindex -> slot, every attached interface
	progs    map[string]*ebpf.Program

	mu       sync.Mutex
	names    map[int]ifaceInfo // attached interfaces by ifindex
	overflow atomic.Uint64
	// changes receives, coalesced, when an interface is attached,
	// detached or renamed.
	changes chan struct{}

	stop     chan struct{}
	done     chan struct{} // closed when the watcher has detached everything
	stopOnce sync.Once
}

// ifaceInfo is what Snapshot tells of an attached interface, and its slot.
type ifaceInfo struct {
	name, ingress, egress string
	slot                  uint32
}

// Load loads the programs and starts the watcher, which attaches to every
// matching interface present; it returns once those are attached. A
// failure on some interfaces is logged, not returned; when every matching
// interface failed, Load fails with ErrNothingAttached. Matching no
// interface yet is no failure: they are attached when they appear.
func Load(opts Options, log *slog.Logger) (*Probe, error) {
	if len(opts.Interfaces) == 0 {
		return nil, ErrNoInterfaces
	}
	for _, p := range opts.Interfaces {
		if _, err := path.Match(p, ""); err != nil {
			return nil, fmt.Errorf("interface pattern %q: %w", p, err)
		}
	}
	p := &Probe{
		log:      log,
		patterns: slices.Clone(opts.Interfaces),
		hook:     opts.Hook,
		tc:       opts.TC,
		slots:    opts.MaxInterfaces,
		sizes:    opts.PacketSizes,
		nsFD:     -1,
		names:    map[int]ifaceInfo{},
		changes:  make(chan struct{}, 1),
	}
	switch p.hook {
	case "":
		p.hook = HookTC
	case HookTC, HookXDP:
	default:
		return nil, fmt.Errorf("unknown hook %q (want tc or xdp)", opts.Hook)
	}
	switch p.tc {
	case "":
		p.tc = TCAuto
	case TCAuto, TCX, TCClsact:
	default:
		return nil, fmt.Errorf("unknown TC mode %q (want auto, tcx or clsact)", opts.TC)
	}
	if p.slots == 0 {
		p.slots = DefaultMaxInterfaces
	}
	if p.slots < 1 || p.slots > maxSlots {
		return nil, fmt.Errorf("MaxInterfaces %d out of 1..%d", p.slots, maxSlots)
	}
	var err error
	if p.ncpu, err = ebpf.PossibleCPU(); err != nil {
		return nil, fmt.Errorf("possible CPUs: %w", err)
	}
	if err := p.load(); err != nil {
		p.Close()
		return nil, err
	}
	if opts.NetNS != "" {
		if p.nsFD, err = unix.Open(opts.NetNS, unix.O_RDONLY|unix.O_CLOEXEC, 0); err != nil {
			p.Close()
			return nil, fmt.Errorf("open network namespace: %w", err)
		}
	}
	p.stop, p.done = make(chan struct{}), make(chan struct{})
	ready := make(chan error, 1)
	go p.watch(ready)
	if err := <-ready; err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

func (p *Probe) load() error {
	spec, err := loadNetdev()
	if err != nil {
		return fmt.Errorf("load spec: %w", err)
	}
	var specs netdevSpecs
	if err := spec.Assign(&specs); err != nil {
		return fmt.Errorf("load spec: %w", err)
	}
	specs.NetdevCounters.MaxEntries = uint32(p.slots) + 1 // and slot 0
	specs.NetdevIfaces.MaxEntries = uint32(p.slots)
	if n := specs.NetdevSlots.MaxEntries; n != directIfindex {
		return fmt.Errorf("netdev_slots has %d entries, want %d", n, directIfindex)
	}
	if err := specs.NetdevSizes.Set(boolByte(p.sizes)); err != nil {
		return fmt.Errorf("set netdev_sizes: %w", err)
	}
	// The TC programs always (egress is always TC), XDP's only for
	// KTEL_NETDEV_HOOK=xdp.
	var (
		maps netdevMaps
		tc   tcPrograms
		xdp  xdpPrograms
	)
	if p.hook == HookXDP {
		err = spec.LoadAndAssign(&struct {
			*netdevMaps
			*tcPrograms
			*xdpPrograms
		}{&maps, &tc, &xdp}, nil)
	} else {
		err = spec.LoadAndAssign(&struct {
			*netdevMaps
			*tcPrograms
		}{&maps, &tc}, nil)
	}
	if err != nil {
		return fmt.Errorf("load programs: %w", err)
	}
	p.counters, p.slotMap, p.ifaces = maps.NetdevCounters, maps.NetdevSlots, maps.NetdevIfaces
	p.progs = map[string]*ebpf.Program{
		netdevProgNetdevTcEgress: tc.TcEgress, netdevProgNetdevTcEgressL3: tc.TcEgressL3,
		netdevProgNetdevTcIngress: tc.TcIngress, netdevProgNetdevTcIngressL3: tc.TcIngressL3,
	}
	if xdp.XdpIngress != nil {
		p.progs[netdevProgNetdevXdpIngress] = xdp.XdpIngress
	}
	return nil
}

// tcPrograms and xdpPrograms split the generated netdevPrograms by hook,
// so that XDP's is loaded only when it is used.
type (
	tcPrograms struct {
		TcEgress    *ebpf.Program `ebpf:"netdev_tc_egress"`
		TcEgressL3  *ebpf.Program `ebpf:"netdev_tc_egress_l3"`
		TcIngress   *ebpf.Program `ebpf:"netdev_tc_ingress"`
		TcIngressL3 *ebpf.Program `ebpf:"netdev_tc_ingress_l3"`
	}
	xdpPrograms struct {
		XdpIngress *ebpf.Program `ebpf:"netdev_xdp_ingress"`
	}
)

func boolByte(b bool) uint8 {
	if b {
		return 1
	}
	return 0
}

// Programs are the loaded programs by name.
func (p *Probe) Programs() map[string]*ebpf.Program { return p.progs }

// BoundedMaps are the maps whose fill is worth watching: the interface
// slots, as the hash of attached interfaces (the counters are an array,
// always full).
func (p *Probe) BoundedMaps() map[string]*ebpf.Map {
	return map[string]*ebpf.Map{netdevMapNetdevIfaces: p.ifaces}
}

// setSlot gives interface ifindex the slot, zeroed, so that the programs
// count it there. The counters first: the programs may run as soon as the
// slot is in netdev_slots.
func (p *Probe) setSlot(ifindex int, slot uint32) error {
	if err := p.counters.Update(slot, make([]netdevNetdevValue, p.ncpu), 0); err != nil {
		return fmt.Errorf("zero slot %d: %w", slot, err)
	}
	if err := p.ifaces.Update(uint32(ifindex), slot, 0); err != nil {
		return fmt.Errorf("add interface %d: %w", ifindex, err)
	}
	if ifindex < directIfindex {
		if err := p.slotMap.Update(uint32(ifindex), slot, 0); err != nil {
			p.ifaces.Delete(uint32(ifindex))
			return fmt.Errorf("set slot of interface %d: %w", ifindex, err)
		}
	}
	return nil
}

// clearSlot takes interface ifindex's slot away: its packets count as
// missed from then on.
func (p *Probe) clearSlot(ifindex int) error {
	var errs []error
	if ifindex < directIfindex {
		errs = append(errs, p.slotMap.Update(uint32(ifindex), uint32(0), 0))
	}
	if err := p.ifaces.Delete(uint32(ifindex)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("clear slot of interface %d: %w", ifindex, err)
	}
	return nil
}

// Changes receives after interfaces were attached, detached or renamed.
// Sends are coalesced, and there is one channel: for one consumer.
func (p *Probe) Changes() <-chan struct{} { return p.changes }

func (p *Probe) changed() {
	select {
	case p.changes <- struct{}{}:
	default:
	}
}

// Interfaces returns the names of the attached interfaces, sorted.
func (p *Probe) Interfaces() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]string, 0, len(p.names))
	for _, n := range p.names {
		out = append(out, n.name)
	}
	slices.Sort(out)
	return out
}

// Close stops the watcher, detaches everything the probe attached (and
// only that) and releases the maps; safe on a partly built Probe.
func (p *Probe) Close() error {
	p.stopOnce.Do(func() {
		if p.stop != nil {
			close(p.stop)
			<-p.done
		}
	})
	var cs []interface{ Close() error }
	for _, prog := range p.progs {
		cs = append(cs, prog)
	}
	p.progs = nil
	cs = append(cs, p.counters, p.slotMap, p.ifaces)
	p.counters, p.slotMap, p.ifaces = nil, nil, nil
	if p.nsFD >= 0 {
		unix.Close(p.nsFD)
		p.nsFD = -1
	}
	return closeAll(cs...)
}

func closeAll(cs ...interface{ Close() error }) error {
	var errs []error
	for _, c := range cs {
		if c != nil {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

// valueSize is the size of one CPU's value in netdev_counters.
const valueSize = int(unsafe.Sizeof(netdevNetdevValue{}))

// Snapshot reads the counters of every attached interface.
func (p *Probe) Snapshot() (*Snapshot, error) {
	p.mu.Lock()
	names := maps.Clone(p.names)
	p.mu.Unlock()

	s := &Snapshot{Overflow: p.overflow.Load()}
	var vals []netdevNetdevValue
	for idx, info := range names {
		if err := p.counters.Lookup(info.slot, &vals); err != nil {
			return nil, fmt.Errorf("read netdev_counters: %w", err)
		}
		iface := Interface{
			Name: info.name, Index: idx, IngressHook: info.ingress, EgressHook: info.egress,
			PerCPU: make([]Counters, len(vals)),
		}
		if p.sizes {
			iface.SizesPerCPU = make([]Sizes, len(vals))
		}
		for cpu, v := range vals {
			for d := range v.C {
				for pr := range v.C[d] {
					iface.PerCPU[cpu][d][pr] = Counter{Packets: v.C[d][pr].Packets, Bytes: v.C[d][pr].Bytes}
				}
			}
			if p.sizes {
				iface.SizesPerCPU[cpu] = v.Sizes
			}
		}
		s.Interfaces = append(s.Interfaces, iface)
	}
	// An interface removed meanwhile may have left its slot to another:
	// what was read is someone else's. Only those still in their slot
	// now held it during the read.
	p.mu.Lock()
	s.Interfaces = slices.DeleteFunc(s.Interfaces, func(i Interface) bool {
		now, ok := p.names[i.Index]
		return !ok || now.slot != names[i.Index].slot
	})
	p.mu.Unlock()
	slices.SortFunc(s.Interfaces, func(a, b Interface) int { return strings.Compare(a.Name, b.Name) })

	if err := p.counters.Lookup(uint32(0), &vals); err != nil {
		return nil, fmt.Errorf("read netdev_counters: %w", err)
	}
	for _, v := range vals {
		for d := range v.C {
			for pr := range v.C[d] {
				s.Missed += v.C[d][pr].Packets
			}
		}
	}
	return s, nil
}
