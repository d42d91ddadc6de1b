package metrics

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/internal/k8smeta"
)

// Workloads names the workload of a cgroup v2 id from caches only
// (k8smeta.Resolver): a scrape never waits for the API server.
type Workloads interface {
	Resolve(cgroupID uint64) k8smeta.Labels
}

// WorkloadStats is the resolver's view of what it could not attribute.
type WorkloadStats interface {
	Stats() k8smeta.Stats
}

// workloadLabels are the label names of a workload, cAdvisor's for pods;
// unit names a cgroup outside pods (a systemd unit, "unknown", "other").
var workloadLabels = []string{"namespace", "pod", "container", "unit"}

// WorkloadLabelValues are the values of a workload's labels on a
// per-workload series, in the series' label order: what an exemplar of
// that series is keyed by.
func WorkloadLabelValues(l k8smeta.Labels) []string {
	return []string{l.Namespace, l.Pod, l.Container, l.Unit}
}

// podLabels are the label names of a workload to its pod.
var podLabels = []string{"namespace", "pod", "unit"}

func toPod(l k8smeta.Labels) k8smeta.Labels {
	if l.Pod == "" && l.Unit == "" && l.Container != "" {
		// A container outside Kubernetes: its id stands in for the unit.
		l.Unit = l.Container
	}
	l.Container = ""
	return l
}

func podValues(l k8smeta.Labels) []string { return []string{l.Namespace, l.Pod, l.Unit} }

// cgroupKey is one kernel counter: a cgroup and what else keys it (K).
type cgroupKey[K comparable] struct {
	id  uint64
	key K
}

// seriesKey is one exported series: a workload and K.
type workloadKey[K comparable] struct {
	key    K
	labels k8smeta.Labels
}

type cgroupState struct {
	labels  k8smeta.Labels
	base    []uint64 // the values when the cgroup joined its label set
	last    []uint64
	changed time.Time
}

type seriesState struct {
	carry []uint64 // what cgroups that left the series had added
	used  time.Time
}

// workloadSums folds per-cgroup values that only grow (histogram slots and
// sum, or counters) into per-workload series that only grow too, although
// cgroups come and go, a cgroup's labels change (an unknown one becomes
// known) and several cgroups share a workload (a pod's own cgroup and its
// sandbox). A cgroup whose values have not changed for ttl is returned to
// be deleted from the kernel map; a series with no cgroup left goes ttl
// after its last change.
type workloadSums[K comparable] struct {
	res Workloads
	ttl time.Duration
	now func() time.Time
	// fold coarsens a workload (to its pod, say); nil: as resolved.
	fold func(k8smeta.Labels) k8smeta.Labels

	mu      sync.Mutex
	cgroups map[cgroupKey[K]]*cgroupState
	series  map[workloadKey[K]]*seriesState
	// undeleted are the cgroups returned to be deleted from the kernel's
	// map that may still be in it (not yet deleted, or the deletion
	// failed), with the values already carried: if one is read again, it
	// goes on from those.
	undeleted map[cgroupKey[K]][]uint64
}

func newWorkloadSums[K comparable](res Workloads, ttl time.Duration) *workloadSums[K] {
	return &workloadSums[K]{res: res, ttl: ttl, now: time.Now,
		cgroups: map[cgroupKey[K]]*cgroupState{}, series: map[workloadKey[K]]*seriesState{},
		undeleted: map[cgroupKey[K]][]uint64{}}
}

// leave adds what st brought to its series to that series' carry.
func (w *workloadSums[K]) leave(k K, st *cgroupState) {
	sk := workloadKey[K]{k, st.labels}
	s := w.series[sk]
	if s == nil {
		s = &seriesState{carry: make([]uint64, len(st.last))}
		w.series[sk] = s
	}
	for i := range st.last {
		s.carry[i] += st.last[i] - st.base[i]
	}
	if st.changed.After(s.used) {
		s.used = st.changed
	}
}

// update takes the kernel's current values and returns the series, and
// the cgroups idle for ttl, which the caller deletes from the kernel.
// Values of one K must all have the same length.
func (w *workloadSums[K]) update(cur map[cgroupKey[K]][]uint64) (series map[workloadKey[K]][]uint64, forget []cgroupKey[K]) {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := w.now()
	for ck, st := range w.cgroups {
		if _, ok := cur[ck]; !ok { // deleted from the kernel map
			w.leave(ck.key, st)
			delete(w.cgroups, ck)
		}
	}
	for ck := range w.undeleted {
		if _, ok := cur[ck]; !ok {
			delete(w.undeleted, ck)
		}
	}
	for ck, v := range cur {
		l := w.res.Resolve(ck.id)
		if w.fold != nil {
			l = w.fold(l)
		}
		st := w.cgroups[ck]
		if st == nil {
			base := make([]uint64, len(v))
			if carried, ok := w.undeleted[ck]; ok && !restarted(v, carried) {
				base = carried // its counts up to these are in the carry
			}
			delete(w.undeleted, ck)
			st = &cgroupState{labels: l, base: base, last: slices.Clone(v), changed: now}
			w.cgroups[ck] = st
		} else {
			switch {
			case restarted(v, st.last): // the kernel's entry was re-created
				w.leave(ck.key, st)
				st.labels, st.base, st.changed = l, make([]uint64, len(v)), now
			case !slices.Equal(v, st.last):
				st.changed = now
			}
			if l != st.labels {
				w.leave(ck.key, st)
				st.labels, st.base = l, slices.Clone(st.last)
			}
			st.last = slices.Clone(v)
		}
		if now.Sub(st.changed) >= w.ttl {
			w.leave(ck.key, st)
			delete(w.cgroups, ck)
			w.undeleted[ck] = st.last
			forget = append(forget, ck)
		}
	}
	series = map[workloadKey[K]][]uint64{}
	add := func(sk workloadKey[K], v, base []uint64) {
		out := series[sk]
		if out == nil {
			out = make([]uint64, len(v))
			series[sk] = out
		}
		for i := range v {
			out[i] += v[i]
			if base != nil {
				out[i] -= base[i]
			}
		}
	}
	live := map[workloadKey[K]]bool{}
	for ck, st := range w.cgroups {
		sk := workloadKey[K]{ck.key, st.labels}
		live[sk] = true
		add(sk, st.last, st.base)
	}
	for sk, s := range w.series {
		if !live[sk] && now.Sub(s.used) >= w.ttl {
			delete(w.series, sk)
			continue
		}
		add(sk, s.carry, nil)
	}
	return series, forget
}

// restarted reports whether v, a kernel entry's values, cannot follow
// last: a counter went down, so the entry was re-created.
func restarted(v, last []uint64) bool {
	if len(v) != len(last) {
		return true
	}
	for i := range v {
		if v[i] < last[i] {
			return true
		}
	}
	return false
}

// updateAndForget is update, then forget called for each cgroup idle for
// the TTL, so that the caller deletes it from the kernel map; forget's
// errors are joined. After a deletion, deleted is called: the read cur
// came from still holds the deleted entries and must not be passed again
// (the collectors' cached snapshot), or they would count again, as new
// cgroups.
func (w *workloadSums[K]) updateAndForget(cur map[cgroupKey[K]][]uint64, forget func(cgroupKey[K]) error, deleted func()) (map[workloadKey[K]][]uint64, error) {
	series, idle := w.update(cur)
	var errs []error
	var gone []cgroupKey[K]
	for _, ck := range idle {
		if err := forget(ck); err != nil {
			errs = append(errs, err)
		} else {
			gone = append(gone, ck)
		}
	}
	if len(gone) > 0 {
		w.mu.Lock()
		for _, ck := range gone {
			delete(w.undeleted, ck)
		}
		w.mu.Unlock()
		deleted()
	}
	if len(errs) > 0 {
		return series, fmt.Errorf("forget idle cgroups: %w", errors.Join(errs...))
	}
	return series, nil
}

// addOverflow adds v, what the kernel counted without a cgroup because its
// per-cgroup map was full, to the series of k labelled unit="other".
func addOverflow[K comparable](series map[workloadKey[K]][]uint64, k K, v []uint64) {
	sk := workloadKey[K]{key: k, labels: k8smeta.Labels{Unit: k8smeta.Overflow}}
	if prev := series[sk]; prev != nil {
		for i := range v {
			v[i] += prev[i]
		}
	}
	series[sk] = v
}

// workloadCollector exports the resolver's counters and sizes.
type workloadCollector struct {
	src                                   WorkloadStats
	unknownCgroups, unknownPods, overflow *prometheus.Desc
	labelSets, cgroups, pods              *prometheus.Desc
}

// NewWorkloadCollector exports what workload attribution could not
// attribute (unknown cgroups and pods, label sets beyond the cap) and how
// much it holds.
func NewWorkloadCollector(src WorkloadStats) Collector {
	return &workloadCollector{
		src: src,
		unknownCgroups: prometheus.NewDesc("ktel_workload_unknown_cgroups_total",
			"Lookups of cgroup ids not (yet) in the cgroup index, labelled unit=\"unknown\".", nil, nil),
		unknownPods: prometheus.NewDesc("ktel_workload_unknown_pods_total",
			"Lookups of pods' cgroups whose pod was not (yet) known, labelled \"unknown\".", nil, nil),
		overflow: prometheus.NewDesc("ktel_label_overflow_total",
			"Observations exported under the label value \"other\" because the label had reached its cap on distinct values.",
			nil, prometheus.Labels{"probe": "workload", "label": "workload"}),
		labelSets: prometheus.NewDesc("ktel_workload_label_sets",
			"Workload label sets live now (at most KTEL_WORKLOAD_MAX_LABEL_SETS).", nil, nil),
		cgroups: prometheus.NewDesc("ktel_workload_cgroups",
			"Cgroups in the cgroup index, removed ones within their TTL included.", nil, nil),
		pods: prometheus.NewDesc("ktel_workload_pods",
			"Pods of this node known, deleted ones within their TTL included.", nil, nil),
	}
}

func (c *workloadCollector) Update(ch chan<- prometheus.Metric) error {
	s := c.src.Stats()
	ch <- prometheus.MustNewConstMetric(c.unknownCgroups, prometheus.CounterValue, float64(s.UnknownCgroups))
	ch <- prometheus.MustNewConstMetric(c.unknownPods, prometheus.CounterValue, float64(s.UnknownPods))
	ch <- prometheus.MustNewConstMetric(c.overflow, prometheus.CounterValue, float64(s.Overflows))
	ch <- prometheus.MustNewConstMetric(c.labelSets, prometheus.GaugeValue, float64(s.LabelSets))
	ch <- prometheus.MustNewConstMetric(c.cgroups, prometheus.GaugeValue, float64(s.Cgroups))
	ch <- prometheus.MustNewConstMetric(c.pods, prometheus.GaugeValue, float64(s.Pods))
	return nil
}
