package metrics

import (
	"strconv"

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

type runqlatCollector struct {
	layout    *histogram.Layout
	exemplars *Exemplars
	snap      *Cached[*runqlat.Snapshot]
	perCPU    bool
	latency   *prometheus.Desc
	dropped   *prometheus.Desc
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
	if c.perCPU {
		for cpu, h := range s.PerCPU {
			send(newLatencyHistogram(c.latency, c.layout, h.Slots, h.SumNs, nil, strconv.Itoa(cpu)))
		}
	} else {
		send(newLatencyHistogram(c.latency, c.layout, s.Total.Slots, s.Total.SumNs, c.exemplars.forSeries(RunqueueLatency, nil)))
	}
	ch <- prometheus.MustNewConstMetric(c.dropped, prometheus.CounterValue, float64(s.Dropped))
	sendKernelSpanDrops(ch, "runqlat", s.SpanDrops)
	return nil
}
