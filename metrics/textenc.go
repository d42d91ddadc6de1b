package metrics

import (
	"bytes"
	"io"
	"math"
	"mime"
	"strconv"
	"strings"
	"sync"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// encoder writes metric families in a negotiated exposition format.
// Histogram families in the two text formats (Prometheus text and
// OpenMetrics 1.0) are written by appendHistogram, byte for byte as expfmt
// writes them (TestHandlerMatchesPromhttp) but several times faster: most
// lines of a ktel scrape are syscall histogram buckets, and expfmt
// validates the metric name, concatenates the suffix, escapes every label
// value and formats the bucket bound anew on each of them. Everything else
// goes to expfmt's encoder.
type encoder struct {
	w     io.Writer
	slow  expfmt.Encoder
	fast  bool // a format appendHistogram writes: Prometheus text, OpenMetrics 1.0
	om    bool // OpenMetrics 1.0 (or 0.0.1)
	buf   []byte
	label []byte             // one metric's labels, reused
	bound map[float64][]byte // formatted bucket bounds
}

func newEncoder(w io.Writer, format expfmt.Format) *encoder {
	e := &encoder{w: w, slow: expfmt.NewEncoder(w, format), bound: map[float64][]byte{}}
	switch format.FormatType() {
	case expfmt.TypeTextPlain:
		e.fast = true
	case expfmt.TypeOpenMetrics:
		_, params, err := mime.ParseMediaType(string(format))
		e.om = err == nil && params["version"] != expfmt.OpenMetricsVersion_2_0_0
		e.fast = e.om
	}
	return e
}

// encodeBufSize is how much the encoder buffers before writing.
const encodeBufSize = 32 << 10

// encodeBufs are the encoders' buffers, kept between scrapes.
var encodeBufs = sync.Pool{New: func() any { b := make([]byte, 0, 2*encodeBufSize); return &b }}

// Encode writes one family.
func (e *encoder) Encode(mf *dto.MetricFamily) error {
	if !e.fast || !fastHistogram(mf) {
		return e.slow.Encode(mf)
	}
	if e.buf == nil {
		e.buf = (*encodeBufs.Get().(*[]byte))[:0]
	}
	return e.appendHistogram(mf)
}

// flush writes what is buffered.
func (e *encoder) flush() error {
	_, err := e.w.Write(e.buf)
	e.buf = e.buf[:0]
	return err
}

// Close ends the exposition (OpenMetrics' "# EOF") and gives the buffer
// back.
func (e *encoder) Close() error {
	if e.buf != nil {
		b := e.buf[:0]
		encodeBufs.Put(&b)
		e.buf = nil
	}
	if c, ok := e.slow.(expfmt.Closer); ok {
		return c.Close()
	}
	return nil
}

// fastHistogram reports whether appendHistogram writes mf as expfmt
// would: a histogram family with integer counts, names that need neither
// quoting nor escaping, no timestamps, no unit, and valid exemplars.
// Anything else is left to expfmt, which also reports what is wrong.
func fastHistogram(mf *dto.MetricFamily) bool {
	if mf.GetType() != dto.MetricType_HISTOGRAM || len(mf.Metric) == 0 || mf.Unit != nil ||
		!model.LegacyValidation.IsValidMetricName(mf.GetName()) {
		return false
	}
	for _, m := range mf.Metric {
		h := m.Histogram
		if h == nil || m.TimestampMs != nil || h.GetSampleCountFloat() != 0 || !validLabelNames(m.Label) {
			return false
		}
		for _, b := range h.Bucket {
			if b.GetCumulativeCountFloat() != 0 {
				return false
			}
			if x := b.Exemplar; x != nil && len(x.Label) > 0 &&
				(!validLabelNames(x.Label) || (x.Timestamp != nil && x.Timestamp.CheckValid() != nil)) {
				return false
			}
		}
	}
	return true
}

func validLabelNames(ls []*dto.LabelPair) bool {
	for _, l := range ls {
		if !model.LegacyValidation.IsValidLabelName(l.GetName()) {
			return false
		}
	}
	return true
}

// appendHistogram writes mf through the buffer, and flushes it at the end:
// the slow path may write next, directly.
func (e *encoder) appendHistogram(mf *dto.MetricFamily) error {
	b, name := e.buf, mf.GetName()
	if mf.Help != nil {
		b = append(b, "# HELP "...)
		b = append(b, name...)
		b = append(b, ' ')
		b = appendEscaped(b, mf.GetHelp(), e.om)
		b = append(b, '\n')
	}
	b = append(b, "# TYPE "...)
	b = append(b, name...)
	b = append(b, " histogram\n"...)
	for _, m := range mf.Metric {
		h := m.Histogram
		// `{l1="v1",l2="v2",` or `{`: the bucket lines add le.
		e.label = append(e.label[:0], '{')
		for _, l := range m.Label {
			e.label = append(appendLabel(e.label, l), ',')
		}
		infSeen := false
		for _, bk := range h.Bucket {
			b = e.appendBucket(b, name, bk.GetUpperBound(), bk.GetCumulativeCount(), bk.Exemplar)
			infSeen = infSeen || math.IsInf(bk.GetUpperBound(), +1)
		}
		if !infSeen {
			b = e.appendBucket(b, name, math.Inf(+1), h.GetSampleCount(), nil)
		}
		b = e.appendSeries(b, name, "_sum")
		b = e.appendFloat(b, h.GetSampleSum())
		b = append(b, '\n')
		b = e.appendSeries(b, name, "_count")
		b = e.appendCount(b, h.GetSampleCount())
		b = append(b, '\n')
		if len(b) >= encodeBufSize {
			e.buf = b
			if err := e.flush(); err != nil {
				return err
			}
			b = e.buf
		}
	}
	e.buf = b
	return e.flush()
}

// appendSeries appends name+suffix, the metric's labels if any, and the
// space before the value.
func (e *encoder) appendSeries(b []byte, name, suffix string) []byte {
	b = append(b, name...)
	b = append(b, suffix...)
	if len(e.label) > 1 {
		b = append(b, e.label[:len(e.label)-1]...) // without the trailing comma
		b = append(b, '}')
	}
	return append(b, ' ')
}

func (e *encoder) appendBucket(b []byte, name string, upper float64, count uint64, x *dto.Exemplar) []byte {
	b = append(b, name...)
	b = append(b, "_bucket"...)
	b = append(b, e.label...)
	b = append(b, `le="`...)
	le, ok := e.bound[upper]
	if !ok {
		le = e.appendFloat(nil, upper)
		e.bound[upper] = le
	}
	b = append(b, le...)
	b = append(b, `"} `...)
	b = e.appendCount(b, count)
	if e.om && x != nil && len(x.Label) > 0 {
		b = append(b, " # {"...)
		for i, l := range x.Label {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendLabel(b, l)
		}
		b = append(b, "} "...)
		b = e.appendFloat(b, x.GetValue())
		if x.Timestamp != nil {
			b = append(b, ' ')
			b = e.appendFloat(b, float64(x.Timestamp.AsTime().UnixNano())/1e9)
		}
	}
	return append(b, '\n')
}

// appendCount writes a count: OpenMetrics as an integer, the Prometheus
// text format as a float, which strconv writes with an exponent from 1e6 on.
func (e *encoder) appendCount(b []byte, n uint64) []byte {
	if e.om || n < 1e6 {
		return strconv.AppendUint(b, n, 10)
	}
	return e.appendFloat(b, float64(n))
}

// appendFloat writes f as expfmt's writeFloat (text) or
// writeOpenMetricsFloat (OpenMetrics) do.
func (e *encoder) appendFloat(b []byte, f float64) []byte {
	switch {
	case math.IsNaN(f):
		return append(b, "NaN"...)
	case math.IsInf(f, +1):
		return append(b, "+Inf"...)
	case math.IsInf(f, -1):
		return append(b, "-Inf"...)
	case f == 0: // -0 too
		if e.om {
			return append(b, "0.0"...)
		}
		return append(b, '0')
	}
	n := len(b)
	b = strconv.AppendFloat(b, f, 'g', -1, 64)
	if e.om && !bytes.ContainsAny(b[n:], "e.") {
		b = append(b, ".0"...)
	}
	return b
}

// appendLabel appends name="value", the value escaped.
func appendLabel(b []byte, l *dto.LabelPair) []byte {
	b = append(b, l.GetName()...)
	b = append(b, `="`...)
	b = appendEscaped(b, l.GetValue(), true)
	return append(b, '"')
}

// appendEscaped escapes backslashes and newlines, and double quotes if
// quote, as expfmt does for label values and (OpenMetrics) help texts.
func appendEscaped(b []byte, s string, quote bool) []byte {
	if !strings.ContainsAny(s, "\\\n\"") {
		return append(b, s...)
	}
	for i := range len(s) {
		switch c := s[i]; {
		case c == '\\':
			b = append(b, `\\`...)
		case c == '\n':
			b = append(b, `\n`...)
		case c == '"' && quote:
			b = append(b, `\"`...)
		default:
			b = append(b, c)
		}
	}
	return b
}
