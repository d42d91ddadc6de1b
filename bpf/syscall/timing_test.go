package syscall

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// timedAndCounted are the rises in syscall nr's histogram count and exact
// count between two snapshots.
func timedAndCounted(before, after *Snapshot, nr uint32) (timed, counted uint64) {
	return after.Latency[nr].Count() - before.Latency[nr].Count(), after.Counts[nr] - before.Counts[nr]
}

// Counts are host-wide, so the tests call getppid, which other processes
// rarely make (Go's runtime calls getpid at every preemption signal, so a
// busy host adds thousands of getpids a second); a few per thousand of ours
// is allowed.
func checkCounted(t *testing.T, counted uint64, n int) {
	t.Helper()
	if counted < uint64(n) || counted > uint64(n)+uint64(n)/100+50 {
		t.Errorf("getppid counted %d times, want %d (exact, give or take other processes' calls)", counted, n)
	}
}

// Sampling times about 1 in N syscalls, in every variant, and counts all.
func TestSampleTiming(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	const n, rate = 64000, 16
	for _, v := range Variants {
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v, Timing: TimeSample, SampleRate: rate}, discard())
			if err != nil {
				t.Fatalf("load: %+v", err)
			}
			defer p.Close()
			before, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			testenv.Getppids(n)
			after, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			timed, counted := timedAndCounted(before, after, unix.SYS_GETPPID)
			checkCounted(t, counted, n)
			// 4000 expected; the timed count's spread is below 2% of
			// that: 25% is far outside chance and far from 1 in 1 or 1
			// in 2N.
			if want := float64(n) / rate; float64(timed) < 0.75*want || float64(timed) > 1.25*want {
				t.Errorf("getppid timed %d times of %d, want about %.0f (1 in %d)", timed, counted, want, rate)
			}
		})
	}
}

// The list mode times the listed syscalls only, and still counts the
// others and their failures.
func TestListTiming(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	const n = 2000
	for _, v := range Variants {
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v, Timing: TimeList, Syscalls: []uint32{unix.SYS_GETPPID}}, discard())
			if err != nil {
				t.Fatalf("load: %+v", err)
			}
			defer p.Close()
			before, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			func() {
				runtime.LockOSThread()
				defer runtime.UnlockOSThread()
				for range n {
					unix.RawSyscall(unix.SYS_GETPPID, 0, 0, 0)
					unix.RawSyscall(unix.SYS_CLOSE, ^uintptr(0), 0, 0) // EBADF
				}
			}()
			after, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			timed, counted := timedAndCounted(before, after, unix.SYS_GETPPID)
			checkCounted(t, counted, n)
			if timed < n || timed > counted {
				t.Errorf("getppid (listed) timed %d times, counted %d, want every one of ours", timed, counted)
			}
			if timed, counted := timedAndCounted(before, after, unix.SYS_CLOSE); timed != 0 || counted < n {
				t.Errorf("close (not listed) timed %d times, counted %d; want 0 and >= %d", timed, counted, n)
			}
			key := ErrorKey{Nr: unix.SYS_CLOSE, Errno: uint32(unix.EBADF)}
			if got := after.Errors[key] - before.Errors[key]; got < n {
				t.Errorf("close EBADF errors (untimed) rose by %d, want >= %d", got, n)
			}
			for nr, h := range after.Latency {
				if nr != unix.SYS_GETPPID && h.Count() > 0 {
					t.Errorf("%s timed though not listed", NativeName(nr))
				}
			}
		})
	}
}

func TestMain(m *testing.M) {
	testenv.GetppidsHelper()
	os.Exit(m.Run())
}

// The cgroup mode times the syscalls of processes in the listed cgroups
// only: a helper started in the test's own child cgroup is timed, the
// test's own calls (outside it) are only counted.
func TestCgroupTiming(t *testing.T) {
	testenv.Privileged(t)
	root, err := cgroups.V2Root()
	if err != nil {
		t.Fatalf("cgroup v2 root: %v", err)
	}
	dir := filepath.Join(root, fmt.Sprintf("ktel-test-syscall-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove cgroup: %v", err)
		}
	})
	id, err := cgroups.ID(dir)
	if err != nil {
		t.Fatal(err)
	}
	cg, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer cg.Close()

	for _, v := range Variants {
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v, Timing: TimeCgroup, Cgroups: []uint64{id}}, discard())
			if err != nil {
				t.Fatalf("load: %+v", err)
			}
			defer p.Close()
			before, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			const ours, helper = 5000, 3000
			testenv.Getppids(ours)
			testenv.GetppidsIn(t, cg, helper)
			after, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			timed, counted := timedAndCounted(before, after, unix.SYS_GETPPID)
			checkCounted(t, counted, ours+helper)
			// The helper's Go runtime may call getppid itself a few times.
			if timed < helper || timed > helper+50 {
				t.Errorf("getppid timed %d times, want the helper's %d only (counted %d)", timed, helper, counted)
			}
		})
	}
}
