package metrics

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/ktel-dev/ktel/internal/histogram"
)

// constCollector sends fixed metrics.
type constCollector []prometheus.Metric

func (c constCollector) Describe(chan<- *prometheus.Desc) {}
func (c constCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c {
		ch <- m
	}
}

// encoderRegistry holds every kind of family the encoder meets, with the
// corner cases of the text formats: label values and help texts to escape,
// counts from 1e6 on (written with an exponent in the text format), zero,
// negative zero, NaN and infinite sums, exemplars with and without a
// timestamp, histograms with and without labels, native-only and classic,
// with and without an explicit +Inf bucket, and histograms the fast path
// leaves to expfmt (float counts, timestamps, invalid UTF-8 names).
func encoderRegistry(t *testing.T) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewRegistry()
	layout, err := histogram.NewLayout(3)
	if err != nil {
		t.Fatal(err)
	}
	desc := prometheus.NewDesc("ktel_test_latency_seconds", "Latency \\ with \"quotes\"\nand a newline.", []string{"syscall", "what"}, nil)
	at := time.Unix(1700000000, 123456789)
	var ms constCollector
	for i, c := range []struct {
		values []string
		counts []uint64 // per slot from slot 40 on
		sumNs  uint64
		ex     map[float64]Exemplar
	}{
		{[]string{"read", `a "quoted" \ value` + "\n"}, []uint64{1, 2, 3, 999_999}, 0, nil},
		{[]string{"write", "ünïcödé"}, []uint64{1_000_000, 5, 0, 0, 12_345_678_901}, 1e9, map[float64]Exemplar{
			histogram.ClassicBounds()[10]: {Value: 0.000123, TraceID: "0af7651916cd43dd8448eb211c80319c", SpanID: "b7ad6b7169203331", Time: at},
			histogram.ClassicBounds()[20]: {Value: 1, TraceID: "0af7651916cd43dd8448eb211c80319d", SpanID: "b7ad6b7169203332", Time: at.Add(time.Second)},
			math.Inf(1):                   {Value: 30, TraceID: "0af7651916cd43dd8448eb211c80319e", SpanID: "b7ad6b7169203333", Time: at.Add(2 * time.Second)},
		}},
		{[]string{"empty", ""}, nil, 0, nil},
		{[]string{"one", "x"}, []uint64{1}, 1e9, nil},
		{[]string{"quote", `only "quotes"`}, []uint64{3}, 5, nil},
	} {
		slots := make([]uint64, layout.Slots())
		copy(slots[40+i:], c.counts)
		ms = append(ms, newLatencyHistogram(desc, layout, slots, c.sumNs, c.ex, c.values...))
	}
	noLabels := prometheus.NewDesc("ktel_test_nolabels_seconds", `No "labels".`, nil, nil)
	ms = append(ms,
		prometheus.MustNewConstHistogram(noLabels, 7, math.NaN(), map[float64]uint64{0.5: 3, 1: 7, math.Inf(+1): 7}),
		prometheus.MustNewConstHistogram(prometheus.NewDesc("ktel_test_inf_sum", "Infinite sum.", []string{"l"}, nil),
			2, math.Inf(+1), map[float64]uint64{1e-9: 1, 2.5e21: 2}, "v"),
		prometheus.MustNewConstHistogram(prometheus.NewDesc("ktel_test_negzero", "", []string{"l"}, nil),
			1, math.Copysign(0, -1), map[float64]uint64{math.Copysign(0, -1): 1, -1: 0, 1: 1}, "v"),
		prometheus.MustNewConstNativeHistogram(prometheus.NewDesc("ktel_test_native_only_seconds", "Native only.", nil, nil),
			5, 2.5, map[int]int64{1: 2, 3: 3}, nil, 0, 3, 0.001, at),
		prometheus.NewMetricWithTimestamp(at, prometheus.MustNewConstHistogram(
			prometheus.NewDesc("ktel_test_timestamped", "With a timestamp.", nil, nil), 1, 1, map[float64]uint64{1: 1})),
		prometheus.MustNewConstMetric(prometheus.NewDesc("ktel_test_events_total", "A counter.", []string{"l"}, nil), prometheus.CounterValue, 12, "a"),
		prometheus.MustNewConstMetric(prometheus.NewDesc("ktel_test_gauge", "A gauge.", nil, nil), prometheus.GaugeValue, -1),
		prometheus.MustNewConstSummary(prometheus.NewDesc("ktel_test_summary_seconds", "A summary.", nil, nil), 3, 1.5, map[float64]float64{0.5: 0.25, 0.99: 1}),
	)
	reg.MustRegister(ms)
	// A histogram of client_golang's own, with an exemplar on a bucket.
	h := prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "ktel_test_observed_seconds", Help: "Observed.", Buckets: []float64{0.001, 0.01, 0.1, 1}},
		[]string{"code"})
	reg.MustRegister(h)
	h.WithLabelValues("200").(prometheus.ExemplarObserver).ObserveWithExemplar(0.005, prometheus.Labels{"trace_id": "abc"})
	for _, v := range []float64{0.0005, 0.05, 5, 0.5} {
		h.WithLabelValues("500").Observe(v)
	}
	// A float histogram, which the fast path leaves to expfmt.
	reg.MustRegister(constCollector{floatHistogram{}})
	return reg
}

// floatHistogram has float counts, which OpenMetrics 1.0 cannot express:
// expfmt reports an error, and so must the encoder.
type floatHistogram struct{}

var floatHistogramDesc = prometheus.NewDesc("ktel_test_float_histogram", "Float counts.", nil, nil)

func (floatHistogram) Desc() *prometheus.Desc { return floatHistogramDesc }
func (floatHistogram) Write(m *dto.Metric) error {
	one, inf := 1.5, math.Inf(+1)
	m.Histogram = &dto.Histogram{SampleCountFloat: &one, SampleSum: &one,
		Bucket: []*dto.Bucket{{UpperBound: &inf, CumulativeCountFloat: &one}}}
	return nil
}

// The encoder writes every family byte for byte as expfmt does, in every
// format Prometheus negotiates, and the handler answers with promhttp's
// headers.
// The syscall latency family, which the syscall collector builds itself
// (FamilyCollector), is among them, with an exemplar.
func TestHandlerMatchesPromhttp(t *testing.T) {
	reg := encoderRegistry(t)
	f := syntheticSyscalls()
	ex := NewExemplars()
	ex.Observe(SyscallLatency, []string{names(3)}, Exemplar{Value: 0.002, TraceID: "0af7651916cd43dd8448eb211c80319c",
		SpanID: "b7ad6b7169203331", Time: time.Unix(1700000000, 0)})
	ex.Observe(SyscallLatency, []string{names(3)}, Exemplar{Value: 30, TraceID: "1af7651916cd43dd8448eb211c80319c",
		SpanID: "c7ad6b7169203331", Time: time.Unix(1700000001, 0)})
	sc := NewSyscallCollector(f, names, ex)
	reg.MustRegister(&collectorAdapter{sc})
	g := NewGatherer(reg, map[string]Collector{"syscall": sc})
	want := promhttp.HandlerForTransactional(g, promhttp.HandlerOpts{ErrorHandling: promhttp.ContinueOnError, EnableOpenMetrics: true,
		OfferedCompressions: []promhttp.Compression{promhttp.Identity, promhttp.Gzip}})
	got := Handler(g, HandlerOpts{Timeout: time.Minute}) // as the daemon: gathering in its own goroutine
	for _, accept := range []string{
		"",
		"*/*",
		"text/plain;version=0.0.4",
		"text/plain;version=1.0.0;escaping=allow-utf-8",
		"text/plain;version=0.0.4;escaping=underscores",
		"application/openmetrics-text;version=1.0.0",
		"application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
		"application/openmetrics-text;version=0.0.1",
		"application/openmetrics-text;version=2.0.0",
		"application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited",
		"application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;escaping=dots",
		// What Prometheus 3 sends by default.
		"application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
	} {
		t.Run(accept, func(t *testing.T) {
			for _, c := range []struct{ query, encoding string }{
				{"", ""},
				{"", "gzip"},
				{"?name[]=ktel_test_latency_seconds&name[]=ktel_test_gauge&name[]=" + SyscallLatency, ""},
			} {
				req := httptest.NewRequest(http.MethodGet, "/metrics"+c.query, nil)
				req.Header.Set("Accept", accept)
				if c.encoding != "" {
					req.Header.Set("Accept-Encoding", c.encoding)
				}
				w, g := httptest.NewRecorder(), httptest.NewRecorder()
				want.ServeHTTP(w, req)
				got.ServeHTTP(g, req)
				if g.Code != w.Code {
					t.Errorf("%+v: status %d, promhttp %d", c, g.Code, w.Code)
				}
				for _, h := range []string{"Content-Type", "Vary", "Content-Encoding"} {
					gv, wv := slices.Sorted(slices.Values(g.Header().Values(h))), slices.Sorted(slices.Values(w.Header().Values(h)))
					if !slices.Equal(gv, wv) {
						t.Errorf("%+v: %s %q, promhttp %q", c, h, gv, wv)
					}
				}
				gb, wb := body(t, g), body(t, w)
				if !bytes.Equal(gb, wb) {
					t.Errorf("%+v: body differs from promhttp's:\n%s", c, firstDifference(string(gb), string(wb)))
				}
				if len(gb) < 100 {
					t.Errorf("%+v: %d bytes only", c, len(gb))
				}
			}
		})
	}
}

// body is a response's body, decompressed.
func body(t *testing.T, w *httptest.ResponseRecorder) []byte {
	t.Helper()
	if w.Header().Get("Content-Encoding") != "gzip" {
		return w.Body.Bytes()
	}
	z, err := gzip.NewReader(w.Body)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(z)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// firstDifference shows the first line where got and want differ.
func firstDifference(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := range min(len(g), len(w)) {
		if g[i] != w[i] {
			return fmt.Sprintf("line %d:\n got  %s\n want %s", i+1, g[i], w[i])
		}
	}
	return "one is a prefix of the other"
}

// The fast path covers the syscall histograms (it is what makes the
// handler faster), and leaves alone what it cannot write as expfmt would.
func TestFastHistogramCoverage(t *testing.T) {
	mfs, err := encoderRegistry(t).Gather()
	if err != nil {
		t.Fatal(err)
	}
	fast := map[string]bool{}
	for _, mf := range mfs {
		fast[mf.GetName()] = fastHistogram(mf)
	}
	for name, want := range map[string]bool{
		"ktel_test_latency_seconds":     true,
		"ktel_test_observed_seconds":    true,
		"ktel_test_native_only_seconds": true,
		"ktel_test_nolabels_seconds":    true,
		"ktel_test_timestamped":         false,
		"ktel_test_float_histogram":     false,
		"ktel_test_events_total":        false,
	} {
		if fast[name] != want {
			t.Errorf("%s: fast path %v, want %v", name, fast[name], want)
		}
	}
}

// blockingCollector holds a scrape until released.
type blockingCollector struct {
	started chan struct{}
	release chan struct{}
}

func (c *blockingCollector) Describe(chan<- *prometheus.Desc) {}
func (c *blockingCollector) Collect(chan<- prometheus.Metric) {
	c.started <- struct{}{}
	<-c.release
}

// Beyond MaxRequestsInFlight, a scrape is answered 503 at once.
func TestHandlerInFlightLimit(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := &blockingCollector{started: make(chan struct{}), release: make(chan struct{})}
	reg.MustRegister(c)
	h := Handler(prometheus.ToTransactionalGatherer(reg), HandlerOpts{MaxRequestsInFlight: 1})
	var wg sync.WaitGroup
	first := httptest.NewRecorder()
	wg.Go(func() { h.ServeHTTP(first, httptest.NewRequest(http.MethodGet, "/metrics", nil)) })
	<-c.started
	second := httptest.NewRecorder()
	h.ServeHTTP(second, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	close(c.release)
	wg.Wait()
	if second.Code != http.StatusServiceUnavailable || !strings.Contains(second.Body.String(), "Limit of concurrent requests reached (1)") {
		t.Errorf("second scrape: %d %q", second.Code, second.Body.String())
	}
	if first.Code != http.StatusOK {
		t.Errorf("first scrape: %d", first.Code)
	}
}

// failingCollector sends one good metric and one error.
type failingCollector struct{}

var failingDesc = prometheus.NewDesc("ktel_test_good", "Good.", nil, nil)

func (failingCollector) Describe(chan<- *prometheus.Desc) {}
func (failingCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(failingDesc, prometheus.GaugeValue, 1)
	ch <- prometheus.NewInvalidMetric(failingDesc, errors.New("map read failed"))
}

// A gathering error is counted and logged; what was gathered is served.
// Without anything gathered, the scrape fails with 500. An encoding error
// is counted too.
func TestHandlerErrors(t *testing.T) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(failingCollector{}, constCollector{floatHistogram{}})
	h := Handler(prometheus.ToTransactionalGatherer(reg), HandlerOpts{Registry: reg})
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept", string(expfmt.NewFormat(expfmt.TypeOpenMetrics)))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), "ktel_test_good 1") {
		t.Errorf("partial scrape: %d %q", w.Code, w.Body.String())
	}
	mfs, _ := reg.Gather()
	count := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() == "promhttp_metric_handler_errors_total" {
			for _, m := range mf.Metric {
				count[m.Label[0].GetValue()] = m.Counter.GetValue()
			}
		}
	}
	if count["gathering"] != 1 || count["encoding"] != 1 {
		t.Errorf("errors counted: %v, want one gathering and one encoding (float histogram in OpenMetrics 1.0)", count)
	}

	empty := prometheus.NewRegistry()
	empty.MustRegister(constCollector{prometheus.NewInvalidMetric(failingDesc, errors.New("map read failed"))})
	w = httptest.NewRecorder()
	Handler(prometheus.ToTransactionalGatherer(empty), HandlerOpts{}).ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != http.StatusInternalServerError || !strings.Contains(w.Body.String(), "map read failed") {
		t.Errorf("failed scrape: %d %q", w.Code, w.Body.String())
	}
}

// A scrape whose gathering outlasts the timeout is answered 503 at the
// timeout, and keeps its in-flight slot until the gathering ends.
// Its families are done with once gathered, as those of every scrape.
func TestHandlerTimeout(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := &blockingCollector{started: make(chan struct{}, 1), release: make(chan struct{})}
	reg.MustRegister(c)
	g := &doneCounter{g: prometheus.ToTransactionalGatherer(reg)}
	h := Handler(g, HandlerOpts{MaxRequestsInFlight: 1, Timeout: 50 * time.Millisecond})
	w := httptest.NewRecorder()
	start := time.Now()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "Exceeded configured timeout of 50ms") {
		t.Errorf("slow scrape: %d %q", w.Code, w.Body.String())
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("slow scrape answered after %v", d)
	}
	<-c.started
	w = httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "Limit of concurrent requests") {
		t.Errorf("scrape while the first still gathers: %d %q", w.Code, w.Body.String())
	}
	close(c.release) // the first gathering ends and frees its slot
	deadline := time.Now().Add(5 * time.Second)
	for {
		w = httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/metrics", nil))
		if w.Code == http.StatusOK || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if w.Code != http.StatusOK {
		t.Errorf("scrape after the gathering ended: %d %q", w.Code, w.Body.String())
	}
	if n, d := g.gathers.Load(), g.dones.Load(); n != d || n < 2 {
		t.Errorf("%d gatherings, %d done with", n, d)
	}
}

// doneCounter counts gatherings and the calls of their done functions.
type doneCounter struct {
	g              prometheus.TransactionalGatherer
	gathers, dones atomic.Int32
}

func (c *doneCounter) Gather() ([]*dto.MetricFamily, func(), error) {
	c.gathers.Add(1)
	mfs, done, err := c.g.Gather()
	return mfs, func() { c.dones.Add(1); done() }, err
}
