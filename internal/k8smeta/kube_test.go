package k8smeta

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// The tests with an API server share one control plane (kubetest.Shared),
// each with namespaces and node names of its own: under emulation (make
// test-kernel-all) a start takes minutes.
func TestMain(m *testing.M) { kubetest.Main(m) }

// testCgroups makes a child cgroup of the v2 root for the test, and
// cgroups below it at the given relative paths; it returns their ids and
// removes them all when the test ends.
func testCgroups(t *testing.T, rels ...string) (root string, ids []uint64) {
	t.Helper()
	root, err := cgroups.V2Root()
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(root, fmt.Sprintf("ktel-test-k8smeta-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if err := os.Mkdir(base, 0o755); err != nil {
		t.Fatal(err)
	}
	var dirs []string
	t.Cleanup(func() {
		// Deepest first; cgroups are removed with rmdir.
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !os.IsNotExist(err) {
				t.Error(err)
			}
		}
		if err := os.Remove(base); err != nil {
			t.Error(err)
		}
	})
	for _, rel := range rels {
		dir := base
		for _, p := range strings.Split(rel, "/") {
			dir = filepath.Join(dir, p)
			if err := os.Mkdir(dir, 0o755); err == nil {
				dirs = append(dirs, dir)
			} else if !os.IsExist(err) {
				t.Fatal(err)
			}
		}
		id, err := cgroups.ID(dir)
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	return root, ids
}

func kubePod(ns, name, node string, containers ...string) *corev1.Pod {
	p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: corev1.PodSpec{NodeName: node}}
	for _, c := range containers {
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: c, Image: "registry.example/" + c})
	}
	return p
}

func systemdPodPath(uid, qos string) string {
	u := strings.ReplaceAll(uid, "-", "_")
	if qos == "" {
		return "kubepods.slice/kubepods-pod" + u + ".slice"
	}
	return "kubepods.slice/kubepods-" + qos + ".slice/kubepods-" + qos + "-pod" + u + ".slice"
}

// The resolver against a real API server: pods on this node, their
// container ids set through the status subresource as a kubelet would,
// and cgroups in kubelet's systemd and cgroupfs layouts below the test's
// own cgroup.
func TestKubeAttribution(t *testing.T) {
	testenv.Privileged(t)
	c := kubetest.Shared(t)
	c.Node(t, "attribution-a")
	c.Node(t, "attribution-b")
	c.Namespace(t, "team-a", nil)
	c.Namespace(t, "team-b", nil)

	web := c.Pod(t, kubePod("team-a", "web", "attribution-a", "nginx", "sidecar"))
	c.SetPodStatus(t, "team-a", "web", kubetest.RunningStatus(web, "10.1.0.2", "containerd://"+hexID(1), "containerd://"+hexID(2)))
	db := c.Pod(t, kubePod("team-b", "db", "attribution-a", "postgres"))
	c.SetPodStatus(t, "team-b", "db", kubetest.RunningStatus(db, "10.1.0.3", "cri-o://"+hexID(3)))
	other := c.Pod(t, kubePod("team-b", "elsewhere", "attribution-b", "app"))
	c.SetPodStatus(t, "team-b", "elsewhere", kubetest.RunningStatus(other, "10.1.0.4", "containerd://"+hexID(4)))

	root, ids := testCgroups(t,
		systemdPodPath(string(web.UID), "burstable")+"/cri-containerd-"+hexID(1)+".scope",
		systemdPodPath(string(web.UID), "burstable")+"/cri-containerd-"+hexID(2)+".scope",
		systemdPodPath(string(web.UID), "burstable"),
		"kubepods/besteffort/pod"+string(db.UID)+"/"+hexID(3),
		"kubepods/besteffort/pod"+string(db.UID)+"/"+hexID(9), // its sandbox
		systemdPodPath(string(other.UID), "")+"/cri-containerd-"+hexID(4)+".scope",
	)
	r, err := New(Options{NodeName: "attribution-a", Kubeconfig: c.Kubeconfig, Root: root, TTL: time.Minute, MaxLabelSets: 100})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r)
	eventually(t, 30*time.Second, "informer not synced", r.Synced)

	want := []Labels{
		{Namespace: "team-a", Pod: "web", Container: "nginx"},
		{Namespace: "team-a", Pod: "web", Container: "sidecar"},
		{Namespace: "team-a", Pod: "web"},
		{Namespace: "team-b", Pod: "db", Container: "postgres"},
		{Namespace: "team-b", Pod: "db"},
		// Another node's pod is not watched.
		{Namespace: Unknown, Pod: Unknown, Container: Unknown},
	}
	for i, id := range ids {
		if got := r.Resolve(id); got != want[i] {
			t.Errorf("cgroup %d: Resolve = %+v, want %+v", i, got, want[i])
		}
	}
	if st := r.Stats(); st.Pods != 2 {
		t.Errorf("%d pods known, want this node's 2", st.Pods)
	}

	// A restarted container (a new id in the status) resolves as soon as
	// the informer sees the update; deleting the pod keeps its labels for
	// the TTL.
	_, newIDs := testCgroups(t, systemdPodPath(string(web.UID), "burstable")+"/cri-containerd-"+hexID(5)+".scope")
	c.SetPodStatus(t, "team-a", "web", kubetest.RunningStatus(web, "10.1.0.2", "containerd://"+hexID(5), "containerd://"+hexID(2)))
	if err := r.Refresh(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "restarted container not resolved", func() bool {
		return r.Resolve(newIDs[0]) == Labels{Namespace: "team-a", Pod: "web", Container: "nginx"}
	})
	if err := c.Client.CoreV1().Pods("team-b").Delete(context.Background(), "db", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "deletion not seen", func() bool { return deleted(r) == 1 })
	if got := r.Resolve(ids[3]); got != want[3] {
		t.Errorf("deleted pod within its TTL: Resolve = %+v, want %+v", got, want[3])
	}
}

// The API server unreachable at start, then for a while: the resolver
// serves unknowns, counted, then catches up; while it is cut again, what
// it knew still resolves.
func TestKubeUnreachable(t *testing.T) {
	testenv.Privileged(t)
	c := kubetest.Shared(t)
	c.Node(t, "unreachable-a")
	c.Namespace(t, "unreachable", nil)
	proxy := c.Proxy(t, false)
	kubeconfig := c.WriteKubeconfig(t, filepath.Join(t.TempDir(), "kubeconfig"), "https://"+proxy.Addr)

	web := c.Pod(t, kubePod("unreachable", "web", "unreachable-a", "app"))
	c.SetPodStatus(t, "unreachable", "web", kubetest.RunningStatus(web, "10.1.0.2", "containerd://"+hexID(1)))
	root, ids := testCgroups(t, "kubepods/pod"+string(web.UID)+"/"+hexID(1))

	r, err := New(Options{NodeName: "unreachable-a", Kubeconfig: kubeconfig, Root: root, TTL: time.Minute, MaxLabelSets: 100})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r)
	if err := r.Refresh(); err != nil {
		t.Fatal(err)
	}
	unknown := Labels{Namespace: Unknown, Pod: Unknown, Container: Unknown}
	// For two seconds the server stays unreachable: unknowns, counted, and
	// no sync.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); testenv.Sleep(t, 100*time.Millisecond) {
		if got := r.Resolve(ids[0]); got != unknown {
			t.Fatalf("API server unreachable: Resolve = %+v, want unknown", got)
		}
	}
	if r.Synced() || r.Stats().UnknownPods == 0 {
		t.Fatalf("unreachable API server: synced %v, stats %+v", r.Synced(), r.Stats())
	}

	proxy.SetUp(true)
	t0 := time.Now()
	// client-go's reflector backs off up to 30 s between tries.
	eventually(t, 90*time.Second, "never caught up with the API server", func() bool {
		return r.Resolve(ids[0]) == Labels{Namespace: "unreachable", Pod: "web", Container: "app"}
	})
	t.Logf("caught up %v after the API server became reachable", time.Since(t0).Round(time.Millisecond))

	proxy.SetUp(false)
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); testenv.Sleep(t, 100*time.Millisecond) {
		if got := r.Resolve(ids[0]); got != (Labels{Namespace: "unreachable", Pod: "web", Container: "app"}) {
			t.Fatalf("API server cut again: Resolve = %+v, want what it knew", got)
		}
	}
}

// 1,000 pods on a real API server, created and deleted: the cap holds
// while they run, and their labels go at their TTL after deletion.
func TestKubeThousandPods(t *testing.T) {
	testenv.Privileged(t)
	const (
		n   = 1000
		max = 300
		ttl = time.Minute
	)
	c := kubetest.Shared(t)
	c.Node(t, "many-a")
	c.Namespace(t, "many", nil)
	root := t.TempDir() // an ordinary tree: ids are inode numbers there too
	clk := &clock{now: time.Unix(1_000_000, 0)}
	r, err := New(Options{NodeName: "many-a", Kubeconfig: c.Kubeconfig, Root: root, TTL: ttl, MaxLabelSets: max,
		RescanInterval: time.Hour, MinRescan: time.Hour, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r)
	eventually(t, 30*time.Second, "informer not synced", r.Synced)

	ids := make([]uint64, n)
	t0 := time.Now()
	parallel(t, n, func(i int) error {
		p := kubePod("many", fmt.Sprintf("pod-%d", i), "many-a", "app")
		created, err := c.Client.CoreV1().Pods("many").Create(context.Background(), p, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		created.Status.ContainerStatuses = []corev1.ContainerStatus{{Name: "app", ContainerID: "containerd://" + hexID(i)}}
		_, err = c.Client.CoreV1().Pods("many").UpdateStatus(context.Background(), created, metav1.UpdateOptions{})
		if err != nil {
			return err
		}
		path := filepath.Join(root, systemdPodPath(string(created.UID), "besteffort"), "cri-containerd-"+hexID(i)+".scope")
		if err := os.MkdirAll(path, 0o755); err != nil {
			return err
		}
		ids[i], err = cgroups.ID(path)
		return err
	})
	t.Logf("1,000 pods created with status in %v", time.Since(t0).Round(time.Millisecond))
	if err := r.Refresh(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "pods' containers not all known", func() bool {
		_, ctrs := r.pods.len()
		return ctrs == n
	})
	named := 0
	for i, id := range ids {
		switch l := r.Resolve(id); l {
		case Labels{Namespace: "many", Pod: fmt.Sprintf("pod-%d", i), Container: "app"}:
			named++
		case Labels{Namespace: Overflow, Pod: Overflow, Container: Overflow}:
		default:
			t.Fatalf("pod %d: Resolve = %+v", i, l)
		}
	}
	if st := r.Stats(); named != max || st.LabelSets != max || st.Overflows != n-max {
		t.Fatalf("named %d, stats %+v; want %d named and label sets, %d overflows", named, st, max, n-max)
	}

	t0 = time.Now()
	parallel(t, n, func(i int) error {
		return c.Client.CoreV1().Pods("many").Delete(context.Background(), fmt.Sprintf("pod-%d", i), metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	})
	eventually(t, 60*time.Second, "deletions not all seen", func() bool { return deleted(r) == n })
	t.Logf("1,000 pods deleted and seen in %v", time.Since(t0).Round(time.Millisecond))

	clk.Add(ttl - time.Nanosecond)
	r.Sweep()
	if got, want := r.Resolve(ids[0]), (Labels{Namespace: "many", Pod: "pod-0", Container: "app"}); got != want {
		t.Fatalf("deleted pod before its TTL: Resolve = %+v, want %+v", got, want)
	}
	clk.Add(time.Nanosecond)
	r.Sweep()
	if st := r.Stats(); st.LabelSets != 0 || st.Pods != 0 {
		t.Fatalf("at the TTL after deletion: %+v; want no label set and no pod", st)
	}
	for i, id := range ids {
		if l := r.Resolve(id); l.Pod != Unknown {
			t.Fatalf("pod %d resolves to %+v after its TTL", i, l)
		}
	}
}

// parallel runs f(0..n-1) on 8 goroutines and fails t on the first error.
func parallel(t *testing.T, n int, f func(i int) error) {
	t.Helper()
	next := make(chan int)
	errs := make(chan error, 8)
	for range 8 {
		go func() {
			var first error
			for i := range next {
				if err := f(i); err != nil && first == nil {
					first = fmt.Errorf("%d: %w", i, err)
				}
			}
			errs <- first
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
