package deploy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/ktel-dev/ktel/internal/testenv"
)

const (
	prometheusBin  = "/usr/bin/prometheus"
	scrapeInterval = "1s"
	rateInterval   = "10s" // $__rate_interval: ten scrapes
	minScrapes     = 15    // before the first query
	queryDeadline  = 60 * time.Second
)

// probeOf maps metric name prefixes to the probe that exports them; a
// query needs data only when its probes are in the binary under test.
var probeOf = []struct{ prefix, probe string }{
	{"ktel_syscall_", "syscall"},
	{"ktel_runqueue_", "runqlat"},
	{"ktel_tcp_", "tcpretrans"},
	{"ktel_label_overflow_", "tcpretrans"},
	{"ktel_net_", "netdev"},
	{"ktel_lb_", "lb"},
	// The load balancer's Kubernetes source (KTEL_LB_SOURCE=kubernetes),
	// which the ktel under test does not run: never in the binary's list.
	{"ktel_lb_sync_", "lb-kubernetes"},
	{"ktel_lb_services_no_local_", "lb-kubernetes"},
	{"ktel_lb_network_programming_", "lb-kubernetes"},
	{"ktel_lb_kubernetes_", "lb-kubernetes"},
}

// query is one PromQL expression to run, and where it comes from.
type query struct {
	origin string // file: panel/target or rule
	expr   string
	series bool // a label_values() selector: run as /api/v1/series
}

// TestQueries runs every expression of the Grafana dashboards and the alert
// rules against two real Prometheus servers scraping a real ktel (built as
// the Dockerfile builds it) that has every probe on, under a workload that
// exercises each probe. One server has native histograms (protobuf
// scrapes, as deploy/prometheus configures Prometheus); the other has none
// (text scrapes, classic buckets only), which the dashboards' classic
// fallback must serve. Every query must return data on both, except
// queries about probes the binary does not have, which are listed.
func TestQueries(t *testing.T) {
	testenv.Privileged(t)
	if _, err := os.Stat(prometheusBin); err != nil {
		t.Fatalf("Prometheus (Debian package prometheus) is needed: %v", err)
	}
	have := probes(t)
	t.Logf("probes in this binary: %v", have)

	queries := append(dashboardQueries(t), ruleQueries(t)...)
	var run []query
	skipped := map[string][]string{}
	for _, q := range queries {
		if missing := missingProbes(q.expr, have); len(missing) > 0 {
			skipped[strings.Join(missing, ",")] = append(skipped[strings.Join(missing, ",")], q.origin)
			continue
		}
		run = append(run, q)
	}
	for probe, origins := range skipped {
		t.Logf("SKIPPED for missing probe %s (%d queries): %s", probe, len(origins), strings.Join(origins, "; "))
	}
	if len(run) == 0 {
		t.Fatal("no query to run")
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := startWorkload(ctx, t, have)
	ktelAddr := startKtel(t, have, w)
	native := startPrometheus(t, ktelAddr, true)
	classic := startPrometheus(t, ktelAddr, false)
	servers := []*promServer{native, classic}

	for _, s := range servers {
		s.waitScrapes(t, minScrapes)
	}
	for _, s := range servers {
		s.checkRules(t)
	}
	checkHistogramKinds(t, native, classic)

	// Run everything; retry what returned nothing until the deadline (some
	// events, retransmits say, come in bursts).
	pending := map[*promServer][]query{native: run, classic: run}
	deadline := time.Now().Add(queryDeadline)
	for {
		for _, s := range servers {
			var still []query
			for _, q := range pending[s] {
				if n, err := s.eval(q); err != nil || n == 0 {
					still = append(still, q)
				}
			}
			pending[s] = still
		}
		if len(pending[native])+len(pending[classic]) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(2 * time.Second)
	}
	for _, s := range servers {
		for _, q := range pending[s] {
			n, err := s.eval(q)
			t.Errorf("%s Prometheus: %s returned %d results (%v):\n  %s", s.name, q.origin, n, err, q.expr)
		}
	}
	t.Logf("%d queries returned data on both servers (%d skipped)", len(run), len(queries)-len(run))
	if t.Failed() {
		t.Logf("ktel stderr:\n%s", w.ktelStderr.String())
	}
}

func missingProbes(expr string, have []string) []string {
	var missing []string
	for _, m := range regexp.MustCompile(`ktel_[a-z0-9_]+`).FindAllString(expr, -1) {
		for _, p := range probeOf {
			if strings.HasPrefix(m, p.prefix) && !slices.Contains(have, p.probe) && !slices.Contains(missing, p.probe) {
				missing = append(missing, p.probe)
			}
		}
	}
	return missing
}

// substitute replaces Grafana's variables as a dashboard user with "All"
// selected would have them: regexes that match everything, and a short
// rate interval.
func substitute(expr string) string {
	expr = strings.ReplaceAll(expr, "$__rate_interval", rateInterval)
	expr = strings.ReplaceAll(expr, "$__interval", "2s")
	return regexp.MustCompile(`\$\{?[a-z_]+\}?`).ReplaceAllString(expr, ".*")
}

// dashboardQueries collects every target expression and every query
// variable of every dashboard.
func dashboardQueries(t *testing.T) []query {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, "dashboards/*.json"))
	if len(files) == 0 {
		t.Fatal("no dashboards")
	}
	type panel struct {
		Title   string
		Targets []struct {
			RefID string
			Expr  string
		}
		Panels []json.RawMessage
	}
	var out []query
	labelValues := regexp.MustCompile(`^label_values\((.*),\s*[a-z_]+\)$`)
	for _, f := range files {
		var d struct {
			Panels     []json.RawMessage
			Templating struct {
				List []struct {
					Name, Type string
					Query      json.RawMessage
				}
			}
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(data, &d); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		name := filepath.Base(f)
		var walk func([]json.RawMessage)
		walk = func(ps []json.RawMessage) {
			for _, raw := range ps {
				var p panel
				if err := json.Unmarshal(raw, &p); err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				for _, tg := range p.Targets {
					if tg.Expr != "" {
						out = append(out, query{origin: fmt.Sprintf("%s: %q/%s", name, p.Title, tg.RefID), expr: substitute(tg.Expr)})
					}
				}
				walk(p.Panels)
			}
		}
		walk(d.Panels)
		for _, v := range d.Templating.List {
			if v.Type != "query" {
				continue
			}
			var q struct{ Query string }
			if err := json.Unmarshal(v.Query, &q); err != nil {
				_ = json.Unmarshal(v.Query, &q.Query)
			}
			m := labelValues.FindStringSubmatch(q.Query)
			if m == nil {
				t.Errorf("%s: variable %s: query %q is not label_values(selector, label)", name, v.Name, q.Query)
				continue
			}
			out = append(out, query{origin: fmt.Sprintf("%s: variable %s", name, v.Name), expr: substitute(m[1]), series: true})
		}
	}
	return out
}

// ruleQueries collects each alert's measure: its expression without the
// final comparison with a threshold, which a healthy system does not meet.
func ruleQueries(t *testing.T) []query {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(root, "deploy/prometheus/*.yaml"))
	threshold := regexp.MustCompile(`\s*(==|!=|>=|<=|>|<)\s*[0-9.eE+-]+\s*$`)
	var out []query
	for _, f := range files {
		if strings.HasSuffix(f, "_test.yaml") {
			continue
		}
		var rf struct {
			Groups []struct {
				Rules []struct {
					Alert, Record, Expr string
				}
			}
		}
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal(data, &rf); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, g := range rf.Groups {
			for _, r := range g.Rules {
				expr := strings.TrimSpace(r.Expr)
				if r.Alert != "" {
					loc := threshold.FindStringIndex(expr)
					if loc == nil {
						t.Errorf("%s: alert %s: expression does not end in a comparison with a number", filepath.Base(f), r.Alert)
						continue
					}
					expr = expr[:loc[0]]
				}
				out = append(out, query{origin: fmt.Sprintf("%s: %s%s", filepath.Base(f), r.Alert, r.Record), expr: expr})
			}
		}
	}
	if len(out) == 0 {
		t.Fatal("no alert rules")
	}
	return out
}

// ---- ktel and its workload ----

type syncBuf struct {
	mu sync.Mutex
	b  []byte
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.b = append(s.b, p...)
	return len(p), nil
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.b)
}

type workload struct {
	dir          string
	sb           *sandbox     // lb's and netdev's; nil without either
	spans        atomic.Int64 // OTLP export requests received
	otlpURL      string
	ktelStderr   syncBuf
	lbServices   string // services file
	retransmitTo string // address whose SYNs are dropped (full accept queue)
}

// lbVIP is the load balancer's test service, with lbBackend (in the
// sandbox); lbEmptyVIP has no backend.
const (
	lbVIP      = "198.18.0.10:80"
	lbEmptyVIP = "198.18.0.11:80"
	lbBackend  = "127.0.0.1:8080"
)

func startWorkload(ctx context.Context, t *testing.T, have []string) *workload {
	t.Helper()
	w := &workload{dir: t.TempDir()}

	// OTLP/HTTP sink: tracing on, so that span counters exist.
	sink := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		if r.Method == http.MethodPost && r.URL.Path == "/v1/traces" {
			w.spans.Add(1)
			rw.Header().Set("Content-Type", "application/x-protobuf")
			rw.WriteHeader(http.StatusOK)
			return
		}
		http.NotFound(rw, r)
	}))
	t.Cleanup(sink.Close)
	w.otlpURL = sink.URL

	// syscall and runqlat: more runnable threads than CPUs, waking often,
	// with slow and failing syscalls.
	for i := range runtime.NumCPU() + 2 {
		go func() {
			runtime.LockOSThread()
			for ctx.Err() == nil {
				end := time.Now().Add(3 * time.Millisecond)
				for time.Now().Before(end) {
				}
				if i%2 == 0 {
					testenv.Sleep(t, 2*time.Millisecond) // above the span threshold
				} else {
					time.Sleep(500 * time.Microsecond)
				}
				if _, err := os.Open("/nonexistent/ktel-deploy-test"); err == nil {
					panic("opened a file that should not exist")
				}
				syscall.Getpid()
			}
		}()
	}

	// tcpretrans: SYNs to a listener whose accept queue is full are dropped
	// and retransmitted.
	if slices.Contains(have, "tcpretrans") {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Close(fd) })
		if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Listen(fd, 0); err != nil {
			t.Fatal(err)
		}
		sa, _ := syscall.Getsockname(fd)
		w.retransmitTo = fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
		go func() {
			for ctx.Err() == nil {
				d := net.Dialer{Timeout: 3 * time.Second}
				if c, err := d.DialContext(ctx, "tcp", w.retransmitTo); err == nil {
					go func() { <-ctx.Done(); c.Close() }()
				}
			}
		}()
	}

	// lb and netdev, in a sandbox: a network namespace with only loopback
	// and no route out (a connect lb failed to rewrite fails with "network
	// unreachable" instead of leaving the machine), and a child cgroup
	// that only the client process joins; lb is attached to that cgroup,
	// never the root. A service with a backend (a listener on the
	// sandbox's loopback) and one without; netdev counts the sandbox's
	// loopback.
	if slices.Contains(have, "lb") || slices.Contains(have, "netdev") {
		w.sb = newSandbox(t)
		ln := w.sb.listen(t, lbBackend)
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
		host, vport, _ := net.SplitHostPort(lbVIP)
		ehost, eport, _ := net.SplitHostPort(lbEmptyVIP)
		bhost, bport, _ := net.SplitHostPort(lbBackend)
		w.lbServices = filepath.Join(w.dir, "services.yaml")
		svc := fmt.Sprintf("services:\n  - name: web\n    vip: %s\n    port: %s\n    backends:\n      - {address: %s, port: %s}\n  - name: empty\n    vip: %s\n    port: %s\n    backends: []\n",
			host, vport, bhost, bport, ehost, eport)
		if err := os.WriteFile(w.lbServices, []byte(svc), 0o644); err != nil {
			t.Fatal(err)
		}
		w.sb.startClient(t, lbVIP, lbEmptyVIP)
	}
	return w
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startKtel runs ktel with every probe it has, statistics on and spans
// exported to the workload's sink, and returns its address.
func startKtel(t *testing.T, have []string, w *workload) string {
	t.Helper()
	addr := freeAddr(t)
	env := []string{
		"PATH=" + os.Getenv("PATH"),
		"KTEL_LISTEN_ADDRESS=" + addr,
		"KTEL_LOG_FORMAT=json",
		"KTEL_PROBES=" + strings.Join(have, ","),
		"KTEL_BPF_STATS=true",
		"KTEL_SYSCALL_SPAN_THRESHOLD=1ms",
		"KTEL_SYSCALL_TIMING=all", // every slow syscall a span candidate
		"KTEL_RUNQLAT_SPAN_THRESHOLD=1ms",
		"OTEL_EXPORTER_OTLP_ENDPOINT=" + w.otlpURL,
		"OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
		"OTEL_RESOURCE_ATTRIBUTES=k8s.node.name=test-node,k8s.pod.name=test-pod",
	}
	known := variables(t)
	if slices.Contains(have, "tcpretrans") && known["KTEL_TCPRETRANS_PEERS"] {
		// Peers make ktel_label_overflow_total exist.
		env = append(env, "KTEL_TCPRETRANS_PEERS=true")
	}
	if slices.Contains(have, "netdev") {
		env = append(env, "KTEL_INTERFACES=lo", "KTEL_NETDEV_NETNS="+testenv.NetnsPath(w.sb.NS))
	}
	if slices.Contains(have, "lb") {
		env = append(env, "KTEL_LB_SERVICES_FILE="+w.lbServices, "KTEL_LB_CGROUP="+w.sb.Cgroup)
	}
	cmd := exec.Command(binary(t))
	cmd.Env = env
	cmd.Stderr = &w.ktelStderr
	done := startUntilCleanup(t, cmd, func() { cmd.Process.Signal(syscall.SIGTERM) }, 10*time.Second)
	waitHTTP(t, "http://"+addr+"/healthz", done, &w.ktelStderr)
	return addr
}

func waitHTTP(t *testing.T, u string, exited <-chan struct{}, log fmt.Stringer) {
	t.Helper()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := client.Get(u)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-exited:
			t.Fatalf("%s: process exited before serving\n%s", u, log)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready: %v\n%s", u, err, log)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ---- Prometheus ----

type promServer struct {
	name string
	url  string
	log  *syncBuf
}

func startPrometheus(t *testing.T, target string, native bool) *promServer {
	t.Helper()
	name := "classic"
	if native {
		name = "native"
	}
	dir := t.TempDir()
	rules, _ := filepath.Abs(filepath.Join(root, "deploy/prometheus/ktel-alerts.yaml"))
	cfg := fmt.Sprintf(`global:
  scrape_interval: %[1]s
  scrape_timeout: %[1]s
  evaluation_interval: %[1]s
rule_files: [%[2]q]
scrape_configs:
  - job_name: ktel
    static_configs:
      - targets: [%[3]q]
`, scrapeInterval, rules, target)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := freeAddr(t)
	args := []string{
		"--config.file=" + filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path=" + filepath.Join(dir, "data"),
		"--web.listen-address=" + addr,
		"--log.level=warn",
	}
	if native {
		// Debian's Prometheus (2.42) then scrapes protobuf and keeps only
		// the native histogram of a histogram that has one.
		args = append(args, "--enable-feature=native-histograms")
	}
	s := &promServer{name: name, url: "http://" + addr, log: &syncBuf{}}
	cmd := exec.Command(prometheusBin, args...)
	cmd.Stdout, cmd.Stderr = s.log, s.log
	done := startUntilCleanup(t, cmd, func() { cmd.Process.Signal(syscall.SIGTERM) }, 10*time.Second)
	waitHTTP(t, s.url+"/-/ready", done, s.log)
	return s
}

type apiResponse struct {
	Status    string
	Error     string
	ErrorType string
	Data      json.RawMessage
}

func (s *promServer) api(path string, params url.Values) (json.RawMessage, error) {
	resp, err := http.Get(s.url + path + "?" + params.Encode())
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var r apiResponse
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, fmt.Errorf("%s: %s: %w", path, resp.Status, err)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s: %s: %s", r.ErrorType, r.Error, resp.Status)
	}
	return r.Data, nil
}

// eval runs q and returns how many results it had.
func (s *promServer) eval(q query) (int, error) {
	if q.series {
		now := time.Now()
		data, err := s.api("/api/v1/series", url.Values{"match[]": {q.expr},
			"start": {fmt.Sprint(now.Add(-5 * time.Minute).Unix())}, "end": {fmt.Sprint(now.Unix())}})
		if err != nil {
			return 0, err
		}
		var series []map[string]string
		err = json.Unmarshal(data, &series)
		return len(series), err
	}
	data, err := s.api("/api/v1/query", url.Values{"query": {q.expr}})
	if err != nil {
		return 0, err
	}
	var r struct {
		ResultType string
		Result     json.RawMessage
	}
	if err := json.Unmarshal(data, &r); err != nil {
		return 0, err
	}
	if r.ResultType != "vector" {
		return 1, nil // scalar or string
	}
	var v []json.RawMessage
	err = json.Unmarshal(r.Result, &v)
	return len(v), err
}

// waitScrapes waits until Prometheus has n scrapes of ktel.
func (s *promServer) waitScrapes(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(time.Duration(n)*time.Second + 30*time.Second)
	q := query{expr: fmt.Sprintf(`count_over_time(ktel_build_info{job="ktel"}[5m]) >= %d`, n)}
	for {
		if got, _ := s.eval(q); got > 0 {
			return
		}
		if time.Now().After(deadline) {
			up, err := s.eval(query{expr: `up{job="ktel"} == 1`})
			t.Fatalf("%s Prometheus: fewer than %d scrapes of ktel (up: %d, %v)\n%s", s.name, n, up, err, s.log)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// checkRules fails on any rule Prometheus could not evaluate.
func (s *promServer) checkRules(t *testing.T) {
	t.Helper()
	data, err := s.api("/api/v1/rules", url.Values{})
	if err != nil {
		t.Fatalf("%s Prometheus: rules: %v", s.name, err)
	}
	var r struct {
		Groups []struct {
			Name  string
			Rules []struct {
				Name, Health, LastError string
			}
		}
	}
	if err := json.Unmarshal(data, &r); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, g := range r.Groups {
		for _, rule := range g.Rules {
			names = append(names, rule.Name)
			if rule.Health != "ok" {
				t.Errorf("%s Prometheus: rule %s: health %q: %s", s.name, rule.Name, rule.Health, rule.LastError)
			}
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		t.Errorf("%s Prometheus loaded no rules", s.name)
	}
	t.Logf("%s Prometheus: %d rules evaluated without error", s.name, len(names))
}

// checkHistogramKinds checks the premise of running every query on both
// servers: the native one has the latency histograms as native histograms
// only, the classic one as classic buckets only, so that each half of the
// dashboards' "native or classic" queries is exercised.
func checkHistogramKinds(t *testing.T, native, classic *promServer) {
	t.Helper()
	for _, c := range []struct {
		s    *promServer
		expr string
		want bool
	}{
		{native, `histogram_count(ktel_syscall_latency_seconds)`, true},
		{native, `ktel_syscall_latency_seconds_bucket`, false},
		{classic, `ktel_syscall_latency_seconds_bucket`, true},
		{classic, `ktel_syscall_latency_seconds`, false},
	} {
		n, err := c.s.eval(query{expr: c.expr})
		if err != nil || (n > 0) != c.want {
			t.Errorf("%s Prometheus: %s: %d results (%v), want data: %v", c.s.name, c.expr, n, err, c.want)
		}
	}
}

func TestMissingProbes(t *testing.T) {
	have := []string{"syscall", "runqlat"}
	for expr, want := range map[string][]string{
		`sum(rate(ktel_syscall_errors_total[1m])) or ktel_runqueue_dropped_total`:           nil,
		`sum by (state) (rate(ktel_tcp_retransmits_total[1m])) + ktel_label_overflow_total`: {"tcpretrans"},
		`ktel_net_packets_total / ktel_lb_services`:                                         {"netdev", "lb"},
		`up`: nil,
	} {
		if got := missingProbes(expr, have); !slices.Equal(got, want) {
			t.Errorf("missingProbes(%q) = %v, want %v", expr, got, want)
		}
	}
	if got, want := substitute(`rate(x{a=~"$instance",b=~"${job}"}[$__rate_interval])`), `rate(x{a=~".*",b=~".*"}[10s])`; got != want {
		t.Errorf("substitute: %s, want %s", got, want)
	}
}
