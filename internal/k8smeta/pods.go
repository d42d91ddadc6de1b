package k8smeta

import (
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

// podStore is this node's pods, by container id and by pod UID, fed by an
// informer. Deleted pods, and containers that a pod's status no longer
// lists (restarted ones), stay for the TTL.
type podStore struct {
	ttl time.Duration
	now func() time.Time

	mu         sync.RWMutex
	pods       map[types.UID]*podEntry
	containers map[string]*containerEntry
	// ips are the pods holding each address, in a network namespace of
	// their own (hostNetwork pods have the node's): a deleted pod's
	// address, within the TTL, may already be a new pod's.
	ips map[netip.Addr][]*podEntry
	// changed receives, coalesced, when a pod's addresses or names may
	// have changed.
	changed chan struct{}
}

type podEntry struct {
	namespace, name string
	ids             map[string]struct{} // container ids, current and recent
	ips             []netip.Addr        // none for hostNetwork pods
	gone            time.Time
}

type containerEntry struct {
	pod  *podEntry
	name string
	gone time.Time
}

func newPodStore(ttl time.Duration, now func() time.Time) *podStore {
	return &podStore{ttl: ttl, now: now, pods: map[types.UID]*podEntry{}, containers: map[string]*containerEntry{},
		ips: map[netip.Addr][]*podEntry{}, changed: make(chan struct{}, 1)}
}

// stripPod is the informer's transform: it keeps only what attribution
// uses, so the cache stays small however large the pods' specs are.
func stripPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion,
	}}
	// The addresses name the pod's interfaces (netdev); a hostNetwork
	// pod's are the node's.
	out.Spec.HostNetwork = p.Spec.HostNetwork
	out.Status.PodIP = p.Status.PodIP
	out.Status.PodIPs = p.Status.PodIPs
	out.Status.ContainerStatuses = stripStatuses(p.Status.ContainerStatuses)
	out.Status.InitContainerStatuses = stripStatuses(p.Status.InitContainerStatuses)
	out.Status.EphemeralContainerStatuses = stripStatuses(p.Status.EphemeralContainerStatuses)
	return out, nil
}

func stripStatuses(in []corev1.ContainerStatus) []corev1.ContainerStatus {
	if len(in) == 0 {
		return nil
	}
	out := make([]corev1.ContainerStatus, len(in))
	for i, s := range in {
		out[i] = corev1.ContainerStatus{Name: s.Name, ContainerID: s.ContainerID}
	}
	return out
}

// containerID strips the runtime scheme: containerd://<id> -> <id>.
func containerID(s string) string {
	if _, id, ok := strings.Cut(s, "://"); ok {
		return id
	}
	return s
}

// podIPs are the addresses of a pod with a network namespace of its own,
// parsed; none for hostNetwork pods.
func podIPs(p *corev1.Pod) []netip.Addr {
	if p.Spec.HostNetwork {
		return nil
	}
	var out []netip.Addr
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil && !slices.Contains(out, a.Unmap()) {
			out = append(out, a.Unmap())
		}
	}
	for _, ip := range p.Status.PodIPs {
		add(ip.IP)
	}
	add(p.Status.PodIP) // servers before podIPs (1.16) set only this
	return out
}

// handler is the informer's event handler.
func (s *podStore) handler() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.upsert(obj) },
		UpdateFunc: func(_, obj any) { s.upsert(obj) },
		DeleteFunc: func(obj any) {
			if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = t.Obj
			}
			if p, ok := obj.(*corev1.Pod); ok {
				s.remove(p.UID)
			}
		},
	}
}

func (s *podStore) upsert(obj any) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	now := s.now()
	current := map[string]string{}
	for _, list := range [][]corev1.ContainerStatus{p.Status.InitContainerStatuses, p.Status.ContainerStatuses, p.Status.EphemeralContainerStatuses} {
		for _, st := range list {
			if id := containerID(st.ContainerID); id != "" {
				current[id] = st.Name
			}
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.pods[p.UID]
	if !ok {
		e = &podEntry{ids: map[string]struct{}{}}
		s.pods[p.UID] = e
	}
	ips := podIPs(p)
	if !ok || !e.gone.IsZero() || !slices.Equal(ips, e.ips) {
		s.setIPs(e, ips)
		s.notify()
	}
	e.namespace, e.name, e.gone = p.Namespace, p.Name, time.Time{}
	for id := range e.ids {
		if _, ok := current[id]; !ok {
			if c := s.containers[id]; c != nil && c.gone.IsZero() {
				c.gone = now
			}
		}
	}
	for id, name := range current {
		e.ids[id] = struct{}{}
		s.containers[id] = &containerEntry{pod: e, name: name}
	}
}

func (s *podStore) remove(uid types.UID) {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.pods[uid]
	if !ok {
		return
	}
	if e.gone.IsZero() {
		e.gone = now
	}
	s.notify()
	for id := range e.ids {
		if c := s.containers[id]; c != nil && c.gone.IsZero() {
			c.gone = now
		}
	}
}

// sweep forgets pods and containers gone for the TTL.
func (s *podStore) sweep(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, c := range s.containers {
		if !c.gone.IsZero() && now.Sub(c.gone) >= s.ttl {
			delete(s.containers, id)
			delete(c.pod.ids, id)
		}
	}
	for uid, e := range s.pods {
		if !e.gone.IsZero() && now.Sub(e.gone) >= s.ttl {
			for id := range e.ids {
				delete(s.containers, id)
			}
			s.setIPs(e, nil)
			delete(s.pods, uid)
		}
	}
}

// container returns the pod and name of a container, and when it went
// (zero while it runs).
func (s *podStore) container(id string) (namespace, pod, name string, gone time.Time, ok bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	c, ok := s.containers[id]
	if !ok {
		return "", "", "", time.Time{}, false
	}
	gone = c.gone
	if gone.IsZero() || (!c.pod.gone.IsZero() && c.pod.gone.Before(gone)) {
		gone = c.pod.gone
	}
	return c.pod.namespace, c.pod.name, c.name, gone, true
}

// pod returns a pod by UID, and when it was deleted (zero while it
// exists).
func (s *podStore) pod(uid string) (namespace, name string, gone time.Time, ok bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	e, ok := s.pods[types.UID(uid)]
	if !ok {
		return "", "", time.Time{}, false
	}
	return e.namespace, e.name, e.gone, true
}

// setIPs gives e the addresses ips in the address index; s.mu is held.
func (s *podStore) setIPs(e *podEntry, ips []netip.Addr) {
	for _, a := range e.ips {
		if l := slices.DeleteFunc(s.ips[a], func(o *podEntry) bool { return o == e }); len(l) > 0 {
			s.ips[a] = l
		} else {
			delete(s.ips, a)
		}
	}
	e.ips = ips
	for _, a := range ips {
		s.ips[a] = append(s.ips[a], e)
	}
}

func (s *podStore) notify() {
	select {
	case s.changed <- struct{}{}:
	default:
	}
}

// byIP returns the pod with address ip, and when it was deleted (zero
// while it exists): a pod that exists before deleted ones, and among
// those the last deleted.
func (s *podStore) byIP(ip netip.Addr) (namespace, name string, gone time.Time, ok bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var best *podEntry
	for _, e := range s.ips[ip.Unmap()] {
		if best == nil || (!best.gone.IsZero() && (e.gone.IsZero() || e.gone.After(best.gone))) {
			best = e
		}
	}
	if best == nil {
		return "", "", time.Time{}, false
	}
	return best.namespace, best.name, best.gone, true
}

// addrs returns every address of this node's pods (deleted ones within
// the TTL included).
func (s *podStore) addrs() []netip.Addr {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]netip.Addr, 0, len(s.ips))
	for a := range s.ips {
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

func (s *podStore) len() (pods, containers int) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.pods), len(s.containers)
}
