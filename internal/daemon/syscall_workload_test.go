package daemon

import (
	"fmt"
	"log/slog"
	"net/http/httptest"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// helperGetppidsVar makes the test binary a helper that calls getppid, a
// syscall no Go runtime makes, the given number of times and exits.
const helperGetppidsVar = "KTEL_DAEMON_TEST_GETPPIDS"

func TestMain(m *testing.M) {
	if s := os.Getenv(helperGetppidsVar); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		runtime.LockOSThread()
		for range n {
			unix.RawSyscall(unix.SYS_GETPPID, 0, 0, 0)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// getppidsIn runs the helper in cgroup dir, from its first instruction.
func getppidsIn(t *testing.T, dir *os.File, n int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperGetppidsVar+"="+strconv.Itoa(n))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("helper: %v: %s", err, out)
	}
}

// With KTEL_SYSCALL_PER_CONTAINER and KTEL_NODE_NAME, against a real API
// server: the getppid calls of a process in a container's cgroup (kubelet's
// systemd layout, below the test's own cgroup) are timed under that
// container's namespace, pod and container labels, exactly, and another
// pod's calls under its own.
func TestSyscallPerContainer(t *testing.T) {
	testenv.Privileged(t)
	c := kubetest.Start(t)
	c.Node(t, "node-a")
	c.Namespace(t, "team-a", nil)
	t.Setenv("KUBECONFIG", c.Kubeconfig)
	pod := func(ns, name, ctr, id string) *corev1.Pod {
		p := c.Pod(t, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.PodSpec{NodeName: "node-a", Containers: []corev1.Container{{Name: ctr, Image: "registry.example/" + ctr}}}})
		return c.SetPodStatus(t, ns, name, kubetest.RunningStatus(p, "10.1.0.2", "containerd://"+id))
	}
	webID, dbID := fmt.Sprintf("%064x", 3), fmt.Sprintf("%064x", 4)
	web := pod("team-a", "web", "nginx", webID)
	db := pod("default", "db", "postgres", dbID)

	base := testenv.TestCgroup(t, "daemon-syscall")
	webDir := testenv.SubCgroup(t, base, testenv.KubepodsPath(string(web.UID), webID))
	dbDir := testenv.SubCgroup(t, base, testenv.KubepodsPath(string(db.UID), dbID))

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
	series := func(labels string) (n uint64) {
		rec := httptest.NewRecorder()
		d.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
		re := regexp.MustCompile(`(?m)^ktel_syscall_latency_seconds_count\{` + regexp.QuoteMeta(labels) + `\} (\d+)$`)
		if m := re.FindStringSubmatch(rec.Body.String()); m != nil {
			n, _ = strconv.ParseUint(m[1], 10, 64)
		}
		return n
	}
	webSeries := `container="nginx",namespace="team-a",pod="web",syscall="getppid",unit=""`
	dbSeries := `container="postgres",namespace="default",pod="db",syscall="getppid",unit=""`

	// Calls made before the informer synced and the cgroups were walked
	// stay with unit="unknown": call until each container's series shows.
	deadline := time.Now().Add(30 * time.Second)
	for series(webSeries) == 0 || series(dbSeries) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the containers' series never appeared")
		}
		getppidsIn(t, webDir, 1)
		getppidsIn(t, dbDir, 1)
		time.Sleep(100 * time.Millisecond)
	}
	webBefore, dbBefore := series(webSeries), series(dbSeries)

	const inWeb, inDB = 3000, 1000
	getppidsIn(t, webDir, inWeb)
	getppidsIn(t, dbDir, inDB)
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
