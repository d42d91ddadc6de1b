package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// The binary with KTEL_PROBES=lb and KTEL_LB_SOURCE=kubernetes against a
// real API server and controller-manager: Pods whose IPs are addresses
// listening in a network namespace of the test (no route out), a
// LoadBalancer Service selecting them, and connects from the test's
// cgroup, in that namespace, to the ClusterIP. Connects reach the Pods
// (not through the Service's external IP) and move when one stops being
// ready; the source's metrics move; objects the API server would refuse
// (written to etcd directly) or that ktel cannot serve are skipped and
// counted while the rest is served; SIGTERM leaves nothing in the kernel.
func TestLBKubernetes(t *testing.T) {
	testenv.Privileged(t)
	binary(t) // built before the baseline, not while ktel runs
	c := kubetest.Start(t)
	ctx := context.Background()
	const ns, node = "default", "node-a"
	c.Node(t, node)
	sb := newLBSandbox(t)
	ips := []string{"10.244.0.1", "10.244.0.2", "10.244.0.3"}
	for _, ip := range ips {
		sb.backend(t, ip+":8080")
	}
	for i, ip := range ips[:2] {
		lbPod(t, c, ns, fmt.Sprintf("web-%d", i), node, ip, "web")
	}
	// A LoadBalancer Service (with a node port) is served on its
	// ClusterIP; its external IP is not balanced (README).
	const externalIP = "192.0.2.10" // TEST-NET-1, unrouted in the sandbox
	vip := lbService(t, c, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeLoadBalancer, ExternalIPs: []string{externalIP}, Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
	})

	before := loadedObjects(t)
	start := time.Now()
	d := startDaemon(t, "KTEL_PROBES=lb", "KTEL_LB_SOURCE=kubernetes", "KUBECONFIG="+c.Kubeconfig,
		"KTEL_NODE_NAME="+node, "KTEL_LB_CGROUP="+sb.Cgroup)
	ours := added(before, loadedObjects(t))
	if len(ours.progs) == 0 || len(ours.links) == 0 {
		t.Fatalf("ktel attached nothing: %v", ours)
	}

	const web = `service="default/web:http"`
	sb.reached(t, vip, "10.244.0.1:8080", "10.244.0.2:8080")
	if r := sb.connects(t, externalIP+":80", 5, false).wait(t); r.Errors["ENETUNREACH"] != 5 {
		t.Errorf("connects to the external IP: %+v, want 5 ENETUNREACH (not balanced)", r)
	}
	for _, m := range [][]string{{"ktel_probe_up", `probe="lb"`}, {"ktel_scrape_collector_success", `collector="lb"`}} {
		if v := metricValue(t, d, m[0], m[1]); v != 1 {
			t.Errorf("%s{%s} = %v, want 1", m[0], m[1], v)
		}
	}
	syncs := metricValue(t, d, "ktel_lb_sync_duration_seconds_count")
	if syncs < 1 {
		t.Errorf("ktel_lb_sync_duration_seconds_count = %v, want at least 1", syncs)
	}
	last := metricValue(t, d, "ktel_lb_sync_last_timestamp_seconds")
	if at := time.Unix(0, int64(last*1e9)); at.Before(start) || at.After(time.Now()) {
		t.Errorf("ktel_lb_sync_last_timestamp_seconds = %v (%v), want between ktel's start %v and now", last, at, start)
	}
	// At least the connects of the last batch, to each pod at least one.
	atLeast(t, d, lbBatch, "ktel_lb_service_connections_total", web)
	for _, ip := range ips[:2] {
		atLeast(t, d, 1, "ktel_lb_backend_connections_total", fmt.Sprintf(`backend="%s:8080"`, ip), web)
	}
	promtoolCheck(t, d.text(t))

	t.Run("skipped and counted, the rest served", func(t *testing.T) {
		lbSkipped(t, c, sb, d, vip)
	})

	t.Run("scale down", func(t *testing.T) {
		programmed := metricValue(t, d, "ktel_lb_network_programming_duration_seconds_count")
		c.SetPodStatus(t, ns, "web-1", notReady)
		sb.reached(t, vip, "10.244.0.1:8080")
		// The sync that applied it was measured, and so was the time from
		// the slice's trigger time to the map writes.
		if v := metricValue(t, d, "ktel_lb_sync_duration_seconds_count"); v <= syncs {
			t.Errorf("ktel_lb_sync_duration_seconds_count = %v, not more than %v before", v, syncs)
		}
		n := metricValue(t, d, "ktel_lb_network_programming_duration_seconds_count")
		if n <= programmed {
			t.Errorf("ktel_lb_network_programming_duration_seconds_count = %v, not more than %v before the change", n, programmed)
		}
		if v := metricValue(t, d, "ktel_lb_network_programming_duration_seconds_sum"); v <= 0 || v > 60*n {
			t.Errorf("ktel_lb_network_programming_duration_seconds_sum = %v over %v changes, want a positive time under a minute each", v, n)
		} else {
			t.Logf("network programming: %v changes, %.3f s on average", n, v/n)
		}
	})

	t.Run("no endpoints: refused and counted", func(t *testing.T) {
		if err := c.Client.CoreV1().Pods(ns).Delete(ctx, "web-0", metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
			t.Fatal(err)
		}
		sb.reached(t, vip)
		atLeast(t, d, lbBatch, "ktel_lb_no_backend_total", web)
	})

	ours.merge(added(before, loadedObjects(t)))
	if ps := d.stop(t, syscall.SIGTERM); ps.ExitCode() != 0 {
		t.Errorf("exit status %v, want 0\nstderr:\n%s", ps, d.Stderr)
	}
	checkLog(t, d.Stderr.String())
	waitReleased(t, ours, d.Stderr)
	if out, err := exec.Command("bpftool", "cgroup", "show", sb.Cgroup).CombinedOutput(); err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("bpftool cgroup show %s after ktel stopped: %v\n%s", sb.Cgroup, err, out)
	}
}

// The binary reads the API server through a proxy that the test cuts;
// meanwhile the API server is restarted (its watch cache starts afresh),
// one of the Service's Pods stops being ready and another Service is
// deleted. The datapath keeps serving the last state without a failed
// connect; once the API server is reachable again, both changes are
// applied, and connects made all along never fail.
func TestLBKubernetesAPIServerRestart(t *testing.T) {
	testenv.Privileged(t)
	binary(t)
	c := kubetest.Start(t)
	ctx := context.Background()
	const ns, node = "default", "node-a"
	c.Node(t, node)
	sb := newLBSandbox(t)
	for i, ip := range []string{"10.244.0.1", "10.244.0.2", "10.244.0.3"} {
		sb.backend(t, ip+":8080")
		app := "web"
		if i == 2 {
			app = "gone"
		}
		lbPod(t, c, ns, fmt.Sprintf("%s-%d", app, i), node, ip, app)
	}
	service := func(app string) string {
		return lbService(t, c, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: app},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": app},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}}},
		})
	}
	web, gone := service("web"), service("gone")

	proxy := c.Proxy(t, true)
	kubeconfig := c.WriteKubeconfig(t, t.TempDir()+"/kubeconfig", "https://"+proxy.Addr)
	// No KTEL_NODE_NAME (the host name, then; every Service here is
	// cluster-wide): nothing but lb's source talks to the API server.
	d := startDaemon(t, "KTEL_PROBES=lb", "KTEL_LB_SOURCE=kubernetes", "KUBECONFIG="+kubeconfig, "KTEL_LB_CGROUP="+sb.Cgroup)
	both := []string{"10.244.0.1:8080", "10.244.0.2:8080"}
	sb.reached(t, web, both...)
	sb.reached(t, gone, "10.244.0.3:8080")

	// Connects all along, until the end: none may fail.
	all := sb.connects(t, web, 1<<30, true)

	proxy.SetUp(false)
	restarted := time.Now()
	c.RestartAPIServer(t)
	t.Logf("kube-apiserver restarted in %v", time.Since(restarted).Round(time.Millisecond))
	c.SetPodStatus(t, ns, "web-0", notReady)
	if err := c.Client.CoreV1().Services(ns).Delete(ctx, "gone", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the controller-manager to mark web-0 not ready in the slice", func() bool {
		l, err := c.Client.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{LabelSelector: discovery.LabelServiceName + "=web"})
		if err != nil {
			t.Fatal(err)
		}
		for _, es := range l.Items {
			for _, e := range es.Endpoints {
				if e.Addresses[0] == "10.244.0.1" && !ptr.Deref(e.Conditions.Ready, true) {
					return true
				}
			}
		}
		return false
	})
	// A negative: ktel, cut off, serves what it had; a ktel that saw the
	// API server would have applied both changes within a few of its 1 s
	// sync periods.
	time.Sleep(3 * time.Second)
	if r := sb.connects(t, web, lbBatch, false).wait(t); r.OK != lbBatch || len(r.Backends) != 2 {
		t.Errorf("API server away: connects to web reached %v (errors %v), want the last state %v", r.Backends, r.Errors, both)
	}
	sb.reached(t, gone, "10.244.0.3:8080")

	proxy.SetUp(true)
	back := time.Now()
	sb.reached(t, web, "10.244.0.2:8080")
	t.Logf("web-0 gone from web %v after the API server could be reached again", time.Since(back).Round(time.Millisecond))
	// gone's ClusterIP is no service any more: not rewritten, and the
	// sandbox has no route to it.
	waitFor(t, "gone removed", func() bool {
		r := sb.connects(t, gone, 1, false).wait(t)
		return r.Errors["ENETUNREACH"] == 1
	})
	r := all.wait(t)
	if r.OK == 0 || len(r.Errors) > 0 {
		t.Errorf("connects to web while the API server was away, restarted and back: %d ok, errors %v", r.OK, r.Errors)
	}
	t.Logf("%d connects to web, by backend %v", r.OK, r.Backends)
	if last := metricValue(t, d, "ktel_lb_sync_last_timestamp_seconds"); time.Unix(0, int64(last*1e9)).Before(restarted) {
		t.Errorf("ktel_lb_sync_last_timestamp_seconds = %v, before the restart", last)
	}
	if v := metricValue(t, d, "ktel_probe_up", `probe="lb"`); v != 1 {
		t.Errorf(`ktel_probe_up{probe="lb"} = %v, want 1`, v)
	}
	// client-go's complaints meanwhile went through ktel's logger, not
	// klog's own text on stderr.
	for _, line := range strings.Split(strings.TrimSpace(d.Stderr.String()), "\n") {
		if _, err := parseRecord(line); err != nil {
			t.Errorf("stderr line %q: %v", line, err)
		}
	}
}

// waitFor polls cond until it holds, failing t after 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// lbSkipped adds, next to the Service at vip (default/web, with backends
// 10.244.0.1 and .2), objects ktel must skip and count in
// ktel_lb_kubernetes_skipped: a Service with web's ClusterIP and port, and
// one whose ClusterIP does not parse (both written to etcd directly, as
// the API server refuses them), an SCTP port, a Service whose
// namespace/name:port is longer than the 128 bytes of a service name, and
// a multicast endpoint address (which the API server accepts). web and the
// good endpoint of the bad slice are served all along.
func lbSkipped(t *testing.T, c *kubetest.Cluster, sb *lbSandbox, d *ktelProc, vip string) {
	ctx := context.Background()
	const ns = "default"

	// The API server's own encoding of a Service, under another name, a
	// new uid and no resourceVersion.
	stored, err := c.Client.CoreV1().Services(ns).Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	unchecked := func(name, clusterIP string) {
		s := stored.DeepCopy()
		s.TypeMeta = metav1.TypeMeta{APIVersion: "v1", Kind: "Service"}
		s.Name, s.UID, s.ResourceVersion, s.ManagedFields = name, types.UID(fmt.Sprintf("00000000-0000-0000-0000-%012d", len(name))), "", nil
		s.Spec.Selector = nil
		s.Spec.ClusterIP, s.Spec.ClusterIPs = clusterIP, []string{clusterIP}
		c.StoreUnchecked(t, "/registry/services/specs/"+ns+"/"+name, s)
	}
	// Named to sort after web: whichever of the two ktel keeps, it is the
	// older (and first by name).
	unchecked("zz-same-vip", stored.Spec.ClusterIP)
	unchecked("bad-ip", "10.0.0.300")

	lbService(t, c, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "sctp"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "sig", Port: 3868, Protocol: corev1.ProtocolSCTP},
			{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP}, // served
		}},
	})
	long := strings.Repeat("n", 63)
	if _, err := c.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: long}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	lbService(t, c, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: long, Name: strings.Repeat("s", 63)},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: strings.Repeat("p", 15), Port: 80}}},
	})

	// A Service without a selector and a slice of its own: one good
	// endpoint and one multicast address.
	manualVIP := lbService(t, c, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "manual"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	})
	_, err = c.Client.DiscoveryV1().EndpointSlices(ns).Create(ctx, &discovery.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "manual-1", Labels: map[string]string{
			discovery.LabelServiceName: "manual", discovery.LabelManagedBy: "ktel-e2e"}},
		AddressType: discovery.AddressTypeIPv4,
		Ports:       []discovery.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints: []discovery.Endpoint{
			{Addresses: []string{"239.1.2.3"}},
			{Addresses: []string{"10.244.0.3"}, Conditions: discovery.EndpointConditions{Ready: ptr.To(true)}},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}

	want := map[string]float64{"conflict": 1, "invalid_ip": 1, "protocol": 1, "invalid_name": 1, "invalid_endpoint": 1}
	got := map[string]float64{}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		for reason := range want {
			got[reason] = metricValue(t, d, "ktel_lb_kubernetes_skipped", fmt.Sprintf(`reason="%s"`, reason))
		}
		if maps.Equal(got, want) {
			t.Logf("ktel_lb_kubernetes_skipped by reason: %v", got)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ktel_lb_kubernetes_skipped by reason %v, want %v\nstderr:\n%s", got, want, d.Stderr)
		}
	}
	sb.reached(t, vip, "10.244.0.1:8080", "10.244.0.2:8080")
	sb.reached(t, manualVIP, "10.244.0.3:8080")
	// The TCP port of the Service with an SCTP one is served: no
	// endpoints, so refused (not unreachable: unknown to ktel).
	sctp, err := c.Client.CoreV1().Services(ns).Get(ctx, "sctp", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	sb.reached(t, sctp.Spec.ClusterIP+":80")
}

// text scrapes the text format.
func (d *ktelProc) text(t *testing.T) []byte {
	t.Helper()
	b, _ := d.scrape(t, textFormat)
	return b
}

// atLeast polls until the samples of name with labels add up to at least
// min, failing t after 30 s: lb's counters are read from its maps at most
// once a second (metrics.DefaultMaxAge), so a scrape may not show the
// last connects yet.
func atLeast(t *testing.T, d *ktelProc, min float64, name string, labels ...string) {
	t.Helper()
	var v float64
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if v = metricValue(t, d, name, labels...); v >= min {
			return
		}
	}
	t.Errorf("%s%v = %v, want at least %v", name, labels, v, min)
}

// lbPod creates a Pod labelled app=app on node with a container port
// named http (8080), Running and Ready with ip as its address, as a
// kubelet would report it.
func lbPod(t *testing.T, c *kubetest.Cluster, ns, name, node, ip, app string) {
	t.Helper()
	p := c.Pod(t, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": app}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: app, Image: app,
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}},
	})
	c.SetPodStatus(t, ns, name, kubetest.RunningStatus(p, ip))
}

// notReady is a pod status change for SetPodStatus: not ready any more.
func notReady(s *corev1.PodStatus) {
	s.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionFalse, LastTransitionTime: metav1.Now()}}
}

// lbService creates svc and returns its first port's VIP (ClusterIP:port).
func lbService(t *testing.T, c *kubetest.Cluster, svc *corev1.Service) string {
	t.Helper()
	s, err := c.Client.CoreV1().Services(svc.Namespace).Create(context.Background(), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service %s/%s: %v", svc.Namespace, svc.Name, err)
	}
	return net.JoinHostPort(s.Spec.ClusterIP, strconv.Itoa(int(s.Spec.Ports[0].Port)))
}

// An lbSandbox is a testenv.Sandbox (a network namespace with no route
// out, and a cgroup for lb) with backends in it.
type lbSandbox struct{ *testenv.Sandbox }

func newLBSandbox(t *testing.T) *lbSandbox {
	t.Helper()
	return &lbSandbox{testenv.NewSandbox(t, fmt.Sprintf("ktel-e2e-lb-%d", time.Now().UnixNano()%1e6))}
}

// backend adds addr's IP to the namespace's loopback and answers every
// connection to addr with addr and a newline.
func (sb *lbSandbox) backend(t *testing.T, addr string) {
	t.Helper()
	host, _, _ := net.SplitHostPort(addr)
	testenv.Run(t, []string{"ip", "-n", sb.NS, "addr", "add", host + "/32", "dev", "lo"})
	sb.ServeAddr(t, addr)
}

// lbResult is what a connecting client reports.
type lbResult struct {
	OK       int            `json:"ok"`
	Backends map[string]int `json:"backends"` // answers by backend
	Errors   map[string]int `json:"errors"`   // failed connects by errno
}

// lbBatch is how many connects reached makes at a time.
const lbBatch = 40

// reached polls with batches of connects to vip, from the sandbox's
// cgroup, until the backends that answer are want and every connect
// succeeds, or, with want empty, until every connect is refused (the
// service has no backend).
func (sb *lbSandbox) reached(t *testing.T, vip string, want ...string) {
	t.Helper()
	slices.Sort(want)
	var got []string
	var r lbResult
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		r = sb.connects(t, vip, lbBatch, false).wait(t)
		got = got[:0]
		for b := range r.Backends {
			got = append(got, b)
		}
		slices.Sort(got)
		if len(want) == 0 && r.Errors["ECONNREFUSED"] == lbBatch || len(want) > 0 && r.OK == lbBatch && slices.Equal(got, want) {
			return
		}
	}
	t.Fatalf("connects to %s reached %v (errors %v), want %v (none: refused)", vip, got, r.Errors, want)
}

// connects starts a client that connects to vip n times in turn, in the
// sandbox's namespace and cgroup (TestHelperLBConnects); with untilEOF, it
// also stops when wait closes its stdin.
func (sb *lbSandbox) connects(t *testing.T, vip string, n int, untilEOF bool) *lbClient {
	t.Helper()
	return &lbClient{sb.StartHelper(t, "TestHelperLBConnects", true,
		"LBE2E_VIP="+vip, "LBE2E_N="+strconv.Itoa(n), "LBE2E_UNTIL_EOF="+strconv.FormatBool(untilEOF))}
}

// lbClient is a running client process.
type lbClient struct{ *testenv.Helper }

// wait stops the client (if it has not stopped) and returns its result.
func (c *lbClient) wait(t *testing.T) lbResult {
	t.Helper()
	var r lbResult
	c.Wait(t, &r)
	return r
}

// TestHelperLBConnects is the client process of the lb tests; it does
// nothing in a normal test run. It joins the sandbox's cgroup before it
// opens a socket, connects LBE2E_N times in turn (for two minutes at most,
// and, with LBE2E_UNTIL_EOF=true, until its stdin closes) and prints an
// lbResult.
func TestHelperLBConnects(t *testing.T) {
	vip := os.Getenv("LBE2E_VIP")
	if vip == "" {
		return
	}
	if err := testenv.JoinSandboxCgroup(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	n, _ := strconv.Atoi(os.Getenv("LBE2E_N"))
	var eof atomic.Bool
	var pause time.Duration
	if os.Getenv("LBE2E_UNTIL_EOF") == "true" {
		// Connects all along, not as many as two CPUs can make.
		pause = 2 * time.Millisecond
		go func() {
			io.Copy(io.Discard, os.Stdin)
			eof.Store(true)
		}()
	}
	deadline := time.Now().Add(2 * time.Minute)
	r := lbResult{Backends: map[string]int{}, Errors: map[string]int{}}
	for i := 0; i < n && !eof.Load() && time.Now().Before(deadline); i++ {
		backend, err := testenv.AskAddr(vip, 2*time.Second)
		var errno syscall.Errno
		switch {
		case errors.As(err, &errno):
			r.Errors[unix.ErrnoName(errno)]++
		case err != nil:
			r.Errors[err.Error()]++
		default:
			r.OK++
			r.Backends[backend]++
		}
		time.Sleep(pause)
	}
	out, _ := json.Marshal(r)
	os.Stdout.Write(out)
	os.Exit(0)
}
