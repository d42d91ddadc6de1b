package k8smeta

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func withIPs(p *corev1.Pod, ips ...string) *corev1.Pod {
	for _, ip := range ips {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if len(ips) > 0 {
		p.Status.PodIP = ips[0]
	}
	return p
}

// Pods' addresses resolve to their pods: both families, not hostNetwork
// pods', a deleted pod's for the TTL unless a new pod has the address
// already, and within the label-set cap.
func TestPodByIP(t *testing.T) {
	const ttl = time.Minute
	clk := &clock{now: time.Unix(1_000_000, 0)}
	host := withIPs(testPod(3, "kube-system"), "192.0.2.10")
	host.Spec.HostNetwork = true
	client := fake.NewClientset(withIPs(testPod(1, "ns1"), "10.1.0.5", "fd00::5"), withIPs(testPod(2, "ns2"), "10.1.0.6"), host)
	r, err := New(Options{NodeName: node, Client: client, Root: t.TempDir(), TTL: ttl, MaxLabelSets: 3,
		RescanInterval: time.Hour, MinRescan: time.Hour, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	start(t, r)
	eventually(t, 10*time.Second, "informer not synced", r.Synced)
	<-r.PodsChanged() // the initial list sent at least one

	ip := netip.MustParseAddr
	check := func(what, addr string, want Labels, wantOK bool) {
		t.Helper()
		if got, ok := r.PodByIP(ip(addr)); got != want || ok != wantOK {
			t.Errorf("%s: PodByIP(%s) = %+v, %v; want %+v, %v", what, addr, got, ok, want, wantOK)
		}
	}
	check("pod", "10.1.0.5", Labels{Namespace: "ns1", Pod: "pod-1"}, true)
	check("IPv6", "fd00::5", Labels{Namespace: "ns1", Pod: "pod-1"}, true)
	check("mapped IPv4", "::ffff:10.1.0.6", Labels{Namespace: "ns2", Pod: "pod-2"}, true)
	check("hostNetwork", "192.0.2.10", Labels{}, false)
	check("nobody", "10.1.0.7", Labels{}, false)
	want := []netip.Addr{ip("10.1.0.5"), ip("10.1.0.6"), ip("fd00::5")}
	if got := r.PodIPs(); !slices.Equal(got, want) {
		t.Errorf("PodIPs = %v, want %v", got, want)
	}

	// pod-1 is deleted and pod-4 gets its IPv4 address within the TTL.
	ctx := context.Background()
	pods := client.CoreV1().Pods
	if err := pods("ns1").Delete(ctx, "pod-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "deletion not seen", func() bool {
		_, _, gone, _ := r.pods.byIP(ip("fd00::5"))
		return !gone.IsZero()
	})
	<-r.PodsChanged()
	check("deleted, within TTL", "fd00::5", Labels{Namespace: "ns1", Pod: "pod-1"}, true)
	if _, err := pods("ns4").Create(ctx, withIPs(testPod(4, "ns4"), "10.1.0.5"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "new pod's address not seen", func() bool {
		l, _ := r.PodByIP(ip("10.1.0.5"))
		return l.Pod == "pod-4"
	})
	<-r.PodsChanged()

	// The cap (3 label sets: pod-1, pod-2, pod-4) holds: a fifth pod is
	// "other" until a set lapses.
	if _, err := pods("ns5").Create(ctx, withIPs(testPod(5, "ns5"), "10.1.0.8"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "fifth pod not seen", func() bool { return len(r.PodIPs()) == 4 })
	check("beyond the cap", "10.1.0.8", Labels{Namespace: Overflow, Pod: Overflow}, true)

	clk.Add(ttl)
	r.Sweep()
	check("deleted, TTL passed", "fd00::5", Labels{}, false)
	check("within the cap again", "10.1.0.8", Labels{Namespace: "ns5", Pod: "pod-5"}, true)
	if got := r.PodIPs(); len(got) != 3 {
		t.Errorf("PodIPs after the TTL = %v, want pod-2's, pod-4's and pod-5's", got)
	}
}
