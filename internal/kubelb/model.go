package kubelb

import (
	"cmp"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ktel-dev/ktel/internal/lb"
)

// The informers' transform turns Services and EndpointSlices into service
// and slice: what the translation reads, a fraction of the API objects'
// size, and all the caches hold. They are never modified once made.

// service is a Service as the translation reads it.
type service struct {
	namespace, name, rv string
	// ips are the ClusterIPs (or the ClusterIP); nil when kube-proxy
	// would not program the Service (headless, ExternalName, no
	// ClusterIP).
	ips      []string
	ports    []servicePort
	affinity time.Duration // ClientIP session affinity timeout; 0 is none
	local    bool          // internalTrafficPolicy Local
}

type servicePort struct {
	name     string
	port     int32
	protocol corev1.Protocol // as given: "" is TCP
}

// epSlice is an EndpointSlice as the translation reads it.
type epSlice struct {
	namespace, name, rv string
	service             string // the kubernetes.io/service-name label; "" when none
	family              discovery.AddressType
	ports               []slicePort
	endpoints           []sliceEndpoint
	trigger             time.Time // last-change-trigger-time; zero when none or unparsable
}

// slicePort is a port of a slice that can match a service port: named, of
// a valid number.
type slicePort struct {
	name     string
	port     uint16
	protocol corev1.Protocol // a missing protocol is TCP; "" matches nothing
}

// sliceEndpoint is an endpoint with an address (its first).
type sliceEndpoint struct {
	addr                               netip.Addr // zero when the address is invalid (ParseAddr)
	local, ready, serving, terminating bool
}

// GetObjectMeta makes service a metav1.ObjectMetaAccessor, which is what
// the informer's store reads: its key and its resource version (an update
// of the same version is a resync).
func (s *service) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: s.namespace, Name: s.name, ResourceVersion: s.rv}
}

// GetObjectMeta: see service's.
func (s *epSlice) GetObjectMeta() metav1.Object {
	return &metav1.ObjectMeta{Namespace: s.namespace, Name: s.name, ResourceVersion: s.rv}
}

func (s *service) key() string { return s.namespace + "/" + s.name }

// serviceKey is the Service key of a slice, "" when it belongs to none:
// kube-proxy ignores slices without the service-name label, and FQDN ones.
func (s *epSlice) serviceKey() string {
	if s.service == "" || s.family == discovery.AddressTypeFQDN {
		return ""
	}
	return s.namespace + "/" + s.service
}

// compactService is svc as the translation reads it.
func compactService(svc *corev1.Service) *service {
	s := &service{namespace: svc.Namespace, name: svc.Name, rv: svc.ResourceVersion}
	if ip := svc.Spec.ClusterIP; svc.Spec.Type != corev1.ServiceTypeExternalName && ip != "" && ip != corev1.ClusterIPNone {
		s.ips = slices.Clone(svc.Spec.ClusterIPs)
		if len(s.ips) == 0 {
			s.ips = []string{ip}
		}
	}
	if len(svc.Spec.Ports) > 0 {
		s.ports = make([]servicePort, len(svc.Spec.Ports))
		for i, p := range svc.Spec.Ports {
			s.ports[i] = servicePort{name: p.Name, port: p.Port, protocol: p.Protocol}
		}
	}
	if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
		timeout := int32(corev1.DefaultClientIPServiceAffinitySeconds)
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			timeout = *c.ClientIP.TimeoutSeconds
		}
		s.affinity = time.Duration(timeout) * time.Second
	}
	s.local = svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
	return s
}

// compactSlice is es as the translation reads it on node node. As
// kube-proxy reads slices: only the first address of an endpoint counts;
// a missing ready or serving condition means true, a missing terminating
// condition false.
func compactSlice(es *discovery.EndpointSlice, node string) *epSlice {
	s := &epSlice{namespace: es.Namespace, name: es.Name, rv: es.ResourceVersion,
		service: es.Labels[discovery.LabelServiceName], family: es.AddressType}
	if v, ok := es.Annotations[corev1.EndpointsLastChangeTriggerTime]; ok {
		if t, err := time.Parse(time.RFC3339Nano, v); err == nil {
			s.trigger = t
		}
	}
	for _, p := range es.Ports {
		if p.Name == nil || p.Port == nil || *p.Port < 1 || *p.Port > 65535 {
			continue
		}
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		s.ports = append(s.ports, slicePort{name: *p.Name, port: uint16(*p.Port), protocol: proto})
	}
	n := 0
	for _, e := range es.Endpoints {
		if len(e.Addresses) > 0 {
			n++
		}
	}
	if n > 0 {
		s.endpoints = make([]sliceEndpoint, 0, n)
	}
	for _, e := range es.Endpoints {
		if len(e.Addresses) == 0 {
			continue
		}
		a, msg := lb.ParseAddr(e.Addresses[0])
		if msg != "" {
			a = netip.Addr{}
		}
		c := e.Conditions
		s.endpoints = append(s.endpoints, sliceEndpoint{
			addr:        a,
			local:       node != "" && e.NodeName != nil && *e.NodeName == node,
			ready:       c.Ready == nil || *c.Ready,
			serving:     c.Serving == nil || *c.Serving,
			terminating: c.Terminating != nil && *c.Terminating,
		})
	}
	return s
}

// counts are what a Service contributes to Result's Skipped and
// NoLocalEndpoints.
type counts struct {
	protocol, ip, name, conflict, endpoint, noLocal int
}

func (c *counts) add(o counts, sign int) {
	c.protocol += sign * o.protocol
	c.ip += sign * o.ip
	c.name += sign * o.name
	c.conflict += sign * o.conflict
	c.endpoint += sign * o.endpoint
	c.noLocal += sign * o.noLocal
}

// skipped is Result.Skipped: the reasons counted at least once.
func (c counts) skipped() map[string]int {
	m := map[string]int{}
	for _, r := range []struct {
		reason string
		n      int
	}{{SkipProtocol, c.protocol}, {SkipClusterIP, c.ip}, {SkipName, c.name}, {SkipConflict, c.conflict}, {SkipEndpoint, c.endpoint}} {
		if r.n != 0 {
			m[r.reason] = r.n
		}
	}
	return m
}

// candidate is a service port of a Service (VIP:port) that its own
// content allows: whether it is applied depends on the others (conflicts).
type candidate struct {
	svc  lb.Service // without backends
	port int        // index in service.ports
	v6   bool
	won  bool // applied, after the conflicts were resolved
}

// entry is a Service translated.
type entry struct {
	svc   *service
	cands []candidate
	base  counts // of the Service alone: protocol, invalid_ip, invalid_name
	res   counts // from the resolution: conflict, invalid_endpoint, no local endpoint
}

// newEntry translates what of svc does not depend on other Services, in
// kube-proxy's order: its ClusterIPs, then its ports.
func newEntry(svc *service) *entry {
	e := &entry{svc: svc}
	for i, ip := range svc.ips {
		vip, msg := lb.ParseAddr(ip)
		if msg != "" {
			e.base.ip++
			continue
		}
		family := discovery.AddressTypeIPv4
		if vip.Is6() {
			family = discovery.AddressTypeIPv6
		}
		for pi, sp := range svc.ports {
			var proto lb.Protocol
			switch sp.protocol {
			case corev1.ProtocolTCP, "":
				proto = lb.TCP
			case corev1.ProtocolUDP:
				proto = lb.UDP
			default:
				e.base.protocol++
				continue
			}
			// The port's name as kube-proxy prints a ServicePortName,
			// with the port number for the unnamed port (a port name has
			// a letter, so the two cannot collide), and the family for
			// the second ClusterIP of a dual-stack Service.
			name := svc.namespace + "/" + svc.name + ":" + cmp.Or(sp.name, strconv.Itoa(int(sp.port)))
			if i > 0 {
				name += "/" + strings.ToLower(string(family))
			}
			if !lb.ValidName(name) {
				e.base.name++
				continue
			}
			if sp.port < 1 || sp.port > 65535 {
				e.base.ip++
				continue
			}
			e.cands = append(e.cands, candidate{
				svc:  lb.Service{Name: name, VIP: netip.AddrPortFrom(vip, uint16(sp.port)), Protocol: proto, Affinity: svc.affinity},
				port: pi,
				v6:   vip.Is6(),
			})
		}
	}
	return e
}

// compare orders entries as Translate walks Services: by namespace, then
// name. The first of two Services with the same VIP:port gets it.
func compare(a, b *entry) int {
	return cmp.Or(strings.Compare(a.svc.namespace, b.svc.namespace), strings.Compare(a.svc.name, b.svc.name))
}

// resolve decides which candidates of es (sorted by compare) are applied:
// a VIP:port goes to the first Service that has it, a name to the first
// port of its Service. es must hold every Service that has a VIP:port of
// one of them (a component of the conflict graph; names cannot be shared
// by two Services). It leaves the endpoint counts to backends.
func resolve(es []*entry) {
	keys := map[lb.Key]bool{}
	names := map[string]bool{}
	for _, e := range es {
		clear(names)
		e.res.conflict = 0
		for i := range e.cands {
			c := &e.cands[i]
			k := c.svc.Key()
			if names[c.svc.Name] || keys[k] {
				e.res.conflict++
				c.won = false
				continue
			}
			names[c.svc.Name], keys[k] = true, true
			c.won = true
		}
	}
}

// services returns e's applied services with their backends, from the
// slices of its Service (sorted by name), and counts the endpoints
// skipped and the ports without a local endpoint.
func (e *entry) services(sl []*epSlice, out []lb.Service) []lb.Service {
	e.res.endpoint, e.res.noLocal = 0, 0
	for _, c := range e.cands {
		if !c.won {
			continue
		}
		s := c.svc
		all := endpoints(sl, e.svc.ports[c.port], c.v6, &e.res.endpoint)
		s.Backends = usable(all, e.svc.local)
		if e.svc.local && len(s.Backends) == 0 {
			e.res.noLocal++
		}
		out = append(out, s)
	}
	return out
}

// endpoint is one endpoint of a service port with its conditions.
type endpoint struct {
	addr                        netip.AddrPort
	local                       bool
	ready, serving, terminating bool
}

// endpoints collects the endpoints of service port sp of the given family
// from the slices of its Service. As kube-proxy does:
//   - a slice port belongs to sp when it has sp's name and protocol, and
//     its port number is where sp's targetPort resolved to (so a named
//     targetPort may be a different number on each slice);
//   - one IP:port is one endpoint across slices: a later copy replaces an
//     earlier one unless it is terminating, so that a pod reusing the IP
//     of a terminating one wins.
//
// Addresses that are invalid or of the other family are counted in
// skipped.
func endpoints(sl []*epSlice, sp servicePort, v6 bool, skipped *int) []endpoint {
	var (
		out   []endpoint
		at    map[netip.AddrPort]int
		proto = cmp.Or(sp.protocol, corev1.ProtocolTCP)
	)
	family := discovery.AddressTypeIPv4
	if v6 {
		family = discovery.AddressTypeIPv6
	}
	for _, es := range sl {
		if es.family != family {
			continue
		}
		for _, p := range es.ports {
			if p.name != sp.name || p.protocol != proto {
				continue
			}
			for _, e := range es.endpoints {
				if !e.addr.IsValid() || e.addr.Is6() != v6 {
					*skipped++
					continue
				}
				ep := endpoint{addr: netip.AddrPortFrom(e.addr, p.port), local: e.local, ready: e.ready, serving: e.serving, terminating: e.terminating}
				if i, dup := at[ep.addr]; dup {
					if !ep.terminating {
						out[i] = ep
					}
					continue
				}
				if at == nil {
					at = map[netip.AddrPort]int{}
				}
				at[ep.addr] = len(out)
				out = append(out, ep)
			}
		}
	}
	return out
}

// usable picks the backends of a service port from its endpoints, as
// kube-proxy's endpoint categorisation (pkg/proxy/topology.go) does for
// ClusterIP traffic: the ready endpoints; when none is ready, those still
// serving while terminating, so that a rollout's last pods keep answering;
// never one that is terminating and no longer serving. With local set
// (internalTrafficPolicy Local), only this node's endpoints are
// considered, and with none the service has no backend: traffic is not
// sent to other nodes. Topology hints are not followed. Backends are
// sorted by address, each of weight 1.
func usable(all []endpoint, local bool) []lb.Backend {
	pick := func(ok func(endpoint) bool) []lb.Backend {
		var out []lb.Backend
		for _, e := range all {
			if (!local || e.local) && ok(e) {
				out = append(out, lb.Backend{Addr: e.addr, Weight: 1})
			}
		}
		return out
	}
	out := pick(func(e endpoint) bool { return e.ready })
	if len(out) == 0 {
		out = pick(func(e endpoint) bool { return e.serving && e.terminating })
	}
	slices.SortFunc(out, func(a, b lb.Backend) int { return a.Addr.Compare(b.Addr) })
	return out
}

// model is the translation of the caches, kept up to date Service by
// Service: a change of one Service (or of its slices) is translated alone,
// with the Services it shares a VIP:port with, and gives the difference
// to apply.
type model struct {
	entries map[string]*entry // by namespace/name
	// users are the Services (namespace/name) with a candidate at each
	// VIP:port: more than one is a conflict.
	users map[lb.Key][]string
	total counts
}

func newModel() *model {
	return &model{entries: map[string]*entry{}, users: map[lb.Key][]string{}}
}

// lookup gives a Service by namespace/name (nil when there is none), and
// the slices of one sorted by name.
type lookup struct {
	service func(key string) *service
	slices  func(key string) []*epSlice
}

// rebuild translates every Service of svcs anew and returns all the
// applied services, sorted by name.
func (m *model) rebuild(svcs []*service, look lookup) []lb.Service {
	*m = *newModel()
	es := make([]*entry, 0, len(svcs))
	for _, svc := range svcs {
		e := newEntry(svc)
		m.entries[svc.key()] = e
		m.index(svc.key(), e, true)
		m.total.add(e.base, 1)
		es = append(es, e)
	}
	slices.SortFunc(es, compare)
	resolve(es)
	var out []lb.Service
	for _, e := range es {
		out = e.services(look.slices(e.svc.key()), out)
		m.total.add(e.res, 1)
	}
	slices.SortFunc(out, func(a, b lb.Service) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// index adds (or removes) e's candidates to users.
func (m *model) index(key string, e *entry, add bool) {
	for _, c := range e.cands {
		k := c.svc.Key()
		u := m.users[k]
		if add {
			if !slices.Contains(u, key) {
				m.users[k] = append(u, key)
			}
			continue
		}
		u = slices.DeleteFunc(u, func(s string) bool { return s == key })
		if len(u) == 0 {
			delete(m.users, k)
		} else {
			m.users[k] = u
		}
	}
}

// update translates the Services named in changed anew, as look now has
// them, and returns what to apply: the services to add or replace, and
// the names of those to remove.
func (m *model) update(changed []string, look lookup) (upsert []lb.Service, remove []string) {
	// The applied names before, of every Service whose outcome may change.
	before := map[string][]string{}
	won := func(key string) {
		if _, ok := before[key]; ok {
			return
		}
		var names []string
		if e := m.entries[key]; e != nil {
			for _, c := range e.cands {
				if c.won {
					names = append(names, c.svc.Name)
				}
			}
		}
		before[key] = names
	}
	var queue []string
	for _, key := range changed {
		won(key)
		old := m.entries[key]
		if old != nil {
			// Those that shared a VIP:port with it may get it now.
			for _, c := range old.cands {
				for _, u := range m.users[c.svc.Key()] {
					won(u)
					queue = append(queue, u)
				}
			}
			m.index(key, old, false)
			m.total.add(old.base, -1)
			m.total.add(old.res, -1)
			old.res = counts{}
			delete(m.entries, key)
		}
		if svc := look.service(key); svc != nil {
			e := newEntry(svc)
			m.entries[key] = e
			m.index(key, e, true)
			m.total.add(e.base, 1)
		}
		queue = append(queue, key)
	}
	// The component: every Service linked to those by a shared VIP:port.
	var comp []*entry
	seen := map[string]bool{}
	for len(queue) > 0 {
		key := queue[len(queue)-1]
		queue = queue[:len(queue)-1]
		if seen[key] {
			continue
		}
		seen[key] = true
		won(key)
		e := m.entries[key]
		if e == nil {
			continue
		}
		comp = append(comp, e)
		for _, c := range e.cands {
			queue = append(queue, m.users[c.svc.Key()]...)
		}
	}
	for _, e := range comp {
		m.total.add(e.res, -1)
	}
	slices.SortFunc(comp, compare)
	resolve(comp)
	after := map[string]bool{}
	for _, e := range comp {
		n := len(upsert)
		upsert = e.services(look.slices(e.svc.key()), upsert)
		m.total.add(e.res, 1)
		for _, s := range upsert[n:] {
			after[s.Name] = true
		}
	}
	for _, names := range before {
		for _, name := range names {
			if !after[name] {
				remove = append(remove, name)
			}
		}
	}
	slices.Sort(remove)
	return upsert, remove
}
