package syscall

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// The Go structs bpf2go generated must match the kernel-side layout.
func TestStructSizes(t *testing.T) {
	spec, err := loadSyscall()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := uint32(startSize), spec.Maps["syscall_start_task"].ValueSize; got != want {
		t.Errorf("struct start: Go %d bytes, map value %d", got, want)
	}
	if got, want := uint32(startSize), spec.Maps["syscall_start_hash"].ValueSize; got != want {
		t.Errorf("struct start: Go %d bytes, hash value %d", got, want)
	}
	if EventSize != 64 || unsafe.Offsetof(syscallSyscallEvent{}.Comm) != 32 || unsafe.Offsetof(syscallSyscallEvent{}.Pcomm) != 48 {
		t.Errorf("struct syscall_event changed: DecodeEvent's offsets must follow")
	}
	if got, want := uint32(errorsKeySize), spec.Maps["syscall_errors"].KeySize; got != want {
		t.Errorf("struct errors_key: Go %d bytes, map key %d", got, want)
	}
	if got, want := uint32(cgroupKeySize), spec.Maps["syscall_latency_cgroup"].KeySize; got != want {
		t.Errorf("struct cgroup_key: Go %d bytes, map key %d", got, want)
	}
	if got, want := spec.Maps["syscall_latency_cgroup"].MaxEntries, uint32(MaxCgroupHists); got != want {
		t.Errorf("syscall_latency_cgroup: %d entries, MaxCgroupHists %d", got, want)
	}
}

// The per-cgroup variants differ from the default ones in their exit
// program only, which exists in the object for every variant.
func TestPerCgroupVariants(t *testing.T) {
	spec, err := loadSyscall()
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range Variants {
		cg := perCgroup(v)
		if len(cg.Programs) != len(v.Programs) || cg.String() != v.String() {
			t.Fatalf("%s: per-cgroup variant %+v", v, cg)
		}
		for i, p := range cg.Programs {
			want := v.Programs[i].Name
			if p.Tracepoint == "sys_exit" {
				want += "_cg"
			}
			if p.Name != want {
				t.Errorf("%s: program %s, want %s", v, p.Name, want)
			}
			if spec.Programs[p.Name] == nil {
				t.Errorf("%s: no program %s in the object", v, p.Name)
			}
		}
		for _, p := range v.Programs {
			if strings.HasSuffix(p.Name, "_cg") {
				t.Errorf("%s: perCgroup changed the default variant's %s", v, p.Name)
			}
		}
	}
}

func TestNames(t *testing.T) {
	for _, tc := range []struct {
		arch string
		nr   uint32
		want string
	}{
		{"amd64", 0, "read"},
		{"amd64", 39, "getpid"},
		{"amd64", 230, "clock_nanosleep"},
		{"amd64", 435, "clone3"},
		{"arm64", 63, "read"},
		{"arm64", 115, "clock_nanosleep"},
		{"arm64", 172, "getpid"},
		{"arm64", 435, "clone3"},
		{"amd64", 499, "499"}, // not in the table
		{"riscv64", 0, "0"},
	} {
		if got := Name(tc.arch, tc.nr); got != tc.want {
			t.Errorf("Name(%s, %d) = %q, want %q", tc.arch, tc.nr, got, tc.want)
		}
	}
	if got := NativeName(unix.SYS_GETPID); got != "getpid" {
		t.Errorf("NativeName(SYS_GETPID) = %q", got)
	}
	// Every name is unique within an architecture.
	for arch, table := range names {
		seen := map[string]bool{}
		for _, n := range table {
			if n != "" && seen[n] {
				t.Errorf("%s: %q twice", arch, n)
			}
			seen[n] = true
		}
		if len(seen) < 300 {
			t.Errorf("%s: only %d names", arch, len(seen))
		}
	}
}

// delta is after minus before for one syscall's slots.
func delta(before, after *Snapshot, nr uint32) []uint64 {
	a := after.Latency[nr].Slots
	d := slices.Clone(a)
	if b := before.Latency[nr].Slots; b != nil {
		for i := range d {
			d[i] -= b[i]
		}
	}
	return d
}

// medianSlot is the slot holding the median observation.
func medianSlot(slots []uint64) int {
	var total, cum uint64
	for _, c := range slots {
		total += c
	}
	for k, c := range slots {
		cum += c
		if cum*2 >= total {
			return k
		}
	}
	return -1
}

func sum(s []uint64) (n uint64) {
	for _, c := range s {
		n += c
	}
	return n
}

// exercise runs n 2 ms clock_nanosleeps, n getpids and n failing closes
// from one locked OS thread.
func exercise(t *testing.T, n int) (slept []time.Duration) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for range n {
		start := time.Now()
		testenv.Sleep(t, 2*time.Millisecond)
		slept = append(slept, time.Since(start))
		unix.RawSyscall(unix.SYS_GETPID, 0, 0, 0)
		unix.RawSyscall(unix.SYS_CLOSE, ^uintptr(0), 0, 0) // EBADF
	}
	return slept
}

func TestLatency(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	const n = 100
	for _, v := range Variants {
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v}, discard())
			if err != nil {
				t.Fatalf("load: %+v", err)
			}
			defer p.Close()
			before, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			slept := exercise(t, n)
			after, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			l := p.Layout()

			sleeps := delta(before, after, unix.SYS_CLOCK_NANOSLEEP)
			if c := sum(sleeps); c < n {
				t.Errorf("clock_nanosleep count rose by %d, want >= %d", c, n)
			}
			// A sleep overshoots by timer slack and wakeup latency, more
			// on a VM whose host steals time: the next two slots (9 % wide
			// each) are allowed, or up to the slot of the median sleep as
			// the thread timed it, where sleeps took longer still (software
			// emulation): the kernel cannot see a sleep longer than its
			// caller did. A slot computed wrong is octaves off.
			want := l.Slot(uint64(2 * time.Millisecond))
			slices.Sort(slept)
			most := max(want+2, l.Slot(uint64(slept[len(slept)/2])))
			if k := medianSlot(sleeps); k < want || k > most {
				t.Errorf("clock_nanosleep median in slot %d (<= %d ns), want %d (<= %d ns) to %d (sleeps timed by the thread: median %v)",
					k, l.Bounds[min(k, len(l.Bounds)-1)], want, l.Bounds[want], most, slept[len(slept)/2])
			}

			getpids := delta(before, after, unix.SYS_GETPID)
			if c := sum(getpids); c < n {
				t.Errorf("getpid count rose by %d, want >= %d", c, n)
			}
			if k := medianSlot(getpids); k >= l.Slot(uint64(time.Millisecond)) {
				t.Errorf("getpid median in slot %d, not below 1 ms", k)
			}

			key := ErrorKey{Nr: unix.SYS_CLOSE, Errno: uint32(unix.EBADF)}
			if got := after.Errors[key] - before.Errors[key]; got < n {
				t.Errorf("close EBADF errors rose by %d, want >= %d", got, n)
			}
			if sn := after.Latency[unix.SYS_CLOCK_NANOSLEEP].SumNs - before.Latency[unix.SYS_CLOCK_NANOSLEEP].SumNs; sn < n*uint64(2*time.Millisecond) {
				t.Errorf("clock_nanosleep sum rose by %d ns, want >= %d", sn, n*2*time.Millisecond)
			}
		})
	}
}

// Every schema loads (the value size and slot count are load-time
// constants) and sorts a known sleep into the right slot.
func TestSchemas(t *testing.T) {
	testenv.Privileged(t)
	for schema := 0; schema <= 4; schema++ {
		p, err := Load(Options{Schema: schema}, discard())
		if err != nil {
			t.Fatalf("schema %d: %+v", schema, err)
		}
		before, _ := p.Snapshot()
		slept := exercise(t, 20)
		after, err := p.Snapshot()
		p.Close()
		if err != nil {
			t.Fatal(err)
		}
		// Buckets are 4.4% wide at schema 4: a sleep's usual overshoot
		// (timer slack, wakeup, a host stealing time) can cross several.
		// The median bucket must overlap [2 ms, 2.6 ms], or up to the
		// median of the sleeps as the thread timed them where they took
		// longer still (under software emulation, 5 to 10 ms): the kernel
		// cannot see a sleep longer than its caller did.
		slices.Sort(slept)
		most := max(2600*time.Microsecond, slept[len(slept)/2])
		sleeps := delta(before, after, unix.SYS_CLOCK_NANOSLEEP)
		l := p.Layout()
		k := medianSlot(sleeps)
		lower, upper := uint64(0), uint64(math.MaxUint64)
		if k > 0 {
			lower = l.Bounds[k-1]
		}
		if k < len(l.Bounds) {
			upper = l.Bounds[k]
		}
		if upper < uint64(2*time.Millisecond) || lower > uint64(most) {
			t.Errorf("schema %d: median slot %d covers (%d, %d] ns, not within [2ms, %v] (sleeps timed by the thread: median %v)",
				schema, k, lower, upper, most, slept[len(slept)/2])
		}
	}
}

func TestHookSelection(t *testing.T) {
	testenv.Privileged(t)
	p, err := Load(Options{Schema: 3, Hook: probe.HookRaw}, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.Variant().Hook != probe.HookRaw {
		t.Errorf("asked for raw_tp, got %s", p.Variant())
	}
	if _, err := Load(Options{Schema: 3, Hook: "kprobe"}, discard()); err == nil {
		t.Error("unknown hook accepted")
	}
}

// A scrape reads only the syscalls flagged in syscall_seen: exactly those
// whose histograms hold counts, with the same values as the bpf syscall
// returns for every key of every CPU (the snapshot reads them mapped into
// memory).
func TestSeenSyscalls(t *testing.T) {
	testenv.Privileged(t)
	p, err := Load(Options{Schema: 3}, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	exercise(t, 20)
	// Stop counting so both reads see the same values.
	for _, l := range p.objs.Links {
		l.Close()
	}
	p.objs.Links = nil
	snap, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	all := 0
	for nr := range uint32(MaxSyscalls) {
		var buf []byte
		for cpu := range uint32(p.ncpu) {
			v, err := p.maps.Latency.LookupBytes(cpu*MaxSyscalls + nr)
			if err != nil {
				t.Fatal(err)
			}
			buf = append(buf, v...)
		}
		slots, sum := probe.SumHist(buf, p.ncpu, p.layout, nil)
		h, ok := snap.Latency[nr]
		if !slices.ContainsFunc(slots, func(c uint64) bool { return c > 0 }) {
			if ok {
				t.Errorf("syscall %d: in the snapshot without counts", nr)
			}
			continue
		}
		all++
		if !ok || h.SumNs != sum || !slices.Equal(h.Slots, slots) {
			t.Errorf("syscall %d: snapshot %v, all keys %d/%d", nr, ok, Hist{Slots: slots}.Count(), sum)
		}
	}
	if all == 0 || len(snap.Latency) != all {
		t.Errorf("%d syscalls in the snapshot, %d with counts", len(snap.Latency), all)
	}
}

// Threads that end (in exit, a syscall that never returns) leave no start
// behind in the hash variants, whose entries outlive their threads.
func TestExitedThreadsLeaveNoStart(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	for _, v := range Variants {
		if v.Storage != probe.StorageHash {
			continue
		}
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v}, discard())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			const n = 20
			tids := make(chan uint32, n)
			for range n {
				go func() {
					// A goroutine that ends locked to its thread takes the
					// thread with it: the thread calls exit.
					runtime.LockOSThread()
					tids <- uint32(unix.Gettid())
				}()
			}
			ours := map[uint32]bool{}
			for range n {
				ours[<-tids] = true
			}
			// The threads that are gone (the runtime may keep one).
			gone := map[uint32]bool{}
			for deadline := time.Now().Add(time.Second); len(gone) < n && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
				for tid := range ours {
					if _, err := os.Stat(fmt.Sprintf("/proc/self/task/%d", tid)); errors.Is(err, fs.ErrNotExist) {
						gone[tid] = true
					}
				}
			}
			if len(gone) < n/2 {
				t.Fatalf("only %d of %d threads exited", len(gone), n)
			}
			var (
				tid   uint32
				start syscallStart
				left  []string
			)
			it := p.hash.StartHash.Iterate()
			for it.Next(&tid, &start) {
				if gone[tid] {
					left = append(left, fmt.Sprintf("%d in %s", tid, NativeName(start.Nr)))
				}
			}
			if err := it.Err(); err != nil {
				t.Fatal(err)
			}
			if len(left) > 0 {
				t.Errorf("starts of %d of %d exited threads left in the map: %v", len(left), len(gone), left)
			}
		})
	}
}

// In the hash variants, a start whose exit was missed is not finished by
// the exit of another syscall (untimed syscalls leave the thread's entry
// alone): it is dropped, and nothing is recorded for it.
func TestStaleStartNotFinished(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	const timed = unix.SYS_SYSFS // timed, and called by nobody here
	for _, v := range Variants {
		if v.Storage != probe.StorageHash {
			continue
		}
		t.Run(v.String(), func(t *testing.T) {
			p, err := Load(Options{Schema: 3, Variant: &v, Timing: TimeList, Syscalls: []uint32{timed}}, discard())
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			tid := uint32(unix.Gettid())
			var ts unix.Timespec
			if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
				t.Fatal(err)
			}
			stale := syscallStart{Nr: timed, Ts: uint64(ts.Nano()) - uint64(time.Second)}
			// The exit of this bpf(2) call, or else getppid's, meets it.
			if err := p.hash.StartHash.Put(tid, stale); err != nil {
				t.Fatal(err)
			}
			unix.Getppid()
			var s syscallStart
			if err := p.hash.StartHash.Lookup(tid, &s); !errors.Is(err, ebpf.ErrKeyNotExist) {
				t.Errorf("thread's start %+v (%v) after other syscalls exited, want none", s, err)
			}
			snap, err := p.Snapshot()
			if err != nil {
				t.Fatal(err)
			}
			if h, ok := snap.Latency[timed]; ok && h.Count() > 0 {
				t.Errorf("sysfs timed %d times (sum %d ns) by other syscalls' exits", h.Count(), h.SumNs)
			}
		})
	}
}
