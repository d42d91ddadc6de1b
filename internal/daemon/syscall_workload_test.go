package daemon

import (
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/testenv"
)

func TestMain(m *testing.M) {
	testenv.GetppidsHelper()
	os.Exit(m.Run())
}

// With KTEL_SYSCALL_PER_CONTAINER and KTEL_NODE_NAME, against a real API
// server: the getppid calls of a process in a container's cgroup (kubelet's
// systemd layout, below the test's own cgroup) are timed under that
// container's namespace, pod and container labels, exactly, and another
// pod's calls (its container in the cgroupfs layout) under its own.
func TestSyscallPerContainer(t *testing.T) {
	testenv.Privileged(t)
	webDir, dbDir := twoPods(t, "daemon-syscall")
	cfg := testConfig("syscall", false)
	cfg.NodeName = "node-a"
	getppidsPerWorkload(t, cfg, webDir, dbDir,
		`container="nginx",namespace="team-a",pod="web",syscall="getppid",unit=""`,
		`container="postgres",namespace="default",pod="db",syscall="getppid",unit=""`)
}

// Off Kubernetes (KTEL_WORKLOAD_ATTRIBUTION=cgroup), the same by systemd
// unit, named from the cgroup path alone.
func TestSyscallPerUnit(t *testing.T) {
	testenv.Privileged(t)
	foo, bar := twoUnits(t, "syscall-unit")
	cfg := testConfig("syscall", false)
	cfg.WorkloadAttribution = "cgroup"
	getppidsPerWorkload(t, cfg, foo, bar,
		`container="",namespace="",pod="",syscall="getppid",unit="foo.service"`,
		`container="",namespace="",pod="",syscall="getppid",unit="bar.service"`)
}

// getppidsPerWorkload starts a daemon with cfg, the syscall probe per
// container and every syscall timed, and asserts that getppid calls made
// in cgroups a and b are each counted exactly under the series aSeries and
// bSeries (labels as exposed).
func getppidsPerWorkload(t *testing.T, cfg *config.Config, a, b *os.File, aSeries, bSeries string) {
	t.Helper()
	cfg.SyscallTiming, cfg.SyscallSampleRate, cfg.SyscallPerContainer = "all", 1, true
	cfg.WorkloadLabelTTL, cfg.WorkloadMaxLabelSets = time.Minute, 100
	d, err := newDaemon(cfg, slog.New(slog.DiscardHandler), starters())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, ok := d.probes["syscall"]; !ok || d.workloads == nil {
		t.Fatalf("syscall probe started: %v, workload attribution on: %v", ok, d.workloads != nil)
	}
	series := func(labels string) uint64 { return histogramCount(d, "ktel_syscall_latency_seconds", labels) }

	// Calls made before the cgroups were walked (and, on Kubernetes, the
	// informer synced) stay with unit="unknown": call until both series
	// show.
	deadline := time.Now().Add(30 * time.Second)
	for series(aSeries) == 0 || series(bSeries) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the workloads' series never appeared")
		}
		testenv.GetppidsIn(t, a, 1)
		testenv.GetppidsIn(t, b, 1)
		time.Sleep(100 * time.Millisecond)
	}
	aBefore, bBefore := series(aSeries), series(bSeries)

	const inA, inB = 3000, 1000
	testenv.GetppidsIn(t, a, inA)
	testenv.GetppidsIn(t, b, inB)
	var aGot, bGot uint64
	deadline = time.Now().Add(10 * time.Second)
	for {
		aGot, bGot = series(aSeries)-aBefore, series(bSeries)-bBefore
		if aGot >= inA && bGot >= inB {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("getppid timed %d times in %s, %d in %s; want %d and %d", aGot, aSeries, bGot, bSeries, inA, inB)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The helpers' Go runtimes make no getppid of their own: a few at
	// most would be a surprise, the other workload's calls a failure.
	if aGot > inA+10 || bGot > inB+10 {
		t.Errorf("getppid timed %d times in %s, %d in %s; want %d and %d", aGot, aSeries, bGot, bSeries, inA, inB)
	}
	t.Logf("getppid per workload: %d and %d", aGot, bGot)
}
