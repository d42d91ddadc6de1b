package main

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/k8smeta"
	"github.com/ktel-dev/ktel/metrics"
)

// A node at kubelet's default pod limit, each pod with a sandbox and two
// containers.
const (
	benchPods          = 110
	benchContainers    = 2
	attributionScrapes = 8
)

// runAttributionBench measures what workload attribution costs a 110-pod
// node: the kernel memory of runqlat's and tcpretrans's maps with and
// without per-cgroup keys (the per-cgroup maps filled by real waits of
// processes in 330 cgroups of kubelet's layout, below a cgroup of the
// bench's own), the series a scrape then holds, and the scrape's time.
func runAttributionBench(w io.Writer, log *slog.Logger, sum *summary) {
	if err := attribution(w, log, sum); err != nil {
		fmt.Fprintln(w, "attribution:", err)
	}
}

func attribution(w io.Writer, log *slog.Logger, sum *summary) error {
	fmt.Fprintf(w, "\nworkload attribution, a %d-pod node: %d cgroups of kubelet's systemd layout (a sandbox and %d containers per pod, containerd) below a cgroup of the bench's own, each running /bin/true once (its first wait creates its histogram); kernel memory as the kernel reports it (memlock of each map the probe's programs use, as bpftool map show); scrapes in-process, 1.1 s apart so that each reads the maps\n\n",
		benchPods, benchPods*(1+benchContainers), benchContainers)
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}

	// Node-level first: what attribution adds is the difference.
	base := map[string]memUse{}
	for name, load := range map[string]func() (programs, error){
		"runqlat":    func() (programs, error) { return runqlat.Load(runqlat.Options{Schema: 3}, log) },
		"tcpretrans": func() (programs, error) { return tcpretrans.Load(tcpretrans.Options{}, log) },
	} {
		p, err := load()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		base[name], err = probeMemory(p.Programs(), ncpu)
		p.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}

	dirs, ids, cleanup, err := podCgroups()
	defer cleanup()
	if err != nil {
		return fmt.Errorf("cgroups: %w", err)
	}
	p, err := runqlat.Load(runqlat.Options{Schema: 3, PerCgroup: true}, log)
	if err != nil {
		return fmt.Errorf("runqlat per cgroup: %w", err)
	}
	defer p.Close()
	if err := runIn(dirs); err != nil {
		return fmt.Errorf("run in cgroups: %w", err)
	}
	snap, err := p.Snapshot()
	if err != nil {
		return err
	}
	ours := 0
	for _, id := range ids {
		if _, ok := snap.Cgroups[id]; ok {
			ours++
		}
	}
	perRunqlat, err := probeMemory(p.Programs(), ncpu)
	if err != nil {
		return err
	}

	// tcpretrans: a node's retransmits come from few of its pods; the map
	// is filled directly with two keys for each of the 330 cgroups (an
	// element costs the kernel the same whoever inserts it), more than
	// any real node would hold.
	rp, err := tcpretrans.Load(tcpretrans.Options{PerCgroup: true}, log)
	if err != nil {
		return fmt.Errorf("tcpretrans per cgroup: %w", err)
	}
	defer rp.Close()
	if err := fillRetransCgroups(rp.Programs(), ids); err != nil {
		return fmt.Errorf("fill tcp_rtx_cgroups: %w", err)
	}
	perRtx, err := probeMemory(rp.Programs(), ncpu)
	if err != nil {
		return err
	}

	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "probe\tmaps\tper-cgroup entries\tfixed KiB\tper CPU KiB\ton 2 CPUs KiB\ton 64 CPUs KiB\t\n")
	row := func(name string, m memUse, entries string) {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t%.1f\t%.0f\t%.0f\t\n", name, m.maps, entries, m.fixed/1024, m.perCPU/1024, m.at(2)/1024, m.at(64)/1024)
	}
	row("runqlat, node-level", base["runqlat"], "")
	row("runqlat, per cgroup", perRunqlat, fmt.Sprintf("%d (%d of the bench's)", len(snap.Cgroups), ours))
	row("tcpretrans, node-level", base["tcpretrans"], "")
	row("tcpretrans, per cgroup", perRtx, fmt.Sprintf("%d", 2*len(ids)))
	tw.Flush()
	added := perRunqlat.at(2) - base["runqlat"].at(2) + perRtx.at(2) - base["tcpretrans"].at(2)
	fmt.Fprintf(w, "\nkernel memory attribution adds (runqlat + tcpretrans, per cgroup minus node-level), on 2 CPUs: %.2f MiB; per CPU: %.1f KiB (the per-cgroup maps are shared by all CPUs)\n",
		added/(1<<20), (perRunqlat.perCPU-base["runqlat"].perCPU+perRtx.perCPU-base["tcpretrans"].perCPU)/1024)
	sum.add("attribution", fmt.Sprintf("kernel memory added, %d pods, 2 CPUs", benchPods), []float64{added / (1 << 20)}, "MiB", "<= 16 MiB", atMost(16),
		fmt.Sprintf("runqlat %d cgroup histograms, tcpretrans %d keys; memlock", len(snap.Cgroups), 2*len(ids)))
	sum.add("attribution", "kernel memory, runqlat per cgroup, whole probe, 2 CPUs", []float64{perRunqlat.at(2) / (1 << 20)}, "MiB", "", nil,
		fmt.Sprintf("%.0f KiB fixed + %.0f KiB per CPU", perRunqlat.fixed/1024, perRunqlat.perCPU/1024))

	return scrapeWorkloads(w, log, sum, p)
}

// programs is a loaded probe.
type programs interface {
	Programs() map[string]*ebpf.Program
	Close() error
}

// memUse is the memlock of a probe's maps: the part of per-CPU maps,
// which grows with the CPU count, and the rest.
type memUse struct {
	maps          int
	fixed, perCPU float64 // bytes; perCPU for one CPU
}

func (m memUse) at(cpus int) float64 { return m.fixed + m.perCPU*float64(cpus) }

// eachMap calls f with each map that progs use, once, and its info; the
// map is closed after f returns, unless f keeps it (returns true).
func eachMap(progs map[string]*ebpf.Program, f func(*ebpf.Map, *ebpf.MapInfo) (keep bool, err error)) error {
	seen := map[ebpf.MapID]bool{}
	for _, prog := range progs {
		info, err := prog.Info()
		if err != nil {
			return err
		}
		ids, _ := info.MapIDs()
		for _, id := range ids {
			if seen[id] {
				continue
			}
			seen[id] = true
			m, err := ebpf.NewMapFromID(id)
			if err != nil {
				return err
			}
			mi, err := m.Info()
			keep := false
			if err == nil {
				keep, err = f(m, mi)
			}
			if !keep {
				m.Close()
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// probeMemory sums the memlock of the maps progs use, as the kernel
// reports it (bpftool map show: memlock).
func probeMemory(progs map[string]*ebpf.Program, ncpu int) (memUse, error) {
	var u memUse
	err := eachMap(progs, func(_ *ebpf.Map, mi *ebpf.MapInfo) (bool, error) {
		mem, ok := mi.Memlock()
		if !ok {
			return false, fmt.Errorf("map %s: no memlock in fdinfo", mi.Name)
		}
		u.maps++
		switch mi.Type {
		case ebpf.PerCPUArray, ebpf.PerCPUHash, ebpf.LRUCPUHash:
			u.perCPU += float64(mem) / float64(ncpu)
		default:
			u.fixed += float64(mem)
		}
		return false, nil
	})
	return u, err
}

// mapNamed returns the map named name (the kernel keeps 15 characters)
// among those progs use.
func mapNamed(progs map[string]*ebpf.Program, name string) (*ebpf.Map, error) {
	name = name[:min(len(name), 15)]
	var found *ebpf.Map
	err := eachMap(progs, func(m *ebpf.Map, mi *ebpf.MapInfo) (bool, error) {
		if found == nil && mi.Name == name {
			found = m
			return true, nil
		}
		return false, nil
	})
	if err == nil && found == nil {
		err = fmt.Errorf("no map %s", name)
	}
	return found, err
}

// fillRetransCgroups inserts two counters (struct cgroup_key: the cgroup
// id, an index, padding) for each of ids.
func fillRetransCgroups(progs map[string]*ebpf.Program, ids []uint64) error {
	m, err := mapNamed(progs, "tcp_rtx_cgroups")
	if err != nil {
		return err
	}
	defer m.Close()
	key := make([]byte, 16)
	for _, id := range ids {
		for idx := range uint32(2) {
			binary.NativeEndian.PutUint64(key, id)
			binary.NativeEndian.PutUint32(key[8:], idx)
			if err := m.Put(key, uint64(1)); err != nil {
				return err
			}
		}
	}
	return nil
}

// podCgroups makes the pods' cgroups below a cgroup of the bench's own
// and returns them, their ids, and what removes them.
func podCgroups() (dirs []string, ids []uint64, cleanup func(), err error) {
	root, err := cgroups.V2Root()
	if err != nil {
		return nil, nil, func() {}, err
	}
	top := filepath.Join(root, fmt.Sprintf("ktel-bench-attribution-%d", os.Getpid()))
	var made []string
	cleanup = func() {
		for _, d := range slices.Backward(made) {
			for range 50 { // the kernel empties a cgroup of reaped tasks in a moment
				if err := os.Remove(d); err == nil || errors.Is(err, os.ErrNotExist) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	mkdir := func(d string) error {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
		made = append(made, d)
		return nil
	}
	qos := filepath.Join(top, "kubepods.slice", "kubepods-burstable.slice")
	for _, d := range []string{top, filepath.Dir(qos), qos} {
		if err := mkdir(d); err != nil {
			return nil, nil, cleanup, err
		}
	}
	for i := range benchPods {
		uid := fmt.Sprintf("00000000_0000_4000_8000_%012x", i)
		pod := filepath.Join(qos, "kubepods-burstable-pod"+uid+".slice")
		if err := mkdir(pod); err != nil {
			return nil, nil, cleanup, err
		}
		for c := range 1 + benchContainers { // the sandbox, then the containers
			// Ids that differ in their first 12 digits, the label's.
			d := filepath.Join(pod, fmt.Sprintf("cri-containerd-be%04x%02x%056x.scope", i, c, 0))
			if err := mkdir(d); err != nil {
				return nil, nil, cleanup, err
			}
			id, err := cgroups.ID(d)
			if err != nil {
				return nil, nil, cleanup, err
			}
			dirs, ids = append(dirs, d), append(ids, id)
		}
	}
	return dirs, ids, cleanup, nil
}

// runIn runs /bin/true once in each cgroup (clone3 into it).
func runIn(dirs []string) error {
	for _, d := range dirs {
		f, err := os.Open(d)
		if err != nil {
			return err
		}
		cmd := exec.Command("/bin/true")
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(f.Fd())}
		err = cmd.Run()
		f.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", d, err)
		}
	}
	return nil
}

// scrapeWorkloads serves the per-workload run-queue collector, named from
// cgroup paths (KTEL_WORKLOAD_ATTRIBUTION=cgroup: no API server, the same
// number of label sets as on Kubernetes, one per cgroup with tasks), with
// the daemon's exporter and handler, and scrapes it.
func scrapeWorkloads(w io.Writer, log *slog.Logger, sum *summary, p *runqlat.Probe) error {
	res, err := k8smeta.New(k8smeta.Options{TTL: 2 * time.Minute, MaxLabelSets: 2000})
	if err != nil {
		return fmt.Errorf("resolver: %w", err)
	}
	if err := res.Refresh(); err != nil {
		return fmt.Errorf("resolver: %w", err)
	}
	reg, _ := metrics.NewRegistry("bench", "bench", "bench")
	cs := map[string]metrics.Collector{
		"runqlat":  metrics.NewRunqlatWorkloadCollector(p, p, res, 2*time.Minute, metrics.NewExemplars()),
		"workload": metrics.NewWorkloadCollector(res),
	}
	reg.MustRegister(metrics.NewExporter(cs, log))
	srv := httptest.NewServer(metrics.Handler(prometheus.ToTransactionalGatherer(reg), metrics.HandlerOpts{Log: log, Registry: reg, MaxRequestsInFlight: 10}))
	defer srv.Close()
	client := &http.Client{Timeout: 30 * time.Second}

	var proto []float64
	var protoKiB float64
	for i := range attributionScrapes {
		if i > 0 {
			time.Sleep(metrics.DefaultMaxAge + 100*time.Millisecond)
		}
		d, n, err := scrape(client, srv.URL, acceptProto)
		if err != nil {
			return fmt.Errorf("scrape: %w", err)
		}
		proto, protoKiB = append(proto, d), float64(n)/1024
	}
	time.Sleep(metrics.DefaultMaxAge + 100*time.Millisecond)
	text, textBytes, err := scrape(client, srv.URL, acceptText)
	if err != nil {
		return fmt.Errorf("scrape: %w", err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		return fmt.Errorf("gather: %w", err)
	}
	var histograms, bench, all, lines int
	for _, mf := range mfs {
		all += len(mf.Metric)
		if mf.GetName() != metrics.RunqueueLatency {
			continue
		}
		histograms = len(mf.Metric)
		for _, m := range mf.Metric {
			for _, l := range m.Label {
				if l.GetName() == "container" && strings.HasPrefix(l.GetValue(), "be") {
					bench++
				}
			}
			// Text and OpenMetrics: a line per classic bucket, _sum, _count.
			lines += len(m.Histogram.Bucket) + 3
		}
	}
	st := res.Stats()
	fmt.Fprintf(w, "\nscrape: %d run-queue histograms (%d of the bench's containers; the rest the host's units), %d series in all; in the text format %d lines for the histograms (classic buckets, _sum, _count); %d cgroups indexed, %d label sets\n",
		histograms, bench, all, lines, st.Cgroups, st.LabelSets)
	fmt.Fprintf(w, "protobuf: %.1f ms [%.1f..%.1f] over %d scrapes, %.0f KiB; text: %.1f ms, %.0f KiB\n",
		median(proto), minOf(proto), maxOf(proto), len(proto), protoKiB, text, float64(textBytes)/1024)
	sum.add("attribution", fmt.Sprintf("run-queue histograms in a scrape, %d pods", benchPods), []float64{float64(histograms)}, "series", "", nil,
		fmt.Sprintf("%d of the pods' cgroups, %d series in all, %d text lines for the histograms", bench, all, lines))
	sum.add("attribution", fmt.Sprintf("/metrics latency, %d pods' run-queue histograms, protobuf", benchPods), proto, "ms", "", nil,
		fmt.Sprintf("client_golang; %.0f KiB; text %.1f ms, %.0f KiB", protoKiB, text, float64(textBytes)/1024))
	return nil
}
