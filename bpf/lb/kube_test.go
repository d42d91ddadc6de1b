package lb

import (
	"context"
	"fmt"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/ktel-dev/ktel/internal/kubeclient"
	"github.com/ktel-dev/ktel/internal/kubelb"
	"github.com/ktel-dev/ktel/internal/kubetest"
)

// latencies records the source's network programming latencies.
type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) ObserveSync(time.Duration)             {}
func (l *latencies) Synced(time.Time, int, map[string]int) {}
func (l *latencies) ObserveNetworkProgramming(d time.Duration) {
	l.mu.Lock()
	l.d = append(l.d, d)
	l.mu.Unlock()
}

// TestKubernetes runs the load balancer from a real API server and
// controller-manager: Pods whose IPs are addresses of the sandbox's
// namespace (no route out of it), made Ready through the status
// subresource as a kubelet would, a Service selecting them, and connects
// from the sandbox's cgroup to the ClusterIP, inside the namespace.
func TestKubernetes(t *testing.T) {
	c := kubetest.Start(t)
	ctx := context.Background()
	const ns, node = "default", "node-a"
	c.Node(t, node)

	sb := newSandbox(t)
	pods := []string{"10.244.0.1", "10.244.0.2", "10.244.0.3"}
	for _, ip := range pods {
		if out, err := exec.Command("ip", "-n", sb.NS, "addr", "add", ip+"/32", "dev", "lo").CombinedOutput(); err != nil {
			t.Fatalf("add %s: %v: %s", ip, err, out)
		}
		sb.serveTCP(t, ip+":8080")
		sb.serveTCP(t, ip+":9090")
	}

	lat := &latencies{}
	src, err := kubelb.New(kubelb.Options{Client: c.Client, Node: node, MinSyncPeriod: 50 * time.Millisecond, Metrics: lat, Log: discard()})
	if err != nil {
		t.Fatal(err)
	}
	// Trigger times come in the API's whole seconds, and the source
	// measures only those after its start (older ones are changes some
	// other proxy programmed): the changes below begin in the next second,
	// or a fast run could make them all in the second the source started.
	for next := time.Now().Truncate(time.Second).Add(time.Second); time.Now().Before(next); {
		time.Sleep(time.Until(next))
	}
	p := load(t, Options{Cgroup: sb.Cgroup, Source: src})
	select {
	case <-src.Synced():
	case <-time.After(time.Minute):
		t.Fatal("the source did not sync")
	}

	pod := func(name string) {
		c.Pod(t, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": "web"}},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "web", Image: "web",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "alt", ContainerPort: 9090}}}}},
		})
	}
	ready := func(i int, ok bool) {
		c.SetPodStatus(t, ns, fmt.Sprintf("web-%d", i), func(s *corev1.PodStatus) {
			now := metav1.Now()
			s.Phase, s.PodIP, s.PodIPs = corev1.PodRunning, pods[i], []corev1.PodIP{{IP: pods[i]}}
			st := corev1.ConditionFalse
			if ok {
				st = corev1.ConditionTrue
			}
			s.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: st, LastTransitionTime: now}}
		})
	}
	for i := range 2 {
		pod(fmt.Sprintf("web-%d", i))
		ready(i, true)
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP + ":80"

	// reached polls with batches of connects until the backends they
	// reach are want (none: refused), or a deadline passes.
	reached := func(t *testing.T, want ...string) {
		t.Helper()
		slices.Sort(want)
		var got []string
		var r clientResult
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
			r = sb.run(t, clientSpec{mode: "tcp", addr: vip, n: 40, inCgroup: true})
			got = got[:0]
			for b := range r.Backends {
				got = append(got, b)
			}
			slices.Sort(got)
			if slices.Equal(got, want) && (len(want) == 0 || r.OK == 40) {
				if len(r.BadPeer) > 0 {
					t.Errorf("getpeername returned %v, want the ClusterIP", r.BadPeer)
				}
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Fatalf("connects to %s reached %v (errors %v), want %v", vip, got, r.Errors, want)
	}

	t.Run("ready pods", func(t *testing.T) { reached(t, "10.244.0.1:8080", "10.244.0.2:8080") })
	t.Run("scale up", func(t *testing.T) {
		pod("web-2")
		ready(2, true)
		reached(t, "10.244.0.1:8080", "10.244.0.2:8080", "10.244.0.3:8080")
	})
	t.Run("session affinity", func(t *testing.T) {
		setAffinity := func(a corev1.ServiceAffinity) {
			s, err := c.Client.CoreV1().Services(ns).Get(ctx, "web", metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			s.Spec.SessionAffinity = a
			if _, err := c.Client.CoreV1().Services(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		// One client (the sandbox's namespace): with affinity, 40 connects
		// reach one of the three pods; without, at random, all three
		// (each missed with chance (2/3)^40).
		spread := func(want func(n int) bool) {
			t.Helper()
			var r clientResult
			for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
				r = sb.run(t, clientSpec{mode: "tcp", addr: vip, n: 40, inCgroup: true})
				if r.OK == 40 && want(len(r.Backends)) {
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
			t.Fatalf("connects reached %v (errors %v)", r.Backends, r.Errors)
		}
		setAffinity(corev1.ServiceAffinityClientIP)
		spread(func(n int) bool { return n == 1 })
		setAffinity(corev1.ServiceAffinityNone)
		spread(func(n int) bool { return n == 3 })
	})
	t.Run("readiness flip", func(t *testing.T) {
		ready(0, false)
		reached(t, "10.244.0.2:8080", "10.244.0.3:8080")
		ready(0, true)
		reached(t, "10.244.0.1:8080", "10.244.0.2:8080", "10.244.0.3:8080")
		ready(0, false)
		reached(t, "10.244.0.2:8080", "10.244.0.3:8080")
	})
	t.Run("scale down", func(t *testing.T) {
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, "web-2", metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
			t.Fatal(err)
		}
		reached(t, "10.244.0.2:8080")
	})
	t.Run("named port change", func(t *testing.T) {
		s, err := c.Client.CoreV1().Services(ns).Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Spec.Ports[0].TargetPort = intstr.FromString("alt")
		if _, err := c.Client.CoreV1().Services(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		reached(t, "10.244.0.2:9090")
	})
	t.Run("terminating fallback", func(t *testing.T) {
		// A graceful delete with no kubelet to finish it: the pod stays,
		// terminating and still serving, and is the only one left.
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, "web-1", metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](300)}); err != nil {
			t.Fatal(err)
		}
		// Wait for the slice to say so before asserting that nothing
		// changed for clients.
		deadline := time.Now().Add(30 * time.Second)
		for {
			l, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=web"})
			if err != nil {
				t.Fatal(err)
			}
			terminating := false
			for _, es := range l.Items {
				for _, e := range es.Endpoints {
					terminating = terminating || ptr.Deref(e.Conditions.Terminating, false)
				}
			}
			if terminating {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the endpoint of web-1 never became terminating")
			}
			time.Sleep(50 * time.Millisecond)
		}
		reached(t, "10.244.0.2:9090")
		// Not serving any more: no backend, connects refused.
		ready(1, false)
		reached(t)
	})
	t.Run("no endpoints: refused and counted", func(t *testing.T) {
		r := sb.run(t, clientSpec{mode: "tcp", addr: vip, n: 5, inCgroup: true})
		if r.Errors[p.RefuseErrno()] != 5 {
			t.Errorf("errors %v, want 5 %s", r.Errors, p.RefuseErrno())
		}
		s, err := p.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		if sv := service(s, "default/web:http"); sv.NoBackend < 5 {
			t.Errorf("no-backend counter %d, want at least 5", sv.NoBackend)
		}
	})
	t.Run("other proxies' and headless services skipped", func(t *testing.T) {
		names := func() map[string]bool {
			s, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			out := map[string]bool{}
			for _, sv := range s.Services {
				out[sv.Name] = true
			}
			return out
		}
		create := func(name string, labels map[string]string, clusterIP string) {
			_, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
				Spec:       corev1.ServiceSpec{ClusterIP: clusterIP, Ports: []corev1.ServicePort{{Port: 80}}},
			}, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
		}
		create("other", map[string]string{"service.kubernetes.io/service-proxy-name": "someone-else"}, "")
		create("headless", nil, corev1.ClusterIPNone)
		// Services arrive in order: once the sentinel is applied, the two
		// before it have been seen.
		create("sentinel", nil, "")
		waitCond(t, "sentinel applied", func() bool { return names()["default/sentinel:80"] })
		if n := names(); n["default/other:80"] || n["default/headless:80"] {
			t.Errorf("services %v: want neither other nor headless", n)
		}
		// A service that becomes another proxy's is removed.
		s, err := c.Client.CoreV1().Services(ns).Get(ctx, "sentinel", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		s.Labels = map[string]string{"service.kubernetes.io/service-proxy-name": "someone-else"}
		if _, err := c.Client.CoreV1().Services(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitCond(t, "sentinel removed", func() bool { return !names()["default/sentinel:80"] })
	})

	lat.mu.Lock()
	defer lat.mu.Unlock()
	if len(lat.d) == 0 {
		t.Error("no network programming latency measured")
	}
	for _, d := range lat.d {
		if d < 0 || d > 30*time.Second {
			t.Errorf("network programming latency %v", d)
		}
	}
	t.Logf("network programming latencies: %v", lat.d)
}

// waitCond polls cond until it holds, or fails t after 30 s.
func waitCond(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestKubernetesAPIServerAway cuts the source off the API server (a proxy
// between them): the datapath keeps serving what it had, without a
// failed connect, and once the API server is back the changes made
// meanwhile are applied.
func TestKubernetesAPIServerAway(t *testing.T) {
	c := kubetest.Start(t)
	ctx := context.Background()
	const ns, node = "default", "node-a"
	c.Node(t, node)
	sb := newSandbox(t)
	ips := []string{"10.244.0.1", "10.244.0.2"}
	for i, ip := range ips {
		if out, err := exec.Command("ip", "-n", sb.NS, "addr", "add", ip+"/32", "dev", "lo").CombinedOutput(); err != nil {
			t.Fatalf("add %s: %v: %s", ip, err, out)
		}
		sb.serveTCP(t, ip+":8080")
		name := fmt.Sprintf("web-%d", i)
		c.Pod(t, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": "web"}},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "web", Image: "web",
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
		})
		c.SetPodStatus(t, ns, name, kubetest.RunningStatus(&corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "web"}}}}, ip))
	}
	svc, err := c.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	vip := svc.Spec.ClusterIP + ":80"

	proxy := c.Proxy(t, true)
	rc, err := kubeclient.Config(c.WriteKubeconfig(t, t.TempDir()+"/kubeconfig", "https://"+proxy.Addr))
	if err != nil {
		t.Fatal(err)
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		t.Fatal(err)
	}
	src, err := kubelb.New(kubelb.Options{Client: client, Node: node, MinSyncPeriod: 50 * time.Millisecond, Log: discard()})
	if err != nil {
		t.Fatal(err)
	}
	p := load(t, Options{Cgroup: sb.Cgroup, Source: src})
	both := []string{"10.244.0.1:8080", "10.244.0.2:8080"}
	backends := func() []string {
		s, err := p.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, b := range service(s, "default/web:http").Backends {
			out = append(out, b.Address)
		}
		slices.Sort(out)
		return out
	}
	waitCond(t, "both pods applied", func() bool { return slices.Equal(backends(), both) })

	// Connects all along, until the end: none may fail.
	cl := sb.start(t, clientSpec{mode: "tcp", addr: vip, n: 1 << 30, inCgroup: true, untilEOF: true})

	proxy.SetUp(false)
	// Meanwhile web-0 stops being ready; the controller-manager updates
	// the slice, which the source cannot see.
	c.SetPodStatus(t, ns, "web-0", func(s *corev1.PodStatus) {
		s.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse, LastTransitionTime: metav1.Now()}}
	})
	waitCond(t, "the slice to show web-0 not ready", func() bool {
		l, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: "kubernetes.io/service-name=web"})
		if err != nil {
			t.Fatal(err)
		}
		for _, es := range l.Items {
			for _, e := range es.Endpoints {
				if len(e.Addresses) > 0 && e.Addresses[0] == ips[0] && !ptr.Deref(e.Conditions.Ready, true) {
					return true
				}
			}
		}
		return false
	})
	// A negative: a source that still saw the API server would have
	// applied the change within a few of its 50 ms sync periods.
	time.Sleep(time.Second)
	if got := backends(); !slices.Equal(got, both) {
		t.Errorf("API server away: backends %v, want the last state %v", got, both)
	}

	proxy.SetUp(true)
	waitCond(t, "the resync after the API server came back", func() bool { return slices.Equal(backends(), []string{"10.244.0.2:8080"}) })
	r := cl.wait(t)
	if r.OK == 0 || len(r.Errors) > 0 {
		t.Errorf("connects while the API server was away and back: %d ok, errors %v", r.OK, r.Errors)
	}
	t.Logf("%d connects, by backend %v", r.OK, r.Backends)
}
