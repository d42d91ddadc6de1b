package metrics

import (
	"bytes"
	"cmp"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/histogram"
	"github.com/ktel-dev/ktel/internal/k8smeta"
)

type fakeWorkloads map[uint64]k8smeta.Labels

func (f fakeWorkloads) Resolve(id uint64) k8smeta.Labels {
	if l, ok := f[id]; ok {
		return l
	}
	return k8smeta.Labels{Unit: k8smeta.Unknown}
}

type none = struct{}

func cg(id uint64) cgroupKey[none] { return cgroupKey[none]{id: id} }

// Series only grow while cgroups share a workload, leave the kernel's map
// and change labels; they go once idle for the TTL.
func TestWorkloadSums(t *testing.T) {
	podA := k8smeta.Labels{Namespace: "ns", Pod: "a"}
	podB := k8smeta.Labels{Namespace: "ns", Pod: "b", Container: "app"}
	unknown := k8smeta.Labels{Unit: k8smeta.Unknown}
	res := fakeWorkloads{1: podA, 2: podA}
	now := time.Unix(1000, 0)
	w := newWorkloadSums[none](res, time.Minute)
	w.now = func() time.Time { return now }
	check := func(series map[workloadKey[none]][]uint64, want map[k8smeta.Labels]uint64) {
		t.Helper()
		got := map[k8smeta.Labels]uint64{}
		for sk, v := range series {
			got[sk.labels] = v[0]
		}
		if len(got) != len(want) {
			t.Fatalf("series %v, want %v", got, want)
		}
		for l, n := range want {
			if got[l] != n {
				t.Errorf("%+v: %d, want %d", l, got[l], n)
			}
		}
	}

	s, forget := w.update(map[cgroupKey[none]][]uint64{cg(1): {5}, cg(2): {7}, cg(3): {2}})
	check(s, map[k8smeta.Labels]uint64{podA: 12, unknown: 2})
	if len(forget) != 0 {
		t.Errorf("forget %v", forget)
	}

	// Cgroup 3's pod becomes known; cgroup 1 leaves the kernel's map.
	res[3] = podB
	now = now.Add(10 * time.Second)
	s, _ = w.update(map[cgroupKey[none]][]uint64{cg(2): {8}, cg(3): {6}})
	check(s, map[k8smeta.Labels]uint64{podA: 13, unknown: 2, podB: 4})

	// Cgroup 1 comes back, its entry re-created from zero.
	now = now.Add(10 * time.Second)
	s, _ = w.update(map[cgroupKey[none]][]uint64{cg(1): {1}, cg(2): {8}, cg(3): {6}})
	check(s, map[k8smeta.Labels]uint64{podA: 14, unknown: 2, podB: 4})

	// Cgroups 2 and 3 idle for the TTL: forgotten; a series goes when no
	// cgroup of it changed for the TTL (unknown's last did 60 s ago).
	now = now.Add(50 * time.Second)
	s, forget = w.update(map[cgroupKey[none]][]uint64{cg(1): {3}, cg(2): {8}, cg(3): {6}})
	check(s, map[k8smeta.Labels]uint64{podA: 16})
	slices.SortFunc(forget, func(a, b cgroupKey[none]) int { return int(a.id) - int(b.id) })
	if !slices.Equal(forget, []cgroupKey[none]{cg(2), cg(3)}) {
		t.Errorf("forget %v, want cgroups 2 and 3", forget)
	}
	now = now.Add(time.Minute)
	s, forget = w.update(map[cgroupKey[none]][]uint64{cg(1): {3}})
	check(s, map[k8smeta.Labels]uint64{})
	if !slices.Equal(forget, []cgroupKey[none]{cg(1)}) {
		t.Errorf("forget %v, want cgroup 1", forget)
	}
}

type fakeForget struct{ ids []uint64 }

func (f *fakeForget) ForgetCgroup(id uint64) error { f.ids = append(f.ids, id); return nil }

// oneWait is a histogram of one wait of ns.
func oneWait(l *histogram.Layout, ns uint64) runqlat.Hist {
	s := make([]uint64, l.Slots())
	s[l.Slot(ns)] = 1
	return runqlat.Hist{Slots: s, SumNs: ns}
}

// Per workload, the histogram has namespace, pod, container and unit
// labels; unknown cgroups are unit="unknown", and waits the kernel could
// not key by cgroup unit="other", counted.
func TestRunqlatWorkloadCollector(t *testing.T) {
	f := newFakeRunqlat(t)
	h := func(ns uint64) runqlat.Hist { return oneWait(f.layout, ns) }
	f.snap.Cgroups = map[uint64]runqlat.Hist{10: h(3000), 11: h(3000), 12: h(5_000_000)}
	f.snap.CgroupsFull = 3 // Total has 3 waits
	res := fakeWorkloads{10: {Namespace: "ns", Pod: "web", Container: "nginx"}, 11: {Unit: "kubelet.service"}}
	c := NewRunqlatWorkloadCollector(f, &fakeForget{}, res, time.Minute, nil)
	got, err := testutil.CollectAndFormat(&collectorAdapter{c}, expfmt.TypeTextPlain,
		"ktel_runqueue_latency_seconds", "ktel_label_overflow_total")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`ktel_runqueue_latency_seconds_count{container="nginx",namespace="ns",pod="web",unit=""} 1`,
		`ktel_runqueue_latency_seconds_count{container="",namespace="",pod="",unit="kubelet.service"} 1`,
		`ktel_runqueue_latency_seconds_count{container="",namespace="",pod="",unit="unknown"} 1`,
		`ktel_runqueue_latency_seconds_count{container="",namespace="",pod="",unit="other"} 3`,
		`ktel_runqueue_latency_seconds_sum{container="",namespace="",pod="",unit="unknown"} 0.005`,
		`ktel_label_overflow_total{label="cgroup",probe="runqlat"} 3`,
	} {
		if !containsLine(string(got), want) {
			t.Errorf("missing %s in\n%s", want, got)
		}
	}
	if problems, err := testutil.CollectAndLint(&collectorAdapter{c}); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// Exemplars of spans observed under a workload's label values show on that
// workload's series only; once the workload's series is gone and its
// exemplars are older than the TTL, the store forgets them.
func TestRunqlatWorkloadExemplars(t *testing.T) {
	f := newFakeRunqlat(t)
	h := func(ns uint64) runqlat.Hist { return oneWait(f.layout, ns) }
	f.snap.Cgroups = map[uint64]runqlat.Hist{10: h(80_000_000), 11: h(3000)}
	web, cron := k8smeta.Labels{Namespace: "ns", Pod: "web", Container: "nginx"}, k8smeta.Labels{Unit: "cron.service"}
	res := fakeWorkloads{10: web, 11: cron}
	ex := NewExemplars()
	ex.Observe(RunqueueLatency, WorkloadLabelValues(web), Exemplar{Value: 0.08, TraceID: "0af7651916cd43dd8448eb211c80319c",
		SpanID: "b7ad6b7169203331", Time: time.Now()})
	// A workload that has no series (gone, or never had one), with an
	// exemplar older than the TTL.
	gone := k8smeta.Labels{Unit: "gone.service"}
	ex.Observe(RunqueueLatency, WorkloadLabelValues(gone), Exemplar{Value: 0.06, TraceID: "1af7651916cd43dd8448eb211c80319c",
		SpanID: "c7ad6b7169203331", Time: time.Now().Add(-2 * time.Minute)})

	mfs, err := gathered(NewRunqlatWorkloadCollector(f, &fakeForget{}, res, time.Minute, ex)).Gather()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeOpenMetrics))
	for _, mf := range mfs {
		if mf.GetName() != RunqueueLatency {
			continue
		}
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
		for _, m := range mf.Metric {
			n := len(m.Histogram.Exemplars)
			isWeb := slices.ContainsFunc(m.Label, func(lp *dto.LabelPair) bool { return lp.GetValue() == "web" })
			if isWeb && n != 1 || !isWeb && n != 0 {
				t.Errorf("%v: %d native exemplars", m.Label, n)
			}
		}
	}
	want := `ktel_runqueue_latency_seconds_bucket{container="nginx",namespace="ns",pod="web",unit="",le="0.125"} 1 # {trace_id="0af7651916cd43dd8448eb211c80319c",span_id="b7ad6b7169203331"} 0.08`
	if !strings.Contains(buf.String(), want) {
		t.Errorf("OpenMetrics output lacks\n%s\nin\n%s", want, buf.String())
	}
	if strings.Count(buf.String(), "trace_id=") != 1 {
		t.Errorf("exemplars on other series:\n%s", buf.String())
	}
	if ex.Lookup(RunqueueLatency, WorkloadLabelValues(gone)) != nil {
		t.Error("a gone workload's exemplar outlived its TTL")
	}
	if ex.Lookup(RunqueueLatency, WorkloadLabelValues(web)) == nil {
		t.Error("a live workload's exemplar was forgotten")
	}
}

// The resolver's counters.
func TestWorkloadCollector(t *testing.T) {
	c := NewWorkloadCollector(fakeStats{k8smeta.Stats{UnknownCgroups: 4, UnknownPods: 2, Overflows: 7, LabelSets: 9, Cgroups: 30, Pods: 5}})
	got, err := testutil.CollectAndFormat(&collectorAdapter{c}, expfmt.TypeTextPlain,
		"ktel_workload_unknown_cgroups_total", "ktel_workload_unknown_pods_total", "ktel_label_overflow_total",
		"ktel_workload_label_sets", "ktel_workload_cgroups", "ktel_workload_pods")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"ktel_workload_unknown_cgroups_total 4", "ktel_workload_unknown_pods_total 2",
		`ktel_label_overflow_total{label="workload",probe="workload"} 7`,
		"ktel_workload_label_sets 9", "ktel_workload_cgroups 30", "ktel_workload_pods 5",
	} {
		if !containsLine(string(got), want) {
			t.Errorf("missing %s in\n%s", want, got)
		}
	}
}

type fakeStats struct{ s k8smeta.Stats }

func (f fakeStats) Stats() k8smeta.Stats { return f.s }

func containsLine(text, line string) bool {
	for l := range strings.Lines(text) {
		if strings.TrimSuffix(l, "\n") == line {
			return true
		}
	}
	return false
}

type fakeTCPForget struct{}

func (fakeTCPForget) ForgetCgroup(tcpretrans.CgroupKey) error { return nil }

// Per pod: a pod's containers add up, sockets outside pods are by unit,
// and what the kernel's map had no room for is unit="other", counted.
func TestTCPRetransWorkloadCollector(t *testing.T) {
	f := &fakeTCPRetrans{snaps: []*tcpretrans.Snapshot{{
		Retransmits: map[tcpretrans.Key]uint64{synSent: 10, established: 4},
		Cgroups: map[tcpretrans.CgroupKey]uint64{
			{Key: synSent, Cgroup: 1}: 3, {Key: synSent, Cgroup: 2}: 2, {Key: synSent, Cgroup: 3}: 1,
			{Key: established, Cgroup: 4}: 4,
		},
		CgroupMapFull: 4,
	}}}
	res := fakeWorkloads{
		1: {Namespace: "ns", Pod: "web", Container: "nginx"},
		2: {Namespace: "ns", Pod: "web", Container: "sidecar"},
		3: {Unit: "sshd.service"},
		4: {Container: "0123456789ab"},
	}
	c := NewTCPRetransWorkloadCollector(f, fakeTCPForget{}, res, time.Minute)
	got, err := testutil.CollectAndFormat(&collectorAdapter{c}, expfmt.TypeTextPlain,
		"ktel_tcp_retransmits_total", "ktel_label_overflow_total")
	if err != nil {
		t.Fatal(err)
	}
	want := `# HELP ktel_label_overflow_total Observations exported under the label value "other" because the label had reached its cap on distinct values.
# TYPE ktel_label_overflow_total counter
ktel_label_overflow_total{label="cgroup",probe="tcpretrans"} 4
# HELP ktel_tcp_retransmits_total TCP segments retransmitted, by address family, TCP state at retransmit and kind (syn, synack, data).
# TYPE ktel_tcp_retransmits_total counter
ktel_tcp_retransmits_total{family="ipv4",kind="syn",namespace="",pod="",state="SYN_SENT",unit="other"} 4
ktel_tcp_retransmits_total{family="ipv4",kind="syn",namespace="",pod="",state="SYN_SENT",unit="sshd.service"} 1
ktel_tcp_retransmits_total{family="ipv4",kind="syn",namespace="ns",pod="web",state="SYN_SENT",unit=""} 5
ktel_tcp_retransmits_total{family="ipv6",kind="data",namespace="",pod="",state="ESTABLISHED",unit="0123456789ab"} 4
`
	if string(got) != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

type fakeSyscallForget struct{ keys []sysprobe.CgroupKey }

func (f *fakeSyscallForget) ForgetCgroup(k sysprobe.CgroupKey) error {
	f.keys = append(f.keys, k)
	return nil
}

// Per container: one histogram per syscall and workload; a pod's
// containers stay apart, the same workload's cgroups add up, and timed
// syscalls the kernel could not key by cgroup are unit="other", counted.
// Counts and errors stay by syscall.
func TestSyscallWorkloadCollector(t *testing.T) {
	f := newFake(t)
	l := f.layout
	h := func(ns ...uint64) sysprobe.Hist {
		s := make([]uint64, l.Slots())
		var sum uint64
		for _, v := range ns {
			s[l.Slot(v)]++
			sum += v
		}
		return sysprobe.Hist{Slots: s, SumNs: sum}
	}
	f.snap.Cgroups = map[sysprobe.CgroupKey]sysprobe.Hist{
		{Cgroup: 1, Nr: 0}:  h(3000, 3000), // read
		{Cgroup: 2, Nr: 0}:  h(500),
		{Cgroup: 2, Nr: 39}: h(2_000_000), // getpid
		{Cgroup: 3, Nr: 0}:  h(700),
		{Cgroup: 4, Nr: 39}: h(900),
	}
	f.snap.CgroupsFull = 4 // Latency has 4 reads
	res := fakeWorkloads{
		1: {Namespace: "ns", Pod: "web", Container: "nginx"},
		2: {Namespace: "ns", Pod: "web", Container: "sidecar"},
		3: {Namespace: "ns", Pod: "web", Container: "nginx"}, // a restarted container's new cgroup
	}
	forget := &fakeSyscallForget{}
	c := NewSyscallWorkloadCollector(f, forget, names, res, time.Minute)
	got, err := testutil.CollectAndFormat(&collectorAdapter{c}, expfmt.TypeTextPlain,
		"ktel_syscall_latency_seconds", "ktel_label_overflow_total", "ktel_syscalls_total")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`ktel_syscall_latency_seconds_count{container="nginx",namespace="ns",pod="web",syscall="read",unit=""} 3`,
		`ktel_syscall_latency_seconds_sum{container="nginx",namespace="ns",pod="web",syscall="read",unit=""} 6.7e-06`,
		`ktel_syscall_latency_seconds_count{container="sidecar",namespace="ns",pod="web",syscall="read",unit=""} 1`,
		`ktel_syscall_latency_seconds_count{container="sidecar",namespace="ns",pod="web",syscall="getpid",unit=""} 1`,
		`ktel_syscall_latency_seconds_count{container="",namespace="",pod="",syscall="getpid",unit="unknown"} 1`,
		`ktel_syscall_latency_seconds_count{container="",namespace="",pod="",syscall="read",unit="other"} 4`,
		`ktel_label_overflow_total{label="cgroup",probe="syscall"} 4`,
		`ktel_syscalls_total{syscall="read"} 40`,
	} {
		if !containsLine(string(got), want) {
			t.Errorf("missing %s in\n%s", want, got)
		}
	}
	if n := strings.Count(string(got), "ktel_syscall_latency_seconds_count{"); n != 5 {
		t.Errorf("%d latency series, want 5", n)
	}
	if problems, err := testutil.CollectAndLint(&collectorAdapter{c}); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	if len(forget.keys) != 0 {
		t.Errorf("forgot %v, nothing idle yet", forget.keys)
	}
	// Idle for the TTL: every (cgroup, syscall) is deleted from the
	// kernel, under its own key.
	later := time.Now().Add(2 * time.Minute)
	c.workloads.now = func() time.Time { return later }
	testutil.CollectAndCount(&collectorAdapter{c}, "ktel_syscall_latency_seconds")
	slices.SortFunc(forget.keys, func(a, b sysprobe.CgroupKey) int {
		return cmp.Or(cmp.Compare(a.Cgroup, b.Cgroup), cmp.Compare(a.Nr, b.Nr))
	})
	if want := []sysprobe.CgroupKey{{Cgroup: 1, Nr: 0}, {Cgroup: 2, Nr: 0}, {Cgroup: 2, Nr: 39}, {Cgroup: 3, Nr: 0}, {Cgroup: 4, Nr: 39}}; !slices.Equal(forget.keys, want) {
		t.Errorf("forgot %v, want %v", forget.keys, want)
	}
}

// fakeSyscallMap is the kernel's per-cgroup map behind a probe: each read
// copies it, after active's entry has counted one more read; ForgetCgroup
// deletes from it, or fails while fail is set.
type fakeSyscallMap struct {
	layout  *histogram.Layout
	cgroups map[sysprobe.CgroupKey]sysprobe.Hist
	active  sysprobe.CgroupKey
	fail    error
}

func (f *fakeSyscallMap) reads(n uint64) sysprobe.Hist {
	s := make([]uint64, f.layout.Slots())
	s[f.layout.Slot(3000)] = n
	return sysprobe.Hist{Slots: s, SumNs: 3000 * n}
}

func (f *fakeSyscallMap) Snapshot() (*sysprobe.Snapshot, error) {
	f.cgroups[f.active] = f.reads(f.cgroups[f.active].Count() + 1)
	return &sysprobe.Snapshot{Latency: map[uint32]sysprobe.Hist{}, Cgroups: maps.Clone(f.cgroups)}, nil
}

func (f *fakeSyscallMap) Layout() *histogram.Layout { return f.layout }

func (f *fakeSyscallMap) ForgetCgroup(k sysprobe.CgroupKey) error {
	if f.fail != nil {
		return f.fail
	}
	delete(f.cgroups, k)
	return nil
}

// A cgroup idle for the TTL leaves the kernel's map, and its counts stay
// in its workload's series, which another cgroup keeps live (a restarted
// container's new one), once: not again when a scrape is served the read
// made before the deletion (the collector's cached snapshot), nor when the
// deletion failed and the entry is still there at the next read.
func TestWorkloadForgetCountsOnce(t *testing.T) {
	l, err := histogram.NewLayout(3)
	if err != nil {
		t.Fatal(err)
	}
	idle, active := sysprobe.CgroupKey{Cgroup: 1, Nr: 0}, sysprobe.CgroupKey{Cgroup: 2, Nr: 0}
	f := &fakeSyscallMap{layout: l, active: active, cgroups: map[sysprobe.CgroupKey]sysprobe.Hist{}}
	f.cgroups[idle] = f.reads(2)
	nginx := k8smeta.Labels{Namespace: "ns", Pod: "web", Container: "nginx"}
	c := NewSyscallWorkloadCollector(f, f, names, fakeWorkloads{1: nginx, 2: nginx}, time.Minute)
	// Scrapes are served the last read unless the test or the collector
	// asks for a new one (fresh).
	c.snap = NewCached(f.Snapshot, time.Hour)
	t0 := time.Now()
	now := t0
	c.workloads.now = func() time.Time { return now }
	count := func(what string, at time.Duration, fresh bool, want uint64, wantErr bool) {
		t.Helper()
		now = t0.Add(at)
		if fresh {
			c.snap.Invalidate()
		}
		ch := make(chan prometheus.Metric, 100)
		err := c.Update(ch)
		close(ch)
		if (err != nil) != wantErr {
			t.Fatalf("%s: Update: %v", what, err)
		}
		var got uint64
		for m := range ch {
			var pb dto.Metric
			if m.Write(&pb) == nil && pb.Histogram != nil {
				got += pb.Histogram.GetSampleCount()
			}
		}
		if got != want {
			t.Errorf("%s: nginx's read count %d, want %d", what, got, want)
		}
	}
	count("first read", 0, true, 2+1, false)
	count("active cgroup read again", 30*time.Second, true, 2+2, false)
	// Cgroup 1 idle for the TTL, and its deletion fails: the entry stays,
	// and its counts count once.
	f.fail = errors.New("operation not permitted")
	count("deletion failed", time.Minute, false, 2+2, true)
	f.fail = nil
	count("entry still there", time.Minute, true, 2+3, false)
	count("active cgroup read again", 90*time.Second, true, 2+4, false)
	// Idle for the TTL again, and deleted.
	count("deleted", 2*time.Minute, false, 2+4, false)
	if _, ok := f.cgroups[idle]; ok {
		t.Fatal("not deleted from the kernel's map")
	}
	count("scrape after the deletion", 2*time.Minute, false, 2+5, false)
	count("and another", 2*time.Minute, false, 2+5, false)
	// Cgroup 1 reads again: a new entry, from zero.
	f.cgroups[idle] = f.reads(1)
	count("entry re-created", 2*time.Minute, true, 2+1+6, false)
}
