package kubelb

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ktel-dev/ktel/internal/lb"
)

// nopDatapath accepts every write.
type nopDatapath struct{}

func (nopDatapath) ResetCounters(_, _ []uint32) error             { return nil }
func (nopDatapath) WriteSlots([]uint32, []lb.Slot) error          { return nil }
func (nopDatapath) WriteMaglev(uint32, []uint32) error            { return nil }
func (nopDatapath) DeleteMaglev([]uint32) error                   { return nil }
func (nopDatapath) WriteServices([]lb.Entry) error                { return nil }
func (nopDatapath) DeleteServices([]lb.Key) error                 { return nil }
func (nopDatapath) WriteMembers([]uint32, []lb.Member) error      { return nil }
func (nopDatapath) ClearMembers([]uint32, []netip.AddrPort) error { return nil }
func (nopDatapath) DisconnectUDP([]lb.Removed) (int, error)       { return 0, nil }

// benchObjects are n Services and slices as make bench-kube creates them.
func benchObjects(n int) []k8sruntime.Object {
	var objs []k8sruntime.Object
	for i := range n {
		name := "svc-" + strconv.Itoa(i)
		ip := fmt.Sprintf("10.96.%d.%d", 1+i/250, 1+i%250)
		objs = append(objs, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID(fmt.Sprintf("0a1b2c3d-0000-4000-8000-%012d", i)), ResourceVersion: strconv.Itoa(1000 + i),
				Labels: map[string]string{"app": "bench"}},
			Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: ip, ClusterIPs: []string{ip},
				IPFamilies: []corev1.IPFamily{corev1.IPv4Protocol}, SessionAffinity: corev1.ServiceAffinityNone,
				Ports: []corev1.ServicePort{{Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)}}},
		})
		p, proto, ready := int32(8080), corev1.ProtocolTCP, true
		empty := ""
		objs = append(objs, &discovery.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Name: name + "-1", Namespace: "default", UID: types.UID(fmt.Sprintf("1a1b2c3d-0000-4000-8000-%012d", i)), ResourceVersion: strconv.Itoa(20000 + i),
				Labels:      map[string]string{discovery.LabelServiceName: name, discovery.LabelManagedBy: "ktel-bench"},
				Annotations: map[string]string{corev1.EndpointsLastChangeTriggerTime: time.Now().Format(time.RFC3339Nano)}},
			AddressType: discovery.AddressTypeIPv4,
			Ports:       []discovery.EndpointPort{{Name: &empty, Port: &p, Protocol: &proto}},
			Endpoints:   []discovery.Endpoint{{Addresses: []string{"10.244.0.1"}, Conditions: discovery.EndpointConditions{Ready: &ready}}},
		})
	}
	return objs
}

// TestHeap writes a heap profile of a Source holding
// KTEL_KUBELB_HEAP_N Services to KTEL_KUBELB_HEAP (a measurement, not a
// check; skipped unless set).
func TestHeap(t *testing.T) {
	out := os.Getenv("KTEL_KUBELB_HEAP")
	if out == "" {
		t.Skip("KTEL_KUBELB_HEAP not set")
	}
	// Every allocation sampled: exact sizes per site.
	defer func(r int) { runtime.MemProfileRate = r }(runtime.MemProfileRate)
	runtime.MemProfileRate = 1
	n, _ := strconv.Atoi(os.Getenv("KTEL_KUBELB_HEAP_N"))
	n = max(n, 1)
	client := fake.NewClientset(benchObjects(n)...)
	st, err := lb.NewState(nopDatapath{}, lb.Limits{MaxServices: 32768, MaxSlots: 131072, MaxCounters: 65536})
	if err != nil {
		t.Fatal(err)
	}
	mgr := lb.NewSourceManager("kubernetes", st, slog.New(slog.DiscardHandler))
	rec := &recorder{}
	src, err := New(Options{Client: client, Node: "n", MinSyncPeriod: 100 * time.Millisecond, Metrics: rec})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(mgr); err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	<-src.Synced()
	ctx := context.Background()
	for k := range 20 {
		es, err := client.DiscoveryV1().EndpointSlices("default").Get(ctx, "svc-"+strconv.Itoa(k*n/20)+"-1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		es.Endpoints[0].Addresses[0] = "10.244.0.2"
		if _, err := client.DiscoveryV1().EndpointSlices("default").Update(ctx, es, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		time.Sleep(150 * time.Millisecond)
	}
	waitFor(t, "syncs", func() bool { rec.mu.Lock(); defer rec.mu.Unlock(); return rec.syncs >= 10 })
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	rec.mu.Lock()
	t.Logf("%d services: heap in use %.1f MiB, alloc %.1f MiB, syncs %d (mean %v), total allocated %.1f MiB", n,
		float64(ms.HeapInuse)/(1<<20), float64(ms.HeapAlloc)/(1<<20), rec.syncs, rec.syncTime/time.Duration(rec.syncs), float64(ms.TotalAlloc)/(1<<20))
	rec.mu.Unlock()
	f, err := os.Create(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := pprof.WriteHeapProfile(f); err != nil {
		t.Fatal(err)
	}
}
