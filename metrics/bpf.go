package metrics

import (
	"errors"
	"fmt"
	"reflect"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
)

// BPFObjects is what a loaded probe exposes about its kernel objects.
type BPFObjects interface {
	Programs() map[string]*ebpf.Program
	BoundedMaps() map[string]*ebpf.Map
}

type bpfCollector struct {
	probes    map[string]BPFObjects
	withStats bool

	runTime, runs, misses *prometheus.Desc
	entries, maxEntries   *prometheus.Desc
}

// NewBPFCollector exports per-program statistics and the fill of bounded
// hash maps for the probes given, keyed by probe name. Run time and run
// count are exported only when withStats is set: the kernel collects them
// only while kernel.bpf_stats_enabled is on (KTEL_BPF_STATS).
func NewBPFCollector(probes map[string]BPFObjects, withStats bool) Collector {
	labels := []string{"probe", "program"}
	return &bpfCollector{
		probes:    probes,
		withStats: withStats,
		runTime: prometheus.NewDesc("ktel_bpf_program_run_seconds_total",
			"Time spent running the program (KTEL_BPF_STATS=true).", labels, nil),
		runs: prometheus.NewDesc("ktel_bpf_program_runs_total",
			"Times the program ran (KTEL_BPF_STATS=true).", labels, nil),
		misses: prometheus.NewDesc("ktel_bpf_program_recursion_misses_total",
			"Times the program did not run because another BPF program was running on the CPU.", labels, nil),
		entries: prometheus.NewDesc("ktel_bpf_map_entries",
			"Entries in a bounded hash map.", []string{"probe", "map"}, nil),
		maxEntries: prometheus.NewDesc("ktel_bpf_map_max_entries",
			"Capacity of a bounded hash map.", []string{"probe", "map"}, nil),
	}
}

func (c *bpfCollector) Update(ch chan<- prometheus.Metric) error {
	var errs []error
	for probe, objs := range c.probes {
		for name, prog := range objs.Programs() {
			st, err := prog.Stats()
			if err != nil {
				errs = append(errs, fmt.Errorf("stats of %s/%s: %w", probe, name, err))
				continue
			}
			if c.withStats {
				ch <- prometheus.MustNewConstMetric(c.runTime, prometheus.CounterValue, st.Runtime.Seconds(), probe, name)
				ch <- prometheus.MustNewConstMetric(c.runs, prometheus.CounterValue, float64(st.RunCount), probe, name)
			}
			ch <- prometheus.MustNewConstMetric(c.misses, prometheus.CounterValue, float64(st.RecursionMisses), probe, name)
		}
		for name, m := range objs.BoundedMaps() {
			n, err := countKeys(m)
			if err != nil {
				errs = append(errs, fmt.Errorf("count %s/%s: %w", probe, name, err))
				continue
			}
			ch <- prometheus.MustNewConstMetric(c.entries, prometheus.GaugeValue, float64(n), probe, name)
			ch <- prometheus.MustNewConstMetric(c.maxEntries, prometheus.GaugeValue, float64(m.MaxEntries()), probe, name)
		}
	}
	return errors.Join(errs...)
}

// countKeys counts m's entries: by batch lookups where the kernel has
// them (5.6+), a few syscalls for the whole map, else by walking the keys,
// one syscall per key. The batch buffers are typed as arrays of the key
// and value sizes, which is all a batch needs. Keys deleted during a walk
// may restart it from the first key (the kernel's behaviour for a missing
// key), so the walk is capped at the capacity.
func countKeys(m *ebpf.Map) (int, error) {
	n, err := countKeysBatch(m)
	if !errors.Is(err, ebpf.ErrNotSupported) {
		return n, err
	}
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	var cur any // nil: start from the first key
	for n = 0; n < int(m.MaxEntries()); n++ {
		if err := m.NextKey(cur, &next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		copy(key, next)
		cur = key
	}
	return n, nil
}

// countBatch is how many entries one batch lookup asks for: enough that a
// full syscall_errors (4096) takes a few calls, and that any hash bucket
// fits (the kernel fails a batch smaller than a bucket with ENOSPC).
const countBatch = 512

func countKeysBatch(m *ebpf.Map) (int, error) {
	per := 1
	switch m.Type() {
	case ebpf.PerCPUHash, ebpf.LRUCPUHash, ebpf.PerCPUArray:
		ncpu, err := ebpf.PossibleCPU()
		if err != nil {
			return 0, err
		}
		per = ncpu
	}
	chunk := min(countBatch, int(m.MaxEntries()))
	keys := reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(m.KeySize()), reflect.TypeFor[byte]())), chunk, chunk).Interface()
	vals := reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(int(m.ValueSize()), reflect.TypeFor[byte]())), chunk*per, chunk*per).Interface()
	var (
		cursor ebpf.MapBatchCursor
		n      int
	)
	for {
		got, err := m.BatchLookup(&cursor, keys, vals, nil)
		n += got
		switch {
		case errors.Is(err, ebpf.ErrKeyNotExist):
			return n, nil
		case err != nil:
			return n, err
		case got == 0:
			return n, nil
		}
	}
}
