// Package k8smeta attributes cgroups to workloads: a cgroup v2 id (what
// ktel's BPF programs read) becomes namespace/pod/container labels on
// Kubernetes, from an informer on this node's pods, or a systemd unit or
// container id elsewhere; without a node name it reads cgroup paths only.
// Resolve answers from caches only, so a scrape never waits for the API
// server or the file system.
package k8smeta

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"path"
	"sync"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/kubeclient"
)

// Label values that stand for no workload in particular.
const (
	// Unknown: a cgroup not (yet) in the index, or a pod's cgroup whose
	// pod the informer does not (yet) know, for example while the API
	// server is unreachable.
	Unknown = "unknown"
	// Overflow: a workload beyond the label-set cap.
	Overflow = "other"
)

// Labels are a workload's label values; empty ones are not set.
// Kubernetes workloads have Namespace, Pod and Container (empty for a
// pod's own cgroup and its sandbox); others a Unit (a systemd unit, or the
// cgroup path) or a Container (the first 12 digits of a container id, for
// containers outside Kubernetes).
type Labels struct {
	Namespace, Pod, Container, Unit string
}

// Options configure a Resolver.
type Options struct {
	// NodeName is this node's name (spec.nodeName of its pods). Empty:
	// no API server, labels from cgroup paths only: a pod's container
	// gets its short container id (as containers of other runtimes do)
	// and a pod's own cgroup its last path component as unit.
	NodeName string
	// Kubeconfig is the value of $KUBECONFIG (kubeclient.Config): one or
	// more files; empty: the in-cluster configuration. Client, when set,
	// is used instead.
	Kubeconfig string
	Client     kubernetes.Interface
	// Root is the cgroup v2 mount point; empty: from /proc/self/mountinfo.
	Root string
	// TTL is how long deleted pods and removed cgroups stay resolvable,
	// and how long a label set lives once it is no longer used.
	TTL time.Duration
	// MaxLabelSets caps the label sets handed out at once; further
	// workloads get Overflow.
	MaxLabelSets int
	// RescanInterval is how often the cgroup hierarchy is walked; an
	// unknown cgroup id also triggers a walk, at most once per MinRescan.
	RescanInterval, MinRescan time.Duration
	Logger                    *slog.Logger
	// Now is the clock (tests); nil: time.Now.
	Now func() time.Time
}

// Stats count what Resolve could not attribute.
type Stats struct {
	UnknownCgroups uint64 // ids not in the cgroup index
	UnknownPods    uint64 // pods' cgroups whose pod is not known
	Overflows      uint64 // resolutions beyond MaxLabelSets
	LabelSets      int    // label sets live now
	Cgroups        int    // cgroups indexed (removed ones within their TTL included)
	Pods           int    // pods known (deleted ones within their TTL included)
}

// Resolver maps cgroup ids to Labels.
type Resolver struct {
	opts   Options
	log    *slog.Logger
	index  *cgroups.Index
	pods   *podStore
	client kubernetes.Interface

	rescan chan struct{}
	synced atomic.Bool

	unknownCgroups, unknownPods, overflows atomic.Uint64

	mu   sync.Mutex
	sets map[Labels]time.Time // label set -> when it expires
}

// New returns a resolver; Run starts its informer and cgroup walks.
func New(opts Options) (*Resolver, error) {
	if opts.TTL <= 0 {
		return nil, errors.New("k8smeta: TTL must be positive")
	}
	if opts.MaxLabelSets < 1 {
		return nil, errors.New("k8smeta: MaxLabelSets must be at least 1")
	}
	if opts.RescanInterval <= 0 {
		opts.RescanInterval = 30 * time.Second
	}
	if opts.MinRescan <= 0 {
		opts.MinRescan = time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Root == "" {
		root, err := cgroups.V2Root()
		if err != nil {
			return nil, fmt.Errorf("k8smeta: %w", err)
		}
		opts.Root = root
	}
	r := &Resolver{
		opts:   opts,
		log:    opts.Logger,
		index:  cgroups.NewIndex(opts.Root, opts.TTL),
		pods:   newPodStore(opts.TTL, opts.Now),
		rescan: make(chan struct{}, 1),
		sets:   map[Labels]time.Time{},
	}
	if opts.NodeName != "" {
		client := opts.Client
		if client == nil {
			cfg, err := kubeclient.Config(opts.Kubeconfig)
			if err != nil {
				return nil, fmt.Errorf("k8smeta: %w", err)
			}
			if client, err = kubernetes.NewForConfig(cfg); err != nil {
				return nil, fmt.Errorf("k8smeta: %w", err)
			}
		}
		r.client = client
	}
	return r, nil
}

// Run watches this node's pods and walks the cgroup hierarchy until ctx
// ends. Resolve serves meanwhile: before the first walk and the informer's
// first sync, and while the API server is unreachable, from what it has
// (Unknown for the rest); the informer retries on its own.
func (r *Resolver) Run(ctx context.Context) error {
	if err := r.Refresh(); err != nil {
		return err
	}
	if r.client != nil {
		factory := informers.NewSharedInformerFactoryWithOptions(r.client, 0,
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", r.opts.NodeName).String()
			}))
		inf := factory.Core().V1().Pods().Informer()
		if err := inf.SetTransform(stripPod); err != nil {
			return fmt.Errorf("k8smeta: %w", err)
		}
		if _, err := inf.AddEventHandler(r.pods.handler()); err != nil {
			return fmt.Errorf("k8smeta: %w", err)
		}
		factory.Start(ctx.Done())
		defer factory.Shutdown()
		go func() {
			if cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
				r.synced.Store(true)
				pods, _ := r.pods.len()
				r.log.Info("pods of this node synced", "node", r.opts.NodeName, "pods", pods)
			}
		}()
	}

	walk := time.NewTicker(r.opts.RescanInterval)
	defer walk.Stop()
	sweep := time.NewTicker(min(r.opts.TTL/4, time.Second))
	defer sweep.Stop()
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-walk.C:
		case <-r.rescan:
			if time.Since(last) < r.opts.MinRescan {
				continue
			}
		case <-sweep.C:
			r.Sweep()
			continue
		}
		last = time.Now()
		if err := r.Refresh(); err != nil {
			// The hierarchy is there at start; losing it later leaves
			// the last walk's view, aging out.
			r.log.Warn("cgroup walk failed", "err", err)
		}
	}
}

// Synced reports whether the pod informer has listed this node's pods
// once.
func (r *Resolver) Synced() bool { return r.synced.Load() }

// Refresh walks the cgroup hierarchy now, then sweeps.
func (r *Resolver) Refresh() error {
	if err := r.index.Refresh(r.opts.Now()); err != nil {
		return err
	}
	r.Sweep()
	return nil
}

// Sweep forgets the pods, cgroups and label sets whose TTL has passed.
func (r *Resolver) Sweep() {
	now := r.opts.Now()
	r.pods.sweep(now)
	r.mu.Lock()
	defer r.mu.Unlock()
	for l, exp := range r.sets {
		if !now.Before(exp) {
			delete(r.sets, l)
		}
	}
}

// Resolve returns the labels of cgroup id, from caches only. Ids it does
// not know are counted, labelled Unknown and make Run walk the hierarchy
// soon.
func (r *Resolver) Resolve(id uint64) Labels {
	c, ok := r.index.Lookup(id)
	if !ok {
		r.unknownCgroups.Add(1)
		select {
		case r.rescan <- struct{}{}:
		default:
		}
		return Labels{Unit: Unknown}
	}
	now := r.opts.Now()
	gone := c.Gone
	w := c.Workload
	var l Labels
	switch {
	case w.Kube() && r.client == nil:
		// No API server to name the pod: what the path says.
		if w.ContainerID != "" {
			l.Container = shortID(w.ContainerID)
		} else {
			l.Unit = path.Base(c.Path)
		}
	case w.Kube():
		var ok bool
		var podGone time.Time
		if w.ContainerID != "" {
			l.Namespace, l.Pod, l.Container, podGone, ok = r.pods.container(w.ContainerID)
		}
		if !ok {
			// The pod's own cgroup, its sandbox, or a container the
			// pod's status does not list (yet).
			l.Namespace, l.Pod, podGone, ok = r.pods.pod(w.PodUID)
		}
		if !ok {
			r.unknownPods.Add(1)
			return Labels{Namespace: Unknown, Pod: Unknown, Container: Unknown}
		}
		gone = earliest(gone, podGone)
	case w.ContainerID != "":
		l.Container = shortID(w.ContainerID)
	default:
		l.Unit = w.Unit
	}
	exp := now.Add(r.opts.TTL)
	if !gone.IsZero() {
		exp = gone.Add(r.opts.TTL)
	}
	return r.admit(l, now, exp)
}

// shortID is a container id's first 12 digits, the short form that
// docker ps, podman ps and crictl ps show. Cgroup paths carry ids, not
// container names, and the names live in each runtime's own store, which
// a scrape must not wait on.
func shortID(id string) string { return id[:min(12, len(id))] }

// PodIPs returns the addresses of this node's pods that have a network
// namespace of their own (not hostNetwork), deleted ones within the TTL
// included, sorted.
func (r *Resolver) PodIPs() []netip.Addr { return r.pods.addrs() }

// PodsChanged receives after pods' addresses may have changed: a pod
// added, deleted or given addresses. Sends are coalesced, and there is
// one channel: for one consumer.
func (r *Resolver) PodsChanged() <-chan struct{} { return r.pods.changed }

// PodByIP returns the Namespace and Pod labels of the pod of this node
// that has address ip, from the informer's cache only, counted against
// the label-set cap like Resolve's (Overflow beyond it); false when no
// pod (or a deleted one within the TTL) has it.
func (r *Resolver) PodByIP(ip netip.Addr) (Labels, bool) {
	ns, name, gone, ok := r.pods.byIP(ip)
	if !ok {
		return Labels{}, false
	}
	now := r.opts.Now()
	exp := now.Add(r.opts.TTL)
	if !gone.IsZero() {
		exp = gone.Add(r.opts.TTL)
	}
	l := r.admit(Labels{Namespace: ns, Pod: name}, now, exp)
	l.Container = ""
	return l, true
}

// admit counts l against the cap: a label set lives until exp, refreshed
// on every use, and lapses after.
func (r *Resolver) admit(l Labels, now, exp time.Time) Labels {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.sets[l]; ok || len(r.sets) < r.opts.MaxLabelSets {
		if !now.Before(exp) {
			// Gone for the TTL already; the sweep will catch up.
			delete(r.sets, l)
			return l
		}
		r.sets[l] = exp
		return l
	}
	r.overflows.Add(1)
	if l.Unit != "" {
		return Labels{Unit: Overflow}
	}
	o := Labels{Container: Overflow}
	if l.Pod != "" {
		o.Namespace, o.Pod = Overflow, Overflow
	}
	return o
}

func earliest(a, b time.Time) time.Time {
	switch {
	case a.IsZero():
		return b
	case b.IsZero() || a.Before(b):
		return a
	}
	return b
}

// Stats returns the counters and sizes.
func (r *Resolver) Stats() Stats {
	pods, _ := r.pods.len()
	r.mu.Lock()
	sets := len(r.sets)
	r.mu.Unlock()
	return Stats{
		UnknownCgroups: r.unknownCgroups.Load(),
		UnknownPods:    r.unknownPods.Load(),
		Overflows:      r.overflows.Load(),
		LabelSets:      sets,
		Cgroups:        r.index.Len(),
		Pods:           pods,
	}
}

// LabelSets returns the label sets live now (at the last sweep).
func (r *Resolver) LabelSets() []Labels {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Labels, 0, len(r.sets))
	for l := range r.sets {
		out = append(out, l)
	}
	return out
}
