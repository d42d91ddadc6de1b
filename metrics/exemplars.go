package metrics

import (
	"math"
	"sort"
	"strings"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

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
	out := make(map[float64]Exemplar, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (e Exemplar) dto() *dto.Exemplar {
	return &dto.Exemplar{
		Label: []*dto.LabelPair{
			{Name: proto.String("trace_id"), Value: proto.String(e.TraceID)},
			{Name: proto.String("span_id"), Value: proto.String(e.SpanID)},
		},
		Value:     proto.Float64(e.Value),
		Timestamp: timestamppb.New(e.Time),
	}
}

// attachExemplars puts each exemplar on its classic bucket (OpenMetrics
// text) and all of them, oldest first, on the native histogram (protobuf).
func attachExemplars(h *dto.Histogram, ex map[float64]Exemplar) {
	if len(ex) == 0 {
		return
	}
	for _, b := range h.Bucket {
		if e, ok := ex[b.GetUpperBound()]; ok {
			b.Exemplar = e.dto()
		}
	}
	all := make([]Exemplar, 0, len(ex))
	for _, e := range ex {
		all = append(all, e)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })
	for _, e := range all {
		h.Exemplars = append(h.Exemplars, e.dto())
	}
}
