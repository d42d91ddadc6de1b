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

	"github.com/ktel-dev/ktel/internal/lb"
)

// referenceTranslate is Translate as it was before the translation was
// made incremental (model), kept as the oracle of TestIncremental: it turns Services and their EndpointSlices into the load
// balancer's model, following kube-proxy's semantics (pkg/proxy). node is
// this node's name, for internalTrafficPolicy Local. Headless and
// ExternalName Services have no ClusterIP and are left out, not counted.
// Translate does not modify its arguments.
func referenceTranslate(svcs []*corev1.Service, eps []*discovery.EndpointSlice, node string) Result {
	r := Result{Skipped: map[string]int{}}

	// Slices belong to the Service named by their service-name label, in
	// the slice's namespace; kube-proxy ignores slices without it.
	byService := map[string][]*discovery.EndpointSlice{}
	for _, es := range eps {
		name := es.Labels[discovery.LabelServiceName]
		if name == "" || es.AddressType == discovery.AddressTypeFQDN {
			continue
		}
		k := es.Namespace + "/" + name
		byService[k] = append(byService[k], es)
	}
	for _, l := range byService {
		// Deterministic de-duplication below; kube-proxy walks them in
		// map order.
		slices.SortFunc(l, func(a, b *discovery.EndpointSlice) int { return strings.Compare(a.Name, b.Name) })
	}

	svcs = slices.Clone(svcs)
	slices.SortFunc(svcs, func(a, b *corev1.Service) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	names := map[string]bool{}
	keys := map[lb.Key]bool{}
	for _, svc := range svcs {
		if !refHasClusterIP(svc) {
			continue
		}
		ips := svc.Spec.ClusterIPs
		if len(ips) == 0 {
			ips = []string{svc.Spec.ClusterIP}
		}
		var affinity time.Duration
		if svc.Spec.SessionAffinity == corev1.ServiceAffinityClientIP {
			timeout := int32(corev1.DefaultClientIPServiceAffinitySeconds)
			if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
				timeout = *c.ClientIP.TimeoutSeconds
			}
			affinity = time.Duration(timeout) * time.Second
		}
		local := svc.Spec.InternalTrafficPolicy != nil && *svc.Spec.InternalTrafficPolicy == corev1.ServiceInternalTrafficPolicyLocal
		for i, ip := range ips {
			vip, msg := lb.ParseAddr(ip)
			if msg != "" {
				r.Skipped[SkipClusterIP]++
				continue
			}
			family := discovery.AddressTypeIPv4
			if vip.Is6() {
				family = discovery.AddressTypeIPv6
			}
			for _, sp := range svc.Spec.Ports {
				var proto lb.Protocol
				switch sp.Protocol {
				case corev1.ProtocolTCP, "":
					proto = lb.TCP
				case corev1.ProtocolUDP:
					proto = lb.UDP
				default:
					r.Skipped[SkipProtocol]++
					continue
				}
				// The port's name as kube-proxy prints a ServicePortName,
				// with the port number for the unnamed port (a port name
				// has a letter, so the two cannot collide), and the family
				// for the second ClusterIP of a dual-stack Service.
				name := svc.Namespace + "/" + svc.Name + ":" + cmp.Or(sp.Name, strconv.Itoa(int(sp.Port)))
				if i > 0 {
					name += "/" + strings.ToLower(string(family))
				}
				if !lb.ValidName(name) {
					r.Skipped[SkipName]++
					continue
				}
				s := lb.Service{
					Name:     name,
					VIP:      netip.AddrPortFrom(vip, uint16(sp.Port)),
					Protocol: proto,
					Affinity: affinity,
				}
				if sp.Port < 1 || sp.Port > 65535 {
					r.Skipped[SkipClusterIP]++
					continue
				}
				if names[s.Name] || keys[s.Key()] {
					r.Skipped[SkipConflict]++
					continue
				}
				names[s.Name], keys[s.Key()] = true, true
				all := refEndpoints(byService[svc.Namespace+"/"+svc.Name], sp, family, node, &r)
				s.Backends = refUsable(all, local)
				if local && len(s.Backends) == 0 {
					r.NoLocalEndpoints++
				}
				r.Services = append(r.Services, s)
			}
		}
	}
	slices.SortFunc(r.Services, func(a, b lb.Service) int { return strings.Compare(a.Name, b.Name) })
	return r
}

// hasClusterIP is kube-proxy's test of a Service it programs: not
// headless (clusterIP None), not ExternalName, and with a ClusterIP.
func refHasClusterIP(svc *corev1.Service) bool {
	ip := svc.Spec.ClusterIP
	return svc.Spec.Type != corev1.ServiceTypeExternalName && ip != "" && ip != corev1.ClusterIPNone
}

// refEndpoint is one refEndpoint of a service port with its conditions.
type refEndpoint struct {
	addr                        netip.AddrPort
	local                       bool
	ready, serving, terminating bool
}

// endpoints collects the endpoints of service port sp of the given family
// from the slices of its Service. As kube-proxy does:
//   - a slice port belongs to sp when it has sp's name and protocol, and
//     its port number is where sp's targetPort resolved to (so a named
//     targetPort may be a different number on each slice);
//   - only the first address of an refEndpoint counts;
//   - a missing ready or serving condition means true, a missing
//     terminating condition false;
//   - one IP:port is one refEndpoint across slices: a later copy replaces an
//     earlier one unless it is terminating, so that a pod reusing the IP
//     of a terminating one wins.
func refEndpoints(eps []*discovery.EndpointSlice, sp corev1.ServicePort, family discovery.AddressType, node string, r *Result) []refEndpoint {
	var (
		out []refEndpoint
		at  = map[netip.AddrPort]int{}
	)
	proto := cmp.Or(sp.Protocol, corev1.ProtocolTCP)
	for _, es := range eps {
		if es.AddressType != family {
			continue
		}
		for _, p := range es.Ports {
			if p.Name == nil || *p.Name != sp.Name || p.Port == nil || *p.Port < 1 || *p.Port > 65535 {
				continue
			}
			if pp := p.Protocol; (pp == nil && proto != corev1.ProtocolTCP) || (pp != nil && *pp != proto) {
				continue
			}
			for _, e := range es.Endpoints {
				if len(e.Addresses) == 0 {
					continue
				}
				a, msg := lb.ParseAddr(e.Addresses[0])
				if msg != "" || a.Is6() != (family == discovery.AddressTypeIPv6) {
					r.Skipped[SkipEndpoint]++
					continue
				}
				c := e.Conditions
				ep := refEndpoint{
					addr:        netip.AddrPortFrom(a, uint16(*p.Port)),
					local:       node != "" && e.NodeName != nil && *e.NodeName == node,
					ready:       c.Ready == nil || *c.Ready,
					serving:     c.Serving == nil || *c.Serving,
					terminating: c.Terminating != nil && *c.Terminating,
				}
				if i, dup := at[ep.addr]; dup {
					if !ep.terminating {
						out[i] = ep
					}
					continue
				}
				at[ep.addr] = len(out)
				out = append(out, ep)
			}
		}
	}
	return out
}

// usable picks the backends of a service port from its endpoints, as
// kube-proxy's refEndpoint categorisation (pkg/proxy/topology.go) does for
// ClusterIP traffic: the ready endpoints; when none is ready, those still
// serving while terminating, so that a rollout's last pods keep answering;
// never one that is terminating and no longer serving. With local set
// (internalTrafficPolicy Local), only this node's endpoints are
// considered, and with none the service has no backend: traffic is not
// sent to other nodes. Topology hints are not followed. Backends are
// sorted by address, each of weight 1.
func refUsable(all []refEndpoint, local bool) []lb.Backend {
	pick := func(ok func(refEndpoint) bool) []lb.Backend {
		var out []lb.Backend
		for _, e := range all {
			if (!local || e.local) && ok(e) {
				out = append(out, lb.Backend{Addr: e.addr, Weight: 1})
			}
		}
		return out
	}
	out := pick(func(e refEndpoint) bool { return e.ready })
	if len(out) == 0 {
		out = pick(func(e refEndpoint) bool { return e.serving && e.terminating })
	}
	slices.SortFunc(out, func(a, b lb.Backend) int { return a.Addr.Compare(b.Addr) })
	return out
}
