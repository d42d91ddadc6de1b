package metrics

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

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

// SyscallCollector exports the syscall probe's maps. Its latency
// histograms, a series per syscall seen, are most of a scrape: it builds
// them as a FamilyCollector.
type SyscallCollector struct {
	layout    *histogram.Layout
	exemplars *Exemplars
	snap      *Cached[*sysprobe.Snapshot]
	name      func(nr uint32) string
	errors    *prometheus.Desc
	dropped   *prometheus.Desc
	untimed   *prometheus.Desc
	latency   familyPool[latencyFamily]
}

// latencyFamily is ktel_syscall_latency_seconds as built for one scrape,
// kept for a later one: its series, by syscall number, are refilled in
// place.
type latencyFamily struct {
	mf     dto.MetricFamily
	series map[uint32]*latencySeries
}

// latencySeries is one syscall's series; its metric points to its label
// and histogram for good, fill rewrites the histogram.
type latencySeries struct {
	m     dto.Metric
	label dto.LabelPair
	name  string
	hist  histogramBlock
}

var (
	syscallLatencyName = proto.String(SyscallLatency)
	syscallLatencyHelp = proto.String("Time from syscall entry to exit, per syscall.")
	syscallLabel       = proto.String("syscall")
	histogramType      = dto.MetricType_HISTOGRAM.Enum()
)

// NewSyscallCollector exports the syscall probe's histograms as
// ktel_syscall_latency_seconds{syscall} and its failures as
// ktel_syscall_errors_total{syscall,errno}. name turns syscall numbers
// into names (sysprobe.NativeName outside tests).
// Exemplars, when not nil, supply exemplars for the latency histograms.
func NewSyscallCollector(src SyscallSource, name func(nr uint32) string, ex *Exemplars) *SyscallCollector {
	return &SyscallCollector{
		layout:    src.Layout(),
		exemplars: ex,
		snap:      NewCached(src.Snapshot, DefaultMaxAge),
		name:      name,
		errors: prometheus.NewDesc("ktel_syscall_errors_total",
			"Syscalls that returned an error, per syscall and errno.", []string{"syscall", "errno"}, nil),
		dropped: prometheus.NewDesc("ktel_syscall_errors_dropped_total",
			"Failed syscalls not counted in ktel_syscall_errors_total because its kernel map was full.", nil, nil),
		untimed: prometheus.NewDesc("ktel_syscall_untimed_total",
			"Syscalls missing from ktel_syscall_latency_seconds because the kernel had no memory to keep their start.", nil, nil),
	}
}

// Update sends every metric but the latency histograms (Families).
func (c *SyscallCollector) Update(ch chan<- prometheus.Metric) error {
	s, err := c.snap.Get()
	if err != nil {
		return err
	}
	for k, n := range s.Errors {
		ch <- prometheus.MustNewConstMetric(c.errors, prometheus.CounterValue, float64(n), c.name(k.Nr), errnoName(k.Errno))
	}
	ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(s.ErrorsDropped))
	ch <- prometheus.MustNewConstMetric(c.untimed, prometheus.CounterValue, float64(s.StartsDropped))
	sendKernelSpanDrops(ch, "syscall", s.SpanDrops)
	return nil
}

// Families returns ktel_syscall_latency_seconds, a histogram per syscall
// seen, sorted by syscall name as the registry sorts series. It reads the
// snapshot Update read within the same second (Cached); when that read
// failed, it tries once more, and a failure leaves the family out of the
// scrape with an error, which the handler logs and counts (cause
// "gathering").
func (c *SyscallCollector) Families() ([]*dto.MetricFamily, func(), error) {
	s, err := c.snap.Get()
	if err != nil {
		return nil, func() {}, fmt.Errorf("%s: %w", SyscallLatency, err)
	}
	if len(s.Latency) == 0 {
		return nil, func() {}, nil
	}
	f := c.latency.get()
	if f.series == nil {
		f.series = map[uint32]*latencySeries{}
		f.mf = dto.MetricFamily{Name: syscallLatencyName, Help: syscallLatencyHelp, Type: histogramType}
	}
	f.mf.Metric = f.mf.Metric[:0]
	for nr, h := range s.Latency {
		ser := f.series[nr]
		if ser == nil {
			ser = &latencySeries{name: c.name(nr)}
			ser.label = dto.LabelPair{Name: syscallLabel, Value: &ser.name}
			ser.m = dto.Metric{Label: []*dto.LabelPair{&ser.label}, Histogram: &ser.hist.h}
			f.series[nr] = ser
		}
		ser.hist.fill(c.layout, h.Slots, h.SumNs, c.exemplars.Lookup(SyscallLatency, []string{ser.name}))
		f.mf.Metric = append(f.mf.Metric, &ser.m)
	}
	slices.SortFunc(f.mf.Metric, func(a, b *dto.Metric) int {
		return strings.Compare(a.Label[0].GetValue(), b.Label[0].GetValue())
	})
	return []*dto.MetricFamily{&f.mf}, func() { c.latency.put(f) }, nil
}

// errnoName is the symbolic name (EAGAIN), or the number for codes without
// one, such as the kernel-internal ERESTARTSYS (512) seen at sys_exit.
func errnoName(e uint32) string {
	if n := unix.ErrnoName(unix.Errno(e)); n != "" {
		return n
	}
	return strconv.FormatUint(uint64(e), 10)
}
