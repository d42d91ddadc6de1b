package metrics

import (
	"math"
	"sort"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// nativeAndClassic is a const histogram carrying both representations of
// the same kernel slots: native buckets for protobuf scrapes and classic
// power-of-two buckets for text scrapes. client_golang's const histograms
// offer one or the other, not both in one series.
type nativeAndClassic struct {
	desc   *prometheus.Desc
	labels []*dto.LabelPair
	h      *dto.Histogram
}

// newLatencyHistogram builds the metric for per-slot counts and a sum in
// nanoseconds, with exemplars by classic bucket (may be nil).
func newLatencyHistogram(desc *prometheus.Desc, layout *histogram.Layout, slots []uint64, sumNs uint64, ex map[float64]Exemplar, labelValues ...string) prometheus.Metric {
	var count uint64
	for _, c := range slots {
		count += c
	}
	h := &dto.Histogram{
		SampleCount:   proto.Uint64(count),
		SampleSum:     proto.Float64(float64(sumNs) / 1e9),
		Schema:        proto.Int32(layout.Schema),
		ZeroThreshold: proto.Float64(layout.ZeroThreshold()),
	}
	classic := layout.Classic(slots)
	for _, ub := range histogram.ClassicBounds() {
		h.Bucket = append(h.Bucket, &dto.Bucket{UpperBound: proto.Float64(ub), CumulativeCount: proto.Uint64(classic[ub])})
	}
	zero, buckets := layout.Native(slots)
	h.ZeroCount = proto.Uint64(zero)
	h.PositiveSpan, h.PositiveDelta = spansAndDeltas(buckets)
	if len(h.PositiveSpan) == 0 && zero == 0 {
		// A native histogram with no buckets needs a span to be told apart
		// from a classic one.
		h.PositiveSpan = []*dto.BucketSpan{{Offset: proto.Int32(0), Length: proto.Uint32(0)}}
	}
	attachExemplars(h, ex)
	return &nativeAndClassic{desc: desc, labels: prometheus.MakeLabelPairs(desc, labelValues), h: h}
}

func (m *nativeAndClassic) Desc() *prometheus.Desc { return m.desc }

func (m *nativeAndClassic) Write(out *dto.Metric) error {
	out.Label = m.labels
	out.Histogram = m.h
	return nil
}

// spansAndDeltas encodes sparse buckets as native-histogram spans and
// delta-encoded counts. Gaps of up to two empty buckets are filled with
// zero counts rather than opening a new span, as client_golang does.
func spansAndDeltas(buckets map[int]uint64) ([]*dto.BucketSpan, []int64) {
	if len(buckets) == 0 {
		return nil, nil
	}
	idx := make([]int, 0, len(buckets))
	for i := range buckets {
		idx = append(idx, i)
	}
	sort.Ints(idx)

	var (
		spans  []*dto.BucketSpan
		deltas []int64
		prev   int64
		next   int // index after the last bucket written
	)
	for n, i := range idx {
		gap := i - next
		switch {
		case n == 0:
			spans = append(spans, &dto.BucketSpan{Offset: proto.Int32(int32(i)), Length: proto.Uint32(0)})
		case gap <= 2:
			for range gap {
				deltas = append(deltas, -prev)
				prev = 0
				*spans[len(spans)-1].Length++
			}
		default:
			spans = append(spans, &dto.BucketSpan{Offset: proto.Int32(int32(gap)), Length: proto.Uint32(0)})
		}
		c := int64(min(buckets[i], math.MaxInt64))
		deltas = append(deltas, c-prev)
		prev = c
		*spans[len(spans)-1].Length++
		next = i + 1
	}
	return spans, deltas
}
