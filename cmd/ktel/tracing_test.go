package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/otelcoltest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// tracingEnv points ktel at the collector over proto ("grpc" or
// "http/protobuf").
func tracingEnv(c *otelcoltest.Collector, proto string, extra ...string) []string {
	endpoint := c.HTTPEndpoint()
	if proto == "grpc" {
		endpoint = "http://" + c.GRPCEndpoint()
	}
	return append([]string{
		"OTEL_EXPORTER_OTLP_ENDPOINT=" + endpoint,
		"OTEL_EXPORTER_OTLP_PROTOCOL=" + proto,
		"OTEL_SERVICE_NAME=",
		// Only timed syscalls become spans: time them all.
		"KTEL_SYSCALL_TIMING=all",
	}, extra...)
}

// sleepOnThread sleeps d in clock_nanosleep on a locked thread and returns
// the thread id, the wall time just before, and how long the sleep took as
// the thread saw it.
func sleepOnThread(t *testing.T, d time.Duration) (tid int, before time.Time, slept time.Duration) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid = unix.Gettid()
	before = time.Now()
	testenv.Sleep(t, d)
	return tid, before, time.Since(before)
}

// spansOf returns the spans named name whose thread.id is tid.
func spansOf(spans []otelcoltest.Span, name string, tid int) []otelcoltest.Span {
	var out []otelcoltest.Span
	for _, s := range spans {
		if s.Name == name && s.Attributes["thread.id"] == int64(tid) {
			out = append(out, s)
		}
	}
	return out
}

// A slow syscall becomes a span with the kernel's timestamps and the
// thread's identity, over both OTLP protocols, and its latency bucket
// links to it with an exemplar.
func TestSpansOfSlowSyscalls(t *testing.T) {
	testenv.Privileged(t)
	for _, proto := range []string{"grpc", "http/protobuf"} {
		t.Run(proto, func(t *testing.T) {
			c := otelcoltest.Start(t)
			d := startDaemon(t, tracingEnv(c, proto, "KTEL_PROBES=syscall", "KTEL_SYSCALL_SPAN_THRESHOLD=50ms")...)

			tid, before, slept := sleepOnThread(t, 200*time.Millisecond)
			spans := c.WaitForSpans(t, 15*time.Second, func(s []otelcoltest.Span) bool {
				return len(spansOf(s, "syscall clock_nanosleep", tid)) > 0
			})
			mine := spansOf(spans, "syscall clock_nanosleep", tid)
			// A signal may split the sleep in several syscalls; together
			// they last the 200 ms, and no longer than the thread saw
			// (the timer's wakeup on a busy VM may add a few ms).
			var total time.Duration
			for _, s := range mine {
				total += s.EndTime.Sub(s.StartTime)
				if s.Attributes["process.pid"] != int64(os.Getpid()) || s.Attributes["thread.name"] == "" ||
					s.Attributes["process.executable.name"] != "ktel.test" || s.Attributes["ktel.syscall.name"] != "clock_nanosleep" {
					t.Errorf("span attributes %v", s.Attributes)
				}
				if s.Resource["service.name"] != "ktel" || s.Resource["host.name"] == nil {
					t.Errorf("resource %v", s.Resource)
				}
			}
			if total < 190*time.Millisecond || total > slept {
				t.Errorf("spans last %v in all, want 190ms..%v (the sleep as the thread saw it)", total, slept)
			}
			if skew := mine[0].StartTime.Sub(before); skew < -50*time.Millisecond || skew > 50*time.Millisecond {
				t.Errorf("span starts %v from the wall clock time recorded before the sleep", skew)
			}

			// The exemplar on the bucket of 200 ms (le=0.25) names a span the
			// collector receives (it may be another thread's, still being
			// exported: only queued spans get exemplars).
			body := scrapeOpenMetrics(t, d)
			re := regexp.MustCompile(`ktel_syscall_latency_seconds_bucket\{syscall="clock_nanosleep",le="0.25"\} \d+ # \{trace_id="([0-9a-f]{32})",span_id="[0-9a-f]{16}"\} (\S+)`)
			m := re.FindStringSubmatch(body)
			if m == nil {
				t.Fatalf("no exemplar on the clock_nanosleep le=0.25 bucket:\n%s", grepLines(body, "clock_nanosleep"))
			}
			c.WaitForSpans(t, 10*time.Second, func(s []otelcoltest.Span) bool {
				return slices.ContainsFunc(s, func(sp otelcoltest.Span) bool { return sp.TraceID == m[1] })
			})
		})
	}
}

func scrapeOpenMetrics(t *testing.T, d *ktelProc) string {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+d.Addr+"/metrics", nil)
	req.Header.Set("Accept", "application/openmetrics-text; version=1.0.0")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// metricValue sums the samples of name whose labels contain every one of
// labels (`reason="queue_full"`), from a text scrape.
func metricValue(t *testing.T, d *ktelProc, name string, labels ...string) float64 {
	t.Helper()
	body, _ := d.scrape(t, "text/plain; version=0.0.4")
	var v float64
	for _, l := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(l, name+"{") && !strings.HasPrefix(l, name+" ") {
			continue
		}
		ok := true
		for _, lb := range labels {
			ok = ok && strings.Contains(l, lb)
		}
		if f := strings.Fields(l); ok && len(f) >= 2 {
			x, err := strconv.ParseFloat(f[len(f)-1], 64)
			if err == nil {
				v += x
			}
		}
	}
	return v
}

// outliers sleeps 3 ms n times on one thread: a stream of syscalls above a
// 1 ms threshold.
func outliers(t *testing.T, n int) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for range n {
		testenv.Sleep(t, 3*time.Millisecond)
	}
}

// While the collector is away ktel drops what does not fit its bounded
// queue, counts it, keeps its memory bounded, and sends spans again once
// the collector is back.
func TestCollectorOutage(t *testing.T) {
	testenv.Privileged(t)
	c := otelcoltest.Start(t)
	d := startDaemon(t, tracingEnv(c, "http/protobuf", "KTEL_PROBES=syscall", "KTEL_SYSCALL_SPAN_THRESHOLD=1ms",
		"KTEL_SPAN_QUEUE_SIZE=64", "OTEL_EXPORTER_OTLP_TIMEOUT=1000")...)
	outliers(t, 20)
	c.WaitForSpans(t, 10*time.Second, func(s []otelcoltest.Span) bool { return len(s) > 0 })

	c.Stop()
	for range 4 { // about 3 s of outliers, ~300 spans against a queue of 64
		outliers(t, 250)
		if rss := rssKiB(t, d); rss > 150<<10 {
			t.Errorf("RSS %d KiB while the collector is down", rss)
		}
	}
	dropped := metricValue(t, d, "ktel_spans_dropped_total", `probe="syscall"`, `reason="queue_full"`) +
		metricValue(t, d, "ktel_spans_dropped_total", `probe="syscall"`, `reason="export_failed"`)
	if dropped == 0 {
		t.Error("no span counted as dropped while the collector was down")
	}

	// Spans flow again: some that started after the restart arrive (which
	// ones depends on the rate limit and on what else the host does).
	c.Restart()
	restarted := time.Now()
	outliers(t, 100)
	c.WaitForSpans(t, 40*time.Second, func(s []otelcoltest.Span) bool {
		for _, sp := range s {
			if sp.StartTime.After(restarted) {
				return true
			}
		}
		return false
	})
	if exported := metricValue(t, d, "ktel_spans_exported_total", `probe="syscall"`); exported == 0 {
		t.Error("ktel_spans_exported_total is 0 after recovery")
	}
}

func rssKiB(t *testing.T, d *ktelProc) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.Cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil || n <= 0 {
				t.Fatalf("VmRSS of ktel: %q (%v)", v, err)
			}
			return n
		}
	}
	t.Fatalf("no VmRSS in /proc/%d/status", d.Cmd.Process.Pid)
	return 0
}

// A storm of outliers is capped at KTEL_SPAN_RATE_LIMIT; the excess is
// counted as rate_limited.
func TestSpanRateLimit(t *testing.T) {
	testenv.Privileged(t)
	c := otelcoltest.Start(t)
	start := time.Now() // outliers of the whole host count from ktel's start
	d := startDaemon(t, tracingEnv(c, "http/protobuf", "KTEL_PROBES=syscall", "KTEL_SYSCALL_SPAN_THRESHOLD=1ms",
		"KTEL_SPAN_RATE_LIMIT=20")...)
	marker, startMarker := markerThread(t)
	outliers(t, 400) // ~1.2 s, ~400 outliers of this thread alone
	limited := metricValue(t, d, "ktel_spans_dropped_total", `probe="syscall"`, `reason="rate_limited"`)
	// Spans travel in order (one ring buffer, one queue, one exporting
	// goroutine): once a span that began after the storm has arrived,
	// every span of the storm that ktel sends has.
	startMarker()
	spans := c.WaitForSpans(t, 15*time.Second, func(s []otelcoltest.Span) bool {
		return len(spansOf(s, "syscall clock_nanosleep", marker)) > 0
	})
	elapsed := time.Since(start)
	// The steady rate plus a second's burst per CPU.
	limit := int(20*elapsed.Seconds()) + 20 + 5
	t.Logf("%d spans in %v (limit %d), %v rate_limited", len(spans), elapsed.Round(time.Millisecond), limit, limited)
	if len(spans) > limit {
		t.Errorf("%d spans in %v, want <= %d at 20/s", len(spans), elapsed, limit)
	}
	// And the limit lets spans through: every CPU the storm ran on refills
	// its even share of 20/s during the storm's ~1.2 s, so at least one
	// CPU's share per second arrives, whatever else the host did.
	if least := max(1, 20/runtime.NumCPU()); len(spans) < least {
		t.Errorf("%d spans in %v, want >= %d: the rate limit let none through", len(spans), elapsed, least)
	}
	if limited < 100 {
		t.Errorf("%v outliers counted as rate_limited, want the storm's excess", limited)
	}
}

// markerThread locks a thread now, so that no other outlier of the test
// runs on it, and returns its id and a function that starts 3 ms sleeps on
// it every 20 ms: outliers above a 1 ms threshold, one of which the rate
// limit lets through within a second. They stop when the test ends.
func markerThread(t *testing.T) (tid int, start func()) {
	tids, begin, quit, done := make(chan int), make(chan struct{}), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		tids <- unix.Gettid()
		select {
		case <-begin:
		case <-quit:
			return
		}
		for {
			// An interrupted sleep is simply shorter; the next one counts.
			unix.ClockNanosleep(unix.CLOCK_MONOTONIC, 0, &unix.Timespec{Nsec: 3e6}, nil)
			select {
			case <-quit:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { close(quit); <-done })
	return <-tids, func() { close(begin) }
}

// A TCP retransmit in test namespaces becomes a span naming the peer.
func TestRetransmitSpan(t *testing.T) {
	testenv.Privileged(t)
	c := otelcoltest.Start(t)
	startDaemon(t, tracingEnv(c, "http/protobuf", "KTEL_PROBES=tcpretrans", "KTEL_TCPRETRANS_SPANS=true")...)

	client, server := fmt.Sprintf("ktel-e2e-%d-c", os.Getpid()), fmt.Sprintf("ktel-e2e-%d-s", os.Getpid())
	for _, ns := range []string{client, server} {
		ip(t, "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	}
	ip(t, "link", "add", "kte2e0", "netns", client, "type", "veth", "peer", "name", "kte2e1", "netns", server)
	ip(t, "-n", client, "addr", "add", "10.201.0.1/24", "dev", "kte2e0")
	ip(t, "-n", server, "addr", "add", "10.201.0.2/24", "dev", "kte2e1")
	for _, a := range [][2]string{{client, "kte2e0"}, {server, "kte2e1"}, {client, "lo"}, {server, "lo"}} {
		ip(t, "-n", a[0], "link", "set", a[1], "up")
	}
	testenv.WaitUp(t, client, "kte2e0")
	testenv.WaitUp(t, server, "kte2e1")
	if out, err := exec.Command("ip", "netns", "exec", server, "iptables", "-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP").CombinedOutput(); err != nil {
		t.Fatalf("iptables: %v\n%s", err, out)
	}
	dialFrom(t, client, "10.201.0.2:7", 1500*time.Millisecond) // the SYN is dropped and retransmitted

	spans := c.WaitForSpans(t, 15*time.Second, func(s []otelcoltest.Span) bool {
		for _, sp := range s {
			if sp.Name == "tcp retransmit" && sp.Attributes["network.peer.address"] == "10.201.0.2" {
				return true
			}
		}
		return false
	})
	for _, s := range spans {
		if s.Name == "tcp retransmit" && s.Attributes["network.peer.address"] == "10.201.0.2" {
			if s.Attributes["network.peer.port"] != int64(7) || s.Attributes["network.local.address"] != "10.201.0.1" ||
				s.Attributes["ktel.tcp.state"] != "SYN_SENT" || s.Attributes["ktel.tcp.retransmit.kind"] != "syn" ||
				s.Attributes["network.type"] != "ipv4" {
				t.Errorf("span attributes %v", s.Attributes)
			}
			return
		}
	}
}

func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %v: %v\n%s", args, err, out)
	}
}

// dialFrom connects to addr from inside network namespace ns and expects
// the connect to time out.
func dialFrom(t *testing.T, ns, addr string, timeout time.Duration) {
	t.Helper()
	conn, err := testenv.InNetns(ns, func() (net.Conn, error) { return net.DialTimeout("tcp", addr, timeout) })
	if err == nil {
		conn.Close()
		t.Fatalf("connected to %s through the firewall", addr)
	}
	if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
		t.Fatalf("dial %s from %s: %v, want a timeout (the SYN dropped)", addr, ns, err)
	}
}

// Off Kubernetes with KTEL_WORKLOAD_ATTRIBUTION=cgroup, a long run-queue
// wait in a systemd-like unit becomes a span, and that unit's run-queue
// series (not another's) carries the exemplar pointing at it.
func TestRunqlatWorkloadExemplar(t *testing.T) {
	testenv.Privileged(t)
	c := otelcoltest.Start(t)
	base := testenv.TestCgroup(t, "e2e-unit")
	busy := testenv.SubCgroup(t, base, "ktel-test.slice/foo.service")
	d := startDaemon(t, tracingEnv(c, "http/protobuf", "KTEL_PROBES=runqlat", "KTEL_WORKLOAD_ATTRIBUTION=cgroup",
		"KTEL_RUNQLAT_SPAN_THRESHOLD=1ms")...)

	// A spinner and, at the lowest priority, a shell sleeping 1 ms at a
	// time on the same CPU: its wakeups wait behind the spinner's slices.
	spinner := testenv.StartInCgroup(t, busy, "taskset", "-c", "0", "sh", "-c", "while :; do :; done")
	defer spinner.Process.Kill()
	sleeper := testenv.StartInCgroup(t, busy, "taskset", "-c", "0", "nice", "-n", "19", "sh", "-c",
		"i=0; while [ $i -lt 3000 ]; do sleep 0.001; i=$((i+1)); done")
	defer sleeper.Process.Kill()

	re := regexp.MustCompile(`(?m)^ktel_runqueue_latency_seconds_bucket\{([^}]*)\} \d+ # \{trace_id="([0-9a-f]{32})",span_id="[0-9a-f]{16}"\} (\S+)`)
	foo := `container="",namespace="",pod="",unit="foo.service",`
	var trace, body string
	started := time.Now()
	deadline := started.Add(30 * time.Second)
	for trace == "" {
		if time.Now().After(deadline) {
			t.Fatalf("no exemplar on foo.service's run-queue series:\n%s", grepLines(body, "foo.service"))
		}
		time.Sleep(200 * time.Millisecond)
		body = scrapeOpenMetrics(t, d)
		for _, m := range re.FindAllStringSubmatch(body, -1) {
			if strings.HasPrefix(m[1], foo) {
				trace = m[2]
			}
		}
	}
	t.Logf("exemplar on foo.service's series after %v", time.Since(started).Round(time.Millisecond))
	for _, m := range re.FindAllStringSubmatch(body, -1) {
		if m[2] == trace && !strings.HasPrefix(m[1], foo) {
			t.Errorf("foo.service's exemplar (trace %s) also on {%s}", trace, m[1])
		}
	}
	spans := c.WaitForSpans(t, 10*time.Second, func(s []otelcoltest.Span) bool {
		return slices.ContainsFunc(s, func(sp otelcoltest.Span) bool { return sp.TraceID == trace })
	})
	for _, s := range spans {
		if s.TraceID == trace && s.Name != "runqueue wait" {
			t.Errorf("exemplar points at a %q span", s.Name)
		}
	}
}
