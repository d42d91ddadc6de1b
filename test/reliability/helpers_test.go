package reliability

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/ktel-dev/ktel/internal/testenv"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Bounds on every wait, so that a broken daemon fails the test instead of
// hanging it.
const (
	stopTimeout    = testenv.StopTimeout // from the signal until the process is reaped
	releaseTimeout = 10 * time.Second    // until the kernel has freed what ktel held
	pollInterval   = 20 * time.Millisecond
)

func TestMain(m *testing.M) { testenv.Main(m) }

// binary is the ktel binary under test, built once.
func binary(t testing.TB) string {
	t.Helper()
	return testenv.KtelBinary(t)
}

// childEnv is the test's environment without KTEL_* variables, plus kv.
func childEnv(kv ...string) []string { return testenv.ChildEnv(kv...) }

type daemon struct{ *testenv.Ktel }

// startDaemon runs argv (nil: the binary, no arguments) serving on a free
// loopback port, with env added, and waits until /healthz answers. It is
// killed at cleanup unless the test stopped it.
func startDaemon(t testing.TB, argv []string, env ...string) *daemon {
	t.Helper()
	return &daemon{testenv.StartKtel(t, argv, env...)}
}

func (d *daemon) pid() int { return d.Pid() }

// stop sends sig and waits for the process to be reaped.
func (d *daemon) stop(t testing.TB, sig syscall.Signal) *os.ProcessState { return d.Stop(t, sig) }

// stopClean stops with SIGTERM and fails the test unless ktel exits 0.
func (d *daemon) stopClean(t testing.TB) {
	t.Helper()
	if ps := d.stop(t, syscall.SIGTERM); ps.ExitCode() != 0 {
		t.Errorf("exit %v after SIGTERM\nstderr:\n%s", ps, d.Stderr)
	}
}

// metrics scrapes /metrics in the text format and parses it.
func (d *daemon) metrics(t testing.TB) families {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+d.Addr+"/metrics", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "text/plain; version=0.0.4")
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("scrape: %v\nstderr:\n%s", err, d.Stderr)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("scrape: status %s\n%s", resp.Status, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse scrape: %v", err)
	}
	return mfs
}

// families is a parsed scrape.
type families map[string]*dto.MetricFamily

// series returns the samples of family name whose labels include match,
// keyed by the value of label by (or "" if by is empty).
func (f families) series(name, by string, match ...string) map[string]float64 {
	out := map[string]float64{}
	mf := f[name]
	if mf == nil {
		return out
	}
metrics:
	for _, m := range mf.GetMetric() {
		for i := 0; i+1 < len(match); i += 2 {
			if labelValue(m, match[i]) != match[i+1] {
				continue metrics
			}
		}
		var v float64
		switch {
		case m.GetCounter() != nil:
			v = m.GetCounter().GetValue()
		case m.GetGauge() != nil:
			v = m.GetGauge().GetValue()
		case m.GetUntyped() != nil:
			v = m.GetUntyped().GetValue()
		}
		out[labelValue(m, by)] += v
	}
	return out
}

// value is the sum of the samples of name whose labels include match; ok
// is false if there are none.
func (f families) value(name string, match ...string) (v float64, ok bool) {
	s := f.series(name, "", match...)
	v, ok = s[""]
	return v, ok
}

func labelValue(m *dto.Metric, name string) string {
	if name == "" {
		return ""
	}
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// kernelObjects are BPF programs, maps and links by ID.
type kernelObjects struct {
	progs map[ebpf.ProgramID]bool
	maps  map[ebpf.MapID]bool
	links map[link.ID]bool
}

func newObjects() kernelObjects {
	return kernelObjects{progs: map[ebpf.ProgramID]bool{}, maps: map[ebpf.MapID]bool{}, links: map[link.ID]bool{}}
}

func (o kernelObjects) add(b kernelObjects) {
	for id := range b.progs {
		o.progs[id] = true
	}
	for id := range b.maps {
		o.maps[id] = true
	}
	for id := range b.links {
		o.links[id] = true
	}
}

// minus returns those of o that are not in b.
func (o kernelObjects) minus(b kernelObjects) kernelObjects {
	r := newObjects()
	for id := range o.progs {
		if !b.progs[id] {
			r.progs[id] = true
		}
	}
	for id := range o.maps {
		if !b.maps[id] {
			r.maps[id] = true
		}
	}
	for id := range o.links {
		if !b.links[id] {
			r.links[id] = true
		}
	}
	return r
}

func (o kernelObjects) len() int { return len(o.progs) + len(o.maps) + len(o.links) }

func (o kernelObjects) String() string {
	return fmt.Sprintf("programs %v, maps %v, links %v", sortedKeys(o.progs), sortedKeys(o.maps), sortedKeys(o.links))
}

func sortedKeys[K ~uint32](m map[K]bool) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// heldBy lists the BPF objects process pid holds: those it has file
// descriptors for (from /proc/pid/fdinfo: prog_id, map_id, link_id) and
// the maps its programs use. Telling ktel's objects apart this way, rather
// than by what appeared on the host while it ran, blames nothing that
// concurrent tests or other tools load.
func heldBy(pid int) (kernelObjects, error) {
	o := newObjects()
	dir := fmt.Sprintf("/proc/%d/fdinfo", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return o, err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // closed meanwhile
		} else if err != nil {
			return o, err
		}
		fields := map[string]uint32{}
		sc := bufio.NewScanner(bytes.NewReader(b))
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 32); err == nil {
				fields[k] = uint32(n)
			}
		}
		if id, ok := fields["link_id"]; ok {
			o.links[link.ID(id)] = true
		}
		if id, ok := fields["prog_id"]; ok {
			o.progs[ebpf.ProgramID(id)] = true
		}
		if id, ok := fields["map_id"]; ok {
			o.maps[ebpf.MapID(id)] = true
		}
	}
	for id := range o.progs {
		p, err := ebpf.NewProgramFromID(id)
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return o, fmt.Errorf("program %d: %w", id, err)
		}
		info, err := p.Info()
		p.Close()
		if err != nil {
			return o, fmt.Errorf("program %d info: %w", id, err)
		}
		ids, _ := info.MapIDs()
		for _, m := range ids {
			o.maps[m] = true
		}
	}
	return o, nil
}

// held is heldBy for a test.
func held(t testing.TB, pid int) kernelObjects {
	t.Helper()
	o, err := heldBy(pid)
	if err != nil {
		t.Fatalf("BPF objects of pid %d: %v", pid, err)
	}
	return o
}

// stillLoaded returns those of o that the kernel still has. IDs are
// allocated cyclically, so an ID that exists is still the same object.
func stillLoaded(o kernelObjects) (kernelObjects, error) {
	left := newObjects()
	for id := range o.progs {
		p, err := ebpf.NewProgramFromID(id)
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return left, fmt.Errorf("program %d: %w", id, err)
		}
		p.Close()
		left.progs[id] = true
	}
	for id := range o.maps {
		m, err := ebpf.NewMapFromID(id)
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return left, fmt.Errorf("map %d: %w", id, err)
		}
		m.Close()
		left.maps[id] = true
	}
	for id := range o.links {
		l, err := link.NewFromID(id)
		if errors.Is(err, os.ErrNotExist) {
			continue
		} else if err != nil {
			return left, fmt.Errorf("link %d: %w", id, err)
		}
		l.Close()
		left.links[id] = true
	}
	return left, nil
}

// waitReleased waits until the kernel has freed every one of ours. It does
// so asynchronously after the last reference goes (RCU, work queues), so a
// short wait is legitimate even after a clean exit.
func waitReleased(t testing.TB, ours kernelObjects) {
	t.Helper()
	start := time.Now()
	for {
		left, err := stillLoaded(ours)
		if err != nil {
			t.Fatal(err)
		}
		if left.len() == 0 {
			t.Logf("kernel released all %d of ktel's objects %v after the last exit", ours.len(), time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Since(start) > releaseTimeout {
			t.Fatalf("%v after ktel exited, still loaded: %v", releaseTimeout, left)
		}
		time.Sleep(pollInterval)
	}
}

// sentinel creates and frees one BPF map and one program and returns
// their IDs. The kernel allocates IDs cyclically, so if two sentinels
// taken around an interval are consecutive, no map or program at all was
// created in it, however short-lived: stronger than comparing the objects
// loaded before and after.
func sentinel(t testing.TB) (ebpf.MapID, ebpf.ProgramID) {
	t.Helper()
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatalf("sentinel map: %v", err)
	}
	defer m.Close()
	mi, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	mid, _ := mi.ID()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         ebpf.SocketFilter,
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
		License:      "GPL",
	})
	if err != nil {
		t.Fatalf("sentinel program: %v", err)
	}
	defer p.Close()
	pi, err := p.Info()
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := pi.ID()
	return mid, pid
}

// Network namespaces. All traffic of these tests stays inside namespaces
// they create and delete; nothing is addressed outside them.

var netnsCount atomic.Int32

// newNetns creates a network namespace, deleted when t ends, and returns
// its name; its file is /var/run/netns/<name>.
func newNetns(t testing.TB) string {
	t.Helper()
	name := fmt.Sprintf("ktel-rel-%d-%d", os.Getpid(), netnsCount.Add(1))
	testenv.NewNetns(t, name)
	return name
}

func netnsPath(ns string) string { return testenv.NetnsPath(ns) }

// inNetns runs f in network namespace ns (testenv.InNetns).
func inNetns[T any](ns string, f func() (T, error)) (T, error) { return testenv.InNetns(ns, f) }

// eventually polls cond every 100 ms until it returns nil or timeout
// passes, and returns its last error.
func eventually(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func numCPU() int { return runtime.NumCPU() }

// tcMode is the TC hook netdev is given: tcx where the kernel has it
// (6.6+), clsact where not (auto would pick the same).
func tcMode(t testing.TB) string {
	if testenv.HaveTCX(t) {
		return "tcx"
	}
	return "clsact"
}

// netdevFilters returns, a filter each, the IDs of the programs that
// netdev's cls_bpf filters (named ktel-netdev) run on devs in ns, both
// directions.
func netdevFilters(t testing.TB, ns string, devs ...string) []ebpf.ProgramID {
	t.Helper()
	var ids []ebpf.ProgramID
	for _, dev := range devs {
		for _, dir := range []string{"ingress", "egress"} {
			out, err := exec.Command("tc", "-n", ns, "filter", "show", "dev", dev, dir).CombinedOutput()
			if err != nil {
				t.Fatalf("tc filter show dev %s %s: %v: %s", dev, dir, err, out)
			}
			for line := range strings.Lines(string(out)) {
				if !strings.Contains(line, " ktel-netdev") {
					continue
				}
				f := strings.Fields(line)
				i := slices.Index(f, "id")
				if i < 0 || i+1 == len(f) {
					t.Fatalf("no program id in tc's filter line %q", line)
				}
				id, err := strconv.ParseUint(f[i+1], 10, 32)
				if err != nil {
					t.Fatalf("program id in tc's filter line %q: %v", line, err)
				}
				ids = append(ids, ebpf.ProgramID(id))
			}
		}
	}
	return ids
}

// all reports whether every one of ids is in set.
func all[K comparable](ids []K, set map[K]bool) bool {
	for _, id := range ids {
		if !set[id] {
			return false
		}
	}
	return true
}
