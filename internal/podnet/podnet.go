// Package podnet finds the pod whose host-side veth an interface is, so
// that netdev's per-interface series can carry the pod's namespace and
// name. It reads the node's pods' addresses from the pod informer and asks
// the kernel, over netlink, which interface leads to each; a scrape reads
// only what the last resolution found.
package podnet

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/ktel-dev/ktel/internal/k8smeta"
)

// Pods is what podnet needs of the pod informer (k8smeta.Resolver).
type Pods interface {
	PodIPs() []netip.Addr
	PodsChanged() <-chan struct{}
	PodByIP(netip.Addr) (k8smeta.Labels, bool)
}

// Link is what podnet needs of an interface.
type Link struct {
	Index int
	Kind  string // netlink's kind: "veth", "netkit", "bridge", ...
	// NetNsID is the id, in the interface's namespace, of the namespace
	// its peer is in; -1: none (the peer, if any, is in the same one).
	NetNsID int
	Peer    int // the peer's ifindex in that namespace (IFLA_LINK)
}

// podSide reports whether l is one end of a pair whose other end is in
// another network namespace: a veth or netkit device, as CNI plugins give
// pods.
func (l Link) podSide() bool {
	return (l.Kind == "veth" || l.Kind == "netkit") && l.NetNsID >= 0 && l.Peer > 0
}

// Net is the kernel's view of the network namespace the interfaces are in
// (Netlink), or a fake.
type Net interface {
	// Links lists the namespace's interfaces by ifindex.
	Links() (map[int]Link, error)
	// RouteDev returns the ifindex of the interface the namespace routes
	// ip out of.
	RouteDev(ip netip.Addr) (int, error)
	// PeerAddrs returns the addresses of interface peer of the namespace
	// whose id is nsid.
	PeerAddrs(nsid, peer int) ([]netip.Addr, error)
}

// resolveErrors are the first error of each kind of lookup that failed
// in a resolution (which goes on without that lookup).
type resolveErrors struct {
	route, peer error
	// list is the Mapper's alone: the interfaces could not be listed.
	list error
}

// resolve maps the pod-side interfaces of n to the pod addresses that
// lead to them, in two ways:
//
//   - route: the kernel's route to a pod's address goes out of the pod's
//     veth where the CNI plugin routes each pod (a /32 or /128 route per
//     pod: Calico, Cilium with endpoint routes, kindnet and the ptp
//     plugin, the AWS VPC CNI);
//   - peer: the veth's other end, in the pod's network namespace, holds
//     the pod's address, which the kernel lists for the host side through
//     the peer's namespace id (IFA_TARGET_NETNSID, Linux 4.20+), without
//     entering that namespace or knowing any of its processes: bridge
//     plugins (flannel, the bridge plugin, where routes lead to the
//     bridge), and any veth the first way missed.
//
// It also returns the pod-side interfaces it could not map.
func resolve(n Net, podIPs []netip.Addr) (_ map[int][]netip.Addr, unmapped []int, _ resolveErrors, _ error) {
	links, err := n.Links()
	if err != nil {
		return nil, nil, resolveErrors{}, fmt.Errorf("list links: %w", err)
	}
	podIPs = slices.SortedFunc(slices.Values(podIPs), netip.Addr.Compare)
	var errs resolveErrors
	out := map[int][]netip.Addr{}
	for _, ip := range podIPs {
		idx, err := n.RouteDev(ip)
		if err != nil {
			errs.route = cmpErr(errs.route, fmt.Errorf("route to %s: %w", ip, err))
			continue
		}
		if l, ok := links[idx]; ok && l.podSide() {
			out[idx] = append(out[idx], ip)
		}
	}
	for idx, l := range links {
		if _, done := out[idx]; done || !l.podSide() {
			continue
		}
		addrs, err := n.PeerAddrs(l.NetNsID, l.Peer)
		if err != nil {
			errs.peer = cmpErr(errs.peer, fmt.Errorf("addresses of the peer of interface %d: %w", idx, err))
		}
		for _, a := range addrs {
			if _, ok := slices.BinarySearchFunc(podIPs, a, netip.Addr.Compare); ok {
				out[idx] = append(out[idx], a)
			}
		}
		if len(out[idx]) == 0 {
			unmapped = append(unmapped, idx)
		}
	}
	for idx := range out {
		slices.SortFunc(out[idx], netip.Addr.Compare)
	}
	return out, unmapped, errs, nil
}

func cmpErr(first, err error) error {
	if first != nil {
		return first
	}
	return err
}

// DefaultResync is how often Mapper resolves without being told of a
// change: routes and addresses change without a pod or link event too.
const DefaultResync = 30 * time.Second

// A pod-side interface that appeared within newLink and is not mapped
// yet makes Mapper resolve again after retry: a CNI plugin creates the
// veth first and gives the pod its address after, which no event in this
// namespace tells.
const (
	newLink = 15 * time.Second
	retry   = time.Second
)

// Mapper keeps the pods' interfaces resolved: again whenever pods'
// addresses change, whenever it is told that interfaces did, and every
// Resync.
type Mapper struct {
	net    Net
	pods   Pods
	log    *slog.Logger
	resync time.Duration

	mu      sync.RWMutex
	byIndex map[int][]netip.Addr
	// resolved is closed and replaced after each resolution (tests).
	resolved chan struct{}
}

// NewMapper returns a mapper of n's interfaces to pods; Run resolves.
func NewMapper(n Net, pods Pods, log *slog.Logger) *Mapper {
	return &Mapper{net: n, pods: pods, log: log, resync: DefaultResync, byIndex: map[int][]netip.Addr{}, resolved: make(chan struct{})}
}

// Run resolves at once, then on every signal of links (interfaces added
// or removed), of the pods, every resync, and soon again while a new
// pod-side interface is not mapped, until ctx ends.
func (m *Mapper) Run(ctx context.Context, links <-chan struct{}) {
	tick := time.NewTicker(m.resync)
	defer tick.Stop()
	var warned resolveErrors
	unmapped := map[int]time.Time{} // pod-side interfaces not mapped, by when first seen
	for {
		var soon <-chan time.Time
		if m.refresh(&warned, unmapped) {
			soon = time.After(retry)
		}
		select {
		case <-ctx.Done():
			return
		case <-links:
		case <-m.pods.PodsChanged():
		case <-tick.C:
		case <-soon:
		}
	}
}

// refresh resolves once, and reports whether a pod-side interface first
// seen within newLink is still unmapped. A kind of error is logged as a
// warning the first time, at debug level after.
func (m *Mapper) refresh(warned *resolveErrors, unmapped map[int]time.Time) (pending bool) {
	byIndex, missing, errs, err := resolve(m.net, m.pods.PodIPs())
	if err != nil {
		m.logOnce(err, &warned.list, "cannot map interfaces to pods; labels kept from the last mapping")
		return false
	}
	m.mu.Lock()
	m.byIndex = byIndex
	close(m.resolved)
	m.resolved = make(chan struct{})
	m.mu.Unlock()
	m.logOnce(errs.route, &warned.route, "route lookup of a pod's address failed")
	m.logOnce(errs.peer, &warned.peer, "cannot list the addresses in a veth peer's network namespace; bridge-attached pods' interfaces stay unlabelled")

	now := time.Now()
	seen := maps.Clone(unmapped)
	clear(unmapped)
	for _, idx := range missing {
		first, ok := seen[idx]
		if !ok {
			first = now
		}
		unmapped[idx] = first
		pending = pending || now.Sub(first) < newLink
	}
	return pending
}

func (m *Mapper) logOnce(err error, warned *error, msg string) {
	switch {
	case err == nil:
	case *warned == nil:
		*warned = err
		m.log.Warn(msg, "err", err)
	default:
		m.log.Debug(msg, "err", err)
	}
}

// Resolved returns a channel closed after the next resolution (tests).
func (m *Mapper) Resolved() <-chan struct{} {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.resolved
}

// PodOf returns the namespace and pod of interface ifindex, from the last
// resolution and the informer's cache only; empty when it is no known
// pod's interface. Pods beyond the label-set cap are k8smeta.Overflow.
func (m *Mapper) PodOf(ifindex int) (namespace, pod string) {
	m.mu.RLock()
	ips := m.byIndex[ifindex]
	m.mu.RUnlock()
	for _, ip := range ips {
		if l, ok := m.pods.PodByIP(ip); ok {
			return l.Namespace, l.Pod
		}
	}
	return "", ""
}
