// Package syscall loads the syscall-latency probe: raw_syscalls sys_enter
// and sys_exit programs that count every syscall and sort the latency of
// the timed ones (all, a sample, listed syscalls or chosen cgroups' ones)
// into per-CPU native-histogram slots, and typed readers for those. It
// knows nothing of Prometheus.
package syscall

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/histogram"
	"github.com/ktel-dev/ktel/internal/probe"
)

// MaxSyscalls bounds the syscall numbers measured (MAX_SYSCALLS in C).
const MaxSyscalls = 512

// Keys of syscall_drops (enum drop_reason in C).
const (
	dropErrorsFull = iota
	dropStartFull
	dropCgroupFull
	dropReasons
)

func pair(enter, exit string) []probe.Program {
	// Exit first: an enter without exit only leaves a start behind, an
	// exit without enter is skipped anyway.
	return []probe.Program{
		{Name: exit, Group: "raw_syscalls", Tracepoint: "sys_exit"},
		{Name: enter, Group: "raw_syscalls", Tracepoint: "sys_enter"},
	}
}

// cpuVariant keeps the start in a per-CPU slot and, for a thread switched
// out mid-syscall, in its task storage. The sched_switch program that moves
// it there is attached first and detached last, so that no start is ever
// left in a slot whose thread has gone.
func cpuVariant() []probe.Program {
	return append([]probe.Program{{Name: "syscall_switch_btf_cpu", Group: "sched", Tracepoint: "sched_switch"}},
		pair("sys_enter_btf_cpu", "sys_exit_btf_cpu")...)
}

// Variants in order of preference: cheapest first, as measured by
// `make bench` (see README, "Overhead"). Every supported kernel picks a
// tp_btf one: the cpu variant where tracing programs have task storage
// (5.11+), the hash one before (5.8-5.10). raw_tp and tracepoint run only
// when forced (KTEL_SYSCALL_HOOK), and keep their start in a hash so that
// they run on every supported kernel.
var Variants = []probe.Variant{
	{Hook: probe.HookBTF, Storage: probe.StorageCPU, Programs: cpuVariant()},
	{Hook: probe.HookBTF, Storage: probe.StorageHash, Programs: pair("sys_enter_btf_hash", "sys_exit_btf_hash")},
	{Hook: probe.HookRaw, Storage: probe.StorageHash, Programs: pair("sys_enter_raw_hash", "sys_exit_raw_hash")},
	{Hook: probe.HookTracepoint, Storage: probe.StorageHash, Programs: pair("sys_enter_tp_hash", "sys_exit_tp_hash")},
}

// perCgroup is variant v with the exit program that keys the histograms
// by the caller's cgroup (the "_cg" programs in C); its other programs are
// v's own.
func perCgroup(v probe.Variant) probe.Variant {
	progs := slices.Clone(v.Programs)
	for i, p := range progs {
		if p.Tracepoint == "sys_exit" {
			progs[i].Name += "_cg"
		}
	}
	v.Programs = progs
	return v
}

// Timing is which syscalls are timed; every syscall is counted.
type Timing string

const (
	// TimeAll times every syscall.
	TimeAll Timing = "all"
	// TimeSample times about one in SampleRate syscalls per CPU, skipping
	// a random number between two (see count_and_pick in C).
	TimeSample Timing = "sample"
	// TimeList times the syscalls numbered in Syscalls.
	TimeList Timing = "list"
	// TimeCgroup times the syscalls of threads directly in the cgroups
	// (v2 ids, the directories' inode numbers) in Cgroups.
	TimeCgroup Timing = "cgroup"
)

// timingModes are the values of syscall_timing (enum timing in C).
var timingModes = map[Timing]uint32{"": 0, TimeAll: 0, TimeSample: 1, TimeList: 2, TimeCgroup: 3}

// MaxCgroups bounds Options.Cgroups (syscall_cgroups in C).
const MaxCgroups = 1024

// Options configure Load.
type Options struct {
	// Timing selects the syscalls timed; "" is TimeAll.
	Timing Timing
	// SampleRate is N for TimeSample: 1 in N syscalls are timed.
	SampleRate uint32
	// Syscalls are the numbers timed in TimeList.
	Syscalls []uint32
	// Cgroups are the cgroup v2 ids timed in TimeCgroup.
	Cgroups []uint64
	// PerCgroup keeps the histograms of the timed syscalls per cgroup v2
	// id of the caller and syscall (Snapshot.Cgroups), up to
	// MaxCgroupHists of them, instead of per CPU and syscall. It loads
	// each variant with its per-cgroup exit program; the default
	// programs are untouched.
	PerCgroup bool

	// Schema is the native-histogram schema of the kernel slots, 0..4.
	Schema int
	// Hook restricts the variants tried; HookAuto or "" is tp_btf
	// (probe.Candidates): raw_tp and tracepoint only when named.
	Hook probe.Hook
	// Variant, when set, forces exactly one variant (benchmarks, tests).
	Variant *probe.Variant
	// Spans configures outlier events: syscalls slower than the threshold.
	Spans probe.SpanOptions
}

// maps are the maps a scrape or the span reader uses, whatever the variant.
type maps struct {
	Latency   *ebpf.Map `ebpf:"syscall_latency"`
	Count     *ebpf.Map `ebpf:"syscall_count"`
	Cgroups   *ebpf.Map `ebpf:"syscall_cgroups"`
	Errors    *ebpf.Map `ebpf:"syscall_errors"`
	Drops     *ebpf.Map `ebpf:"syscall_drops"`
	Events    *ebpf.Map `ebpf:"ktel_events"`
	SpanDrops *ebpf.Map `ebpf:"ktel_span_drops"`
	Bss       *ebpf.Map `ebpf:".bss"` // holds syscall_seen
}

// cgroupMaps is the per-cgroup histogram map (Options.PerCgroup).
type cgroupMaps struct {
	Latency *ebpf.Map `ebpf:"syscall_latency_cgroup"`
}

// MaxCgroupHists bounds the (cgroup, syscall) histograms of
// Options.PerCgroup (max_entries of syscall_latency_cgroup in C).
const MaxCgroupHists = 2048

// hashMaps is the start map of the hash variants, whose fill is watched.
type hashMaps struct {
	StartHash *ebpf.Map `ebpf:"syscall_start_hash"`
}

// Probe is the loaded and attached syscall-latency probe.
type Probe struct {
	layout  *histogram.Layout
	variant probe.Variant
	ncpu    int
	objs    *probe.Loaded
	maps    maps
	hash    hashMaps   // with a hash variant
	cgroups cgroupMaps // with Options.PerCgroup

	seenOff int // of syscall_seen in .bss

	// hists is syscall_latency mapped into memory: the histogram of
	// syscall nr on CPU c at offset (c*MaxSyscalls+nr)*valueSize.
	hists *ebpf.Memory
	// counts is syscall_count mapped likewise, 8 bytes per value.
	counts    *ebpf.Memory
	valueSize int

	readMu sync.Mutex // guards the read buffers
	bssBuf []byte
	buf    []byte // one syscall's values, CPU after CPU
}

// Load loads and attaches the probe, trying variants in order of preference
// and returning the first that loads. When none does, the errors of all are
// returned, wrapping probe.ErrUnsupported if the kernel lacks what every
// variant needs.
func Load(opts Options, log *slog.Logger) (*Probe, error) {
	variants, forced := Variants, opts.Variant
	if opts.PerCgroup {
		variants = make([]probe.Variant, len(Variants))
		for i, v := range Variants {
			variants[i] = perCgroup(v)
		}
		if forced != nil {
			v := perCgroup(*forced)
			forced = &v
		}
	}
	return probe.LoadHistogramProbe(opts.Schema, variants, opts.Hook, forced, log,
		func(layout *histogram.Layout, v probe.Variant, ncpu int) (*Probe, error) {
			return load(layout, v, ncpu, opts)
		})
}

// setTiming writes the timing mode into the program's read-only data.
func setTiming(specs *syscallSpecs, opts Options) error {
	mode, ok := timingModes[opts.Timing]
	if !ok {
		return fmt.Errorf("unknown syscall timing %q", opts.Timing)
	}
	rate := max(opts.SampleRate, 1)
	if rate > 1<<30 {
		return fmt.Errorf("sample rate %d above 2^30", rate)
	}
	if len(opts.Cgroups) > MaxCgroups {
		return fmt.Errorf("%d cgroups, more than %d", len(opts.Cgroups), MaxCgroups)
	}
	var timed [MaxSyscalls]uint8
	for _, nr := range opts.Syscalls {
		if nr >= MaxSyscalls {
			return fmt.Errorf("syscall number %d not below %d", nr, MaxSyscalls)
		}
		timed[nr] = 1
	}
	if err := specs.SyscallTiming.Set(mode); err != nil {
		return fmt.Errorf("set syscall_timing: %w", err)
	}
	if err := specs.SyscallSampleRate.Set(rate); err != nil {
		return fmt.Errorf("set syscall_sample_rate: %w", err)
	}
	if err := specs.SyscallTimed.Set(timed); err != nil {
		return fmt.Errorf("set syscall_timed: %w", err)
	}
	return nil
}

func load(layout *histogram.Layout, v probe.Variant, ncpu int, opts Options) (*Probe, error) {
	spans := opts.Spans
	spec, err := loadSyscall()
	if err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	var specs syscallSpecs
	if err := spec.Assign(&specs); err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	if err := probe.SetHistogram(spec, layout, specs.SyscallLatency); err != nil {
		return nil, err
	}
	specs.SyscallLatency.MaxEntries = uint32(ncpu * MaxSyscalls)
	specs.SyscallCount.MaxEntries = uint32(ncpu * MaxSyscalls)
	specs.SyscallLatencyCgroup.ValueSize = specs.SyscallLatency.ValueSize
	specs.SyscallZero.ValueSize = specs.SyscallLatency.ValueSize
	if err := setTiming(&specs, opts); err != nil {
		return nil, err
	}
	if err := spans.Apply(spec); err != nil {
		return nil, err
	}
	if err := specs.SyscallNrExit.Set(uint32(unix.SYS_EXIT)); err != nil {
		return nil, fmt.Errorf("set syscall_nr_exit: %w", err)
	}
	if err := specs.SyscallNrExitGroup.Set(uint32(unix.SYS_EXIT_GROUP)); err != nil {
		return nil, fmt.Errorf("set syscall_nr_exit_group: %w", err)
	}
	seen := specs.SyscallSeen
	if seen.SectionName != ".bss" || seen.Size() != MaxSyscalls {
		return nil, fmt.Errorf("syscall_seen: not a %d-byte variable in .bss", MaxSyscalls)
	}
	bssSize := spec.Maps[".bss"].ValueSize
	p := &Probe{layout: layout, variant: v, ncpu: ncpu, bssBuf: make([]byte, bssSize), seenOff: int(seen.Offset)}
	to := []any{&p.maps}
	if v.Storage == probe.StorageHash {
		to = append(to, &p.hash)
	}
	if opts.PerCgroup {
		to = append(to, &p.cgroups)
	}
	if p.objs, err = probe.LoadVariant(spec, v, to...); err != nil {
		return nil, err
	}
	// The programs are attached: cgroups listed now are timed from their
	// first syscall after Load returns.
	for _, id := range opts.Cgroups {
		if err := p.maps.Cgroups.Put(id, uint8(1)); err != nil {
			p.objs.Close()
			return nil, fmt.Errorf("add cgroup %d to syscall_cgroups: %w", id, err)
		}
	}
	if p.hists, err = p.maps.Latency.Memory(); err != nil {
		p.objs.Close()
		return nil, fmt.Errorf("map syscall_latency into memory: %w", err)
	}
	if p.counts, err = p.maps.Count.Memory(); err != nil {
		p.objs.Close()
		return nil, fmt.Errorf("map syscall_count into memory: %w", err)
	}
	p.valueSize = probe.HistValueSize(layout)
	p.buf = make([]byte, ncpu*p.valueSize)
	return p, nil
}

// Variant is the variant in use.
func (p *Probe) Variant() probe.Variant { return p.variant }

// Layout is the slot layout of the histograms.
func (p *Probe) Layout() *histogram.Layout { return p.layout }

// Programs are the loaded programs by name, for run-time statistics.
func (p *Probe) Programs() map[string]*ebpf.Program { return p.objs.Programs }

// BoundedMaps are the hash maps whose fill is worth watching.
func (p *Probe) BoundedMaps() map[string]*ebpf.Map {
	m := map[string]*ebpf.Map{"syscall_errors": p.maps.Errors}
	if p.hash.StartHash != nil {
		m["syscall_start_hash"] = p.hash.StartHash
	}
	if p.cgroups.Latency != nil {
		m["syscall_latency_cgroup"] = p.cgroups.Latency
	}
	return m
}

// Detach detaches the programs; the maps stay readable until Close.
func (p *Probe) Detach() error { return p.objs.Detach() }

// Close detaches the programs and releases every map.
func (p *Probe) Close() error { return p.objs.Close() }

// Events is the ring buffer of outlier syscalls (see DecodeEvent).
func (p *Probe) Events() *ebpf.Map { return p.maps.Events }

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
	// Counts are every syscall entered, by number; syscalls never seen
	// are absent.
	Counts map[uint32]uint64
	// Latency of the timed syscalls by number; syscalls never timed are
	// absent. With Options.PerCgroup, only those timed while
	// syscall_latency_cgroup was full (CgroupsFull).
	Latency map[uint32]Hist
	// Cgroups are the histograms by cgroup and syscall
	// (Options.PerCgroup).
	Cgroups map[CgroupKey]Hist
	// CgroupsFull counts timed syscalls recorded in Latency because
	// syscall_latency_cgroup had no room for their (cgroup, syscall).
	CgroupsFull uint64
	// Errors counts failed syscalls.
	Errors map[ErrorKey]uint64
	// ErrorsDropped counts failures not recorded because syscall_errors
	// was full.
	ErrorsDropped uint64
	// StartsDropped counts syscalls not timed because the kernel had no
	// memory for the start of one whose thread was switched out.
	StartsDropped uint64
	// SpanDrops are outliers the kernel did not deliver as events.
	SpanDrops probe.SpanDrops
}

// Snapshot reads and sums the per-CPU maps. Counters only grow, but the
// read is not atomic across syscalls: a scrape may see one syscall's
// histogram a few microseconds later than another's.
func (p *Probe) Snapshot() (*Snapshot, error) {
	s := &Snapshot{Counts: make(map[uint32]uint64), Latency: make(map[uint32]Hist), Errors: make(map[ErrorKey]uint64)}
	p.readMu.Lock()
	defer p.readMu.Unlock()
	// Only the syscalls seen: most never are, and each histogram is
	// CPUs x slots counters.
	if err := p.maps.Bss.Lookup(uint32(0), p.bssBuf); err != nil {
		return nil, fmt.Errorf("read syscall_seen: %w", err)
	}
	seen := p.bssBuf[p.seenOff : p.seenOff+MaxSyscalls]
	for nr, ok := range seen {
		if ok == 0 {
			continue
		}
		if err := p.readHist(uint32(nr)); err != nil {
			return nil, err
		}
		var h Hist
		h.Slots, h.SumNs = probe.SumHist(p.buf, p.ncpu, p.layout, nil)
		if h.Count() > 0 {
			s.Latency[uint32(nr)] = h
		}
		n, err := p.readCount(uint32(nr))
		if err != nil {
			return nil, err
		}
		s.Counts[uint32(nr)] = n
	}

	errs, err := probe.SumPerCPUHash[syscallErrorsKey](p.maps.Errors, int(p.maps.Errors.MaxEntries()))
	if err != nil {
		return nil, fmt.Errorf("read syscall_errors: %w", err)
	}
	for k, n := range errs {
		s.Errors[ErrorKey{Nr: k.Nr, Errno: k.Err}] = n
	}

	drops, err := probe.SumPerCPUArray(p.maps.Drops, dropReasons)
	if err != nil {
		return nil, fmt.Errorf("read syscall_drops: %w", err)
	}
	s.ErrorsDropped, s.StartsDropped, s.CgroupsFull = drops[dropErrorsFull], drops[dropStartFull], drops[dropCgroupFull]
	if p.cgroups.Latency != nil {
		s.Cgroups = map[CgroupKey]Hist{}
		if err := probe.ReadHistHash(p.cgroups.Latency, p.layout, func(k syscallCgroupKey, slots []uint64, sum uint64) {
			s.Cgroups[CgroupKey{Cgroup: k.Cgroup, Nr: k.Nr}] = Hist{Slots: slots, SumNs: sum}
		}); err != nil {
			return nil, fmt.Errorf("read syscall_latency_cgroup: %w", err)
		}
	}
	spanDrops, err := probe.ReadSpanDrops(p.maps.SpanDrops)
	if err != nil {
		return nil, err
	}
	s.SpanDrops = spanDrops
	return s, nil
}

// CgroupKey is one histogram of Options.PerCgroup: a syscall made by the
// threads of a cgroup (its v2 id).
type CgroupKey struct {
	Cgroup uint64
	Nr     uint32
}

// ForgetCgroup deletes the histogram of k (one idle long enough that its
// series may go); syscalls timed between the last read and the deletion
// are lost. A key not in the map is no error.
func (p *Probe) ForgetCgroup(k CgroupKey) error {
	if err := p.cgroups.Latency.Delete(syscallCgroupKey{Cgroup: k.Cgroup, Nr: k.Nr}); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from syscall_latency_cgroup: %w", err)
	}
	return nil
}

// readHist copies the values of syscall nr on every CPU from the mapped
// syscall_latency into p.buf, CPU after CPU as a per-CPU map lookup returns
// them. The kernel keeps counting meanwhile: each 8-byte counter is read
// whole, but one histogram's counters are not read at one instant.
func (p *Probe) readHist(nr uint32) error {
	for cpu := range p.ncpu {
		off := int64((cpu*MaxSyscalls + int(nr)) * p.valueSize)
		if _, err := p.hists.ReadAt(p.buf[cpu*p.valueSize:(cpu+1)*p.valueSize], off); err != nil {
			return fmt.Errorf("read syscall_latency of syscall %d on CPU %d: %w", nr, cpu, err)
		}
	}
	return nil
}

// readCount sums syscall nr's count over CPUs, from the mapped
// syscall_count.
func (p *Probe) readCount(nr uint32) (uint64, error) {
	var n uint64
	var b [8]byte
	for cpu := range p.ncpu {
		if _, err := p.counts.ReadAt(b[:], int64((cpu*MaxSyscalls+int(nr))*8)); err != nil {
			return 0, fmt.Errorf("read syscall_count of syscall %d on CPU %d: %w", nr, cpu, err)
		}
		n += binary.NativeEndian.Uint64(b[:])
	}
	return n, nil
}

// Event is one outlier syscall. Times are CLOCK_MONOTONIC nanoseconds.
type Event struct {
	StartNs, EndNs uint64
	Pid, Tid       uint32
	Nr             uint32
	Ret            int32
	Comm           string // the thread's name
	ProcessComm    string // the process's (its main thread's) name
}

// EventSize is the size of a record in the ring buffer.
const EventSize = int(unsafe.Sizeof(syscallSyscallEvent{}))

// DecodeEvent decodes one ring-buffer record (struct syscall_event, whose
// layout TestStructSizes pins; decoded by offset, without reflection,
// because it runs for every outlier).
func DecodeEvent(b []byte) (Event, error) {
	if len(b) != EventSize {
		return Event{}, fmt.Errorf("syscall event: %d bytes, want %d", len(b), EventSize)
	}
	ne := binary.NativeEndian
	e := Event{
		StartNs: ne.Uint64(b[0:]), EndNs: ne.Uint64(b[8:]),
		Pid: ne.Uint32(b[16:]), Tid: ne.Uint32(b[20:]), Nr: ne.Uint32(b[24:]), Ret: int32(ne.Uint32(b[28:])),
		Comm: probe.CBytes(b[32:48]), ProcessComm: probe.CBytes(b[48:64]),
	}
	if e.EndNs < e.StartNs {
		return Event{}, fmt.Errorf("syscall event ends (%d) before it starts (%d)", e.EndNs, e.StartNs)
	}
	return e, nil
}

// Sizes of the generated structs, for the layout check in tests.
const (
	startSize     = unsafe.Sizeof(syscallStart{})
	errorsKeySize = unsafe.Sizeof(syscallErrorsKey{})
	cgroupKeySize = unsafe.Sizeof(syscallCgroupKey{})
)
