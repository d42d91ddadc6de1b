package runqlat

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// testCgroup makes a cgroup below the test's own child of the v2 root and
// returns its directory, opened, and its id; both go when the test ends
// (after its processes, which the caller waits for).
func testCgroup(t *testing.T, base, name string) (dir *os.File, id uint64) {
	t.Helper()
	path := filepath.Join(base, name)
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(path); err != nil {
			t.Error(err)
		}
	})
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if id, err = cgroups.ID(path); err != nil {
		t.Fatal(err)
	}
	return f, id
}

// sleeping reports whether process pid is asleep (state S).
func sleeping(t *testing.T, pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	_, after, _ := strings.Cut(string(b), ") ")
	return strings.HasPrefix(after, "S")
}

func count(h Hist) (n uint64) {
	for _, c := range h.Slots {
		n += c
	}
	return n
}

// With PerCgroup, the waits of the tasks of one cgroup (a spinner and a
// shell starting 300 short sleeps, all on CPU 0) land in that cgroup's
// histogram, while an idle cgroup's does not move.
func TestPerCgroup(t *testing.T) {
	testenv.Privileged(t)
	root, err := cgroups.V2Root()
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(root, fmt.Sprintf("ktel-test-runqlat-%d", os.Getpid()))
	if err := os.Mkdir(base, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.Remove(base); err != nil {
			t.Error(err)
		}
	})
	busyDir, busy := testCgroup(t, base, "busy")
	idleDir, idle := testCgroup(t, base, "idle")

	for _, v := range Variants[:3] { // the tp_btf ones, which give the task
		t.Run(v.String(), func(t *testing.T) {
			// Spans of waits >= 100 µs carry the cgroup id too.
			p, rd := loadWithEvents(t, Options{Schema: 3, Variant: &v, PerCgroup: true,
				Spans: probe.SpanOptions{Threshold: 100 * time.Microsecond}})
			read := func() *Snapshot {
				s, err := p.Snapshot()
				if err != nil {
					t.Fatal(err)
				}
				return s
			}
			sleeper := testenv.StartInCgroup(t, idleDir, "sleep", "30")
			// The idle cgroup's one task has run and gone to sleep: its
			// waits are all recorded (at its switch-out or switch-in).
			deadline := time.Now().Add(5 * time.Second)
			for count(read().Cgroups[idle]) == 0 || !sleeping(t, sleeper.Process.Pid) {
				if time.Now().After(deadline) {
					t.Fatal("the idle cgroup's sleep was never counted")
				}
				time.Sleep(10 * time.Millisecond)
			}
			before := read()
			var ts unix.Timespec
			if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
				t.Fatal(err)
			}
			since := uint64(ts.Nano())

			const sleeps = 300
			spinner := testenv.StartInCgroup(t, busyDir, "taskset", "-c", "0", "sh", "-c", "while :; do :; done")
			shell := testenv.StartInCgroup(t, busyDir, "taskset", "-c", "0", "sh", "-c",
				fmt.Sprintf("i=0; while [ $i -lt %d ]; do sleep 0.001; i=$((i+1)); done", sleeps))
			if err := shell.Wait(); err != nil {
				t.Fatal(err)
			}
			spinner.Process.Kill()
			spinner.Wait()
			after := read()

			got := count(after.Cgroups[busy]) - count(before.Cgroups[busy])
			if got < sleeps {
				t.Errorf("busy cgroup: %d waits, want at least %d (one per sleep process)", got, sleeps)
			}
			if after.Cgroups[busy].SumNs <= before.Cgroups[busy].SumNs {
				t.Error("busy cgroup: the sum of waits did not grow")
			}
			if n := count(after.Cgroups[idle]) - count(before.Cgroups[idle]); n != 0 {
				t.Errorf("idle cgroup: %d waits while its task slept", n)
			}
			if after.CgroupsFull != 0 {
				t.Errorf("%d waits found the cgroup map full", after.CgroupsFull)
			}
			if _, ok := p.BoundedMaps()["runqueue_latency_cgroup"]; !ok {
				t.Error("the cgroup map is not among the bounded maps")
			}
			if err := p.ForgetCgroup(busy); err != nil {
				t.Fatal(err)
			}
			if err := p.ForgetCgroup(busy); err != nil {
				t.Errorf("forgetting a cgroup twice: %v", err)
			}
			var ours int
			for _, e := range events(t, rd) {
				if e.StartNs < since {
					continue
				}
				switch e.Cgroup {
				case busy:
					ours++
				case idle:
					t.Errorf("an event of the idle cgroup: %+v", e)
				}
			}
			if ours == 0 {
				t.Error("no long-wait event carries the busy cgroup's id")
			}
			sleeper.Process.Kill()
			sleeper.Wait()
			t.Logf("busy cgroup: %d waits, %v in all; %d cgroups in the map", got,
				time.Duration(after.Cgroups[busy].SumNs-before.Cgroups[busy].SumNs), len(after.Cgroups))
		})
	}
}
