package reliability

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// Test-only variables (childEnv keeps them from ktel).
const (
	// longEnv=1 runs the load test for its full duration.
	longEnv = "KTEL_RELIABILITY_LONG"
	// reportEnv names a file the load test writes its figures to (JSON),
	// for the docs.
	reportEnv = "KTEL_RELIABILITY_REPORT"
)

const (
	scrapers     = 50
	maxScrapes   = 64 // KTEL_MAX_CONCURRENT_SCRAPES, above scrapers
	loadShort    = 20 * time.Second
	loadLong     = 60 * time.Second
	scrapeBudget = 30 * time.Second // client timeout; ktel's own is 20 s
)

// loadReport is what TestConcurrentScrapes measured.
type loadReport struct {
	Scrapers      int     `json:"scrapers"`
	DurationS     float64 `json:"duration_seconds"`
	Scrapes       int     `json:"scrapes"`
	Failed        int     `json:"failed"`
	Refused503    int     `json:"refused_503"`
	PerSecond     float64 `json:"scrapes_per_second"`
	P50MS         float64 `json:"p50_ms"`
	P90MS         float64 `json:"p90_ms"`
	P99MS         float64 `json:"p99_ms"`
	MaxMS         float64 `json:"max_ms"`
	TextBytes     int64   `json:"text_body_bytes"`
	ProtobufBytes int64   `json:"protobuf_body_bytes"`
	CPUs          int     `json:"cpus"`
}

// TestConcurrentScrapes runs 50 scrapers in closed loops (half text, half
// protobuf) against ktel with every default probe, for 20 s (60 s with
// KTEL_RELIABILITY_LONG=1). With KTEL_MAX_CONCURRENT_SCRAPES above the
// number of scrapers none may be refused, and none may fail. Latencies
// are logged (and written to $KTEL_RELIABILITY_REPORT), not asserted:
// this machine is shared and timings are noisy.
func TestConcurrentScrapes(t *testing.T) {
	testenv.Privileged(t)
	binary(t)
	duration := loadShort
	if os.Getenv(longEnv) == "1" {
		duration = loadLong
	}
	d := startDaemon(t, nil, fmt.Sprintf("KTEL_MAX_CONCURRENT_SCRAPES=%d", maxScrapes))
	url := "http://" + d.Addr + "/metrics"
	client := &http.Client{
		Timeout:   scrapeBudget,
		Transport: &http.Transport{MaxIdleConnsPerHost: scrapers, MaxConnsPerHost: scrapers},
	}
	accepts := []string{
		"text/plain; version=0.0.4",
		"application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited",
	}

	type result struct {
		lat    []time.Duration
		failed []string
		n503   int
		bytes  [2]int64
	}
	results := make([]result, scrapers)
	start := time.Now()
	deadline := start.Add(duration)
	var wg sync.WaitGroup
	for i := range scrapers {
		wg.Go(func() {
			r := &results[i]
			kind := i % 2
			for time.Now().Before(deadline) {
				req, _ := http.NewRequest(http.MethodGet, url, nil)
				req.Header.Set("Accept", accepts[kind])
				t0 := time.Now()
				resp, err := client.Do(req)
				if err != nil {
					r.failed = append(r.failed, err.Error())
					continue
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				lat := time.Since(t0)
				switch {
				case err != nil:
					r.failed = append(r.failed, fmt.Sprintf("read body: %v", err))
				case resp.StatusCode == http.StatusServiceUnavailable:
					r.n503++
				case resp.StatusCode != http.StatusOK:
					r.failed = append(r.failed, "status "+resp.Status)
				case n == 0:
					r.failed = append(r.failed, "empty body")
				default:
					r.lat = append(r.lat, lat)
					r.bytes[kind] = n
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)

	var all []time.Duration
	rep := loadReport{Scrapers: scrapers, DurationS: elapsed.Seconds(), CPUs: numCPU()}
	var failures []string
	for _, r := range results {
		all = append(all, r.lat...)
		failures = append(failures, r.failed...)
		rep.Refused503 += r.n503
		rep.TextBytes = max(rep.TextBytes, r.bytes[0])
		rep.ProtobufBytes = max(rep.ProtobufBytes, r.bytes[1])
	}
	slices.Sort(all)
	rep.Scrapes = len(all) + len(failures) + rep.Refused503
	rep.Failed = len(failures)
	rep.PerSecond = float64(len(all)) / elapsed.Seconds()
	if len(all) > 0 {
		ms := func(q float64) float64 {
			return float64(all[min(len(all)-1, int(q*float64(len(all))))].Microseconds()) / 1000
		}
		rep.P50MS, rep.P90MS, rep.P99MS, rep.MaxMS = ms(0.50), ms(0.90), ms(0.99), ms(1)
	}
	t.Logf("%d scrapers for %v: %d scrapes (%.0f/s), %d failed, %d refused (503); latency p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms; bodies: text %d B, protobuf %d B",
		scrapers, elapsed.Round(time.Millisecond), rep.Scrapes, rep.PerSecond, rep.Failed, rep.Refused503,
		rep.P50MS, rep.P90MS, rep.P99MS, rep.MaxMS, rep.TextBytes, rep.ProtobufBytes)
	if path := os.Getenv(reportEnv); path != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
			t.Errorf("write %s: %v", path, err)
		}
	}

	if len(failures) > 0 {
		t.Errorf("%d failed scrapes; first: %v", len(failures), failures[:min(5, len(failures))])
	}
	if rep.Refused503 > 0 {
		t.Errorf("%d scrapes refused with 503 although KTEL_MAX_CONCURRENT_SCRAPES=%d > %d scrapers", rep.Refused503, maxScrapes, scrapers)
	}
	if len(all) < scrapers {
		t.Errorf("only %d successful scrapes", len(all))
	}
	// Still healthy, and it stops cleanly after the load.
	m := d.metrics(t)
	for _, p := range defaultProbes {
		if up, _ := m.value("ktel_probe_up", "probe", p); up != 1 {
			t.Errorf("ktel_probe_up{probe=%q} = %v after the load", p, up)
		}
	}
	d.stopClean(t)
}
