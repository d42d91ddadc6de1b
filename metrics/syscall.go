package metrics

import (
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/histogram"
)

// SyscallLatency is the syscall latency histogram's name, for exemplars.
const SyscallLatency = "ktel_syscall_latency_seconds"

// SyscallSource is what the syscall collector reads: the loaded probe, or a
// fake in tests.
type SyscallSource interface {
	Snapshot() (*sysprobe.Snapshot, error)
	Layout() *histogram.Layout
}

// SyscallCollector exports the syscall probe's maps.
type SyscallCollector struct {
	layout    *histogram.Layout
	exemplars *Exemplars
	snap      *Cached[*sysprobe.Snapshot]
	name      func(nr uint32) string
	calls     *prometheus.Desc
	latency   *prometheus.Desc
	errors    *prometheus.Desc
	dropped   *prometheus.Desc
	untimed   *prometheus.Desc

	// With workload attribution (NewSyscallWorkloadCollector).
	workloads *workloadSums[uint32]
	forget    SyscallCgroups
	overflow  *prometheus.Desc
	mu        sync.Mutex // serialises reads with workload sums
}

// SyscallCgroups is what the collector also needs with workload
// attribution: deleting idle cgroups' histograms.
type SyscallCgroups interface {
	ForgetCgroup(k sysprobe.CgroupKey) error
}

// NewSyscallWorkloadCollector is NewSyscallCollector for a probe loaded
// with per-cgroup histograms: ktel_syscall_latency_seconds is by syscall
// and workload (labels namespace, pod, container, unit), res naming each
// cgroup; a cgroup's histogram of a syscall that has not changed for ttl
// is deleted from the kernel (its series goes when none of its workload's
// cgroups is left). Timed syscalls the kernel could not key by cgroup (its
// map full) are exported as unit="other" and counted in
// ktel_label_overflow_total{probe="syscall",label="cgroup"}. The counts
// and errors stay by syscall only.
func NewSyscallWorkloadCollector(src SyscallSource, forget SyscallCgroups, name func(nr uint32) string, res Workloads, ttl time.Duration) *SyscallCollector {
	c := NewSyscallCollector(src, name, nil)
	c.forget = forget
	c.workloads = newWorkloadSums[uint32](res, ttl)
	c.latency = prometheus.NewDesc(SyscallLatency,
		"Time from syscall entry to exit, per syscall and workload, of the syscalls timed (KTEL_SYSCALL_TIMING: all, a sample, listed syscalls or chosen cgroups'); ktel_syscalls_total counts them all.",
		append([]string{"syscall"}, workloadLabels...), nil)
	c.overflow = prometheus.NewDesc("ktel_label_overflow_total",
		"Observations exported under the label value \"other\" because the label had reached its cap on distinct values.",
		nil, prometheus.Labels{"probe": "syscall", "label": "cgroup"})
	return c
}

// NewSyscallCollector exports the syscall probe's exact counts as
// ktel_syscalls_total{syscall}, the histograms of the timed syscalls as
// ktel_syscall_latency_seconds{syscall} and the failures as
// ktel_syscall_errors_total{syscall,errno}. name turns syscall numbers
// into names (sysprobe.NativeName outside tests).
// Exemplars, when not nil, supply exemplars for the latency histograms.
func NewSyscallCollector(src SyscallSource, name func(nr uint32) string, ex *Exemplars) *SyscallCollector {
	return &SyscallCollector{
		layout:    src.Layout(),
		exemplars: ex,
		snap:      NewCached(src.Snapshot, DefaultMaxAge),
		name:      name,
		calls: prometheus.NewDesc("ktel_syscalls_total",
			"Syscalls entered, per syscall: every one, whether ktel_syscall_latency_seconds times it or not.", []string{"syscall"}, nil),
		latency: prometheus.NewDesc(SyscallLatency,
			"Time from syscall entry to exit, per syscall, of the syscalls timed (KTEL_SYSCALL_TIMING: all, a sample, listed syscalls or chosen cgroups'); ktel_syscalls_total counts them all.", []string{"syscall"}, nil),
		errors: prometheus.NewDesc("ktel_syscall_errors_total",
			"Syscalls that returned an error, per syscall and errno.", []string{"syscall", "errno"}, nil),
		dropped: prometheus.NewDesc("ktel_syscall_errors_dropped_total",
			"Failed syscalls not counted in ktel_syscall_errors_total because its kernel map was full.", nil, nil),
		untimed: prometheus.NewDesc("ktel_syscall_untimed_total",
			"Syscalls chosen for timing but missing from ktel_syscall_latency_seconds because the kernel had no memory to keep their start.", nil, nil),
	}
}

// Update sends the syscall metrics. When the maps cannot be read, the
// latency histograms' absence is also a gathering error, which the handler
// logs and counts (promhttp_metric_handler_errors_total{cause="gathering"}).
func (c *SyscallCollector) Update(ch chan<- prometheus.Metric) error {
	if c.workloads != nil {
		// Snapshots reach the workload sums in the order they were read.
		c.mu.Lock()
		defer c.mu.Unlock()
	}
	s, err := c.snap.Get()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(c.latency, fmt.Errorf("%s: %w", SyscallLatency, err))
		return err
	}
	if c.workloads != nil {
		err = c.updateWorkloads(ch, s)
	} else {
		for nr, h := range s.Latency {
			name := c.name(nr)
			m, err := newLatencyHistogram(c.latency, c.layout, h.Slots, h.SumNs, c.exemplars.forSeries(SyscallLatency, []string{name}), name)
			if err != nil {
				m = prometheus.NewInvalidMetric(c.latency, err)
			}
			ch <- m
		}
	}
	for nr, n := range s.Counts {
		ch <- prometheus.MustNewConstMetric(c.calls, prometheus.CounterValue, float64(n), c.name(nr))
	}
	for k, n := range s.Errors {
		ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(n), c.name(k.Nr), errnoName(k.Errno))
	}
	ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(s.ErrorsDropped))
	ch <- prometheus.MustNewConstMetric(c.untimed, prometheus.CounterValue, float64(s.StartsDropped))
	sendKernelSpanDrops(ch, "syscall", s.SpanDrops)
	return err
}

// updateWorkloads sends one histogram per syscall and workload.
func (c *SyscallCollector) updateWorkloads(ch chan<- prometheus.Metric, s *sysprobe.Snapshot) error {
	cur := make(map[cgroupKey[uint32]][]uint64, len(s.Cgroups))
	for k, h := range s.Cgroups {
		cur[cgroupKey[uint32]{id: k.Cgroup, key: k.Nr}] = append(h.Slots[:len(h.Slots):len(h.Slots)], h.SumNs)
	}
	series, err := c.workloads.updateAndForget(cur, func(ck cgroupKey[uint32]) error {
		return c.forget.ForgetCgroup(sysprobe.CgroupKey{Cgroup: ck.id, Nr: ck.key})
	}, c.snap.Invalidate)
	n := c.layout.Slots()
	// With the map full, the rest went to the node-level histograms.
	for nr, h := range s.Latency {
		addOverflow(series, nr, append(h.Slots[:n:n], h.SumNs))
	}
	for sk, v := range series {
		m, err := newLatencyHistogram(c.latency, c.layout, v[:n], v[n], nil, append([]string{c.name(sk.key)}, WorkloadLabelValues(sk.labels)...)...)
		if err != nil {
			m = prometheus.NewInvalidMetric(c.latency, err)
		}
		ch <- m
	}
	ch <- prometheus.MustNewConstMetric(c.overflow, prometheus.CounterValue, float64(s.CgroupsFull))
	return err
}

// errnoName is the symbolic name (EAGAIN), or the number for codes without
// one, such as the kernel-internal ERESTARTSYS (512) seen at sys_exit.
func errnoName(e uint32) string {
	if n := unix.ErrnoName(unix.Errno(e)); n != "" {
		return n
	}
	return strconv.FormatUint(uint64(e), 10)
}
