package metrics

import (
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	"github.com/ktel-dev/ktel/internal/histogram"
)

// RunqueueLatency is the run-queue histogram's name, for exemplars.
const RunqueueLatency = "ktel_runqueue_latency_seconds"

// RunqlatSource is what the run-queue collector reads.
type RunqlatSource interface {
	Snapshot() (*runqlat.Snapshot, error)
	Layout() *histogram.Layout
}

// RunqlatCgroups is what the collector also needs with workload
// attribution: deleting idle cgroups' histograms.
type RunqlatCgroups interface {
	ForgetCgroup(id uint64) error
}

type runqlatCollector struct {
	layout    *histogram.Layout
	forget    RunqlatCgroups
	workloads *workloadSums[struct{}]
	mu        sync.Mutex // serialises reads with workload sums
	overflow  *prometheus.Desc
	exemplars *Exemplars
	snap      *Cached[*runqlat.Snapshot]
	perCPU    bool
	latency   *prometheus.Desc
	dropped   *prometheus.Desc
}

// NewRunqlatWorkloadCollector exports ktel_runqueue_latency_seconds by
// workload (labels namespace, pod, container, unit) from a probe loaded
// with per-cgroup histograms: res names each cgroup, and a cgroup whose
// histogram has not changed for ttl is deleted from the kernel (its series
// goes when none of its workload's cgroups is left). Waits the kernel
// could not key by cgroup (its map full) are exported as unit="other" and
// counted in ktel_label_overflow_total{probe="runqlat",label="cgroup"}.
// Exemplars, when not nil, supply each series' exemplars: spans whose
// LabelValues are the workload's (WorkloadLabelValues).
func NewRunqlatWorkloadCollector(src RunqlatSource, forget RunqlatCgroups, res Workloads, ttl time.Duration, ex *Exemplars) Collector {
	c := NewRunqlatCollector(src, false, ex).(*runqlatCollector)
	c.forget = forget
	c.workloads = newWorkloadSums[struct{}](res, ttl)
	c.latency = prometheus.NewDesc(RunqueueLatency,
		"Time runnable tasks waited for a CPU: from wakeup or preemption to running.", workloadLabels, nil)
	c.overflow = prometheus.NewDesc("ktel_label_overflow_total",
		"Observations exported under the label value \"other\" because the label had reached its cap on distinct values.",
		nil, prometheus.Labels{"probe": "runqlat", "label": "cgroup"})
	return c
}

// NewRunqlatCollector exports ktel_runqueue_latency_seconds, with a cpu
// label (the CPU the task ran on after waiting) when perCPU is set.
// Exemplars, when not nil, supply exemplars (of the summed histogram).
func NewRunqlatCollector(src RunqlatSource, perCPU bool, ex *Exemplars) Collector {
	var labels []string
	if perCPU {
		labels = []string{"cpu"}
	}
	return &runqlatCollector{
		layout:    src.Layout(),
		exemplars: ex,
		snap:      NewCached(src.Snapshot, DefaultMaxAge),
		perCPU:    perCPU,
		latency: prometheus.NewDesc(RunqueueLatency,
			"Time runnable tasks waited for a CPU: from wakeup or preemption to running.", labels, nil),
		dropped: prometheus.NewDesc("ktel_runqueue_dropped_total",
			"Waits not timed because their start could not be stored in the kernel.", nil, nil),
	}
}

func (c *runqlatCollector) Update(ch chan<- prometheus.Metric) error {
	if c.workloads != nil {
		// Snapshots reach the workload sums in the order they were read:
		// an older one after a newer would look like counts going down.
		c.mu.Lock()
		defer c.mu.Unlock()
	}
	s, err := c.snap.Get()
	if err != nil {
		return err
	}
	send := func(m prometheus.Metric, err error) {
		if err != nil {
			m = prometheus.NewInvalidMetric(c.latency, err)
		}
		ch <- m
	}
	switch {
	case c.workloads != nil:
		if err := c.updateWorkloads(ch, s); err != nil {
			return err
		}
	case c.perCPU:
		for cpu, h := range s.PerCPU {
			send(newLatencyHistogram(c.latency, c.layout, h.Slots, h.SumNs, nil, strconv.Itoa(cpu)))
		}
	default:
		send(newLatencyHistogram(c.latency, c.layout, s.Total.Slots, s.Total.SumNs, c.exemplars.forSeries(RunqueueLatency, nil)))
	}
	ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(s.Dropped))
	sendKernelSpanDrops(ch, "runqlat", s.SpanDrops)
	return nil
}

// updateWorkloads sends one histogram per workload.
func (c *runqlatCollector) updateWorkloads(ch chan<- prometheus.Metric, s *runqlat.Snapshot) error {
	cur := make(map[cgroupKey[struct{}]][]uint64, len(s.Cgroups))
	for id, h := range s.Cgroups {
		cur[cgroupKey[struct{}]{id: id}] = append(h.Slots[:len(h.Slots):len(h.Slots)], h.SumNs)
	}
	series, err := c.workloads.updateAndForget(cur, func(ck cgroupKey[struct{}]) error { return c.forget.ForgetCgroup(ck.id) }, c.snap.Invalidate)
	n := c.layout.Slots()
	if s.CgroupsFull > 0 {
		// The kernel's map was full: those waits are in Total.
		addOverflow(series, struct{}{}, append(s.Total.Slots[:n:n], s.Total.SumNs))
	}
	live := make([][]string, 0, len(series))
	for sk, v := range series {
		values := WorkloadLabelValues(sk.labels)
		live = append(live, values)
		m, err := newLatencyHistogram(c.latency, c.layout, v[:n], v[n], c.exemplars.forSeries(RunqueueLatency, values), values...)
		if err != nil {
			m = prometheus.NewInvalidMetric(c.latency, err)
		}
		ch <- m
	}
	// Exemplars of workloads gone for the TTL go with their series.
	c.exemplars.Retain(RunqueueLatency, live, c.workloads.now().Add(-c.workloads.ttl))
	ch <- prometheus.MustNewConstMetric(c.overflow, prometheus.CounterValue, float64(s.CgroupsFull))
	return err
}
