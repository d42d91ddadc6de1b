package metrics

import (
	"errors"
	"fmt"

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

// countKeys walks the keys only, without copying values. Keys deleted
// during the walk may restart it from the first key (the kernel's
// behaviour for a missing key), so the walk is capped at the capacity.
func countKeys(m *ebpf.Map) (int, error) {
	key := make([]byte, m.KeySize())
	next := make([]byte, m.KeySize())
	var (
		n   int
		cur any // nil: start from the first key
	)
	for n < int(m.MaxEntries()) {
		if err := m.NextKey(cur, &next); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		n++
		copy(key, next)
		cur = key
	}
	return n, nil
}
