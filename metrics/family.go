package metrics

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// FamilyCollector is a Collector that builds some of its metric families
// itself, as the protobuf messages that the exposition formats encode,
// rather than as one prometheus.Metric per series for client_golang's
// registry to turn into those messages. It is for families with many
// series that change on every scrape (the syscall latency histograms):
// their messages are kept and refilled from one scrape to the next, where
// the registry path allocates every series anew and checks it again.
type FamilyCollector interface {
	Collector
	// Families returns the families the collector builds itself, valid
	// until done is called (done may be nil), and an error for those it
	// could not build. They must not be among those Update sends.
	Families() (mfs []*dto.MetricFamily, done func(), err error)
}

// Gatherer gathers a registry, then the families of the FamilyCollectors
// among its collectors, and merges them as the registry would: by name.
// It is a prometheus.TransactionalGatherer: the families it returns stay
// valid until done is called.
type Gatherer struct {
	reg      prometheus.Gatherer
	families []FamilyCollector
}

// NewGatherer returns the gatherer over reg, in which the Exporter of
// collectors is registered.
func NewGatherer(reg prometheus.Gatherer, collectors map[string]Collector) *Gatherer {
	g := &Gatherer{reg: reg}
	for _, name := range slices.Sorted(maps.Keys(collectors)) {
		if fc, ok := collectors[name].(FamilyCollector); ok {
			g.families = append(g.families, fc)
		}
	}
	return g
}

// Gather implements prometheus.TransactionalGatherer. The registry's
// collectors run first: the map reads they time are then shared with the
// families (Cached).
func (g *Gatherer) Gather() ([]*dto.MetricFamily, func(), error) {
	mfs, err := g.reg.Gather()
	var dones []func()
	for _, fc := range g.families {
		fams, done, ferr := fc.Families()
		if done != nil {
			dones = append(dones, done)
		}
		if ferr != nil {
			err = errors.Join(err, ferr)
		}
		mfs = append(mfs, fams...)
	}
	done := func() {
		for _, d := range dones {
			d()
		}
	}
	slices.SortStableFunc(mfs, func(a, b *dto.MetricFamily) int { return strings.Compare(a.GetName(), b.GetName()) })
	for i := 1; i < len(mfs); i++ {
		if mfs[i].GetName() == mfs[i-1].GetName() {
			// A programming error (a family built both ways): the
			// registry's is kept, it comes first in the stable sort.
			err = errors.Join(err, fmt.Errorf("metric family %s gathered twice", mfs[i].GetName()))
			mfs = slices.Delete(mfs, i, i+1)
			i--
		}
	}
	return mfs, done, err
}

// familyPool keeps the families built for past scrapes for the next ones:
// one set per scrape in progress, so that concurrent scrapes never share
// one.
type familyPool[T any] struct {
	mu   sync.Mutex
	free []*T
}

// maxFree bounds the sets kept beyond those in use.
const maxFree = 2

// get returns a set to fill, a kept one if any.
func (p *familyPool[T]) get() *T {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.free); n > 0 {
		t := p.free[n-1]
		p.free = p.free[:n-1]
		return t
	}
	return new(T)
}

// put keeps t for a later get, unless maxFree are kept already.
func (p *familyPool[T]) put(t *T) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.free) < maxFree {
		p.free = append(p.free, t)
	}
}
