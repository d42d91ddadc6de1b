package daemon

import (
	"log/slog"
	"os"
	"testing"
	"time"

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
// pod's calls under its own.
func TestSyscallPerContainer(t *testing.T) {
	testenv.Privileged(t)
	webDir, dbDir := twoPods(t, "daemon-syscall")

	cfg := testConfig("syscall", false)
	cfg.SyscallTiming, cfg.SyscallSampleRate, cfg.SyscallPerContainer = "all", 1, true
	cfg.NodeName, cfg.WorkloadLabelTTL, cfg.WorkloadMaxLabelSets = "node-a", time.Minute, 100
	d, err := newDaemon(cfg, slog.New(slog.DiscardHandler), starters())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, ok := d.probes["syscall"]; !ok {
		t.Fatal("the syscall probe did not start")
	}
	series := func(labels string) uint64 { return histogramCount(d, "ktel_syscall_latency_seconds", labels) }
	webSeries := `container="nginx",namespace="team-a",pod="web",syscall="getppid",unit=""`
	dbSeries := `container="postgres",namespace="default",pod="db",syscall="getppid",unit=""`

	// Calls made before the informer synced and the cgroups were walked
	// stay with unit="unknown": call until each container's series shows.
	deadline := time.Now().Add(30 * time.Second)
	for series(webSeries) == 0 || series(dbSeries) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the containers' series never appeared")
		}
		testenv.GetppidsIn(t, webDir, 1)
		testenv.GetppidsIn(t, dbDir, 1)
		time.Sleep(100 * time.Millisecond)
	}
	webBefore, dbBefore := series(webSeries), series(dbSeries)

	const inWeb, inDB = 3000, 1000
	testenv.GetppidsIn(t, webDir, inWeb)
	testenv.GetppidsIn(t, dbDir, inDB)
	var webGot, dbGot uint64
	deadline = time.Now().Add(10 * time.Second)
	for {
		webGot, dbGot = series(webSeries)-webBefore, series(dbSeries)-dbBefore
		if webGot >= inWeb && dbGot >= inDB {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("getppid timed %d times in web, %d in db; want %d and %d", webGot, dbGot, inWeb, inDB)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The helpers' Go runtimes make no getppid of their own: a few at
	// most would be a surprise, the other pod's calls a failure.
	if webGot > inWeb+10 || dbGot > inDB+10 {
		t.Errorf("getppid timed %d times in web, %d in db; want %d and %d", webGot, dbGot, inWeb, inDB)
	}
	t.Logf("getppid per container: web %d, db %d", webGot, dbGot)
}
