package metrics

import (
	"compress/gzip"
	"errors"
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
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
)

// constCollector sends fixed metrics.
type constCollector []prometheus.Metric

func (c constCollector) Describe(chan<- *prometheus.Desc) {}
func (c constCollector) Collect(ch chan<- prometheus.Metric) {
	for _, m := range c {
		ch <- m
	}
}

// floatHistogram has float counts, which OpenMetrics 1.0 cannot express:
// expfmt reports an error, which the handler counts as an encoding error.
type floatHistogram struct{}

var floatHistogramDesc = prometheus.NewDesc("ktel_test_float_histogram", "Float counts.", nil, nil)

func (floatHistogram) Desc() *prometheus.Desc { return floatHistogramDesc }
func (floatHistogram) Write(m *dto.Metric) error {
	one, inf := 1.5, math.Inf(+1)
	m.Histogram = &dto.Histogram{SampleCountFloat: &one, SampleSum: &one,
		Bucket: []*dto.Bucket{{UpperBound: &inf, CumulativeCountFloat: &one}}}
	return nil
}

// The handler negotiates what Prometheus asks for: protobuf (native
// histograms, with their exemplars) gzip-compressed, OpenMetrics text
// (exemplars on classic buckets) and the Prometheus text format, plain.
func TestHandlerNegotiates(t *testing.T) {
	ex := NewExemplars()
	ex.Observe(SyscallLatency, []string{"read"}, Exemplar{Value: 0.002, TraceID: "0af7651916cd43dd8448eb211c80319c",
		SpanID: "b7ad6b7169203331", Time: time.Unix(1700000000, 0)})
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewExporter(map[string]Collector{"syscall": NewSyscallCollector(newFake(t), names, ex)}, discard()))
	h := Handler(prometheus.ToTransactionalGatherer(reg), HandlerOpts{})
	get := func(accept, encoding string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
		req.Header.Set("Accept", accept)
		req.Header.Set("Accept-Encoding", encoding)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		if w.Code != http.StatusOK {
			t.Fatalf("Accept %q: status %d", accept, w.Code)
		}
		return w
	}

	w := get("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited", "gzip")
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "application/vnd.google.protobuf") {
		t.Errorf("protobuf: Content-Type %q", ct)
	}
	if w.Header().Get("Content-Encoding") != "gzip" || !slices.Contains(w.Header().Values("Vary"), "Accept-Encoding") {
		t.Errorf("protobuf: headers %v, want gzip", w.Header())
	}
	z, err := gzip.NewReader(w.Body)
	if err != nil {
		t.Fatal(err)
	}
	dec := expfmt.NewDecoder(z, expfmt.NewFormat(expfmt.TypeProtoDelim))
	var latency *dto.MetricFamily
	for {
		var mf dto.MetricFamily
		if err := dec.Decode(&mf); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		if mf.GetName() == SyscallLatency {
			latency = &mf
		}
	}
	if latency == nil {
		t.Fatal("protobuf: no " + SyscallLatency)
	}
	hist := latency.Metric[0].Histogram
	if hist.GetSchema() != 3 || len(hist.PositiveSpan) == 0 || len(hist.Bucket) != 25 || len(hist.Exemplars) != 1 {
		t.Errorf("protobuf: schema %d, %d spans, %d classic buckets, %d exemplars; want 3, some, 25, 1",
			hist.GetSchema(), len(hist.PositiveSpan), len(hist.Bucket), len(hist.Exemplars))
	}

	w = get("application/openmetrics-text;version=1.0.0", "")
	want := `ktel_syscall_latency_seconds_bucket{syscall="read",le="0.00390625"} 4 # {trace_id="0af7651916cd43dd8448eb211c80319c",span_id="b7ad6b7169203331"} 0.002 1.7e+09`
	if w.Header().Get("Content-Encoding") != "" || !strings.Contains(w.Body.String(), want) || !strings.HasSuffix(w.Body.String(), "# EOF\n") {
		t.Errorf("OpenMetrics: headers %v, body lacks\n%s\nor the end:\n%s", w.Header(), want, w.Body.String())
	}

	w = get("", "")
	if ct := w.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") ||
		!strings.Contains(w.Body.String(), `ktel_syscall_latency_seconds_bucket{syscall="read",le="0.00390625"} 4`+"\n") {
		t.Errorf("text: Content-Type %q, body\n%s", ct, w.Body.String())
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
	// Answered by the timeout: not before it, nor long after.
	if d := time.Since(start); d < 50*time.Millisecond || d > 5*time.Second {
		t.Errorf("slow scrape answered after %v, want 50ms..5s", d)
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
