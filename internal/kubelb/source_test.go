package kubelb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	"github.com/ktel-dev/ktel/internal/lb"
)

// recorder is the datapath and the metrics of a Source under test.
type recorder struct {
	mu sync.Mutex
	// applies are the services after each apply, sorted by name; changes
	// are the ApplyChanges calls among them.
	applies  [][]lb.Service
	changes  []change
	fail     int // applies still to fail
	syncs    int
	syncTime time.Duration // sum of the syncs' durations
	latency  []time.Duration
	noLocal  int
	skipped  map[string]int
	lastSync time.Time
}

// change is one ApplyChanges call.
type change struct {
	upsert []lb.Service
	remove []string
}

func (r *recorder) ApplyServices(svcs []lb.Service) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail > 0 {
		r.fail--
		return errors.New("maps full")
	}
	r.applies = append(r.applies, sortedServices(svcs))
	return nil
}

func (r *recorder) ApplyChanges(upsert []lb.Service, remove []string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail > 0 {
		r.fail--
		return errors.New("maps full")
	}
	if len(r.applies) == 0 {
		panic("ApplyChanges before ApplyServices")
	}
	m := map[string]lb.Service{}
	for _, s := range r.applies[len(r.applies)-1] {
		m[s.Name] = s
	}
	for _, name := range remove {
		delete(m, name)
	}
	for _, s := range upsert {
		m[s.Name] = s
	}
	r.applies = append(r.applies, sortedServices(slices.Collect(maps.Values(m))))
	r.changes = append(r.changes, change{upsert, remove})
	return nil
}

func sortedServices(svcs []lb.Service) []lb.Service {
	svcs = slices.Clone(svcs)
	slices.SortFunc(svcs, func(a, b lb.Service) int { return strings.Compare(a.Name, b.Name) })
	return svcs
}

func (r *recorder) ObserveSync(d time.Duration) {
	r.mu.Lock()
	r.syncs++
	r.syncTime += d
	r.mu.Unlock()
}
func (r *recorder) ObserveNetworkProgramming(d time.Duration) {
	r.mu.Lock()
	r.latency = append(r.latency, d)
	r.mu.Unlock()
}
func (r *recorder) Synced(at time.Time, noLocal int, skipped map[string]int) {
	r.mu.Lock()
	r.lastSync, r.noLocal, r.skipped = at, noLocal, skipped
	r.mu.Unlock()
}

func (r *recorder) count() int { r.mu.Lock(); defer r.mu.Unlock(); return len(r.applies) }

// last is the last applied set as name -> backends.
func (r *recorder) last() map[string][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.applies) == 0 {
		return nil
	}
	out := map[string][]string{}
	for _, s := range r.applies[len(r.applies)-1] {
		out[s.Name] = backends(s)
	}
	return out
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestSource(t *testing.T) {
	ctx := context.Background()
	web := svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))
	http := []discovery.EndpointPort{eport("http", 8080, corev1.ProtocolTCP)}
	webA := slice("web", "web-a", discovery.AddressTypeIPv4, http, ep("10.0.0.1", "", "rs"))
	client := fake.NewClientset(web, webA)

	// Fail the EndpointSlice lists for a while (a reactor runs under the
	// fake's lock, so it cannot block): nothing may be applied while only
	// the Services are known.
	var (
		held           atomic.Bool
		servicesListed = make(chan struct{})
		once           sync.Once
	)
	held.Store(true)
	client.PrependReactor("list", "services", func(k8stesting.Action) (bool, runtime.Object, error) {
		once.Do(func() { close(servicesListed) })
		return false, nil, nil
	})
	client.PrependReactor("list", "endpointslices", func(k8stesting.Action) (bool, runtime.Object, error) {
		if held.Load() {
			return true, nil, errors.New("API server busy")
		}
		return false, nil, nil
	})

	rec := &recorder{}
	src, err := New(Options{Client: client, Node: "me", MinSyncPeriod: 200 * time.Millisecond, RetryPeriod: 50 * time.Millisecond, Metrics: rec})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(rec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	<-servicesListed
	// A negative: given three sync periods, still nothing applied.
	time.Sleep(600 * time.Millisecond)
	if n := rec.count(); n != 0 {
		t.Fatalf("%d applies before the EndpointSlices synced", n)
	}
	held.Store(false)
	select {
	case <-src.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("not synced")
	}
	// The fake clientset does not replay what happened between a list and
	// its watch: changes start once both watches are open.
	waitFor(t, "watches", func() bool {
		w := map[string]bool{}
		for _, a := range client.Actions() {
			if a.GetVerb() == "watch" {
				w[a.GetResource().Resource] = true
			}
		}
		return w["services"] && w["endpointslices"]
	})
	if got := rec.last(); len(got) != 1 || fmt.Sprint(got["ns/web:http"]) != "[10.0.0.1:8080]" {
		t.Fatalf("first apply %v, want ns/web:http -> 10.0.0.1:8080", got)
	}

	t.Run("burst batched", func(t *testing.T) {
		before, start := rec.count(), time.Now()
		const n = 30
		for i := range n {
			s := svc(fmt.Sprintf("burst-%d", i), []string{fmt.Sprintf("10.96.1.%d", i+1)}, port("http", 80, corev1.ProtocolTCP))
			if _, err := client.CoreV1().Services("ns").Create(ctx, s, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, "all burst services applied", func() bool { return len(rec.last()) == n+1 })
		// At most one sync per period, plus the one a change may start at
		// once after a quiet period.
		took := time.Since(start)
		if got, most := rec.count()-before, int(took/(200*time.Millisecond))+1; got > most || got >= n {
			t.Errorf("%d applies for a burst of %d changes in %v; want at most %d", got, n, took, most)
		}
	})

	t.Run("slice update", func(t *testing.T) {
		// A trigger time 50 ms ago (after the source started) is measured
		// from that time.
		trigger := time.Now().Add(-50 * time.Millisecond)
		s := webA.DeepCopy()
		s.Endpoints = append(s.Endpoints, ep("10.0.0.2", "", "rs"))
		s.Endpoints[0] = ep("10.0.0.1", "", "") // no longer ready
		s.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: trigger.Format(time.RFC3339Nano)}
		if _, err := client.DiscoveryV1().EndpointSlices("ns").Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "update applied", func() bool { return fmt.Sprint(rec.last()["ns/web:http"]) == "[10.0.0.2:8080]" })
		rec.mu.Lock()
		lat := rec.latency
		rec.mu.Unlock()
		if len(lat) != 1 || lat[0] < 50*time.Millisecond || lat[0] > 10*time.Second {
			t.Errorf("network programming latencies %v, want one of 50 ms and a bit", lat)
		}
	})

	t.Run("failed apply retried", func(t *testing.T) {
		rec.mu.Lock()
		rec.fail = 2
		rec.mu.Unlock()
		if err := client.DiscoveryV1().EndpointSlices("ns").Delete(ctx, "web-a", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// No further change: the retries alone must apply it.
		waitFor(t, "slice deletion applied", func() bool {
			b, ok := rec.last()["ns/web:http"]
			return ok && len(b) == 0
		})
	})

	t.Run("service delete", func(t *testing.T) {
		if err := client.CoreV1().Services("ns").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "service deletion applied", func() bool {
			_, ok := rec.last()["ns/web:http"]
			return !ok
		})
	})

	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.syncs != len(rec.applies) || rec.lastSync.IsZero() {
		t.Errorf("%d syncs observed for %d applies; last sync %v", rec.syncs, len(rec.applies), rec.lastSync)
	}
}

func TestCompact(t *testing.T) {
	s := svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))
	s.ResourceVersion = "7"
	s.Annotations = map[string]string{"big": "annotation"}
	s.ManagedFields = []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}
	s.Spec.Selector = map[string]string{"app": "web"}
	src := &Source{opts: Options{Node: "n"}}
	got, err := src.compact(s)
	if err != nil {
		t.Fatal(err)
	}
	gs := got.(*service)
	want := &service{namespace: "ns", name: "web", rv: "7", ips: []string{"10.96.0.1"}, ports: []servicePort{{"http", 80, corev1.ProtocolTCP}}}
	if !reflect.DeepEqual(gs, want) {
		t.Errorf("compact service %+v, want %+v", gs, want)
	}
	es := slice("web", "web-a", discovery.AddressTypeIPv4, []discovery.EndpointPort{eport("http", 8080, corev1.ProtocolTCP)},
		ep("10.0.0.1", "n", "rs"), ep("10.0.0.2", "m", ""), ep("bad", "", "st"))
	es.ResourceVersion = "8"
	es.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: "2026-01-01T00:00:00Z", "other": "x"}
	es.Labels["other"] = "x"
	es.Endpoints[0].TargetRef = &corev1.ObjectReference{Name: "pod"}
	es.Endpoints = append(es.Endpoints, discovery.Endpoint{}) // no address: left out
	got, _ = src.compact(es)
	ge := got.(*epSlice)
	wantSlice := &epSlice{namespace: "ns", name: "web-a", rv: "8", service: "web", family: discovery.AddressTypeIPv4,
		ports: []slicePort{{"http", 8080, corev1.ProtocolTCP}},
		endpoints: []sliceEndpoint{
			{addr: netip.MustParseAddr("10.0.0.1"), local: true, ready: true, serving: true},
			{addr: netip.MustParseAddr("10.0.0.2")},
			{serving: true, terminating: true},
		},
		trigger: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	if !reflect.DeepEqual(ge, wantSlice) {
		t.Errorf("compact slice\n%+v, want\n%+v", ge, wantSlice)
	}
	// What the informer's store reads of them.
	for o, key := range map[any]string{gs: "ns/web", ge: "ns/web-a"} {
		if k, err := cache.MetaNamespaceKeyFunc(o); err != nil || k != key {
			t.Errorf("key %q, %v; want %q", k, err, key)
		}
		if m, err := apimeta.Accessor(o); err != nil || m.GetResourceVersion() == "" {
			t.Errorf("accessor %v, %v", m, err)
		}
	}
	// Tombstones pass as they are.
	if o, _ := src.compact(cache.DeletedFinalStateUnknown{Key: "ns/web", Obj: gs}); o.(cache.DeletedFinalStateUnknown).Obj != gs {
		t.Errorf("tombstone changed: %v", o)
	}
}

// While applies fail, a slice's updates keep one trigger time, the
// earliest unapplied one: memory is bounded by the number of slices.
func TestTriggersBounded(t *testing.T) {
	rec := &recorder{fail: 1 << 30}
	src, err := New(Options{Client: fake.NewSimpleClientset(), Metrics: rec})
	if err != nil {
		t.Fatal(err)
	}
	update := func(name string, at time.Time) {
		s := slice("web", name, discovery.AddressTypeIPv4, nil)
		s.Annotations = map[string]string{corev1.EndpointsLastChangeTriggerTime: at.Format(time.RFC3339Nano)}
		src.sliceChanged(nil, compactSlice(s, ""), true)
	}
	earliest := time.Now().Add(time.Millisecond)
	for i := range 1000 {
		update("web-a", earliest.Add(time.Duration(i)*time.Millisecond))
		if i%100 == 0 {
			if err := src.sync(rec); err == nil {
				t.Fatal("apply did not fail")
			}
		}
	}
	update("web-b", earliest.Add(time.Second))
	src.triggerMu.Lock()
	got := maps.Clone(src.triggers)
	src.triggerMu.Unlock()
	if len(got) != 2 || !got["ns/web-a"].Equal(earliest) || !got["ns/web-b"].Equal(earliest.Add(time.Second)) {
		t.Fatalf("triggers %v, want ns/web-a at %v and ns/web-b", got, earliest)
	}
	// The first successful sync measures each slice once, from its
	// earliest trigger, and forgets them.
	rec.mu.Lock()
	rec.fail = 0
	rec.mu.Unlock()
	// Trigger times carry no monotonic reading: compare wall clocks.
	wall := earliest.Round(0)
	before := time.Now().Round(0)
	if err := src.sync(rec); err != nil {
		t.Fatal(err)
	}
	after := time.Now().Round(0)
	rec.mu.Lock()
	lat := slices.Clone(rec.latency)
	rec.mu.Unlock()
	// Both end at the sync's end: web-a's is the longer, from its
	// earliest trigger, and web-b's trigger came a second after it.
	slices.Sort(lat)
	if len(lat) != 2 || lat[1] < before.Sub(wall) || lat[1] > after.Sub(wall) || lat[1]-lat[0] != time.Second {
		t.Errorf("latencies %v, want two, the longest from %v (%v to %v), the other a second shorter", lat, earliest, before.Sub(wall), after.Sub(wall))
	}
	src.triggerMu.Lock()
	defer src.triggerMu.Unlock()
	if len(src.triggers) != 0 {
		t.Errorf("triggers %v left after a successful sync", src.triggers)
	}
}

// warnCounter counts the warnings logged with a given message.
type warnCounter struct {
	mu  sync.Mutex
	msg string
	n   int
}

func (w *warnCounter) Enabled(context.Context, slog.Level) bool { return true }
func (w *warnCounter) Handle(_ context.Context, r slog.Record) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if r.Level == slog.LevelWarn && r.Message == w.msg {
		w.n++
	}
	return nil
}
func (w *warnCounter) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w *warnCounter) WithGroup(string) slog.Handler      { return w }
func (w *warnCounter) count() int                         { w.mu.Lock(); defer w.mu.Unlock(); return w.n }

// Skipped objects are warned about when their counts change, not at every
// sync.
func TestSkippedWarnedOnChange(t *testing.T) {
	sctp := svc("sctp", []string{"10.96.0.5"}, port("x", 9, corev1.ProtocolSCTP))
	client := fake.NewClientset(sctp)
	warns := &warnCounter{msg: "kubernetes objects skipped"}
	rec := &recorder{}
	src, err := New(Options{Client: client, MinSyncPeriod: time.Hour, Log: slog.New(warns)})
	if err != nil {
		t.Fatal(err)
	}
	if err := src.Start(rec); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	select {
	case <-src.Synced():
	case <-time.After(10 * time.Second):
		t.Fatal("not synced")
	}
	// The sync loop now waits an hour for a change: these syncs are ours.
	if n := warns.count(); n != 1 {
		t.Fatalf("%d warnings after the first sync, want 1", n)
	}
	for range 3 {
		if err := src.sync(rec); err != nil {
			t.Fatal(err)
		}
	}
	if n := warns.count(); n != 1 {
		t.Errorf("%d warnings after syncs with the same skipped objects, want still 1", n)
	}
	src.skipped = map[string]int{SkipProtocol: 2} // as if one was deleted since
	if err := src.sync(rec); err != nil {
		t.Fatal(err)
	}
	if n := warns.count(); n != 2 {
		t.Errorf("%d warnings after the counts changed, want 2", n)
	}
}
