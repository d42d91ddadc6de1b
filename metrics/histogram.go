package metrics

import (
	"math"

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

// classicBoundPtrs are the classic bucket upper bounds, shared read-only by
// every histogram built here.
var classicBoundPtrs = func() []*float64 {
	var out []*float64
	for _, b := range histogram.ClassicBounds() {
		out = append(out, proto.Float64(b))
	}
	return out
}()

// newLatencyHistogram builds the metric for per-slot counts and a sum in
// nanoseconds, with exemplars by classic bucket (may be nil). It runs for
// every series on every scrape: the buckets are built in one pass over the
// slots, which are already in bucket order, with few allocations.
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
		ZeroCount:     proto.Uint64(slots[0]),
	}
	cums := layout.Classic(slots)
	buckets := make([]dto.Bucket, len(cums))
	h.Bucket = make([]*dto.Bucket, len(cums))
	for i := range cums {
		buckets[i] = dto.Bucket{UpperBound: classicBoundPtrs[i], CumulativeCount: &cums[i]}
		h.Bucket[i] = &buckets[i]
	}
	// Slot k > 0 is native bucket FirstIndex()+k; slot 0 is the zero bucket.
	h.PositiveSpan, h.PositiveDelta = spansAndDeltas(layout.FirstIndex()+1, slots[1:])
	if len(h.PositiveSpan) == 0 && slots[0] == 0 {
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

// spansAndDeltas encodes counts[j], the count of native bucket first+j,
// as native-histogram spans and delta-encoded counts, leaving out empty
// buckets. Gaps of up to two empty buckets are filled with zero counts
// rather than opening a new span, as client_golang does.
func spansAndDeltas(first int, counts []uint64) ([]*dto.BucketSpan, []int64) {
	var (
		spans  []*dto.BucketSpan
		deltas []int64
		prev   int64
		next   int // index after the last bucket written
	)
	for j, n := range counts {
		if n == 0 {
			continue
		}
		i := first + j
		gap := i - next
		switch {
		case len(spans) == 0:
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
		c := int64(min(n, math.MaxInt64))
		deltas = append(deltas, c-prev)
		prev = c
		*spans[len(spans)-1].Length++
		next = i + 1
	}
	return spans, deltas
}
