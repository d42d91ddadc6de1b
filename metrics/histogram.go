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

var infBound = proto.Float64(math.Inf(1))

// histogramBlock holds everything one histogram points to but its labels,
// so that building it is one allocation rather than forty, and rebuilding
// it none (fill).
type histogramBlock struct {
	h                  dto.Histogram
	count, zeroCount   uint64
	sum, zeroThreshold float64
	schema             int32
	cums               [histogram.ClassicBuckets]uint64
	buckets            [histogram.ClassicBuckets]dto.Bucket
	bucketPtrs         [histogram.ClassicBuckets + 1]*dto.Bucket // and +Inf
	inf                dto.Bucket                                // explicit only to carry an exemplar
	spans              [2]dto.BucketSpan                         // most histograms need one or two
	spanOffsets        [2]int32
	spanLengths        [2]uint32
	spanPtrs           [2]*dto.BucketSpan
	deltas             []int64 // reused by the next fill
}

// newLatencyHistogram builds the metric for per-slot counts and a sum in
// nanoseconds, with exemplars by classic bucket (may be nil).
func newLatencyHistogram(desc *prometheus.Desc, layout *histogram.Layout, slots []uint64, sumNs uint64, ex map[float64]Exemplar, labelValues ...string) prometheus.Metric {
	m := new(struct {
		nativeAndClassic
		b histogramBlock
	})
	m.b.fill(layout, slots, sumNs, ex)
	m.nativeAndClassic = nativeAndClassic{desc: desc, labels: prometheus.MakeLabelPairs(desc, labelValues), h: &m.b.h}
	return &m.nativeAndClassic
}

// fill sets b.h to the histogram of per-slot counts and a sum in
// nanoseconds, with exemplars by classic bucket (may be nil), reusing b's
// memory. It runs for every series on every scrape: the buckets are built
// in one pass over the slots, which are already in bucket order.
func (b *histogramBlock) fill(layout *histogram.Layout, slots []uint64, sumNs uint64, ex map[float64]Exemplar) {
	b.schema, b.zeroThreshold, b.zeroCount = layout.Schema, layout.ZeroThreshold(), slots[0]
	b.count = 0
	for _, c := range slots {
		b.count += c
	}
	b.sum = float64(sumNs) / 1e9
	b.h = dto.Histogram{
		SampleCount:   &b.count,
		SampleSum:     &b.sum,
		Schema:        &b.schema,
		ZeroThreshold: &b.zeroThreshold,
		ZeroCount:     &b.zeroCount,
	}
	cums := layout.ClassicInto(b.cums[:0], slots)
	for i := range cums {
		b.buckets[i] = dto.Bucket{UpperBound: classicBoundPtrs[i], CumulativeCount: &b.cums[i]}
		b.bucketPtrs[i] = &b.buckets[i]
	}
	b.h.Bucket = b.bucketPtrs[:len(cums)]
	if _, ok := ex[math.Inf(1)]; ok {
		// An outlier above the last bound: client_golang, too, adds an
		// explicit +Inf bucket for its exemplar, or text formats would
		// have no line to put it on.
		b.inf = dto.Bucket{UpperBound: infBound, CumulativeCount: &b.count}
		b.h.Bucket = append(b.h.Bucket, &b.inf)
	}
	// Slot k > 0 is native bucket FirstIndex()+k; slot 0 is the zero bucket.
	b.spanPtrs = [len(b.spanPtrs)]*dto.BucketSpan{}
	b.h.PositiveSpan, b.h.PositiveDelta = b.spansAndDeltas(layout.FirstIndex()+1, slots[1:])
	if len(b.h.PositiveSpan) == 0 && slots[0] == 0 {
		// A native histogram with no buckets needs a span to be told apart
		// from a classic one.
		b.h.PositiveSpan = b.newSpan(0)
	}
	attachExemplars(&b.h, ex)
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
func (b *histogramBlock) spansAndDeltas(first int, counts []uint64) ([]*dto.BucketSpan, []int64) {
	lo, hi := -1, -1
	for j, n := range counts {
		if n != 0 {
			if lo < 0 {
				lo = j
			}
			hi = j
		}
	}
	if lo < 0 {
		return nil, nil
	}
	if cap(b.deltas) < hi-lo+1 {
		b.deltas = make([]int64, 0, hi-lo+1) // gaps filled with zeros at most
	}
	var (
		spans  []*dto.BucketSpan
		deltas = b.deltas[:0]
		prev   int64
		next   int // index after the last bucket written
	)
	for j, n := range counts[lo : hi+1] {
		if n == 0 {
			continue
		}
		i := first + lo + j
		gap := i - next
		switch {
		case len(spans) == 0:
			spans = b.newSpan(int32(i))
		case gap <= 2:
			for range gap {
				deltas = append(deltas, -prev)
				prev = 0
				*spans[len(spans)-1].Length++
			}
		default:
			spans = append(spans, b.newSpan(int32(gap))...)
		}
		c := int64(min(n, math.MaxInt64))
		deltas = append(deltas, c-prev)
		prev = c
		*spans[len(spans)-1].Length++
		next = i + 1
	}
	b.deltas = deltas
	return spans, deltas
}

// newSpan returns a one-element slice of a new empty span at offset, from
// the block's spans while they last (its capacity is one: appending to it
// copies).
func (b *histogramBlock) newSpan(offset int32) []*dto.BucketSpan {
	for k := range b.spanPtrs {
		if b.spanPtrs[k] == nil {
			b.spanOffsets[k], b.spanLengths[k] = offset, 0
			b.spans[k] = dto.BucketSpan{Offset: &b.spanOffsets[k], Length: &b.spanLengths[k]}
			b.spanPtrs[k] = &b.spans[k]
			return b.spanPtrs[k : k+1 : k+1]
		}
	}
	return []*dto.BucketSpan{{Offset: proto.Int32(offset), Length: proto.Uint32(0)}}
}
