package kubelb

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"

	"github.com/ktel-dev/ktel/internal/lb"
)

// mapsDatapath is the load balancer's maps in memory.
type mapsDatapath struct {
	services map[lb.Key]lb.Entry
	slots    map[uint32]lb.Slot
}

func (mapsDatapath) ResetCounters(_, _ []uint32) error { return nil }
func (d mapsDatapath) WriteSlots(idx []uint32, s []lb.Slot) error {
	for i, x := range idx {
		d.slots[x] = s[i]
	}
	return nil
}
func (mapsDatapath) WriteMaglev(uint32, []uint32) error { return nil }
func (mapsDatapath) DeleteMaglev([]uint32) error        { return nil }
func (d mapsDatapath) WriteServices(es []lb.Entry) error {
	for _, e := range es {
		d.services[e.Key] = e
	}
	return nil
}
func (d mapsDatapath) DeleteServices(ks []lb.Key) error {
	for _, k := range ks {
		delete(d.services, k)
	}
	return nil
}
func (mapsDatapath) WriteMembers([]uint32, []lb.Member) error      { return nil }
func (mapsDatapath) ClearMembers([]uint32, []netip.AddrPort) error { return nil }
func (mapsDatapath) DisconnectUDP([]lb.Removed) (int, error)       { return 0, nil }

// balanced is what the maps balance: per VIP:port, the backends in slot
// order and the affinity.
func (d mapsDatapath) balanced() map[lb.Key]string {
	out := map[lb.Key]string{}
	for k, e := range d.services {
		var bs []string
		for s := e.Base; s < e.Base+e.Count; s++ {
			bs = append(bs, d.slots[s].Addr.String())
		}
		out[k] = fmt.Sprint(bs, e.Affinity)
	}
	return out
}

// want is what the maps should balance for svcs.
func want(svcs []lb.Service) map[lb.Key]string {
	out := map[lb.Key]string{}
	for _, s := range svcs {
		var bs []string
		for _, b := range s.Backends {
			bs = append(bs, b.Addr.String())
		}
		out[s.Key()] = fmt.Sprint(bs, uint32((s.Affinity+999999999)/1e9))
	}
	return out
}

// flaky fails an apply when fail is set, else passes it on to both.
type flaky struct {
	fail, tried bool
	a, b        lb.Applier
}

func (f *flaky) ApplyServices(svcs []lb.Service) error {
	f.tried = true
	if f.fail {
		return errors.New("maps full")
	}
	return errors.Join(f.a.ApplyServices(svcs), f.b.ApplyServices(svcs))
}

func (f *flaky) ApplyChanges(upsert []lb.Service, remove []string) error {
	f.tried = true
	if f.fail {
		return errors.New("maps full")
	}
	return errors.Join(f.a.ApplyChanges(upsert, remove), f.b.ApplyChanges(upsert, remove))
}

// randomService is a Service of a small space, so that Services share
// ClusterIPs (conflicts), are dual-stack, headless, of odd ports, ...
func randomService(rng *rand.Rand, ns, name string) *corev1.Service {
	ips := []string{"10.96.0." + strconv.Itoa(1+rng.IntN(6))}
	switch rng.IntN(10) {
	case 0:
		ips = []string{"None"}
	case 1:
		ips = append(ips, "fd00::"+strconv.Itoa(1+rng.IntN(3)))
	case 2:
		ips = []string{"fd00::" + strconv.Itoa(1+rng.IntN(3)), ips[0]}
	case 3:
		ips = []string{"bogus"}
	}
	all := []corev1.ServicePort{
		port("http", 80, corev1.ProtocolTCP), port("http", 81, corev1.ProtocolTCP), port("dns", 53, corev1.ProtocolUDP),
		port("", 443, ""), port("sctp", 9, corev1.ProtocolSCTP), port("big", 70000, corev1.ProtocolTCP),
	}
	var ports []corev1.ServicePort
	for _, i := range rng.Perm(len(all))[:rng.IntN(4)] {
		ports = append(ports, all[i])
	}
	s := svc(name, ips, ports...)
	s.Namespace = ns
	s.ResourceVersion = strconv.Itoa(rng.Int())
	if rng.IntN(5) == 0 {
		s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		if rng.IntN(2) == 0 {
			s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To(int32(1 + rng.IntN(100)))}}
		}
	}
	if rng.IntN(4) == 0 {
		s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	}
	if rng.IntN(15) == 0 {
		s.Spec.Type = corev1.ServiceTypeExternalName
	}
	return s
}

func randomSlice(rng *rand.Rand, ns, name string, services []string) *discovery.EndpointSlice {
	family := []discovery.AddressType{discovery.AddressTypeIPv4, discovery.AddressTypeIPv4, discovery.AddressTypeIPv6, discovery.AddressTypeFQDN}[rng.IntN(4)]
	all := []discovery.EndpointPort{
		eport("http", 8080, corev1.ProtocolTCP), eport("http", 8081, corev1.ProtocolTCP), eport("dns", 5353, corev1.ProtocolUDP),
		eport("", 8443, corev1.ProtocolTCP), {Name: ptr.To("")}, {Name: ptr.To("http"), Port: ptr.To(int32(9090))}, {Port: ptr.To(int32(1))},
	}
	var ports []discovery.EndpointPort
	for _, i := range rng.Perm(len(all))[:rng.IntN(3)] {
		ports = append(ports, all[i])
	}
	var eps []discovery.Endpoint
	for range rng.IntN(4) {
		addr := "10.244.0." + strconv.Itoa(1+rng.IntN(4))
		switch rng.IntN(8) {
		case 0:
			addr = "fd01::" + strconv.Itoa(1+rng.IntN(3))
		case 1:
			addr = "nope"
		}
		if family == discovery.AddressTypeIPv6 && rng.IntN(4) != 0 {
			addr = "fd01::" + strconv.Itoa(1+rng.IntN(3))
		}
		e := ep(addr, []string{"", "n1", "n2"}[rng.IntN(3)], []string{"rs", "rs", "st", "t", "", "r"}[rng.IntN(6)])
		if rng.IntN(6) == 0 {
			e.Conditions = discovery.EndpointConditions{}
		}
		if rng.IntN(10) == 0 {
			e.Addresses = nil
		}
		eps = append(eps, e)
	}
	es := slice(services[rng.IntN(len(services))], name, family, ports, eps...)
	es.Namespace = ns
	es.ResourceVersion = strconv.Itoa(rng.Int())
	if rng.IntN(10) == 0 {
		delete(es.Labels, discovery.LabelServiceName)
	}
	return es
}

// TestIncremental changes Services and EndpointSlices at random, a few at
// a time, through the Source's event handlers, and syncs: the Source
// applies only the differences, yet what is applied (the services, and
// the maps of a State they are applied to), the skipped counts and the
// services without a local endpoint must be, after every sync, those of
// the full translation of everything, by Translate as it was before it
// was made incremental (referenceTranslate). Now and then an apply fails,
// and the next sync applies everything.
func TestIncremental(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { testIncremental(t, seed) })
	}
}

func testIncremental(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	src, err := New(Options{Client: fake.NewClientset(), Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	store := cache.NewStore(cache.DeletionHandlingMetaNamespaceKeyFunc)
	src.services = store
	dp := mapsDatapath{services: map[lb.Key]lb.Entry{}, slots: map[uint32]lb.Slot{}}
	st, err := lb.NewState(dp, lb.Limits{MaxServices: 1000, MaxSlots: 10000, MaxCounters: 10000})
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{}
	apply := &flaky{a: rec, b: lb.NewSourceManager("test", st, slog.New(slog.DiscardHandler))}

	namespaces := []string{"a", "a-b", "b"}
	names := []string{"s0", "s1", "s2", "s3", "s4", "s5"}
	svcs := map[string]*corev1.Service{}
	eps := map[string]*discovery.EndpointSlice{}
	compactOf := map[string]any{} // the slice objects as the informer would have them
	for step := range 150 {
		for range 1 + rng.IntN(4) {
			ns := namespaces[rng.IntN(len(namespaces))]
			switch rng.IntN(2) {
			case 0: // a Service added, updated or deleted
				key := ns + "/" + names[rng.IntN(len(names))]
				if _, ok := svcs[key]; ok && rng.IntN(3) == 0 {
					o, _, _ := store.GetByKey(key)
					store.Delete(o)
					delete(svcs, key)
					// Now and then the informer missed the deletion.
					if rng.IntN(3) == 0 {
						src.serviceChanged(cache.DeletedFinalStateUnknown{Key: key, Obj: o})
					} else {
						src.serviceChanged(o)
					}
					continue
				}
				s := randomService(rng, ns, key[len(ns)+1:])
				svcs[key] = s
				c := compactService(s)
				store.Add(c)
				src.serviceChanged(c)
			case 1: // a slice added, updated (maybe to another Service) or deleted
				name := names[rng.IntN(len(names))] + []string{"-x", "-y", "-z"}[rng.IntN(3)]
				key := ns + "/" + name
				old := compactOf[key]
				if old != nil && rng.IntN(3) == 0 {
					delete(eps, key)
					delete(compactOf, key)
					if rng.IntN(3) == 0 {
						old = cache.DeletedFinalStateUnknown{Key: key, Obj: old}
					}
					src.sliceChanged(old, nil, false)
					continue
				}
				es := randomSlice(rng, ns, name, names)
				eps[key] = es
				c := compactSlice(es, "n1")
				compactOf[key] = c
				src.sliceChanged(old, c, true)
			}
		}
		apply.fail, apply.tried = rng.IntN(10) == 0, false
		err := src.sync(apply)
		if apply.fail && apply.tried {
			if err == nil {
				t.Fatalf("step %d: failed apply not reported", step)
			}
			continue
		}
		if err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
		ref := referenceTranslate(slices.Collect(maps.Values(svcs)), slices.Collect(maps.Values(eps)), "n1")
		rec.mu.Lock()
		got := rec.applies[len(rec.applies)-1]
		rec.mu.Unlock()
		if !reflect.DeepEqual(got, ref.Services) {
			t.Fatalf("step %d: applied\n%v\nwant\n%v", step, got, ref.Services)
		}
		if g, w := dp.balanced(), want(ref.Services); !reflect.DeepEqual(g, w) {
			t.Fatalf("step %d: maps balance\n%v\nwant\n%v", step, g, w)
		}
		if g := src.model.total.skipped(); !maps.Equal(g, ref.Skipped) || src.model.total.noLocal != ref.NoLocalEndpoints {
			t.Fatalf("step %d: skipped %v, %d without local endpoint; want %v, %d", step, g, src.model.total.noLocal, ref.Skipped, ref.NoLocalEndpoints)
		}
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.changes) < 50 {
		t.Errorf("only %d of %d applies were changes", len(rec.changes), len(rec.applies))
	}
}

// A sync after the first applies only what changed: the Services whose
// Service or slices changed, and those that gain a VIP:port they lose.
func TestIncrementalTouchesOnlyChanged(t *testing.T) {
	src, err := New(Options{Client: fake.NewClientset(), Node: "n1"})
	if err != nil {
		t.Fatal(err)
	}
	store := cache.NewStore(cache.DeletionHandlingMetaNamespaceKeyFunc)
	src.services = store
	rec := &recorder{}
	http := []discovery.EndpointPort{eport("http", 8080, corev1.ProtocolTCP)}
	addSvc := func(name, ip string) {
		c := compactService(svc(name, []string{ip}, port("http", 80, corev1.ProtocolTCP)))
		store.Add(c)
		src.serviceChanged(c)
	}
	for i, name := range []string{"a", "b", "c"} {
		addSvc(name, "10.96.0."+strconv.Itoa(i+1))
		src.sliceChanged(nil, compactSlice(slice(name, name+"-1", discovery.AddressTypeIPv4, http, ep("10.0.0.1", "", "rs")), "n1"), true)
	}
	// d conflicts with c (same VIP:port, sorted after it).
	addSvc("d", "10.96.0.3")
	sync := func() change {
		t.Helper()
		n := len(rec.changes)
		if err := src.sync(rec); err != nil {
			t.Fatal(err)
		}
		if len(rec.changes) != n+1 {
			t.Fatalf("%d changes applied, want %d", len(rec.changes), n+1)
		}
		return rec.changes[n]
	}
	if err := src.sync(rec); err != nil || len(rec.applies) != 1 || len(rec.changes) != 0 {
		t.Fatalf("first sync: %v, %d applies, %d changes", err, len(rec.applies), len(rec.changes))
	}
	names := func(c change) string {
		var out []string
		for _, s := range c.upsert {
			out = append(out, s.Name+"="+fmt.Sprint(backends(s)))
		}
		return fmt.Sprint(out, c.remove)
	}
	old := compactSlice(slice("b", "b-1", discovery.AddressTypeIPv4, http, ep("10.0.0.1", "", "rs")), "n1")
	src.sliceChanged(old, compactSlice(slice("b", "b-1", discovery.AddressTypeIPv4, http, ep("10.0.0.2", "", "rs")), "n1"), true)
	if got, want := names(sync()), "[ns/b:http=[10.0.0.2:8080]] []"; got != want {
		t.Errorf("slice of b changed: applied %s, want %s", got, want)
	}
	// c deleted: d gets its VIP:port.
	o, _, _ := store.GetByKey("ns/c")
	store.Delete(o)
	src.serviceChanged(o)
	if got, want := names(sync()), "[ns/d:http=[]] [ns/c:http]"; got != want {
		t.Errorf("c deleted: applied %s, want %s", got, want)
	}
	// Nothing changed: nothing applied.
	n := len(rec.applies)
	if err := src.sync(rec); err != nil || len(rec.applies) != n {
		t.Errorf("idle sync: %v, %d applies, want %d", err, len(rec.applies), n)
	}
}
