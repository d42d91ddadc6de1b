package kubelb

import (
	"fmt"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"

	"github.com/ktel-dev/ktel/internal/lb"
)

// Reasons an object, or part of one, is skipped. Each is a value of the
// reason label of ktel_lb_kubernetes_skipped.
const (
	SkipProtocol  = "protocol"         // a Service port that is neither TCP nor UDP (SCTP)
	SkipClusterIP = "invalid_ip"       // a ClusterIP that is not a unicast address, or a port out of range
	SkipName      = "invalid_name"     // namespace/name:port too long for a service name
	SkipConflict  = "conflict"         // a VIP:port or name another Service port already has
	SkipEndpoint  = "invalid_endpoint" // an endpoint address that does not parse, or of the wrong family
)

// Result is the model of one translation of the informers' caches.
type Result struct {
	// Services are sorted by name.
	Services []lb.Service
	// Skipped counts what was left out, by reason (Skip*).
	Skipped map[string]int
	// NoLocalEndpoints counts the services (VIP:port) with
	// internalTrafficPolicy Local and no usable endpoint on this node.
	NoLocalEndpoints int
}

// Translate turns Services and their EndpointSlices into the load
// balancer's model, following kube-proxy's semantics (pkg/proxy). node is
// this node's name, for internalTrafficPolicy Local. Headless and
// ExternalName Services have no ClusterIP and are left out, not counted.
// Translate does not modify its arguments. The Source keeps the same
// translation up to date Service by Service (model).
func Translate(svcs []*corev1.Service, eps []*discovery.EndpointSlice, node string) Result {
	all := make([]*service, len(svcs))
	for i, svc := range svcs {
		all[i] = compactService(svc)
	}
	// Slices belong to the Service named by their service-name label, in
	// the slice's namespace; kube-proxy ignores slices without it.
	byService := map[string][]*epSlice{}
	for _, es := range eps {
		s := compactSlice(es, node)
		if k := s.serviceKey(); k != "" {
			byService[k] = append(byService[k], s)
		}
	}
	for _, l := range byService {
		// Deterministic de-duplication; kube-proxy walks them in map
		// order.
		slices.SortFunc(l, func(a, b *epSlice) int { return strings.Compare(a.name, b.name) })
	}
	m := newModel()
	out := m.rebuild(all, lookup{slices: func(k string) []*epSlice { return byService[k] }})
	return Result{Services: out, Skipped: m.total.skipped(), NoLocalEndpoints: m.total.noLocal}
}

// String of a result, for logs.
func (r Result) String() string {
	n := 0
	for _, s := range r.Services {
		n += len(s.Backends)
	}
	return fmt.Sprintf("%d services, %d backends", len(r.Services), n)
}
