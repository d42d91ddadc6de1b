package podnet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/k8smeta"
)

// fakeNet is a namespace: links, routes (address -> ifindex) and the
// addresses in peer namespaces (nsid, peer ifindex).
type fakeNet struct {
	mu      sync.Mutex
	links   map[int]Link
	routes  map[netip.Addr]int
	peers   map[[2]int][]netip.Addr
	peerErr error
	listErr error
}

func (f *fakeNet) Links() (map[int]Link, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.listErr != nil {
		return nil, f.listErr
	}
	out := map[int]Link{}
	for k, v := range f.links {
		out[k] = v
	}
	return out, nil
}

func (f *fakeNet) RouteDev(ip netip.Addr) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if idx, ok := f.routes[ip]; ok {
		return idx, nil
	}
	return 0, errors.New("network unreachable")
}

func (f *fakeNet) PeerAddrs(nsid, peer int) ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.peerErr != nil {
		return nil, f.peerErr
	}
	return f.peers[[2]int{nsid, peer}], nil
}

var ip = netip.MustParseAddr

// node: eth0 (2), a Calico-style pod veth (10, route per pod), flannel's
// cni0 bridge (3) with two pods' veths (11, 12), a veth to a namespace
// that is no pod's (13), and cilium_host/cilium_net, a veth pair within
// the host (14, 15).
func node() *fakeNet {
	return &fakeNet{
		links: map[int]Link{
			2:  {Index: 2, Kind: "device", NetNsID: -1},
			3:  {Index: 3, Kind: "bridge", NetNsID: -1},
			10: {Index: 10, Kind: "veth", NetNsID: 0, Peer: 2},
			11: {Index: 11, Kind: "veth", NetNsID: 1, Peer: 2},
			12: {Index: 12, Kind: "netkit", NetNsID: 2, Peer: 3},
			13: {Index: 13, Kind: "veth", NetNsID: 3, Peer: 2},
			14: {Index: 14, Kind: "veth", NetNsID: -1, Peer: 15},
			15: {Index: 15, Kind: "veth", NetNsID: -1, Peer: 14},
		},
		routes: map[netip.Addr]int{
			ip("10.0.0.5"): 10, ip("fd00::5"): 10,
			ip("10.244.0.2"): 3, ip("10.244.0.3"): 3,
			ip("10.9.0.1"): 14, // routed into cilium_host: no pod's own
		},
		peers: map[[2]int][]netip.Addr{
			{0, 2}: {ip("10.0.0.5"), ip("fd00::5")},
			{1, 2}: {ip("10.244.0.2")},
			{2, 3}: {ip("10.244.0.3")},
			{3, 2}: {ip("10.77.0.1")},
		},
	}
}

func TestResolve(t *testing.T) {
	pods := []netip.Addr{ip("fd00::5"), ip("10.0.0.5"), ip("10.244.0.2"), ip("10.244.0.3"), ip("10.9.0.1"), ip("10.0.0.99")}
	got, unmapped, errs, err := resolve(node(), pods)
	if err != nil {
		t.Fatal(err)
	}
	want := map[int][]netip.Addr{
		10: {ip("10.0.0.5"), ip("fd00::5")}, // by route
		11: {ip("10.244.0.2")},              // by peer address (bridged)
		12: {ip("10.244.0.3")},              // netkit likewise
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("resolve = %v, want %v", got, want)
	}
	if errs.route == nil || errs.peer != nil {
		t.Errorf("errors %+v: want the unroutable address's only", errs)
	}
	if fmt.Sprint(unmapped) != "[13]" {
		t.Errorf("unmapped pod-side interfaces %v, want the stranger's [13]", unmapped)
	}

	// Without peer addresses (a kernel before 4.20): routed pods only.
	n := node()
	n.peerErr = errors.New("invalid argument")
	got, _, errs, _ = resolve(n, pods)
	if fmt.Sprint(got) != fmt.Sprint(map[int][]netip.Addr{10: {ip("10.0.0.5"), ip("fd00::5")}}) || errs.peer == nil {
		t.Errorf("without peer addresses: %v, %+v", got, errs)
	}
}

// fakePods is the informer: addresses to labels.
type fakePods struct {
	mu      sync.Mutex
	byIP    map[netip.Addr]k8smeta.Labels
	changed chan struct{}
}

func (f *fakePods) PodIPs() []netip.Addr {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []netip.Addr
	for a := range f.byIP {
		out = append(out, a)
	}
	return out
}

func (f *fakePods) PodsChanged() <-chan struct{} { return f.changed }

func (f *fakePods) PodByIP(a netip.Addr) (k8smeta.Labels, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	l, ok := f.byIP[a]
	return l, ok
}

func (f *fakePods) set(a string, l k8smeta.Labels) {
	f.mu.Lock()
	if l == (k8smeta.Labels{}) {
		delete(f.byIP, ip(a))
	} else {
		f.byIP[ip(a)] = l
	}
	f.mu.Unlock()
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

// The mapper resolves when pods change and when links do, and labels
// come from the informer at each lookup (overflow included).
func TestMapper(t *testing.T) {
	n := node()
	pods := &fakePods{byIP: map[netip.Addr]k8smeta.Labels{
		ip("10.0.0.5"): {Namespace: "team-a", Pod: "web"},
	}, changed: make(chan struct{}, 1)}
	m := NewMapper(n, pods, slog.New(slog.DiscardHandler))
	links := make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx, links) }()
	defer func() { cancel(); <-done }()

	// waitFor waits until ifindex idx maps to namespace/pod, triggering
	// with signal first.
	waitFor := func(signal func(), idx int, ns, pod string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			resolved := m.Resolved()
			if gotNS, gotPod := m.PodOf(idx); gotNS == ns && gotPod == pod {
				return
			}
			if signal != nil {
				signal()
				signal = nil
			}
			select {
			case <-resolved:
			case <-time.After(time.Until(deadline)):
				gotNS, gotPod := m.PodOf(idx)
				t.Fatalf("interface %d: %q/%q, want %q/%q", idx, gotNS, gotPod, ns, pod)
			}
		}
	}
	waitFor(nil, 10, "team-a", "web")
	if ns, pod := m.PodOf(2); ns != "" || pod != "" {
		t.Errorf("eth0: %s/%s, want no pod", ns, pod)
	}
	if ns, pod := m.PodOf(11); ns != "" || pod != "" {
		t.Errorf("a veth before its pod is known: %s/%s", ns, pod)
	}

	// A pod gets its address: its veth (on the bridge) is labelled.
	waitFor(func() { pods.set("10.244.0.2", k8smeta.Labels{Namespace: "team-b", Pod: "db"}) }, 11, "team-b", "db")
	// Beyond the cap, the informer answers "other".
	waitFor(func() {
		pods.set("10.244.0.3", k8smeta.Labels{Namespace: k8smeta.Overflow, Pod: k8smeta.Overflow})
	}, 12, k8smeta.Overflow, k8smeta.Overflow)

	// A new veth appears (hotplug) for a pod already known.
	pods.set("10.244.0.9", k8smeta.Labels{Namespace: "team-c", Pod: "cache"})
	n.mu.Lock()
	n.links[20] = Link{Index: 20, Kind: "veth", NetNsID: 4, Peer: 2}
	n.peers[[2]int{4, 2}] = []netip.Addr{ip("10.244.0.9")}
	n.mu.Unlock()
	waitFor(func() { links <- struct{}{} }, 20, "team-c", "cache")

	// A veth whose pod gets its address only after the veth appeared,
	// with no event of the pod or link after: found by the retry.
	pods.set("10.244.0.10", k8smeta.Labels{Namespace: "team-c", Pod: "late"})
	n.mu.Lock()
	n.links[21] = Link{Index: 21, Kind: "veth", NetNsID: 5, Peer: 2}
	n.mu.Unlock()
	links <- struct{}{}
	<-m.Resolved()
	n.mu.Lock()
	n.peers[[2]int{5, 2}] = []netip.Addr{ip("10.244.0.10")}
	n.mu.Unlock()
	waitFor(nil, 21, "team-c", "late")

	// The pod is forgotten (deleted, and its TTL passed): no labels.
	waitFor(func() { pods.set("10.0.0.5", k8smeta.Labels{}) }, 10, "", "")
}

// A pod-side interface not mapped makes the mapper try again soon, for
// newLink after it first saw it, and not after.
func TestRetryNewLinks(t *testing.T) {
	pods := &fakePods{byIP: map[netip.Addr]k8smeta.Labels{ip("10.0.0.5"): {Namespace: "team-a", Pod: "web"}}, changed: make(chan struct{}, 1)}
	m := NewMapper(node(), pods, slog.New(slog.DiscardHandler))
	var warned resolveErrors
	unmapped := map[int]time.Time{}
	// 11, 12 (no pod has their peers' addresses yet) and 13 (no pod's).
	if !m.refresh(&warned, unmapped) || len(unmapped) != 3 {
		t.Fatalf("new unmapped interfaces %v: no retry", unmapped)
	}
	first := unmapped[13]
	if !m.refresh(&warned, unmapped) || unmapped[13] != first {
		t.Errorf("second try: first seen %v, was %v", unmapped[13], first)
	}
	for idx := range unmapped {
		unmapped[idx] = time.Now().Add(-newLink)
	}
	if m.refresh(&warned, unmapped) {
		t.Errorf("retrying interfaces unmapped for %v", newLink)
	}
	if warned.route != nil || warned.peer != nil {
		t.Errorf("errors %+v", warned)
	}
}

// An error that recurs on every resolution (every resync, every change)
// is a warning once, then debug.
func TestWarnOnce(t *testing.T) {
	var logged strings.Builder
	log := slog.New(slog.NewTextHandler(&logged, &slog.HandlerOptions{Level: slog.LevelDebug}))
	n := node()
	n.listErr = errors.New("netlink: operation not permitted")
	n.peerErr = errors.New("invalid argument")
	pods := &fakePods{byIP: map[netip.Addr]k8smeta.Labels{ip("10.0.0.99"): {Namespace: "team-a", Pod: "web"}}, changed: make(chan struct{}, 1)}
	m := NewMapper(n, pods, log)
	var warned resolveErrors
	for range 3 {
		m.refresh(&warned, map[int]time.Time{})
	}
	n.mu.Lock()
	n.listErr = nil
	n.mu.Unlock()
	for range 3 {
		m.refresh(&warned, map[int]time.Time{})
	}
	for msg, want := range map[string]int{"cannot map interfaces": 1, "route lookup": 1, "cannot list the addresses": 1} {
		if got := strings.Count(logged.String(), "level=WARN msg=\""+msg); got != want {
			t.Errorf("%q warned %d times, want %d:\n%s", msg, got, want, logged.String())
		}
	}
	if !strings.Contains(logged.String(), "level=DEBUG msg=\"cannot map interfaces") {
		t.Errorf("the recurring listing error not logged at debug:\n%s", logged.String())
	}
}
