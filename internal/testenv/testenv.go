// Package testenv gates privileged tests: they skip unless
// KTEL_PRIVILEGED_TESTS=1, and once it is set they never skip, so that CI
// cannot pass by skipping them.
package testenv

import (
	"errors"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"
)

// PrivilegedEnv is the variable that enables privileged tests; ktel knows
// it as config.PrivilegedTestsVar (testenv cannot import config: probe
// packages that config imports use testenv in their own tests).
const PrivilegedEnv = "KTEL_PRIVILEGED_TESTS"

// Enabled reports whether privileged tests were requested.
func Enabled() bool { return os.Getenv(PrivilegedEnv) == "1" }

// Privileged skips tb unless privileged tests were requested, and fails it
// when they were but the process is not root.
func Privileged(tb testing.TB) {
	tb.Helper()
	if !Enabled() {
		tb.Skipf("privileged test: set %s=1 and run as root", PrivilegedEnv)
	}
	if os.Geteuid() != 0 {
		tb.Fatalf("%s=1 but not running as root", PrivilegedEnv)
	}
}

// Tracefs makes sure tracefs is mounted at /sys/kernel/tracing, which
// classic tracepoints need. It stays mounted, as on most hosts: unmounting
// it would pull it from under concurrent users.
func Tracefs(tb testing.TB) {
	tb.Helper()
	const dir = "/sys/kernel/tracing"
	if _, err := os.Stat(dir + "/events"); err == nil {
		return
	}
	if err := unix.Mount("tracefs", dir, "tracefs", 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
		tb.Fatalf("mount tracefs on %s: %v", dir, err)
	}
}

// Sleep sleeps in clock_nanosleep until d has passed, resuming after
// signals (the Go runtime's interrupt syscalls with EINTR). Each resumption
// is a separate syscall.
func Sleep(tb testing.TB, d time.Duration) {
	tb.Helper()
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
		tb.Fatal(err)
	}
	deadline := unix.NsecToTimespec(now.Nano() + d.Nanoseconds())
	for {
		err := unix.ClockNanosleep(unix.CLOCK_MONOTONIC, unix.TIMER_ABSTIME, &deadline, nil)
		if err == nil {
			return
		}
		if !errors.Is(err, unix.EINTR) {
			tb.Fatalf("clock_nanosleep: %v", err)
		}
	}
}

// PossibleCPUs is the number of possible CPUs: how many values a per-CPU
// map holds per key.
func PossibleCPUs(tb testing.TB) int {
	tb.Helper()
	n, err := ebpf.PossibleCPU()
	if err != nil {
		tb.Fatal(err)
	}
	return n
}

// NewMap creates a map from spec, closed when tb ends.
func NewMap(tb testing.TB, spec *ebpf.MapSpec) *ebpf.Map {
	tb.Helper()
	m, err := ebpf.NewMap(spec)
	if err != nil {
		tb.Fatalf("create %s map: %v", spec.Type, err)
	}
	tb.Cleanup(func() { m.Close() })
	return m
}

// RecursionMisses is the number of runs of progs the kernel skipped
// because a program was already running on the CPU (exported as
// ktel_bpf_program_recursion_misses_total).
func RecursionMisses(tb testing.TB, progs map[string]*ebpf.Program) (n uint64) {
	tb.Helper()
	for _, prog := range progs {
		st, err := prog.Stats()
		if err != nil {
			tb.Fatal(err)
		}
		n += st.RecursionMisses
	}
	return n
}

// EventReader opens a reader on a probe's ring buffer, closed when the test
// ends.
func EventReader(tb testing.TB, m *ebpf.Map) *ringbuf.Reader {
	tb.Helper()
	rd, err := ringbuf.NewReader(m)
	if err != nil {
		tb.Fatalf("ring buffer reader: %v", err)
	}
	tb.Cleanup(func() { rd.Close() })
	return rd
}

// EventProbe is a loaded probe with an outlier ring buffer.
type EventProbe interface {
	Events() *ebpf.Map
	Close() error
}

// LoadWithEvents loads a probe and opens a reader on its ring buffer, both
// closed when the test ends.
func LoadWithEvents[P EventProbe](tb testing.TB, load func() (P, error)) (P, *ringbuf.Reader) {
	tb.Helper()
	p, err := load()
	if err != nil {
		tb.Fatalf("load: %+v", err)
	}
	tb.Cleanup(func() { p.Close() })
	return p, EventReader(tb, p.Events())
}

// Records decodes the ring-buffer records that arrive until none has for
// idle.
func Records[T any](tb testing.TB, rd *ringbuf.Reader, idle time.Duration, decode func([]byte) (T, error)) []T {
	tb.Helper()
	var out []T
	for {
		rd.SetDeadline(time.Now().Add(idle))
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			tb.Fatal(err)
		}
		v, err := decode(rec.RawSample)
		if err != nil {
			tb.Fatal(err)
		}
		out = append(out, v)
	}
}

// Snapshot reads p's maps, failing tb if it cannot.
func Snapshot[S any](tb testing.TB, p interface{ Snapshot() (S, error) }) S {
	tb.Helper()
	s, err := p.Snapshot()
	if err != nil {
		tb.Fatal(err)
	}
	return s
}
