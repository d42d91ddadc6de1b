package k8smeta

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ktel-dev/ktel/internal/cgroups"
)

const node = "node-a"

// clock is a settable clock.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func hexID(n int) string { return fmt.Sprintf("%064x", n+1) }
func uid(n int) string   { return fmt.Sprintf("00000000-0000-4000-8000-%012x", n) }

func testPod(n int, ns string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("pod-%d", n), UID: types.UID(uid(n))},
		Spec:       corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "x"}}},
		Status: corev1.PodStatus{ContainerStatuses: []corev1.ContainerStatus{
			{Name: "app", ContainerID: "containerd://" + hexID(n)},
		}},
	}
}

// mkdir creates a cgroup-like directory below root and returns its id.
func mkdir(t *testing.T, root, rel string) uint64 {
	t.Helper()
	dir := filepath.Join(root, rel)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	id, err := cgroups.ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func systemdPath(n int) string {
	u := strings.ReplaceAll(uid(n), "-", "_")
	return "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod" + u + ".slice/cri-containerd-" + hexID(n) + ".scope"
}

func cgroupfsPath(n int) string { return "kubepods/besteffort/pod" + uid(n) + "/" + hexID(n) }

func start(t *testing.T, r *Resolver) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

// eventually polls cond until it holds, failing t after d.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestResolve(t *testing.T) {
	root := t.TempDir()
	ids := map[string]uint64{
		"systemd":  mkdir(t, root, systemdPath(1)),
		"cgroupfs": mkdir(t, root, cgroupfsPath(2)),
		"sandbox":  mkdir(t, root, "kubepods/besteffort/pod"+uid(2)+"/"+hexID(99)),
		"podcg":    mkdir(t, root, "kubepods/besteffort/pod"+uid(2)),
		"stranger": mkdir(t, root, cgroupfsPath(3)),
		"service":  mkdir(t, root, "system.slice/foo.service"),
		"docker":   mkdir(t, root, "system.slice/docker-"+hexID(7)+".scope"),
	}
	client := fake.NewClientset(testPod(1, "ns1"), testPod(2, "ns2"))
	r, err := New(Options{NodeName: node, Client: client, Root: root, TTL: time.Minute, MaxLabelSets: 100})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r)
	eventually(t, 10*time.Second, "informer not synced", r.Synced)

	for name, want := range map[string]Labels{
		"systemd":  {Namespace: "ns1", Pod: "pod-1", Container: "app"},
		"cgroupfs": {Namespace: "ns2", Pod: "pod-2", Container: "app"},
		"sandbox":  {Namespace: "ns2", Pod: "pod-2"},
		"podcg":    {Namespace: "ns2", Pod: "pod-2"},
		"stranger": {Namespace: Unknown, Pod: Unknown, Container: Unknown},
		"service":  {Unit: "foo.service"},
		"docker":   {Container: hexID(7)[:12]},
	} {
		if got := r.Resolve(ids[name]); got != want {
			t.Errorf("%s: Resolve = %+v, want %+v", name, got, want)
		}
	}
	st := r.Stats()
	if st.UnknownPods != 1 || st.UnknownCgroups != 0 {
		t.Errorf("stats %+v: want 1 unknown pod, no unknown cgroup", st)
	}

	// A cgroup created after the last walk: unknown at once (the scrape
	// does not wait), known after the walk that the miss triggers.
	late := mkdir(t, root, "system.slice/late.service")
	if got := r.Resolve(late); got != (Labels{Unit: Unknown}) {
		t.Errorf("new cgroup: Resolve = %+v, want unknown", got)
	}
	if r.Stats().UnknownCgroups != 1 {
		t.Errorf("unknown cgroup not counted: %+v", r.Stats())
	}
	eventually(t, 10*time.Second, "new cgroup never resolved", func() bool {
		return r.Resolve(late) == Labels{Unit: "late.service"}
	})

	// The informer strips pods to what attribution uses.
	objs := r.pods
	if p, c := objs.len(); p != 2 || c != 2 {
		t.Errorf("store holds %d pods, %d containers; want 2, 2", p, c)
	}
}

// Without a node name (off Kubernetes) labels come from cgroup paths only:
// units, and short container ids for containers of any runtime, pods'
// included; the cap holds as on Kubernetes.
func TestResolvePathsOnly(t *testing.T) {
	root := t.TempDir()
	// Ids that differ in their first 12 digits.
	a, b, c := strings.Repeat("a", 64), strings.Repeat("b", 64), strings.Repeat("c", 64)
	ids := map[string]uint64{
		"redis":   mkdir(t, root, "system.slice/redis-server.service"),
		"child":   mkdir(t, root, "system.slice/redis-server.service/worker"),
		"session": mkdir(t, root, "user.slice/user-1000.slice/session-3.scope"),
		"docker":  mkdir(t, root, "system.slice/docker-"+a+".scope"),
		"podman":  mkdir(t, root, "machine.slice/libpod-"+b+".scope/container"),
		"kube":    mkdir(t, root, "kubepods/besteffort/pod"+uid(1)+"/"+c),
		"podcg":   mkdir(t, root, "kubepods/besteffort/pod"+uid(2)),
		"extra":   mkdir(t, root, "system.slice/cron.service"),
	}
	r, err := New(Options{Root: root, TTL: time.Minute, MaxLabelSets: 6})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Refresh(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		want Labels
	}{
		{"redis", Labels{Unit: "redis-server.service"}},
		{"child", Labels{Unit: "redis-server.service"}},
		{"session", Labels{Unit: "session-3.scope"}},
		{"docker", Labels{Container: a[:12]}},
		{"podman", Labels{Container: b[:12]}},
		{"kube", Labels{Container: c[:12]}},
		{"podcg", Labels{Unit: "pod" + uid(2)}},
		// The seventh label set is beyond the cap of 6.
		{"extra", Labels{Unit: Overflow}},
	} {
		if got := r.Resolve(ids[tc.name]); got != tc.want {
			t.Errorf("%s: Resolve = %+v, want %+v", tc.name, got, tc.want)
		}
	}
	if st := r.Stats(); st.Overflows != 1 || st.LabelSets != 6 || st.UnknownPods != 0 {
		t.Errorf("stats %+v: want 1 overflow, 6 label sets, no unknown pod", st)
	}
}

func TestStripPod(t *testing.T) {
	p := testPod(1, "ns")
	p.Labels = map[string]string{"a": "b"}
	p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "X", Value: "y"}}
	p.Status.ContainerStatuses[0].Image = "img"
	p.Status.PodIP, p.Status.PodIPs = "10.1.0.5", []corev1.PodIP{{IP: "10.1.0.5"}, {IP: "fd00::5"}}
	p.Status.HostIP = "192.0.2.1"
	out, err := stripPod(p)
	if err != nil {
		t.Fatal(err)
	}
	s := out.(*corev1.Pod)
	if s.Name != p.Name || s.Namespace != p.Namespace || s.UID != p.UID || len(s.Labels) != 0 || len(s.Spec.Containers) != 0 {
		t.Errorf("stripped pod keeps too much or too little: %+v", s)
	}
	if got := s.Status.ContainerStatuses; len(got) != 1 || !reflect.DeepEqual(got[0], corev1.ContainerStatus{Name: "app", ContainerID: "containerd://" + hexID(1)}) {
		t.Errorf("container statuses %+v", got)
	}
	if s.Status.PodIP != p.Status.PodIP || !reflect.DeepEqual(s.Status.PodIPs, p.Status.PodIPs) || s.Status.HostIP != "" {
		t.Errorf("addresses: pod IP %q, pod IPs %v, host IP %q", s.Status.PodIP, s.Status.PodIPs, s.Status.HostIP)
	}
}

// 1,000 pods come and go: the cap holds while they run, and when they are
// deleted their labels resolve for the TTL and not a moment longer.
func TestThousandPods(t *testing.T) {
	const (
		n   = 1000
		max = 300
		ttl = time.Minute
	)
	root := t.TempDir()
	clk := &clock{now: time.Unix(1_000_000, 0)}
	client := fake.NewClientset()
	r, err := New(Options{NodeName: node, Client: client, Root: root, TTL: ttl, MaxLabelSets: max,
		RescanInterval: time.Hour, MinRescan: time.Hour, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r)
	eventually(t, 10*time.Second, "informer not synced", r.Synced)

	ctx := context.Background()
	ids := make([]uint64, n)
	for i := range n {
		path := systemdPath(i)
		if i%2 == 1 {
			path = cgroupfsPath(i)
		}
		ids[i] = mkdir(t, root, path)
		if _, err := client.CoreV1().Pods("ns").Create(ctx, testPod(i, "ns"), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		// The fake clientset's watch holds 100 events and panics beyond.
		if i%50 == 49 {
			eventually(t, 30*time.Second, "pods not all known", func() bool { return r.Stats().Pods == i+1 })
		}
	}
	if err := r.Refresh(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "pods not all known", func() bool { return r.Stats().Pods == n })

	named := 0
	for i, id := range ids {
		l := r.Resolve(id)
		switch l {
		case Labels{Namespace: "ns", Pod: fmt.Sprintf("pod-%d", i), Container: "app"}:
			named++
		case Labels{Namespace: Overflow, Pod: Overflow, Container: Overflow}:
		default:
			t.Fatalf("pod %d: Resolve = %+v", i, l)
		}
	}
	if st := r.Stats(); named != max || st.LabelSets != max || st.Overflows != n-max {
		t.Fatalf("named %d, stats %+v; want %d named and label sets, %d overflows", named, st, max, n-max)
	}

	// Delete every pod and cgroup.
	for i := range n {
		if err := client.CoreV1().Pods("ns").Delete(ctx, fmt.Sprintf("pod-%d", i), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		if i%50 == 49 {
			eventually(t, 30*time.Second, "deletions not seen", func() bool { return deleted(r) == i+1 })
		}
	}
	if err := os.RemoveAll(filepath.Join(root, "kubepods.slice")); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(root, "kubepods")); err != nil {
		t.Fatal(err)
	}

	// Just before the TTL: still resolvable.
	clk.Add(ttl - time.Nanosecond)
	if err := r.Refresh(); err != nil {
		t.Fatal(err)
	}
	if got, want := r.Resolve(ids[0]), (Labels{Namespace: "ns", Pod: "pod-0", Container: "app"}); got != want {
		t.Fatalf("deleted pod before its TTL: Resolve = %+v, want %+v", got, want)
	}
	// At the TTL: no label set is left, no pod, and nothing resolves to a
	// deleted pod's labels.
	clk.Add(time.Nanosecond)
	r.Sweep()
	if st := r.Stats(); st.LabelSets != 0 || st.Pods != 0 {
		t.Fatalf("at the TTL after deletion: %+v, %v; want no label set and no pod", st, r.LabelSets())
	}
	for i, id := range ids {
		if l := r.Resolve(id); l.Pod != Unknown && l.Unit != Unknown {
			t.Fatalf("pod %d resolves to %+v after its TTL", i, l)
		}
	}
	if st := r.Stats(); st.LabelSets != 0 {
		t.Fatalf("label sets after resolving deleted pods: %v", r.LabelSets())
	}
	// The cgroups go a TTL after the walk that missed them.
	clk.Add(ttl)
	if err := r.Refresh(); err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.Cgroups > 20 {
		t.Fatalf("removed cgroups still indexed: %+v", st)
	}
}

// deleted counts the pods the store holds as deleted.
func deleted(r *Resolver) (n int) {
	r.pods.mu.RLock()
	defer r.pods.mu.RUnlock()
	for _, e := range r.pods.pods {
		if !e.gone.IsZero() {
			n++
		}
	}
	return n
}
