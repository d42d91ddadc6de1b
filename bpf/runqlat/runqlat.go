// Package runqlat loads the run-queue delay probe: scheduler tracepoint
// programs that time how long runnable tasks wait for a CPU and sort the
// waits into per-CPU native-histogram slots. It knows nothing of
// Prometheus.
package runqlat

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/ktel-dev/ktel/internal/histogram"
	"github.com/ktel-dev/ktel/internal/probe"
)

func programs(suffix string) []probe.Program {
	// Attachment order does not matter: a start without a matching
	// switch-in is cleared when the task next sleeps (or replaced when it
	// is next preempted), a switch-in without a start is ignored.
	return []probe.Program{
		{Name: "sched_switch_" + suffix, Group: "sched", Tracepoint: "sched_switch"},
		{Name: "sched_wakeup_" + suffix, Group: "sched", Tracepoint: "sched_wakeup"},
		{Name: "sched_wakeup_new_" + suffix, Group: "sched", Tracepoint: "sched_wakeup_new"},
	}
}

// Variants in order of preference, cheapest first as measured by
// `make bench`. Every supported kernel picks a tp_btf one: sched_info on
// 5.14+, task storage on 5.11-5.13, a hash on 5.8-5.10. raw_tp and
// tracepoint run only when forced (KTEL_RUNQLAT_HOOK).
var Variants = []probe.Variant{
	{Hook: probe.HookBTF, Storage: probe.StorageSchedInfo, Programs: []probe.Program{
		{Name: "sched_switch_btf_info", Group: "sched", Tracepoint: "sched_switch"}}},
	{Hook: probe.HookBTF, Storage: probe.StorageTask, Programs: programs("btf_task")},
	{Hook: probe.HookBTF, Storage: probe.StorageHash, Programs: programs("btf_hash")},
	{Hook: probe.HookRaw, Storage: probe.StorageHash, Programs: programs("raw_hash")},
	{Hook: probe.HookTracepoint, Storage: probe.StorageHash, Programs: programs("tp_hash")},
}

// Options configure Load.
type Options struct {
	Schema  int            // native-histogram schema, 0..4
	Hook    probe.Hook     // restricts the variants tried; "" or auto: tp_btf
	Variant *probe.Variant // forces one variant (benchmarks, tests)
	// Spans configures outlier events: waits longer than the threshold.
	Spans probe.SpanOptions
	// PerCgroup keeps one histogram per cgroup v2 id of the waiting task
	// (Snapshot.Cgroups) instead of one per CPU. The classic tracepoint
	// does not give the task: its waits are all under cgroup 0.
	PerCgroup bool
}

// maps are the maps a scrape or the span reader uses, whatever the variant.
type maps struct {
	Latency   *ebpf.Map `ebpf:"runqueue_latency"`
	Cgroups   *ebpf.Map `ebpf:"runqueue_latency_cgroup"`
	Drops     *ebpf.Map `ebpf:"runqlat_drops"`
	Events    *ebpf.Map `ebpf:"ktel_events"`
	SpanDrops *ebpf.Map `ebpf:"ktel_span_drops"`
}

// hashMaps is the start map of the hash variants, whose fill is watched.
type hashMaps struct {
	StartHash *ebpf.Map `ebpf:"runqlat_start_hash"`
}

// Probe is the loaded and attached run-queue delay probe.
type Probe struct {
	layout  *histogram.Layout
	variant probe.Variant
	ncpu    int
	cgroups bool
	objs    *probe.Loaded
	maps    maps
	hash    hashMaps // with a hash variant
}

// Load loads and attaches the probe with the first variant that loads.
func Load(opts Options, log *slog.Logger) (*Probe, error) {
	return probe.LoadHistogramProbe(opts.Schema, Variants, opts.Hook, opts.Variant, log,
		func(layout *histogram.Layout, v probe.Variant, ncpu int) (*Probe, error) {
			return load(layout, v, ncpu, opts)
		})
}

func load(layout *histogram.Layout, v probe.Variant, ncpu int, opts Options) (*Probe, error) {
	spec, err := loadRunqlat()
	if err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	var specs runqlatSpecs
	if err := spec.Assign(&specs); err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	if err := probe.SetHistogram(spec, layout, specs.RunqueueLatency); err != nil {
		return nil, err
	}
	if err := opts.Spans.Apply(spec); err != nil {
		return nil, err
	}
	size := uint32(probe.HistValueSize(layout))
	specs.RunqueueLatencyCgroup.ValueSize = size
	specs.RunqlatZero.ValueSize = size
	if opts.PerCgroup {
		if err := specs.PerCgroup.Set(uint32(1)); err != nil {
			return nil, fmt.Errorf("set per_cgroup: %w", err)
		}
	}
	p := &Probe{layout: layout, variant: v, ncpu: ncpu, cgroups: opts.PerCgroup}
	to := []any{&p.maps}
	switch v.Storage {
	case probe.StorageHash:
		to = append(to, &p.hash)
	case probe.StorageSchedInfo:
		if err := schedInfoAlways(); err != nil {
			return nil, err
		}
	}
	if p.objs, err = probe.LoadVariant(spec, v, to...); err != nil {
		return nil, err
	}
	return p, nil
}

// Variant is the variant in use.
func (p *Probe) Variant() probe.Variant { return p.variant }

// Layout is the slot layout of the histograms.
func (p *Probe) Layout() *histogram.Layout { return p.layout }

// Programs are the loaded programs by name.
func (p *Probe) Programs() map[string]*ebpf.Program { return p.objs.Programs }

// BoundedMaps are the hash maps whose fill is worth watching.
func (p *Probe) BoundedMaps() map[string]*ebpf.Map {
	m := map[string]*ebpf.Map{}
	if p.hash.StartHash != nil {
		m["runqlat_start_hash"] = p.hash.StartHash
	}
	if p.cgroups {
		m["runqueue_latency_cgroup"] = p.maps.Cgroups
	}
	if len(m) == 0 {
		return nil
	}
	return m
}

// Detach detaches the programs; the maps stay readable until Close.
func (p *Probe) Detach() error { return p.objs.Detach() }

// Close detaches the programs and releases every map.
func (p *Probe) Close() error { return p.objs.Close() }

// Events is the ring buffer of long waits (see DecodeEvent).
func (p *Probe) Events() *ebpf.Map { return p.maps.Events }

// Event is one long run-queue wait. Times are CLOCK_MONOTONIC nanoseconds.
type Event struct {
	StartNs, EndNs uint64
	Pid            uint32 // 0 with the classic tracepoint, which lacks it
	Tid            uint32
	CPU            uint32 // the CPU the task ran on after waiting
	Cgroup         uint64 // the task's cgroup v2 id; 0 with the classic tracepoint
	Comm           string // the thread's name
	ProcessComm    string // the process's name; empty with the classic tracepoint
}

// EventSize is the size of a record in the ring buffer.
const EventSize = int(unsafe.Sizeof(runqlatRunqlatEvent{}))

// DecodeEvent decodes one ring-buffer record.
func DecodeEvent(b []byte) (Event, error) {
	var r runqlatRunqlatEvent
	if len(b) != EventSize {
		return Event{}, fmt.Errorf("runqlat event: %d bytes, want %d", len(b), EventSize)
	}
	if _, err := binary.Decode(b, binary.NativeEndian, &r); err != nil {
		return Event{}, fmt.Errorf("runqlat event: %w", err)
	}
	if r.EndNs < r.StartNs {
		return Event{}, fmt.Errorf("runqlat event ends (%d) before it starts (%d)", r.EndNs, r.StartNs)
	}
	return Event{StartNs: r.StartNs, EndNs: r.EndNs, Pid: r.Pid, Tid: r.Tid, CPU: r.Cpu, Cgroup: r.Cgroup,
		Comm: probe.CString(r.Comm[:]), ProcessComm: probe.CString(r.Pcomm[:])}, nil
}

// Hist is a histogram of waits: per layout slot, and the sum.
type Hist struct {
	Slots []uint64
	SumNs uint64
}

// Snapshot is one read of the probe's maps.
type Snapshot struct {
	Total  Hist
	PerCPU []Hist // indexed by CPU: waits that ended on that CPU
	// Cgroups are the histograms per cgroup v2 id (Options.PerCgroup);
	// Total and PerCPU then hold only the waits of cgroups that found
	// the per-cgroup map full.
	Cgroups map[uint64]Hist
	// Dropped counts waits not timed because their start could not be
	// stored (hash full, or task storage allocation failed).
	Dropped uint64
	// CgroupsFull counts waits counted in Total because the per-cgroup
	// map was full.
	CgroupsFull uint64
	// SpanDrops are long waits the kernel did not deliver as events.
	SpanDrops probe.SpanDrops
}

// Snapshot reads the per-CPU histograms.
func (p *Probe) Snapshot() (*Snapshot, error) {
	buf, err := p.maps.Latency.LookupBytes(uint32(0))
	if err != nil {
		return nil, fmt.Errorf("read runqueue_latency: %w", err)
	}
	s := &Snapshot{PerCPU: make([]Hist, p.ncpu)}
	s.Total.Slots, s.Total.SumNs = probe.SumHist(buf, p.ncpu, p.layout, func(cpu int, slots []uint64, sum uint64) {
		s.PerCPU[cpu] = Hist{Slots: slots, SumNs: sum}
	})
	for reason, to := range []*uint64{&s.Dropped, &s.CgroupsFull} {
		var drops []uint64
		if err := p.maps.Drops.Lookup(uint32(reason), &drops); err != nil {
			return nil, fmt.Errorf("read runqlat_drops: %w", err)
		}
		for _, d := range drops {
			*to += d
		}
	}
	if p.cgroups {
		if s.Cgroups, err = p.readCgroups(); err != nil {
			return nil, err
		}
	}
	if s.SpanDrops, err = probe.ReadSpanDrops(p.maps.SpanDrops); err != nil {
		return nil, err
	}
	return s, nil
}

// readCgroups reads the per-cgroup histograms.
func (p *Probe) readCgroups() (map[uint64]Hist, error) {
	out := map[uint64]Hist{}
	if err := probe.ReadHistHash(p.maps.Cgroups, p.layout, func(id uint64, slots []uint64, sum uint64) {
		out[id] = Hist{Slots: slots, SumNs: sum}
	}); err != nil {
		return nil, fmt.Errorf("read runqueue_latency_cgroup: %w", err)
	}
	return out, nil
}

// ForgetCgroup deletes the histogram of cgroup id (one idle long enough
// that its series may go); waits recorded between the last read and the
// deletion are lost. A cgroup not in the map is no error.
func (p *Probe) ForgetCgroup(id uint64) error {
	if err := p.maps.Cgroups.Delete(id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from runqueue_latency_cgroup: %w", err)
	}
	return nil
}

// schedInfoAlways returns nil if the kernel keeps sched_info for every task
// whatever its boot options: CONFIG_SCHED_INFO (task_struct has
// sched_info) on 5.14+ (which renamed task_struct.state to __state in the
// same release that made the accounting unconditional). Before 5.14 it
// depended on delay accounting being switched on.
func schedInfoAlways() error {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return fmt.Errorf("kernel BTF: %w", err)
	}
	var task *btf.Struct
	if err := spec.TypeByName("task_struct", &task); err != nil {
		return fmt.Errorf("kernel BTF: %w", err)
	}
	has := map[string]bool{}
	for _, m := range task.Members {
		has[m.Name] = true
	}
	if !has["sched_info"] || !has["__state"] {
		return fmt.Errorf("sched_info accounting is not unconditional on this kernel (needs CONFIG_SCHED_INFO and 5.14+): %w", ebpf.ErrNotSupported)
	}
	return nil
}
