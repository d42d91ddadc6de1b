package probe

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// Hook is how a variant's programs attach to their tracepoints.
type Hook string

const (
	HookAuto       Hook = "auto"       // the cheapest variant that loads
	HookBTF        Hook = "tp_btf"     // BTF-enabled raw tracepoint, 5.5+
	HookRaw        Hook = "raw_tp"     // raw tracepoint, 4.17+
	HookTracepoint Hook = "tracepoint" // classic tracepoint; needs tracefs
)

// Storage is where a variant keeps per-task state; empty for probes that
// keep none.
type Storage string

const (
	StorageTask Storage = "task" // BPF task storage, 5.11+
	StorageHash Storage = "hash" // a bounded hash keyed by thread id
	// StorageCPU is a per-CPU slot for what runs on the CPU, moved into
	// task storage (5.11+) when its task is switched out.
	StorageCPU Storage = "cpu"
	// StorageSchedInfo reads the scheduler's own per-task accounting
	// (CONFIG_SCHED_INFO, 5.14+), with a baseline in task storage.
	StorageSchedInfo Storage = "sched_info"
)

// Program is one program of a variant and the tracepoint it attaches to.
type Program struct {
	Name       string // in the ELF
	Group      string // tracepoint group, for classic tracepoints
	Tracepoint string
}

// Variant is a set of programs that together implement a probe with one
// hook and one kind of storage.
type Variant struct {
	Hook     Hook
	Storage  Storage
	Programs []Program
}

func (v Variant) String() string {
	if v.Storage == "" {
		return string(v.Hook)
	}
	return string(v.Hook) + "+" + string(v.Storage)
}

// Candidates returns forced alone if it is set (tests, benchmarks), and
// otherwise the variants using hook, in their order of preference. HookAuto
// or "" is HookBTF: every kernel ktel supports (5.8+ with BTF) has
// BTF-enabled tracepoints, so the raw_tp and classic-tracepoint variants,
// dearer, run only when a hook forces them.
func Candidates(variants []Variant, hook Hook, forced *Variant) ([]Variant, error) {
	if forced != nil {
		return []Variant{*forced}, nil
	}
	if hook == "" || hook == HookAuto {
		hook = HookBTF
	}
	var out []Variant
	for _, v := range variants {
		if v.Hook == hook {
			out = append(out, v)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no variant with hook %q", hook)
	}
	return out, nil
}

// ErrAttrs are the log attributes of a load error: err, and the
// verifier's full log when the verifier refused a program.
func ErrAttrs(err error) []any {
	attrs := []any{"err", err}
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		attrs = append(attrs, "verifier_log", fmt.Sprintf("%+v", ve))
	}
	return attrs
}

// FirstLoading calls load for each candidate in turn and returns the first
// success. When none loads, the errors are combined (see Combine). A
// preferred variant that failed for a reason other than the kernel's lack
// of support (a verifier refusal, say) is logged as a warning, with the
// verifier's log, even when a later one loads: the fallback may hide a bug.
func FirstLoading[T any](candidates []Variant, log *slog.Logger, load func(Variant) (T, error)) (T, Variant, error) {
	var errs []error
	for _, v := range candidates {
		p, err := load(v)
		if err == nil {
			log.Debug("variant loaded", "variant", v.String())
			return p, v, nil
		}
		if Unsupported(err) {
			log.Debug("variant unsupported", "variant", v.String(), "err", err)
		} else {
			log.Warn("variant failed; trying the next", append([]any{"variant", v.String()}, ErrAttrs(err)...)...)
		}
		errs = append(errs, fmt.Errorf("%s: %w", v, err))
	}
	var zero T
	return zero, Variant{}, Combine(errs)
}

// Prune removes from spec every program that is not the variant's, so that
// only the maps this variant uses are created: a kernel without task
// storage can still run a hash variant.
func (v Variant) Prune(spec *ebpf.CollectionSpec) {
	keep := map[string]bool{}
	for _, p := range v.Programs {
		keep[p.Name] = true
	}
	for name := range spec.Programs {
		if !keep[name] {
			delete(spec.Programs, name)
		}
	}
}

// Attach attaches the variant's programs from progs, in the variant's
// order, and returns the links. On error, links already made are closed.
func (v Variant) Attach(progs map[string]*ebpf.Program) ([]link.Link, error) {
	var links []link.Link
	for _, p := range v.Programs {
		l, err := attach(v.Hook, p, progs[p.Name])
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			return nil, err
		}
		links = append(links, l)
	}
	return links, nil
}

func attach(h Hook, p Program, prog *ebpf.Program) (link.Link, error) {
	if prog == nil {
		return nil, fmt.Errorf("program %s not loaded", p.Name)
	}
	var (
		l   link.Link
		err error
	)
	switch h {
	case HookBTF:
		l, err = link.AttachTracing(link.TracingOptions{Program: prog, AttachType: ebpf.AttachTraceRawTp})
	case HookRaw:
		l, err = link.AttachRawTracepoint(link.RawTracepointOptions{Name: p.Tracepoint, Program: prog})
	case HookTracepoint:
		l, err = link.Tracepoint(p.Group, p.Tracepoint, prog, nil)
	default:
		return nil, fmt.Errorf("unknown hook %q", h)
	}
	if err != nil {
		return nil, fmt.Errorf("attach %s %s: %w", h, p.Tracepoint, err)
	}
	return l, nil
}

// SetVar sets variable name of spec (read-only data, or .data) to v, with
// an error naming it when the object has no such variable.
func SetVar(spec *ebpf.CollectionSpec, name string, v any) error {
	vs, ok := spec.Variables[name]
	if !ok {
		return fmt.Errorf("no variable %s", name)
	}
	if err := vs.Set(v); err != nil {
		return fmt.Errorf("set %s: %w", name, err)
	}
	return nil
}

// SetHistogram writes the slot bounds of layout into the program's
// read-only data (ktel_bounds, ktel_slots in ktel_hist.h) and sizes the
// histogram map's values: the slots, then the sum.
func SetHistogram(spec *ebpf.CollectionSpec, layout *histogram.Layout, histMap string) error {
	if err := SetVar(spec, "ktel_bounds", layout.KernelTable()); err != nil {
		return err
	}
	if err := SetVar(spec, "ktel_slots", uint32(layout.Slots())); err != nil {
		return err
	}
	m, ok := spec.Maps[histMap]
	if !ok {
		return fmt.Errorf("no map %s", histMap)
	}
	m.ValueSize = uint32(HistValueSize(layout))
	return nil
}

// HistValueSize is the size of one histogram value in bytes.
func HistValueSize(layout *histogram.Layout) int { return 8 * (layout.Slots() + 1) }

// SumHist reads the histogram value of one key from a per-CPU map read
// with LookupBytes: per CPU, the slots then the sum. perCPU receives each
// CPU's copy (nil to skip); the total is returned.
func SumHist(buf []byte, ncpu int, layout *histogram.Layout, perCPU func(cpu int, slots []uint64, sumNs uint64)) (slots []uint64, sumNs uint64) {
	n := layout.Slots()
	size := HistValueSize(layout)
	stride := (size + 7) &^ 7
	slots = make([]uint64, n)
	for cpu := range ncpu {
		v := buf[cpu*stride : cpu*stride+size]
		var mine []uint64 // only when the caller wants each CPU's copy
		if perCPU != nil {
			mine = make([]uint64, n)
		}
		for k := range n {
			c := nativeEndian.Uint64(v[8*k:])
			slots[k] += c
			if mine != nil {
				mine[k] = c
			}
		}
		s := nativeEndian.Uint64(v[8*n:])
		sumNs += s
		if perCPU != nil {
			perCPU(cpu, mine, s)
		}
	}
	return slots, sumNs
}

// CloseAll closes each of cs, collecting errors; nil interfaces are
// skipped (ebpf.Map and ebpf.Program also accept nil receivers), so it
// suits a partly constructed probe.
func CloseAll(cs ...interface{ Close() error }) error {
	var errs []error
	for _, c := range cs {
		if c != nil {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

var nativeEndian = binary.NativeEndian

// Loaded is what loading a variant leaves: the maps asked for, the
// variant's programs, and their links.
type Loaded struct {
	Maps     map[string]*ebpf.Map
	Programs map[string]*ebpf.Program
	Links    []link.Link
}

// LoadVariant prunes spec to variant v, loads it, keeps the named maps and
// v's programs (the rest of the collection is closed), and attaches the
// programs. On error nothing stays loaded.
func LoadVariant(spec *ebpf.CollectionSpec, v Variant, maps ...string) (*Loaded, error) {
	v.Prune(spec)
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		return nil, fmt.Errorf("load programs: %w", err)
	}
	defer coll.Close() // closes only what was not detached below
	l := &Loaded{Maps: map[string]*ebpf.Map{}, Programs: map[string]*ebpf.Program{}}
	for _, name := range maps {
		m := coll.DetachMap(name)
		if m == nil {
			l.Close()
			return nil, fmt.Errorf("no map %s in the collection", name)
		}
		l.Maps[name] = m
	}
	for _, p := range v.Programs {
		l.Programs[p.Name] = coll.DetachProgram(p.Name)
	}
	if l.Links, err = v.Attach(l.Programs); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// Detach detaches the links, in reverse order of attach, and keeps the
// programs and maps: what the programs wrote stays readable until Close.
// It is safe on a nil Loaded, and idempotent.
func (l *Loaded) Detach() error {
	if l == nil {
		return nil
	}
	var cs []interface{ Close() error }
	for _, lk := range slices.Backward(l.Links) {
		cs = append(cs, lk)
	}
	l.Links = nil
	return CloseAll(cs...)
}

// Close detaches the links and closes programs and maps. It is safe on a
// nil or partly built Loaded, and idempotent.
func (l *Loaded) Close() error {
	if l == nil {
		return nil
	}
	// Links first, in reverse order of attach (Detach): a variant
	// attaches the programs that clean up before those that leave state
	// for them.
	detached := l.Detach()
	var cs []interface{ Close() error }
	for _, p := range l.Programs {
		cs = append(cs, p)
	}
	for _, m := range l.Maps {
		cs = append(cs, m)
	}
	l.Programs, l.Maps = nil, nil
	return errors.Join(detached, CloseAll(cs...))
}

// LoadHistogramProbe is Load for probes with latency histograms: it builds
// the slot layout of schema, and returns the first of the variants (those
// using hook, or forced) that load builds and attaches.
func LoadHistogramProbe[T any](schema int, variants []Variant, hook Hook, forced *Variant, log *slog.Logger,
	load func(layout *histogram.Layout, v Variant, ncpu int) (T, error)) (T, error) {
	var zero T
	layout, err := histogram.NewLayout(schema)
	if err != nil {
		return zero, err
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return zero, fmt.Errorf("possible CPUs: %w", err)
	}
	candidates, err := Candidates(variants, hook, forced)
	if err != nil {
		return zero, err
	}
	p, _, err := FirstLoading(candidates, log, func(v Variant) (T, error) { return load(layout, v, ncpu) })
	return p, err
}
