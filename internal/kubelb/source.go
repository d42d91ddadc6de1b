package kubelb

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discovery "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/ktel-dev/ktel/internal/lb"
)

// Label selectors of the informers, as kube-proxy's: a Service labelled
// with service-proxy-name belongs to another proxy, and the slices of
// headless Services carry the headless label. An object that gains such a
// label is seen as deleted.
const (
	serviceSelector = "!service.kubernetes.io/service-proxy-name"
	sliceSelector   = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
)

// Defaults of Options.
const (
	// DefaultMinSyncPeriod is kube-proxy's default --min-sync-period: a
	// burst of changes within it is applied in one sync.
	DefaultMinSyncPeriod = time.Second
	// DefaultRetryPeriod is how long after a failed apply (maps full, say)
	// the same state is tried again if nothing changed meanwhile.
	DefaultRetryPeriod = 10 * time.Second
)

// Metrics receives what a sync measured (metrics.LBKube in the daemon).
// Its methods are called from the sync goroutine only.
type Metrics interface {
	// ObserveSync is the duration of a successful sync: translating the
	// Services that changed (all of them in a full sync) and applying
	// them.
	ObserveSync(time.Duration)
	// ObserveNetworkProgramming is, for each EndpointSlice change a
	// successful sync applied, the time from the change's trigger (the
	// last-change-trigger-time annotation) to the end of the apply: the
	// map writes, and the closing of connected UDP sockets to removed
	// backends.
	ObserveNetworkProgramming(time.Duration)
	// Synced reports a successful sync at time at, the services with
	// internalTrafficPolicy Local and no local endpoint, and what was
	// skipped, by reason.
	Synced(at time.Time, noLocalEndpoints int, skipped map[string]int)
}

// Options configure New.
type Options struct {
	Client kubernetes.Interface
	// Node is this node's name: endpoints whose nodeName it is are local.
	Node string
	// MinSyncPeriod is the least time between two syncs; 0 is
	// DefaultMinSyncPeriod.
	MinSyncPeriod time.Duration
	// RetryPeriod is how long after a failed apply it is tried again; 0 is
	// DefaultRetryPeriod.
	RetryPeriod time.Duration
	Metrics     Metrics // may be nil
	Log         *slog.Logger
}

// Source keeps the load balancer's services in step with the API server.
// The datapath keeps serving the last applied state while the API server
// is away; the informers then list again, and the next sync applies the
// difference.
type Source struct {
	opts    Options
	factory multiFactory // one per label selector

	services   cache.Store // of *service, by namespace/name
	hasSynced  []cache.InformerSynced
	kick       chan struct{} // a change is waiting for a sync
	synced     chan struct{} // closed after the first successful apply
	started    time.Time
	stop       chan struct{}
	wg         sync.WaitGroup
	startOnce  sync.Once
	closeOnce  sync.Once
	syncedOnce sync.Once
	triggerMu  sync.Mutex
	// triggers holds, per slice (namespace/name), the earliest
	// last-change-trigger-time not yet applied, as kube-proxy keeps it:
	// bounded by the number of slices however long applies fail.
	triggers map[string]time.Time
	// skipped is what the last successful sync skipped, to warn only
	// when it changes.
	skipped map[string]int

	// mu guards slices and dirty, which the informers' handlers keep.
	mu sync.Mutex
	// slices are the EndpointSlices of each Service (namespace/name)
	// sorted by name: the slice informer's objects, indexed.
	slices map[string][]*epSlice
	// dirty are the Services (namespace/name) whose Service or slices
	// changed since the last sync.
	dirty map[string]bool

	// The sync goroutine's: the translation as last applied, and whether
	// the next sync must translate and apply everything (the first, and
	// after a failed apply).
	model *model
	full  bool
}

// New returns a Source over opts.Client. Nothing is watched before Start.
func New(opts Options) (*Source, error) {
	if opts.Client == nil {
		return nil, errors.New("no Kubernetes client")
	}
	if opts.MinSyncPeriod <= 0 {
		opts.MinSyncPeriod = DefaultMinSyncPeriod
	}
	if opts.RetryPeriod <= 0 {
		opts.RetryPeriod = DefaultRetryPeriod
	}
	if opts.Log == nil {
		opts.Log = slog.New(slog.DiscardHandler)
	}
	s := &Source{
		opts:    opts,
		kick:    make(chan struct{}, 1),
		synced:  make(chan struct{}),
		stop:    make(chan struct{}),
		started: time.Now(),
		slices:  map[string][]*epSlice{},
		dirty:   map[string]bool{},
		model:   newModel(),
		full:    true,
	}
	// A factory's list options are the same for every informer it makes,
	// and the two selectors differ: one factory each.
	// The caches hold the compact service and epSlice, not the API
	// objects: the informers' listers do not apply to them.
	svcFactory := informers.NewSharedInformerFactoryWithOptions(opts.Client, 0,
		informers.WithTransform(s.compact),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = serviceSelector }))
	sliceFactory := informers.NewSharedInformerFactoryWithOptions(opts.Client, 0,
		informers.WithTransform(s.compact),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sliceSelector }))
	svcInf := svcFactory.Core().V1().Services()
	sliceInf := sliceFactory.Discovery().V1().EndpointSlices()
	s.services = svcInf.Informer().GetStore()
	h1, err := svcInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.serviceChanged(o) },
		UpdateFunc: func(_, o any) { s.serviceChanged(o) },
		DeleteFunc: func(o any) { s.serviceChanged(o) },
	})
	if err != nil {
		return nil, fmt.Errorf("service informer: %w", err)
	}
	h2, err := sliceInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.sliceChanged(nil, o, true) },
		UpdateFunc: func(old, o any) { s.sliceChanged(old, o, true) },
		// A deleted slice's trigger time dates its last update, not the
		// deletion: like kube-proxy, no latency is measured for it.
		DeleteFunc: func(o any) { s.sliceChanged(o, nil, false) },
	})
	if err != nil {
		return nil, fmt.Errorf("endpointslice informer: %w", err)
	}
	// Synced once the caches hold the first list and the handlers have
	// seen it.
	s.hasSynced = []cache.InformerSynced{svcInf.Informer().HasSynced, sliceInf.Informer().HasSynced, h1.HasSynced, h2.HasSynced}
	s.factory = multiFactory{svcFactory, sliceFactory}
	return s, nil
}

// multiFactory starts and stops several factories.
type multiFactory []informers.SharedInformerFactory

func (m multiFactory) Start(stop <-chan struct{}) {
	for _, f := range m {
		f.Start(stop)
	}
}

func (m multiFactory) Shutdown() {
	for _, f := range m {
		f.Shutdown()
	}
}

// Start starts the informers and the sync loop, which applies the
// services through apply, from one goroutine, never before both informers
// have synced: the first sync, and the first after a failure, with every
// service (ApplyServices), the others with the Services that changed
// (ApplyChanges). apply must leave the previous services in place when it
// fails. Start returns at once.
func (s *Source) Start(apply lb.Applier) error {
	started := false
	s.startOnce.Do(func() {
		started = true
		s.factory.Start(s.stop)
		s.wg.Go(func() { s.run(apply) })
	})
	if !started {
		return errors.New("already started")
	}
	return nil
}

// Synced is closed once the first sync has been applied.
func (s *Source) Synced() <-chan struct{} { return s.synced }

// Close stops the sync loop and the informers. What was applied stays.
func (s *Source) Close() error {
	s.closeOnce.Do(func() {
		close(s.stop)
		s.wg.Wait()
		s.factory.Shutdown()
	})
	return nil
}

// changed asks for a sync. Many changes before the sync starts make one.
func (s *Source) changed() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// serviceChanged marks the Service of o (added, updated or deleted) for
// the next sync.
func (s *Source) serviceChanged(o any) {
	var key string
	switch v := o.(type) {
	case *service:
		key = v.key()
	case cache.DeletedFinalStateUnknown:
		key = v.Key
	default:
		return
	}
	s.mu.Lock()
	s.dirty[key] = true
	s.mu.Unlock()
	s.changed()
}

// sliceChanged moves a slice in the index from old to o (either may be
// nil: added, deleted), marks the Services of both for the next sync, and
// records o's trigger time, for the network programming latency (with
// trigger set). As kube-proxy does, times from before the source started
// are ignored: they belong to changes some other proxy programmed.
func (s *Source) sliceChanged(old, o any, trigger bool) {
	if d, ok := old.(cache.DeletedFinalStateUnknown); ok {
		old = d.Obj
	}
	before, _ := old.(*epSlice)
	after, _ := o.(*epSlice)
	s.mu.Lock()
	if before != nil {
		if k := before.serviceKey(); k != "" {
			l := slices.DeleteFunc(s.slices[k], func(x *epSlice) bool { return x.name == before.name })
			if len(l) == 0 {
				delete(s.slices, k)
			} else {
				s.slices[k] = l
			}
			s.dirty[k] = true
		}
	}
	if after != nil {
		if k := after.serviceKey(); k != "" {
			l := s.slices[k]
			i, found := slices.BinarySearchFunc(l, after.name, func(x *epSlice, name string) int { return strings.Compare(x.name, name) })
			if found {
				l[i] = after
			} else {
				s.slices[k] = slices.Insert(l, i, after)
			}
			s.dirty[k] = true
		}
	}
	s.mu.Unlock()
	if trigger && after != nil && after.trigger.After(s.started) {
		s.addTriggers(map[string]time.Time{after.namespace + "/" + after.name: after.trigger})
	}
	s.changed()
}

// addTriggers merges trigger times per slice, keeping the earliest
// unapplied one of each.
func (s *Source) addTriggers(m map[string]time.Time) {
	s.triggerMu.Lock()
	defer s.triggerMu.Unlock()
	if s.triggers == nil {
		s.triggers = make(map[string]time.Time, len(m))
	}
	for k, t := range m {
		if old, ok := s.triggers[k]; !ok || t.Before(old) {
			s.triggers[k] = t
		}
	}
}

// run is the sync loop: it waits for both informers, then syncs at most
// once per MinSyncPeriod while changes come, in the manner of
// kube-proxy's bounded-frequency runner, and again RetryPeriod after a
// failure.
func (s *Source) run(apply lb.Applier) {
	if !cache.WaitForCacheSync(s.stop, s.hasSynced...) {
		return
	}
	s.opts.Log.Info("kubernetes caches synced")
	s.changed()
	var (
		last  time.Time
		retry <-chan time.Time
	)
	for {
		select {
		case <-s.stop:
			return
		case <-s.kick:
		case <-retry:
		}
		if wait := time.Until(last.Add(s.opts.MinSyncPeriod)); wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-s.stop:
				t.Stop()
				return
			case <-t.C:
			}
		}
		// Changes that came while waiting are in the caches now; one
		// that comes from here on asks for a sync of its own.
		select {
		case <-s.kick:
		default:
		}
		last = time.Now()
		if err := s.sync(apply); err != nil {
			s.opts.Log.Error(lb.FailureMessage("services from the API server", err), "retry_in", s.opts.RetryPeriod, "err", err)
			retry = time.After(s.opts.RetryPeriod)
			continue
		}
		retry = nil
	}
}

// sync applies the caches' current content: what changed since the last
// sync, or everything when s.full.
func (s *Source) sync(apply lb.Applier) error {
	start := time.Now()
	s.triggerMu.Lock()
	triggers := s.triggers
	s.triggers = nil
	s.triggerMu.Unlock()

	look := lookup{
		service: func(key string) *service {
			o, ok, _ := s.services.GetByKey(key)
			if !ok {
				return nil
			}
			v, _ := o.(*service)
			return v
		},
		slices: func(key string) []*epSlice { return s.slices[key] },
	}
	var err error
	s.mu.Lock()
	dirty := s.dirty
	s.dirty = map[string]bool{}
	if s.full {
		var all []*service
		for _, o := range s.services.List() {
			if v, ok := o.(*service); ok {
				all = append(all, v)
			}
		}
		svcs := s.model.rebuild(all, look)
		s.mu.Unlock()
		err = apply.ApplyServices(svcs)
	} else {
		upsert, remove := s.model.update(slices.Sorted(maps.Keys(dirty)), look)
		s.mu.Unlock()
		if len(upsert) > 0 || len(remove) > 0 {
			err = apply.ApplyChanges(upsert, remove)
		}
	}
	// After a failure the model is ahead of what is applied: the next
	// sync translates and applies everything.
	s.full = err != nil
	if err != nil {
		// Measured when a later sync applies them.
		s.addTriggers(triggers)
		return err
	}
	end := time.Now()
	r := Result{Skipped: s.model.total.skipped(), NoLocalEndpoints: s.model.total.noLocal}
	if m := s.opts.Metrics; m != nil {
		m.ObserveSync(end.Sub(start))
		for _, t := range triggers {
			m.ObserveNetworkProgramming(end.Sub(t))
		}
		m.Synced(end, r.NoLocalEndpoints, maps.Clone(r.Skipped))
	}
	// Warned when the counts change, not on every sync.
	if len(r.Skipped) > 0 && !maps.Equal(r.Skipped, s.skipped) {
		reasons := slices.Sorted(maps.Keys(r.Skipped))
		s.opts.Log.Warn("kubernetes objects skipped", "reasons", reasons, "counts", r.Skipped)
	}
	s.skipped = r.Skipped
	s.opts.Log.Debug("services synced", "services", len(s.model.entries), "changed", len(dirty), "took", end.Sub(start))
	s.syncedOnce.Do(func() {
		close(s.synced)
		// The initial lists' objects as decoded, before the transform,
		// were garbage once compacted, but the collections during the
		// lists set the heap goal by them, and with incremental syncs
		// allocating little the next collection may be minutes away:
		// collect now and return the memory to the system.
		debug.FreeOSMemory()
	})
	return nil
}

// compact turns Services and EndpointSlices into what the translation
// reads (service, epSlice) before they enter the caches: the informers
// then hold a fraction of the objects, which matters in large clusters.
func (s *Source) compact(o any) (any, error) {
	switch v := o.(type) {
	case *corev1.Service:
		return compactService(v), nil
	case *discovery.EndpointSlice:
		return compactSlice(v, s.opts.Node), nil
	}
	// Tombstones (cache.DeletedFinalStateUnknown) hold an object already
	// compacted.
	return o, nil
}
