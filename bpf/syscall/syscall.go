// Package syscall loads the syscall-latency probe: raw_syscalls sys_enter
// and sys_exit programs that sort every syscall's latency into per-CPU
// native-histogram slots, and typed readers for those slots. It knows
// nothing of Prometheus.
package syscall

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ktel-dev/ktel/internal/histogram"
	"github.com/ktel-dev/ktel/internal/probe"
)

// MaxSyscalls bounds the syscall numbers measured (MAX_SYSCALLS in C).
const MaxSyscalls = 512

// Hook selects how the programs attach to raw_syscalls.
type Hook string

const (
	HookAuto       Hook = "auto"       // the cheapest that loads here
	HookBTF        Hook = "tp_btf"     // BTF-enabled raw tracepoint, 5.5+
	HookRaw        Hook = "raw_tp"     // raw tracepoint, 4.17+
	HookTracepoint Hook = "tracepoint" // classic tracepoint
)

// Hooks lists the accepted Hook values.
var Hooks = []Hook{HookAuto, HookBTF, HookRaw, HookTracepoint}

// Storage is where the start of a syscall in flight is kept per thread.
type Storage string

const (
	StorageTask Storage = "task" // BPF task storage, 5.11+
	StorageHash Storage = "hash" // LRU hash keyed by thread id
)

// Variant is one attachable pair of programs.
type Variant struct {
	Hook    Hook
	Storage Storage
	enter   string
	exit    string
}

func (v Variant) String() string { return string(v.Hook) + "+" + string(v.Storage) }

// Variants in order of preference: cheapest first, as measured by
// `make bench` (see README, "Overhead").
var Variants = []Variant{
	{HookBTF, StorageTask, "sys_enter_btf_task", "sys_exit_btf_task"},
	{HookRaw, StorageTask, "sys_enter_raw_task", "sys_exit_raw_task"},
	{HookBTF, StorageHash, "sys_enter_btf_hash", "sys_exit_btf_hash"},
	{HookRaw, StorageHash, "sys_enter_raw_hash", "sys_exit_raw_hash"},
	{HookTracepoint, StorageHash, "sys_enter_tp_hash", "sys_exit_tp_hash"},
}

// Options configure Load.
type Options struct {
	// Schema is the native-histogram schema of the kernel slots, 0..4.
	Schema int
	// Hook restricts the variants tried; HookAuto or "" tries all.
	Hook Hook
	// Variant, when set, forces exactly one variant (benchmarks).
	Variant *Variant
}

// Probe is the loaded and attached syscall-latency probe.
type Probe struct {
	layout  *histogram.Layout
	variant Variant
	ncpu    int

	latency *ebpf.Map
	errs    *ebpf.Map
	drops   *ebpf.Map
	start   *ebpf.Map // the start map in use, for fill reporting
	enter   *ebpf.Program
	exit    *ebpf.Program
	links   []link.Link
}

// Load loads and attaches the probe, trying variants in order of preference
// and returning the first that loads. When none does, the error of the most
// preferred one is returned, wrapping probe.ErrUnsupported if the kernel
// lacks what every variant needs.
func Load(opts Options, log *slog.Logger) (*Probe, error) {
	layout, err := histogram.NewLayout(opts.Schema)
	if err != nil {
		return nil, err
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("possible CPUs: %w", err)
	}

	var candidates []Variant
	switch {
	case opts.Variant != nil:
		candidates = []Variant{*opts.Variant}
	default:
		for _, v := range Variants {
			if opts.Hook == "" || opts.Hook == HookAuto || opts.Hook == v.Hook {
				candidates = append(candidates, v)
			}
		}
	}
	if len(candidates) == 0 {
		return nil, fmt.Errorf("unknown syscall hook %q", opts.Hook)
	}

	var errs []error
	for _, v := range candidates {
		p, err := load(layout, v, ncpu)
		if err == nil {
			log.Debug("syscall probe loaded", "variant", v.String())
			return p, nil
		}
		log.Debug("syscall probe variant failed", "variant", v.String(), "err", err)
		errs = append(errs, fmt.Errorf("%s: %w", v, err))
	}
	return nil, probe.Combine(errs)
}

func load(layout *histogram.Layout, v Variant, ncpu int) (_ *Probe, err error) {
	spec, err := loadSyscall()
	if err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	if err := spec.Variables["ktel_bounds"].Set(layout.KernelTable()); err != nil {
		return nil, fmt.Errorf("set ktel_bounds: %w", err)
	}
	if err := spec.Variables["ktel_slots"].Set(uint32(layout.Slots())); err != nil {
		return nil, fmt.Errorf("set ktel_slots: %w", err)
	}
	// One value per syscall: the slots, then the sum of latencies.
	spec.Maps["syscall_latency"].ValueSize = uint32(8 * (layout.Slots() + 1))

	objs := struct {
		Latency *ebpf.Map `ebpf:"syscall_latency"`
		Errors  *ebpf.Map `ebpf:"syscall_errors"`
		Drops   *ebpf.Map `ebpf:"syscall_drops"`
	}{}
	// Only this variant's programs, and so only the start map it uses, are
	// loaded: a kernel without task storage can still run a hash variant.
	keep := map[string]bool{v.enter: true, v.exit: true}
	for name := range spec.Programs {
		if !keep[name] {
			delete(spec.Programs, name)
		}
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		return nil, fmt.Errorf("load programs: %w", err)
	}
	defer func() {
		if err != nil {
			coll.Close()
		}
	}()
	if err := coll.Assign(&objs); err != nil {
		return nil, err
	}

	p := &Probe{
		layout:  layout,
		variant: v,
		ncpu:    ncpu,
		latency: objs.Latency,
		errs:    objs.Errors,
		drops:   objs.Drops,
		enter:   coll.DetachProgram(v.enter),
		exit:    coll.DetachProgram(v.exit),
	}
	if v.Storage == StorageHash {
		p.start = coll.DetachMap("syscall_start_hash")
	} else {
		p.start = coll.DetachMap("syscall_start_task")
	}
	// Everything we keep has been detached or assigned; the rest (unused
	// maps) is closed with the collection.
	coll.Close()
	defer func() {
		if err != nil {
			p.Close()
		}
	}()

	// Exit first: an enter without exit only leaves a start behind, an exit
	// without enter is skipped anyway.
	for _, a := range []struct {
		tp   string
		prog *ebpf.Program
	}{{"sys_exit", p.exit}, {"sys_enter", p.enter}} {
		l, err := attach(v.Hook, a.tp, a.prog)
		if err != nil {
			return nil, err
		}
		p.links = append(p.links, l)
	}
	return p, nil
}

func attach(h Hook, name string, prog *ebpf.Program) (link.Link, error) {
	var (
		l   link.Link
		err error
	)
	switch h {
	case HookBTF:
		l, err = link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
	case HookRaw:
		l, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: name, Program: prog})
	case HookTracepoint:
		l, err = link.Tracepoint("raw_syscalls", name, prog, nil)
	default:
		return nil, fmt.Errorf("unknown hook %q", h)
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s %s: %w", h, name, err)
	}
	return l, nil
}

// Variant is the variant in use.
func (p *Probe) Variant() Variant { return p.variant }

// Layout is the slot layout of the histograms.
func (p *Probe) Layout() *histogram.Layout { return p.layout }

// Programs are the loaded programs by name, for run-time statistics.
func (p *Probe) Programs() map[string]*ebpf.Program {
	return map[string]*ebpf.Program{p.variant.enter: p.enter, p.variant.exit: p.exit}
}

// BoundedMaps are the hash maps whose fill is worth watching.
func (p *Probe) BoundedMaps() map[string]*ebpf.Map {
	m := map[string]*ebpf.Map{"syscall_errors": p.errs}
	if p.variant.Storage == StorageHash {
		m["syscall_start_hash"] = p.start
	}
	return m
}

// Close detaches the programs and releases every map. It is safe to call
// on a partly built Probe.
func (p *Probe) Close() error {
	var errs []error
	for _, l := range p.links {
		errs = append(errs, l.Close())
	}
	p.links = nil
	for _, prog := range []*ebpf.Program{p.enter, p.exit} {
		if prog != nil {
			errs = append(errs, prog.Close())
		}
	}
	for _, m := range []*ebpf.Map{p.latency, p.errs, p.drops, p.start} {
		if m != nil {
			errs = append(errs, m.Close())
		}
	}
	return errors.Join(errs...)
}

// Hist is one syscall's histogram summed over CPUs.
type Hist struct {
	Slots []uint64 // per layout slot
	SumNs uint64
}

// Count is the number of observations.
func (h Hist) Count() uint64 {
	var n uint64
	for _, c := range h.Slots {
		n += c
	}
	return n
}

// ErrorKey identifies failed calls of one syscall with one errno.
type ErrorKey struct {
	Nr    uint32
	Errno uint32
}

// Snapshot is one read of the probe's maps.
type Snapshot struct {
	// Latency by syscall number; syscalls never seen are absent.
	Latency map[uint32]Hist
	// Errors counts failed syscalls.
	Errors map[ErrorKey]uint64
	// ErrorsDropped counts failures not recorded because syscall_errors
	// was full.
	ErrorsDropped uint64
}

// Snapshot reads and sums the per-CPU maps. Counters only grow, but the
// read is not atomic across syscalls: a scrape may see one syscall's
// histogram a few microseconds later than another's.
func (p *Probe) Snapshot() (*Snapshot, error) {
	s := &Snapshot{Latency: make(map[uint32]Hist), Errors: make(map[ErrorKey]uint64)}
	slots := p.layout.Slots()
	valueSize := 8 * (slots + 1)
	for nr := range uint32(MaxSyscalls) {
		buf, err := p.latency.LookupBytes(nr)
		if err != nil {
			return nil, fmt.Errorf("read syscall_latency[%d]: %w", nr, err)
		}
		if h, ok := sumPerCPU(buf, p.ncpu, valueSize, slots); ok {
			s.Latency[nr] = h
		}
	}

	var (
		key  syscallErrorsKey
		vals []uint64
		iter = p.errs.Iterate()
	)
	for iter.Next(&key, &vals) {
		var n uint64
		for _, v := range vals {
			n += v
		}
		s.Errors[ErrorKey{Nr: key.Nr, Errno: key.Err}] = n
	}
	if err := iter.Err(); err != nil {
		return nil, fmt.Errorf("read syscall_errors: %w", err)
	}

	var drops []uint64
	if err := p.drops.Lookup(uint32(0), &drops); err != nil {
		return nil, fmt.Errorf("read syscall_drops: %w", err)
	}
	for _, d := range drops {
		s.ErrorsDropped += d
	}
	return s, nil
}

// sumPerCPU sums the per-CPU copies of one histogram value. ok is false if
// the syscall was never observed.
func sumPerCPU(buf []byte, ncpu, valueSize, slots int) (h Hist, ok bool) {
	h.Slots = make([]uint64, slots)
	stride := (valueSize + 7) &^ 7
	for cpu := range ncpu {
		v := buf[cpu*stride : cpu*stride+valueSize]
		for k := range slots {
			h.Slots[k] += binary.NativeEndian.Uint64(v[8*k:])
		}
		h.SumNs += binary.NativeEndian.Uint64(v[8*slots:])
	}
	return h, h.Count() > 0
}

// Sizes of the generated structs, for the layout check in tests.
const (
	startSize     = unsafe.Sizeof(syscallStart{})
	errorsKeySize = unsafe.Sizeof(syscallErrorsKey{})
)
