package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// collectorSuccess matches every ktel_scrape_collector_success series.
var collectorSuccess = regexp.MustCompile(`(?m)^ktel_scrape_collector_success\{([^}]*)\} (\S+)$`)

// scrapeCheck GETs /metrics once and returns what is wrong with it (a
// status other than 200, a collector that failed) and the body.
func scrapeCheck(client *http.Client, addr string) (body []byte, problem string) {
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, fmt.Sprintf("scrape: %v", err)
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Sprintf("scrape: read body: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Sprintf("scrape: status %s", resp.Status)
	}
	m := collectorSuccess.FindAllSubmatch(body, -1)
	if len(m) == 0 {
		return body, "scrape: no ktel_scrape_collector_success"
	}
	for _, s := range m {
		if string(s[2]) != "1" {
			return body, fmt.Sprintf("scrape: collector failed: {%s} %s", s[1], s[2])
		}
	}
	return body, ""
}

// Cgroups made and removed while the binary, attributing by cgroup path,
// is scraped without pause: each cgroup runs a process that sleeps (a
// wakeup, so a run-queue wait charged to the cgroup) and is removed as
// soon as it exits, so ids reach the resolver for cgroups that are gone
// or going. Every scrape answers 200 with every collector successful, and
// nothing is logged as an error.
func TestWorkloadCgroupChurn(t *testing.T) {
	testenv.Privileged(t)
	const cgroupsMade = 200
	base := testenv.TestCgroup(t, "churn")
	d := startDaemon(t, "KTEL_WORKLOAD_ATTRIBUTION=cgroup", "KTEL_PROBES=runqlat")

	// Whatever ends the test, its cgroups go before base (cleanups run
	// last first) and the scraper stops.
	made := 0
	t.Cleanup(func() {
		for i := range made + 1 {
			os.Remove(filepath.Join(base, fmt.Sprintf("c%d", i)))
		}
	})
	stop := make(chan struct{})
	var (
		wg       sync.WaitGroup
		scrapes  int
		problems []string
		last     []byte
	)
	stopScraper := sync.OnceFunc(func() { close(stop); wg.Wait() })
	defer stopScraper()
	wg.Go(func() {
		client := &http.Client{Timeout: 10 * time.Second}
		for {
			select {
			case <-stop:
				return
			default:
			}
			body, p := scrapeCheck(client, d.Addr)
			scrapes++
			if p != "" {
				problems = append(problems, p)
			} else {
				last = body
			}
		}
	})

	deadline := time.Now().Add(25 * time.Second)
	for ; made < cgroupsMade && time.Now().Before(deadline); made++ {
		dir := filepath.Join(base, fmt.Sprintf("c%d", made))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("sh", "-c", "sleep 0.001; sleep 0.001")
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
		err = cmd.Run()
		f.Close()
		if err != nil {
			t.Errorf("process in %s: %v", dir, err)
		}
		removed := false
		for range 100 {
			if err = os.Remove(dir); err == nil {
				removed = true
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if !removed {
			t.Errorf("remove %s: %v", dir, err)
		}
	}
	stopScraper()
	if made < cgroupsMade {
		t.Errorf("made %d cgroups in 25 s, want %d", made, cgroupsMade)
	}
	if scrapes < 10 {
		t.Errorf("only %d scrapes during the churn", scrapes)
	}
	if len(problems) > 0 {
		t.Errorf("%d of %d scrapes failed; first: %s", len(problems), scrapes, problems[0])
	}
	if last != nil {
		promtoolCheck(t, last)
		if !regexp.MustCompile(`(?m)^ktel_runqueue_latency_seconds_count\{[^}]*unit="`).Match(last) {
			t.Errorf("run-queue waits not attributed to workloads:\n%s", last)
		}
	}
	if st := d.stop(t, syscall.SIGTERM); st.ExitCode() != 0 {
		t.Errorf("exit code %d", st.ExitCode())
	}
	checkLog(t, d.Stderr.String())
	if !strings.Contains(d.Stderr.String(), `"msg":"workload attribution on"`) {
		t.Errorf("workload attribution not on:\n%s", d.Stderr)
	}
	t.Logf("%d cgroups made and removed, %d scrapes", made, scrapes)
}

// cgroup2Mounts lists the mount points of cgroup2 file systems in
// /proc/self/mountinfo, innermost last.
func cgroup2Mounts(t *testing.T) []string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var mounts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if fields := strings.Fields(pre); ok && len(fields) >= 5 && strings.HasPrefix(post, "cgroup2 ") {
			mounts = append(mounts, fields[4])
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return mounts
}

// On a host without cgroup v2 (the binary is run in a mount namespace of
// its own where every cgroup2 mount is unmounted; the host's mounts are
// untouched), KTEL_WORKLOAD_ATTRIBUTION=cgroup logs a warning and the
// probes run with their node-level series; ktel stops cleanly.
func TestWorkloadNoCgroupV2(t *testing.T) {
	testenv.Privileged(t)
	mounts := cgroup2Mounts(t)
	if len(mounts) == 0 {
		t.Fatal("no cgroup2 mount on this host to hide")
	}
	slices.Reverse(mounts)
	script := ""
	for _, m := range mounts {
		script += "umount -l '" + m + "' && "
	}
	script += `exec "$0"`
	argv := []string{"unshare", "--mount", "--propagation", "private", "sh", "-c", script, binary(t)}
	d := &ktelProc{testenv.StartKtel(t, argv, "KTEL_WORKLOAD_ATTRIBUTION=cgroup", "KTEL_PROBES=runqlat")}
	if got := cgroup2Mounts(t); len(got) != len(mounts) {
		t.Fatalf("the host's cgroup2 mounts changed: %v, were %v", got, mounts)
	}

	// Wait for a run-queue wait to be counted (sleeps wake up the test).
	var body string
	for deadline := time.Now().Add(10 * time.Second); ; {
		b, _ := d.scrape(t, "text/plain")
		body = string(b)
		if strings.Contains(body, "ktel_runqueue_latency_seconds_count ") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no node-level run-queue series:\n%s\nstderr:\n%s", body, d.Stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, line := range strings.Split(body, "\n") {
		if strings.HasPrefix(line, "ktel_runqueue_latency_seconds") &&
			(strings.Contains(line, "unit=") || strings.Contains(line, "pod=") || strings.Contains(line, "namespace=")) {
			t.Errorf("workload label on a host without cgroup v2: %s", line)
		}
	}
	if !strings.Contains(body, `ktel_probe_up{probe="runqlat"} 1`) {
		t.Errorf("runqlat not up:\n%s", body)
	}
	if _, p := scrapeCheck(&http.Client{Timeout: 10 * time.Second}, d.Addr); p != "" {
		t.Error(p)
	}
	promtoolCheck(t, []byte(body))
	if st := d.stop(t, syscall.SIGTERM); st.ExitCode() != 0 {
		t.Errorf("exit code %d", st.ExitCode())
	}
	stderr := d.Stderr.String()
	checkLog(t, stderr)
	if !strings.Contains(stderr, `"level":"WARN","msg":"workload attribution unavailable: no cgroup v2 hierarchy`) {
		t.Errorf("no warning that attribution is unavailable:\n%s", stderr)
	}
}

// apiOutage is how long TestWorkloadAPIServerUnreachable keeps the API
// server unreachable: KTEL_TEST_API_OUTAGE (a Go duration) or 2 minutes,
// well past client-go's reflector backoff cap, so that ktel's informers
// are retrying at their longest interval when the server comes back.
func apiOutage(t *testing.T) time.Duration {
	t.Helper()
	s := os.Getenv("KTEL_TEST_API_OUTAGE")
	if s == "" {
		return 2 * time.Minute
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		t.Fatalf("KTEL_TEST_API_OUTAGE=%q: want a positive duration", s)
	}
	return d
}

// The API server unreachable (through a proxy the test cuts) from ktel's
// start and for minutes (apiOutage): ktel serves every scrape, its
// collectors all successful, and counts the busy pod's run-queue waits
// under unknown workloads; once the server is reachable again, the pod's
// labels appear within catchUp.
func TestWorkloadAPIServerUnreachable(t *testing.T) {
	testenv.Privileged(t)
	outage := apiOutage(t)
	// client-go's reflector backs off at most 30 s, jittered by up to as
	// much again ([30, 60) s between tries, client-go
	// tools/cache/reflector.go); then one list and a scrape.
	const catchUp = 90 * time.Second
	c := kubetest.Start(t)
	c.Node(t, "node-u")
	c.Namespace(t, "outage", nil)
	id := fmt.Sprintf("%064x", 0xfeed)
	web := c.Pod(t, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "outage", Name: "web"},
		Spec: corev1.PodSpec{NodeName: "node-u", Containers: []corev1.Container{{Name: "app", Image: "registry.example/app"}}}})
	c.SetPodStatus(t, "outage", "web", kubetest.RunningStatus(web, "10.1.0.2", "containerd://"+id))
	dir := testenv.SubCgroup(t, testenv.TestCgroup(t, "e2e-outage"), testenv.KubepodsPath(string(web.UID), id))
	proxy := c.Proxy(t, false)
	kubeconfig := c.WriteKubeconfig(t, filepath.Join(t.TempDir(), "kubeconfig"), "https://"+proxy.Addr)

	d := startDaemon(t, "KTEL_NODE_NAME=node-u", "KUBECONFIG="+kubeconfig, "KTEL_PROBES=runqlat", "KTEL_WORKLOAD_LABEL_TTL=1m")
	// The pod's container wakes up ten times a second (each a run-queue
	// wait), for at most as long as the test can last.
	wakeups := int((outage + catchUp + 30*time.Second) / (100 * time.Millisecond))
	testenv.StartInCgroup(t, dir, "sh", "-c", fmt.Sprintf("i=0; while [ $i -lt %d ]; do sleep 0.1; i=$((i+1)); done", wakeups))

	client := &http.Client{Timeout: 10 * time.Second}
	podSeries := regexp.MustCompile(`(?m)^ktel_runqueue_latency_seconds_count\{container="app",namespace="outage",pod="web",unit=""\} [1-9]`)
	unknownPods := regexp.MustCompile(`(?m)^ktel_workload_unknown_pods_total [1-9]`)
	scrapes, sawUnknown := 0, false
	for end := time.Now().Add(outage); time.Now().Before(end); testenv.Sleep(t, time.Second) {
		body, p := scrapeCheck(client, d.Addr)
		scrapes++
		if p != "" {
			t.Fatalf("API server unreachable for %v: %s\n%s\nstderr:\n%s", time.Since(end.Add(-outage)).Round(time.Second), p, body, d.Stderr)
		}
		if podSeries.Match(body) {
			t.Fatalf("the pod labelled while the API server is unreachable:\n%s", body)
		}
		sawUnknown = sawUnknown || unknownPods.Match(body)
	}
	if !sawUnknown {
		t.Errorf("no unknown pod counted in %d scrapes while the API server was unreachable", scrapes)
	}

	proxy.SetUp(true)
	t0 := time.Now()
	var body []byte
	for {
		var p string
		body, p = scrapeCheck(client, d.Addr)
		if p != "" {
			t.Fatalf("API server reachable again: %s\n%s\nstderr:\n%s", p, body, d.Stderr)
		}
		if podSeries.Match(body) {
			break
		}
		if time.Since(t0) > catchUp {
			t.Fatalf("the pod's labels not there %v after the API server became reachable again\n%s\nstderr:\n%s", catchUp, body, d.Stderr)
		}
		testenv.Sleep(t, 500*time.Millisecond)
	}
	t.Logf("API server unreachable %v (%d scrapes, all served); caught up %v after it became reachable", outage, scrapes, time.Since(t0).Round(time.Millisecond))
	promtoolCheck(t, body)
	if st := d.stop(t, syscall.SIGTERM); st.ExitCode() != 0 {
		t.Errorf("exit code %d", st.ExitCode())
	}
	checkLog(t, d.Stderr.String())
}
