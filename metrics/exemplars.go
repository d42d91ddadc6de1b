package metrics

import (
	"maps"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// Exemplar links an observation to the span that recorded it.
type Exemplar struct {
	Value           float64 // seconds
	TraceID, SpanID string  // hex
	Time            time.Time
}

// Exemplars keeps, per histogram series, the latest exemplar of each classic
// bucket: bounded by the series count times the classic bucket count. The
// tracing pipeline writes, collectors read; both may run concurrently.
type Exemplars struct {
	mu     sync.Mutex
	series map[string]map[float64]Exemplar // series key -> bucket upper bound -> exemplar
}

// NewExemplars returns an empty store.
func NewExemplars() *Exemplars {
	return &Exemplars{series: map[string]map[float64]Exemplar{}}
}

func seriesKey(metric string, labelValues []string) string {
	return metric + "\x00" + strings.Join(labelValues, "\x00")
}

// Observe records e for the series of metric with labelValues.
func (s *Exemplars) Observe(metric string, labelValues []string, e Exemplar) {
	if s == nil {
		return
	}
	k := seriesKey(metric, labelValues)
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.series[k]
	if m == nil {
		m = map[float64]Exemplar{}
		s.series[k] = m
	}
	m[classicBucket(e.Value)] = e
}

// Retain forgets the exemplars of metric's series that are neither in live
// (label values, as given to Observe) nor observed since: series of
// workloads that came and went would otherwise keep theirs for ever.
func (s *Exemplars) Retain(metric string, live [][]string, since time.Time) {
	if s == nil {
		return
	}
	keep := make(map[string]bool, len(live))
	for _, v := range live {
		keep[seriesKey(metric, v)] = true
	}
	prefix := metric + "\x00"
	s.mu.Lock()
	defer s.mu.Unlock()
	for k, m := range s.series {
		if keep[k] || !strings.HasPrefix(k, prefix) {
			continue
		}
		recent := false
		for _, e := range m {
			recent = recent || !e.Time.Before(since)
		}
		if !recent {
			delete(s.series, k)
		}
	}
}

// classicBounds are computed once: classicBucket runs for every span.
var classicBounds = histogram.ClassicBounds()

// classicBucket is the upper bound of the classic bucket holding v.
func classicBucket(v float64) float64 {
	for _, ub := range classicBounds {
		if v <= ub {
			return ub
		}
	}
	return math.Inf(1)
}

// Lookup returns the exemplars of a series, by classic bucket upper bound.
func (s *Exemplars) Lookup(metric string, labelValues []string) map[float64]Exemplar {
	if s == nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.series[seriesKey(metric, labelValues)]
	if len(m) == 0 {
		return nil
	}
	return maps.Clone(m)
}

// forSeries is what Lookup returns as client_golang's exemplars, oldest
// first: NewMetricWithExemplars puts each on its classic bucket and all of
// them, in this order, on the native histogram.
func (s *Exemplars) forSeries(metric string, labelValues []string) []prometheus.Exemplar {
	m := s.Lookup(metric, labelValues)
	out := make([]prometheus.Exemplar, 0, len(m))
	for _, e := range m {
		out = append(out, prometheus.Exemplar{
			Value:     e.Value,
			Labels:    prometheus.Labels{"trace_id": e.TraceID, "span_id": e.SpanID},
			Timestamp: e.Time,
		})
	}
	slices.SortFunc(out, func(a, b prometheus.Exemplar) int { return a.Timestamp.Compare(b.Timestamp) })
	return out
}
