package metrics

import (
	"math"
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// newLatencyHistogram is the const histogram of per-slot counts and a sum
// in nanoseconds, in both representations: native buckets for protobuf
// scrapes and classic power-of-two buckets for text scrapes, with
// exemplars (oldest first) on both.
func newLatencyHistogram(desc *prometheus.Desc, layout *histogram.Layout, slots []uint64, sumNs uint64, ex []prometheus.Exemplar, labelValues ...string) (prometheus.Metric, error) {
	var count uint64
	native := map[int]int64{}
	for k, c := range slots {
		count += c
		if k > 0 && c != 0 {
			// Slot k > 0 is native bucket FirstIndex()+k; slot 0 is the
			// zero bucket.
			native[layout.FirstIndex()+k] = int64(min(c, math.MaxInt64))
		}
	}
	sum := float64(sumNs) / 1e9
	n, err := prometheus.NewConstNativeHistogram(desc, count, sum, native, nil, slots[0], layout.Schema, layout.ZeroThreshold(), time.Time{}, labelValues...)
	if err != nil {
		return nil, err
	}
	classic := map[float64]uint64{}
	for i, c := range layout.Classic(slots) {
		classic[classicBounds[i]] = c
	}
	c, err := prometheus.NewConstHistogram(desc, count, sum, classic, labelValues...)
	if err != nil {
		return nil, err
	}
	if len(ex) > 0 {
		// On each representation apart: the native one takes them all,
		// the classic one each on its bucket.
		if n, err = prometheus.NewMetricWithExemplars(n, ex...); err != nil {
			return nil, err
		}
		if c, err = prometheus.NewMetricWithExemplars(c, ex...); err != nil {
			return nil, err
		}
	}
	return nativeAndClassic{n, c}, nil
}

// nativeAndClassic writes one series with the buckets of both: client_golang's
// const histograms offer one or the other. It is built for one scrape, and
// written once.
type nativeAndClassic struct{ native, classic prometheus.Metric }

func (m nativeAndClassic) Desc() *prometheus.Desc { return m.native.Desc() }

func (m nativeAndClassic) Write(out *dto.Metric) error {
	var c dto.Metric
	if err := m.classic.Write(&c); err != nil {
		return err
	}
	if err := m.native.Write(out); err != nil {
		return err
	}
	h := out.Histogram
	h.Bucket = c.Histogram.Bucket
	// The kernel's histograms have no creation time to report.
	h.CreatedTimestamp = nil
	if len(h.PositiveSpan) == 0 && h.GetZeroCount() == 0 {
		// An empty native histogram keeps a span, as ktel has always
		// written it, to be told apart from a classic one.
		h.PositiveSpan = []*dto.BucketSpan{{Offset: proto.Int32(0), Length: proto.Uint32(0)}}
	}
	// Exemplar labels come from a map: put them in one order, trace_id
	// first, for the same exposition on every scrape.
	for _, e := range h.Exemplars {
		exemplarLabelOrder(e)
	}
	for _, b := range h.Bucket {
		exemplarLabelOrder(b.Exemplar)
	}
	return nil
}

func exemplarLabelOrder(e *dto.Exemplar) {
	if e != nil {
		slices.SortFunc(e.Label, func(a, b *dto.LabelPair) int { return strings.Compare(b.GetName(), a.GetName()) })
	}
}
