package kubelb

import (
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/ktel-dev/ktel/internal/lb"
)

// svc is a ClusterIP Service ns/name with ports "name:port/proto".
func svc(name string, ips []string, ports ...corev1.ServicePort) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Spec:       corev1.ServiceSpec{Type: corev1.ServiceTypeClusterIP, ClusterIP: ips[0], ClusterIPs: ips, Ports: ports},
	}
}

func port(name string, p int32, proto corev1.Protocol) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: p, Protocol: proto}
}

func slice(svcName, name string, family discovery.AddressType, ports []discovery.EndpointPort, eps ...discovery.Endpoint) *discovery.EndpointSlice {
	return &discovery.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: "ns", Name: name, Labels: map[string]string{discovery.LabelServiceName: svcName}},
		AddressType: family,
		Ports:       ports,
		Endpoints:   eps,
	}
}

func eport(name string, p int32, proto corev1.Protocol) discovery.EndpointPort {
	return discovery.EndpointPort{Name: ptr.To(name), Port: ptr.To(p), Protocol: ptr.To(proto)}
}

// ep is an endpoint; cond is r (ready), s (serving), t (terminating)
// letters, each true when present: "rs" is a running pod, "st" a
// terminating pod still serving, "t" one that stopped serving.
func ep(addr, node, cond string) discovery.Endpoint {
	has := func(c rune) *bool { return ptr.To(slices.Contains([]rune(cond), c)) }
	e := discovery.Endpoint{Addresses: []string{addr}, Conditions: discovery.EndpointConditions{Ready: has('r'), Serving: has('s'), Terminating: has('t')}}
	if node != "" {
		e.NodeName = ptr.To(node)
	}
	return e
}

// backends renders a service's backends for comparison.
func backends(s lb.Service) []string {
	out := []string{}
	for _, b := range s.Backends {
		out = append(out, b.Addr.String())
	}
	return out
}

func TestTranslate(t *testing.T) {
	v4 := discovery.AddressTypeIPv4
	v6 := discovery.AddressTypeIPv6
	http := []discovery.EndpointPort{eport("http", 8080, corev1.ProtocolTCP)}
	tests := []struct {
		name    string
		svcs    []*corev1.Service
		slices  []*discovery.EndpointSlice
		want    map[string][]string // service name -> backends
		vips    map[string]string   // service name -> VIP:port (optional)
		skipped map[string]int
		noLocal int
	}{
		{
			name:   "ready endpoints of two slices, de-duplicated",
			svcs:   []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, http, ep("10.0.0.2", "n1", "rs"), ep("10.0.0.1", "n1", "rs")), slice("web", "web-b", v4, http, ep("10.0.0.2", "n2", "rs"), ep("10.0.0.3", "n2", "rs"))},
			want:   map[string][]string{"ns/web:http": {"10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"}},
			vips:   map[string]string{"ns/web:http": "10.96.0.1:80"},
		},
		{
			name:   "not ready endpoints are left out while one is ready",
			svcs:   []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, http, ep("10.0.0.1", "", "rs"), ep("10.0.0.2", "", ""), ep("10.0.0.3", "", "st"), ep("10.0.0.4", "", "t"))},
			want:   map[string][]string{"ns/web:http": {"10.0.0.1:8080"}},
		},
		{
			name:   "serving terminating endpoints when none is ready; never terminating not serving",
			svcs:   []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, http, ep("10.0.0.2", "", ""), ep("10.0.0.3", "", "st"), ep("10.0.0.4", "", "t"))},
			want:   map[string][]string{"ns/web:http": {"10.0.0.3:8080"}},
		},
		{
			name:   "only terminating not serving: no backend",
			svcs:   []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, http, ep("10.0.0.4", "", "t"))},
			want:   map[string][]string{"ns/web:http": {}},
		},
		{
			name: "missing conditions: ready and serving, not terminating",
			svcs: []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, http,
				discovery.Endpoint{Addresses: []string{"10.0.0.9"}}, ep("10.0.0.2", "", ""))},
			want: map[string][]string{"ns/web:http": {"10.0.0.9:8080"}},
		},
		{
			name: "duplicate across slices: a terminating copy does not replace a running one",
			svcs: []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{
				slice("web", "web-a", v4, http, ep("10.0.0.1", "", "rs")),
				slice("web", "web-b", v4, http, ep("10.0.0.1", "", "t")),
			},
			want: map[string][]string{"ns/web:http": {"10.0.0.1:8080"}},
		},
		{
			name: "duplicate across slices: a running copy replaces a terminating one",
			svcs: []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{
				slice("web", "web-a", v4, http, ep("10.0.0.1", "", "t")),
				slice("web", "web-b", v4, http, ep("10.0.0.1", "", "rs")),
			},
			want: map[string][]string{"ns/web:http": {"10.0.0.1:8080"}},
		},
		{
			name: "ports by name: targetPort resolved per slice; UDP; SCTP skipped",
			svcs: []*corev1.Service{svc("dns", []string{"10.96.0.10"},
				port("dns", 53, corev1.ProtocolUDP), port("dns-tcp", 53, corev1.ProtocolTCP), port("sctp", 99, corev1.ProtocolSCTP))},
			slices: []*discovery.EndpointSlice{
				slice("dns", "dns-a", v4, []discovery.EndpointPort{eport("dns", 5353, corev1.ProtocolUDP), eport("dns-tcp", 5354, corev1.ProtocolTCP)}, ep("10.0.0.1", "", "rs")),
				// Another pod template: other target port numbers.
				slice("dns", "dns-b", v4, []discovery.EndpointPort{eport("dns", 1053, corev1.ProtocolUDP), eport("dns-tcp", 1054, corev1.ProtocolTCP)}, ep("10.0.0.2", "", "rs")),
			},
			want: map[string][]string{
				"ns/dns:dns":     {"10.0.0.1:5353", "10.0.0.2:1053"},
				"ns/dns:dns-tcp": {"10.0.0.1:5354", "10.0.0.2:1054"},
			},
			vips:    map[string]string{"ns/dns:dns": "10.96.0.10:53", "ns/dns:dns-tcp": "10.96.0.10:53"},
			skipped: map[string]int{SkipProtocol: 1},
		},
		{
			name:   "a slice port of another protocol is not the service port's",
			svcs:   []*corev1.Service{svc("dns", []string{"10.96.0.10"}, port("dns", 53, corev1.ProtocolUDP))},
			slices: []*discovery.EndpointSlice{slice("dns", "dns-a", v4, []discovery.EndpointPort{eport("dns", 5353, corev1.ProtocolTCP)}, ep("10.0.0.1", "", "rs"))},
			want:   map[string][]string{"ns/dns:dns": {}},
		},
		{
			name:   "unnamed port: named by its number",
			svcs:   []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, []discovery.EndpointPort{eport("", 8080, corev1.ProtocolTCP)}, ep("10.0.0.1", "", "rs"))},
			want:   map[string][]string{"ns/web:80": {"10.0.0.1:8080"}},
		},
		{
			name: "dual-stack: one service per ClusterIP, each with its family's endpoints",
			svcs: []*corev1.Service{svc("web", []string{"fd00::1", "10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			slices: []*discovery.EndpointSlice{
				slice("web", "web-4", v4, http, ep("10.0.0.1", "", "rs")),
				slice("web", "web-6", v6, http, ep("fd01::1", "", "rs"), ep("10.0.0.7", "", "rs")),
			},
			want:    map[string][]string{"ns/web:http": {"[fd01::1]:8080"}, "ns/web:http/ipv4": {"10.0.0.1:8080"}},
			vips:    map[string]string{"ns/web:http": "[fd00::1]:80", "ns/web:http/ipv4": "10.96.0.1:80"},
			skipped: map[string]int{SkipEndpoint: 1},
		},
		{
			name: "internalTrafficPolicy Local: this node's endpoints only",
			svcs: []*corev1.Service{func() *corev1.Service {
				s := svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))
				s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
				return s
			}()},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, http, ep("10.0.0.1", "me", "rs"), ep("10.0.0.2", "other", "rs"), ep("10.0.0.3", "", "rs"))},
			want:   map[string][]string{"ns/web:http": {"10.0.0.1:8080"}},
		},
		{
			name: "internalTrafficPolicy Local: local serving terminating before remote ready",
			svcs: []*corev1.Service{func() *corev1.Service {
				s := svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))
				s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
				return s
			}()},
			slices: []*discovery.EndpointSlice{slice("web", "web-a", v4, http, ep("10.0.0.1", "me", "st"), ep("10.0.0.2", "other", "rs"))},
			want:   map[string][]string{"ns/web:http": {"10.0.0.1:8080"}},
		},
		{
			name: "internalTrafficPolicy Local without a local endpoint: no backend, counted",
			svcs: []*corev1.Service{func() *corev1.Service {
				s := svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))
				s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
				return s
			}()},
			slices:  []*discovery.EndpointSlice{slice("web", "web-a", v4, http, ep("10.0.0.2", "other", "rs"))},
			want:    map[string][]string{"ns/web:http": {}},
			noLocal: 1,
		},
		{
			name: "headless, ExternalName and no ClusterIP are not ours",
			svcs: []*corev1.Service{
				svc("headless", []string{"None"}, port("http", 80, corev1.ProtocolTCP)),
				{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "ext"}, Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeExternalName, ExternalName: "example.com"}},
				{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "none"}, Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{port("http", 80, corev1.ProtocolTCP)}}},
			},
			slices: []*discovery.EndpointSlice{slice("headless", "h-a", v4, http, ep("10.0.0.1", "", "rs"))},
			want:   map[string][]string{},
		},
		{
			name:   "no slices: a service without backends",
			svcs:   []*corev1.Service{svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))},
			want:   map[string][]string{"ns/web:http": {}},
			slices: []*discovery.EndpointSlice{slice("other", "o-a", v4, http, ep("10.0.0.1", "", "rs"))},
		},
		{
			name: "invalid ClusterIP and conflicting VIP: skipped, counted, the rest served",
			svcs: []*corev1.Service{
				svc("bad", []string{"10.96.0.300"}, port("http", 80, corev1.ProtocolTCP)),
				svc("a", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP)),
				svc("b", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP), port("other", 81, corev1.ProtocolTCP)),
			},
			slices: []*discovery.EndpointSlice{
				slice("a", "a-1", v4, http, ep("10.0.0.1", "", "rs")),
				slice("b", "b-1", v4, http, ep("10.0.0.2", "", "rs"), ep("not-an-ip", "", "rs")),
			},
			want:    map[string][]string{"ns/a:http": {"10.0.0.1:8080"}, "ns/b:other": {}},
			skipped: map[string]int{SkipClusterIP: 1, SkipConflict: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Translate(tt.svcs, tt.slices, "me")
			got := map[string][]string{}
			for _, s := range r.Services {
				got[s.Name] = backends(s)
				if !lb.ValidName(s.Name) {
					t.Errorf("%q is not a valid service name", s.Name)
				}
				if v, ok := tt.vips[s.Name]; ok && s.VIP.String() != v {
					t.Errorf("%s: VIP %s, want %s", s.Name, s.VIP, v)
				}
			}
			if !mapsEqual(got, tt.want) {
				t.Errorf("services:\n got %v\nwant %v", got, tt.want)
			}
			if tt.skipped == nil {
				tt.skipped = map[string]int{}
			}
			if !mapsEqual(r.Skipped, tt.skipped) {
				t.Errorf("skipped %v, want %v", r.Skipped, tt.skipped)
			}
			if r.NoLocalEndpoints != tt.noLocal {
				t.Errorf("no local endpoints %d, want %d", r.NoLocalEndpoints, tt.noLocal)
			}
		})
	}
}

func mapsEqual[V any](a, b map[string]V) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok {
			return false
		}
		switch v := any(v).(type) {
		case []string:
			if !slices.Equal(v, any(w).([]string)) {
				return false
			}
		case int:
			if v != any(w).(int) {
				return false
			}
		}
	}
	return true
}

func TestTranslateAffinity(t *testing.T) {
	s := svc("web", []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))
	s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	if got := Translate([]*corev1.Service{s}, nil, "").Services[0].Affinity; got != 3*time.Hour {
		t.Errorf("default ClientIP timeout %v, want 3h", got)
	}
	s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}
	if got := Translate([]*corev1.Service{s}, nil, "").Services[0].Affinity; got != time.Minute {
		t.Errorf("ClientIP timeout %v, want 1m", got)
	}
	s.Spec.SessionAffinity = corev1.ServiceAffinityNone
	if got := Translate([]*corev1.Service{s}, nil, "").Services[0].Affinity; got != 0 {
		t.Errorf("affinity None: %v, want 0", got)
	}
}

// A name the services file would refuse is skipped and counted.
func TestTranslateLongName(t *testing.T) {
	long := string(slices.Repeat([]byte("a"), 63))
	s := svc(long, []string{"10.96.0.1"}, port("http", 80, corev1.ProtocolTCP))
	s.Namespace = long
	r := Translate([]*corev1.Service{s}, nil, "")
	if len(r.Services) != 0 || r.Skipped[SkipName] != 1 {
		t.Errorf("a 136-byte name: services %v, skipped %v; want skipped as %s", r.Services, r.Skipped, SkipName)
	}
}
