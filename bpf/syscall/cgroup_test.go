package syscall

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// subCgroup makes cgroup name below base and returns it opened, and its id.
func subCgroup(t *testing.T, base, name string) (*os.File, uint64) {
	t.Helper()
	dir := testenv.SubCgroup(t, base, name)
	id, err := cgroups.ID(filepath.Join(base, name))
	if err != nil {
		t.Fatal(err)
	}
	return dir, id
}

// With PerCgroup, every variant sorts the timed syscalls of a process into
// its own cgroup's histograms: two helpers in two cgroups below the test's
// own are counted each under its cgroup only, the test's own calls under
// the test's cgroup, and nothing goes node-level while the map has room.
func TestPerCgroup(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	base := testenv.TestCgroup(t, "syscall")
	aDir, a := subCgroup(t, base, "a")
	bDir, b := subCgroup(t, base, "b")
	for _, v := range Variants {
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v, Timing: TimeAll, PerCgroup: true}, discard())
			if err != nil {
				t.Fatalf("load: %+v", err)
			}
			defer p.Close()
			if _, ok := p.BoundedMaps()["syscall_latency_cgroup"]; !ok {
				t.Error("syscall_latency_cgroup not among the bounded maps")
			}
			before := testenv.Snapshot(t, p)
			const ours, inA, inB = 5000, 3000, 1000
			testenv.Getppids(ours)
			testenv.GetppidsIn(t, aDir, inA)
			testenv.GetppidsIn(t, bDir, inB)
			after := testenv.Snapshot(t, p)

			got := func(id uint64) uint64 {
				k := CgroupKey{Cgroup: id, Nr: unix.SYS_GETPPID}
				return after.Cgroups[k].Count() - before.Cgroups[k].Count()
			}
			// A helper's Go runtime may call getppid itself a few times.
			if n := got(a); n < inA || n > inA+50 {
				t.Errorf("cgroup a: getppid timed %d times, want its helper's %d", n, inA)
			}
			if n := got(b); n < inB || n > inB+50 {
				t.Errorf("cgroup b: getppid timed %d times, want its helper's %d", n, inB)
			}
			var total uint64
			for k, h := range after.Cgroups {
				if k.Nr == unix.SYS_GETPPID {
					total += h.Count() - before.Cgroups[k].Count()
				}
			}
			if total < ours+inA+inB {
				t.Errorf("getppid timed %d times over all cgroups, want at least %d", total, ours+inA+inB)
			}
			_, counted := timedAndCounted(before, after, unix.SYS_GETPPID)
			checkCounted(t, counted, ours+inA+inB)
			if n := after.Latency[unix.SYS_GETPPID].Count(); n != 0 || after.CgroupsFull != 0 {
				t.Errorf("%d getppid timed node-level, %d timed syscalls found the map full; want none", n, after.CgroupsFull)
			}
		})
	}
}

// syscall_latency_cgroup holds at most MaxCgroupHists histograms: once it
// is full, a new cgroup's timed syscalls are recorded node-level and
// counted in CgroupsFull; a forgotten entry makes room again.
func TestPerCgroupFull(t *testing.T) {
	testenv.Privileged(t)
	base := testenv.TestCgroup(t, "syscall-full")
	dir, id := subCgroup(t, base, "late")
	p, err := Load(Options{Schema: 3, Timing: TimeAll, PerCgroup: true}, discard())
	if err != nil {
		t.Fatalf("load: %+v", err)
	}
	defer p.Close()
	// Fill what the host's syscalls have left with cgroup ids no cgroup
	// has (ids are inode numbers, far below 2^62).
	zero := make([]byte, probe.HistValueSize(p.Layout()))
	for i := range uint64(MaxCgroupHists) {
		k := syscallCgroupKey{Cgroup: 1<<62 + i}
		if err := p.cgroups.Latency.Put(k, zero); errors.Is(err, unix.E2BIG) {
			break
		} else if err != nil {
			t.Fatalf("fill syscall_latency_cgroup: %v", err)
		}
	}
	before := testenv.Snapshot(t, p)
	if len(before.Cgroups) != MaxCgroupHists {
		t.Fatalf("%d histograms after filling, want %d", len(before.Cgroups), MaxCgroupHists)
	}
	if info, err := p.cgroups.Latency.Info(); err == nil {
		if mem, ok := info.Memlock(); ok {
			t.Logf("syscall_latency_cgroup full: %d entries, %.2f MiB by the kernel's account", MaxCgroupHists, float64(mem)/(1<<20))
		}
	}
	const n = 2000
	testenv.GetppidsIn(t, dir, n)
	after := testenv.Snapshot(t, p)
	if len(after.Cgroups) != MaxCgroupHists {
		t.Errorf("%d histograms, above the bound %d", len(after.Cgroups), MaxCgroupHists)
	}
	if _, ok := after.Cgroups[CgroupKey{Cgroup: id, Nr: unix.SYS_GETPPID}]; ok {
		t.Error("the late cgroup got a histogram in a full map")
	}
	if full := after.CgroupsFull - before.CgroupsFull; full < n {
		t.Errorf("CgroupsFull rose by %d, want at least the helper's %d getppid", full, n)
	}
	if got := after.Latency[unix.SYS_GETPPID].Count() - before.Latency[unix.SYS_GETPPID].Count(); got < n {
		t.Errorf("node-level getppid histogram rose by %d, want at least %d", got, n)
	}

	// Forgetting makes room: the helper's process, which makes a few
	// dozen kinds of syscalls before its getppids, gets histograms again
	// once 200 fillers are gone (other processes may take some).
	for i := range uint64(200) {
		if err := p.ForgetCgroup(CgroupKey{Cgroup: 1<<62 + i}); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.ForgetCgroup(CgroupKey{Cgroup: 1 << 62}); err != nil {
		t.Errorf("forgetting a key twice: %v", err)
	}
	testenv.GetppidsIn(t, dir, n)
	k := CgroupKey{Cgroup: id, Nr: unix.SYS_GETPPID}
	if got := testenv.Snapshot(t, p).Cgroups[k].Count(); got < n {
		t.Errorf("after forgetting fillers, the late cgroup's getppid histogram holds %d, want at least %d", got, n)
	}
}
