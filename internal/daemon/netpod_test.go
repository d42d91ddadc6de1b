package daemon

import (
	"bytes"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ktel-dev/ktel/internal/kubetest"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// With KTEL_NODE_NAME, against a real API server: netdev's series of a
// pod's host-side veth carry the pod's namespace and name, found by the
// route to the pod (as Calico or the ptp plugin wire pods) or by the
// address of the veth's peer (a bridge plugin's pod), for a pod created
// after its veth and for a veth created after its pod; other interfaces
// have empty ones. The "host" is a network namespace of the test's own.
func TestNetdevPerPod(t *testing.T) {
	testenv.Privileged(t)
	c := kubetest.Start(t)
	c.Node(t, "node-a")
	c.Namespace(t, "team-a", nil)
	t.Setenv("KUBECONFIG", c.Kubeconfig)

	netns := func(suffix string) string {
		name := fmt.Sprintf("ktel-np-%d-%s", os.Getpid(), suffix)
		testenv.NewNetns(t, name)
		return name
	}
	host, web, db, stranger := netns("host"), netns("web"), netns("db"), netns("stranger")
	// The routed pod: 10.244.1.2/32 in its namespace, a /32 route to it
	// through its veth in the host, which answers from 10.244.1.1.
	testenv.Sh(t, "ip", "-n", host, "link", "add", "veth-web", "type", "veth", "peer", "name", "eth0", "netns", web)
	testenv.Sh(t, "ip", "-n", host, "addr", "add", "10.244.1.1/32", "dev", "veth-web")
	testenv.Sh(t, "ip", "-n", host, "link", "set", "veth-web", "up")
	testenv.Sh(t, "ip", "-n", web, "addr", "add", "10.244.1.2/32", "dev", "eth0")
	testenv.Sh(t, "ip", "-n", web, "link", "set", "eth0", "up")
	testenv.Sh(t, "ip", "-n", web, "route", "add", "10.244.1.1/32", "dev", "eth0", "scope", "link")
	testenv.Sh(t, "ip", "-n", host, "route", "add", "10.244.1.2/32", "dev", "veth-web", "scope", "link")
	// A veth to a namespace that is no pod's, though a hostNetwork pod
	// has its address (a hostNetwork pod's addresses are the node's).
	testenv.Sh(t, "ip", "-n", host, "link", "add", "veth-x", "type", "veth", "peer", "name", "eth0", "netns", stranger)
	testenv.Sh(t, "ip", "-n", host, "link", "set", "veth-x", "up")
	testenv.Sh(t, "ip", "-n", stranger, "addr", "add", "10.244.9.2/32", "dev", "eth0")
	testenv.Sh(t, "ip", "-n", stranger, "link", "set", "eth0", "up")
	testenv.Sh(t, "ip", "-n", host, "route", "add", "10.244.9.2/32", "dev", "veth-x", "scope", "link")
	testenv.WaitUp(t, host, "veth-web")
	testenv.WaitUp(t, host, "veth-x")

	pod := func(ns, name, ip string, hostNetwork bool) {
		p := c.Pod(t, &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
			Spec: corev1.PodSpec{NodeName: "node-a", HostNetwork: hostNetwork, Containers: []corev1.Container{{Name: "app", Image: "registry.example/app"}}}})
		c.SetPodStatus(t, ns, name, kubetest.RunningStatus(p, ip))
	}
	pod("default", "db", "10.244.2.2", false)
	pod("kube-system", "agent", "10.244.9.2", true)

	cfg := testConfig("netdev", false)
	cfg.Interfaces, cfg.NetdevHook, cfg.NetdevTCMode, cfg.NetdevMaxInterfaces = "veth*", "tc", "auto", 16
	cfg.NetdevNetNS = testenv.NetnsPath(host)
	cfg.NodeName, cfg.WorkloadLabelTTL, cfg.WorkloadMaxLabelSets = "node-a", time.Minute, 100
	d, err := newDaemon(cfg, slog.New(slog.DiscardHandler), starters())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Running() != 1 {
		t.Fatal("netdev did not start")
	}

	// udpOut is the egress ipv4_udp packets of interface dev with pod
	// labels ns/name, summed over CPUs; -1 when there is no such series.
	udpOut := func(dev, ns, name string) int {
		t.Helper()
		mfs, err := d.reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		n := -1
		for _, mf := range mfs {
			if mf.GetName() != "ktel_net_packets_total" {
				continue
			}
			for _, m := range mf.GetMetric() {
				l := labels(m)
				if l["interface"] == dev && l["namespace"] == ns && l["pod"] == name && l["direction"] == "egress" && l["protocol"] == "ipv4_udp" {
					n = max(n, 0) + int(m.GetCounter().GetValue())
				}
			}
		}
		return n
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("after 15 s: %s", what)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	const n = 50
	send := func(to string) {
		t.Helper()
		sendUDP(t, host, netip.MustParseAddr(to), n)
	}

	// Before its pod exists, veth-web's series has empty pod labels.
	send("10.244.1.2")
	waitFor("veth-web's unlabelled series", func() bool { return udpOut("veth-web", "", "") == n })

	// The pod appears: the same interface's counter, now labelled.
	pod("team-a", "web", "10.244.1.2", false)
	waitFor("veth-web labelled team-a/web", func() bool { return udpOut("veth-web", "team-a", "web") == n })
	if got := udpOut("veth-web", "", ""); got != -1 {
		t.Errorf("veth-web's unlabelled series still there (%d)", got)
	}
	send("10.244.1.2")
	waitFor("veth-web's labelled series moved", func() bool { return udpOut("veth-web", "team-a", "web") == 2*n })

	// A bridge plugin's pod whose veth appears after the pod: its address
	// is on the veth's peer; the route leads to the bridge.
	testenv.Sh(t, "ip", "-n", host, "link", "add", "br0", "type", "bridge")
	testenv.Sh(t, "ip", "-n", host, "addr", "add", "10.244.2.1/24", "dev", "br0")
	testenv.Sh(t, "ip", "-n", host, "link", "set", "br0", "up")
	testenv.Sh(t, "ip", "-n", host, "link", "add", "veth-db", "type", "veth", "peer", "name", "eth0", "netns", db)
	testenv.Sh(t, "ip", "-n", host, "link", "set", "veth-db", "master", "br0", "up")
	testenv.Sh(t, "ip", "-n", db, "addr", "add", "10.244.2.2/24", "dev", "eth0")
	testenv.Sh(t, "ip", "-n", db, "link", "set", "eth0", "up")
	testenv.WaitUp(t, host, "veth-db")
	testenv.WaitUp(t, db, "eth0")
	send("10.244.2.2")
	waitFor("veth-db labelled default/db", func() bool { return udpOut("veth-db", "default", "db") == n })

	// No pod's veth: empty labels, though a hostNetwork pod has the
	// address of its peer.
	send("10.244.9.2")
	waitFor("veth-x's unlabelled series", func() bool { return udpOut("veth-x", "", "") == n })
	if got := udpOut("veth-x", "kube-system", "agent"); got != -1 {
		t.Errorf("veth-x labelled with the hostNetwork pod (%d packets)", got)
	}

	// The exposition, pod labels and all, passes promtool's lint.
	rec := httptest.NewRecorder()
	d.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = bytes.NewReader(rec.Body.Bytes())
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	if !strings.Contains(rec.Body.String(), `interface="veth-db",namespace="default",pod="db"`) {
		t.Errorf("no veth-db series with its pod in the exposition:\n%s", rec.Body.String())
	}
}

func labels(m *dto.Metric) map[string]string {
	out := map[string]string{}
	for _, l := range m.GetLabel() {
		out[l.GetName()] = l.GetValue()
	}
	return out
}

// sendUDP sends n datagrams from network namespace ns to port 9 of to.
func sendUDP(t *testing.T, ns string, to netip.Addr, n int) {
	t.Helper()
	_, err := testenv.InNetns(ns, func() (struct{}, error) {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return struct{}{}, err
		}
		defer unix.Close(fd)
		for i := range n {
			if err := unix.Sendto(fd, []byte("ktel"), 0, &unix.SockaddrInet4{Addr: to.As4(), Port: 9}); err != nil {
				return struct{}{}, fmt.Errorf("send %d: %w", i, err)
			}
		}
		return struct{}{}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
