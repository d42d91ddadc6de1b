package daemon

import (
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
	"github.com/ktel-dev/ktel/metrics"
)

// sleeping reports whether process pid is asleep (state S).
func sleeping(t *testing.T, pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	_, after, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(after, "S")
}

// twoPods starts an API server with node node-a and two running pods,
// team-a/web (container nginx) and default/db (container postgres), points
// KUBECONFIG at it, and makes the containers' cgroups below a cgroup of
// the test's own named after name: web's in kubelet's systemd layout,
// db's in its cgroupfs layout.
func twoPods(t *testing.T, name string) (webDir, dbDir *os.File) {
	c := kubetest.Start(t)
	c.Node(t, "node-a")
	c.Namespace(t, "team-a", nil)
	t.Setenv("KUBECONFIG", c.Kubeconfig)
	pod := func(ns, name, ctr, id string) *corev1.Pod {
		p := c.Pod(t, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.PodSpec{NodeName: "node-a", Containers: []corev1.Container{{Name: ctr, Image: "registry.example/" + ctr}}}})
		return c.SetPodStatus(t, ns, name, kubetest.RunningStatus(p, "10.1.0.2", "containerd://"+id))
	}
	webID, dbID := fmt.Sprintf("%064x", 1), fmt.Sprintf("%064x", 2)
	web := pod("team-a", "web", "nginx", webID)
	db := pod("default", "db", "postgres", dbID)
	base := testenv.TestCgroup(t, name)
	return testenv.SubCgroup(t, base, testenv.KubepodsPath(string(web.UID), webID)),
		testenv.SubCgroup(t, base, testenv.KubepodsCgroupfsPath(string(db.UID), dbID))
}

// histogramCount scrapes d and returns the count of histogram metric's
// series with labels (their text form, sorted), 0 if it is absent.
func histogramCount(d *Daemon, metric, labels string) (n uint64) {
	rec := httptest.NewRecorder()
	d.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	re := regexp.MustCompile(`(?m)^` + metric + `_count\{` + regexp.QuoteMeta(labels) + `\} (\d+)$`)
	if m := re.FindStringSubmatch(rec.Body.String()); m != nil {
		n, _ = strconv.ParseUint(m[1], 10, 64)
	}
	return n
}

// With KTEL_NODE_NAME, against a real API server: the run-queue histogram
// of a pod whose container's cgroup is kept busy moves, labelled with the
// pod's namespace, name and container, while an idle pod's does not.
func TestRunqlatPerPod(t *testing.T) {
	testenv.Privileged(t)
	webDir, dbDir := twoPods(t, "daemon")

	cfg := testConfig("runqlat", false)
	cfg.NodeName, cfg.WorkloadLabelTTL, cfg.WorkloadMaxLabelSets = "node-a", time.Minute, 100
	busyAndIdle(t, cfg, webDir, dbDir,
		`container="nginx",namespace="team-a",pod="web",unit=""`,
		`container="postgres",namespace="default",pod="db",unit=""`)
}

// Off Kubernetes, with KTEL_WORKLOAD_ATTRIBUTION=cgroup: the run-queue
// histogram of a systemd-like unit kept busy moves, labelled with the
// unit's name from its cgroup path alone, while an idle unit's does not.
func TestRunqlatPerUnit(t *testing.T) {
	testenv.Privileged(t)
	busy, idle := twoUnits(t, "unit")
	cfg := testConfig("runqlat", false)
	cfg.WorkloadAttribution, cfg.WorkloadLabelTTL, cfg.WorkloadMaxLabelSets = "cgroup", time.Minute, 100
	busyAndIdle(t, cfg, busy, idle,
		`container="",namespace="",pod="",unit="foo.service"`,
		`container="",namespace="",pod="",unit="bar.service"`)
}

// twoUnits makes the cgroups of two systemd-like units, foo.service and
// bar.service, below a cgroup of the test's own named after name.
func twoUnits(t *testing.T, name string) (foo, bar *os.File) {
	base := testenv.TestCgroup(t, name)
	return testenv.SubCgroup(t, base, "ktel-test.slice/foo.service"), testenv.SubCgroup(t, base, "ktel-test.slice/bar.service")
}

// busyAndIdle starts a daemon with cfg and asserts that the run-queue
// series busySeries (labels as exposed) counts at least every wait of a
// shell sleeping 300 times on a CPU kept busy by a spinner, both in cgroup
// busy, while idleSeries, of a sleeper in cgroup idle, stays put.
func busyAndIdle(t *testing.T, cfg *config.Config, busy, idle *os.File, busySeries, idleSeries string) {
	t.Helper()
	d, err := newDaemon(cfg, slog.New(slog.DiscardHandler), starters())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.workloads == nil {
		t.Fatal("workload attribution is off")
	}
	series := func(labels string) uint64 { return histogramCount(d, "ktel_runqueue_latency_seconds", labels) }

	// The idle workload's one process runs once, then sleeps; its waits
	// are attributed once the cgroups are walked (and, on Kubernetes, the
	// informer has synced).
	sleeper := testenv.StartInCgroup(t, idle, "sleep", "60")
	deadline := time.Now().Add(30 * time.Second)
	for series(idleSeries) == 0 || !sleeping(t, sleeper.Process.Pid) {
		if time.Now().After(deadline) {
			t.Fatal("the idle workload's series never appeared")
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Its last wait was recorded when it went to sleep; scrapes read maps
	// at most metrics.DefaultMaxAge old: let that pass, once.
	time.Sleep(metrics.DefaultMaxAge + 100*time.Millisecond)
	idleBefore, busyBefore := series(idleSeries), series(busySeries)

	const sleeps = 300
	spinner := testenv.StartInCgroup(t, busy, "taskset", "-c", "0", "sh", "-c", "while :; do :; done")
	shell := testenv.StartInCgroup(t, busy, "taskset", "-c", "0", "sh", "-c",
		fmt.Sprintf("i=0; while [ $i -lt %d ]; do sleep 0.001; i=$((i+1)); done", sleeps))
	if err := shell.Wait(); err != nil {
		t.Fatal(err)
	}
	spinner.Process.Kill()
	spinner.Wait()

	var busyAfter uint64
	deadline = time.Now().Add(10 * time.Second)
	for busyAfter = series(busySeries); busyAfter-busyBefore < sleeps; busyAfter = series(busySeries) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d waits, want at least %d", busySeries, busyAfter-busyBefore, sleeps)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if idleAfter := series(idleSeries); idleAfter != idleBefore {
		t.Errorf("idle %s: %d waits while it slept", idleSeries, idleAfter-idleBefore)
	}
	t.Logf("%s: %d waits", busySeries, busyAfter-busyBefore)
}

// With KTEL_NODE_NAME (or KTEL_WORKLOAD_ATTRIBUTION=cgroup) the probes get
// the resolver and its counters are exported, even while the API server is
// unreachable; Close stops it. Without, or with "off", probes get none.
func TestWorkloadWiring(t *testing.T) {
	if _, err := cgroups.V2Root(); err != nil {
		t.Skipf("no cgroup v2 hierarchy: %v", err)
	}
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	// Nothing listens on port 1 of loopback: the informer keeps retrying.
	if err := os.WriteFile(kc, []byte(`apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KUBECONFIG", kc)
	for _, tc := range []struct {
		attribution, node string
		on                bool
	}{
		{"auto", "", false}, {"auto", "node-a", true}, {"cgroup", "", true}, {"cgroup", "node-a", true}, {"off", "node-a", false},
	} {
		var got metrics.Workloads
		p := &fakeProbe{t: t}
		s := map[string]starter{"fake": func(e env) (loaded, error) { got = e.workloads; return p, nil }}
		cfg := testConfig("fake", false)
		cfg.WorkloadAttribution, cfg.NodeName, cfg.WorkloadLabelTTL, cfg.WorkloadMaxLabelSets = tc.attribution, tc.node, time.Minute, 10
		d, err := newDaemon(cfg, slog.New(slog.DiscardHandler), s)
		if err != nil {
			t.Fatal(err)
		}
		rec := httptest.NewRecorder()
		d.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		has := strings.Contains(rec.Body.String(), "ktel_workload_cgroups ")
		if on := got != nil; on != tc.on || has != tc.on {
			t.Errorf("KTEL_WORKLOAD_ATTRIBUTION=%s KTEL_NODE_NAME=%s: probes got a resolver %v, workload metrics exported %v; want %v",
				tc.attribution, tc.node, on, has, tc.on)
		}
		done := make(chan error, 1)
		go func() { done <- d.Close() }()
		select {
		case err := <-done:
			if err != nil {
				t.Error(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Close did not return")
		}
	}
}
