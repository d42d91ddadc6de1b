package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/cgroups"

	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/k8smeta"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
	"github.com/ktel-dev/ktel/internal/version"
	"github.com/ktel-dev/ktel/metrics"
)

func testConfig(probes string, stats bool) *config.Config {
	return &config.Config{ListenAddress: "127.0.0.1:0", Probes: probes, LogLevel: "debug", LogFormat: "text",
		HistogramSchema: 3, BPFStats: stats, SyscallHook: "auto", RunqlatHook: "auto", MaxScrapes: 10,
		WorkloadAttribution: "auto"}
}

func failing(err error) starter {
	return func(env) (loaded, error) { return nil, err }
}

// A probe that cannot load is reported as down and logged; the others run
// and are exported.
func TestFailedProbeIsolated(t *testing.T) {
	testenv.Privileged(t)
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	s := map[string]starter{
		"syscall":     starters()["syscall"],
		"unsupported": failing(fmt.Errorf("attach: %w", probe.ErrUnsupported)),
		"broken":      failing(fmt.Errorf("load programs: boom")),
	}
	d, err := newDaemon(testConfig("syscall,unsupported,broken", true), log, s)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Running() != 1 {
		t.Fatalf("%d probes running, want 1", d.Running())
	}
	want := `
# HELP ktel_probe_up Whether a probe is loaded and attached (1) or could not be (0).
# TYPE ktel_probe_up gauge
ktel_probe_up{probe="broken"} 0
ktel_probe_up{probe="syscall"} 1
ktel_probe_up{probe="unsupported"} 0
`
	if err := testutil.GatherAndCompare(d.reg, strings.NewReader(want), "ktel_probe_up"); err != nil {
		t.Error(err)
	}
	for _, s := range []string{`level=WARN msg="probe unsupported on this kernel" probe=unsupported`, `level=ERROR msg="probe failed to load" probe=broken`} {
		if !strings.Contains(logs.String(), s) {
			t.Errorf("log lacks %q:\n%s", s, logs.String())
		}
	}

	// With KTEL_BPF_STATS the syscall programs report runs.
	rec := httptest.NewRecorder()
	d.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body := rec.Body.String()
	var enter string // the preferred variant's sys_enter program
	for _, p := range sysprobe.Variants[0].Programs {
		if p.Tracepoint == "sys_enter" {
			enter = p.Name
		}
	}
	series := `ktel_bpf_program_runs_total{probe="syscall",program="` + enter + `"}`
	if !strings.Contains(body, series) || strings.Contains(body, series+" 0\n") {
		t.Errorf("no runs reported for sys_enter:\n%s", grep(body, "ktel_bpf_program"))
	}
	if !strings.Contains(body, "ktel_syscall_latency_seconds_count") {
		t.Error("no syscall latency exported")
	}
}

func TestCheckVerdicts(t *testing.T) {
	testenv.Privileged(t)
	var out bytes.Buffer
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s := map[string]starter{
		"syscall":     starters()["syscall"],
		"unsupported": failing(fmt.Errorf("attach: %w", probe.ErrUnsupported)),
		"broken":      failing(fmt.Errorf("boom")),
	}
	if check(testConfig("syscall", false), log, &out, s) != true {
		t.Errorf("check failed: %s", out.String())
	}
	out.Reset()
	ok := check(testConfig("syscall,unsupported,broken", false), log, &out, s)
	want := "syscall: ok\nunsupported: unsupported on this kernel: attach: unsupported on this kernel\nbroken: failed: boom\n"
	// The check of a probe whose error wraps the sentinel says it once.
	if v := verdict(fmt.Errorf("%w: %w", probe.ErrUnsupported, errors.Join(errors.New("a"), errors.New("b")))); v != "a; b" {
		t.Errorf("verdict = %q, want one line without the repeated prefix", v)
	}
	if ok || out.String() != want {
		t.Errorf("check = %v, output:\n%s\nwant:\n%s", ok, out.String(), want)
	}
}

func TestHandlerPages(t *testing.T) {
	d := &Daemon{log: slog.New(slog.NewTextHandler(io.Discard, nil)), cfg: testConfig("", false)}
	d.reg, _ = metrics.NewRegistry(version.Info())
	d.gate = &gatherGate{g: prometheus.ToTransactionalGatherer(d.reg)}
	for path, want := range map[string]int{"/": 200, "/healthz": 200, "/metrics": 200, "/nope": 404} {
		rec := httptest.NewRecorder()
		d.Handler().ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != want {
			t.Errorf("GET %s: %d, want %d", path, rec.Code, want)
		}
	}
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// ktel check loads what the daemon would: with workload attribution on,
// the probes get a resolver, so that they load their per-cgroup programs
// (and the syscall probe its per-container ones), without any API server
// being asked.
func TestCheckWithAttribution(t *testing.T) {
	// Without a cgroup v2 hierarchy the daemon runs attribution off.
	_, err := cgroups.V2Root()
	v2 := err == nil
	for _, tc := range []struct {
		attribution, node string
		want              bool
	}{
		{"auto", "", false},
		{"auto", "node-a", true},
		{"cgroup", "", true},
		{"off", "node-a", false},
	} {
		cfg := testConfig("syscall", false)
		cfg.WorkloadAttribution, cfg.NodeName = tc.attribution, tc.node
		var got bool
		s := map[string]starter{"syscall": func(e env) (loaded, error) {
			got = e.workloads != nil
			if got && e.workloads.Resolve(1) != (k8smeta.Labels{Unit: k8smeta.Unknown}) {
				t.Errorf("check's resolver names cgroups: %+v", e.workloads.Resolve(1))
			}
			return nil, errors.New("not loaded")
		}}
		check(cfg, slog.New(slog.DiscardHandler), io.Discard, s)
		if got != (tc.want && v2) {
			t.Errorf("KTEL_WORKLOAD_ATTRIBUTION=%s KTEL_NODE_NAME=%s: probes given a resolver: %v, want %v", tc.attribution, tc.node, got, tc.want)
		}
	}
}
