package kubetest

import (
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
)

// A control plane takes seconds to start on a workstation and minutes
// under emulation (make test-kernel-all); tests of a package that only
// add objects of their own (their own namespaces and node names) can share
// one. Shared starts it in the first test that asks; Main stops it after
// the package's tests.
var shared struct {
	mu       sync.Mutex
	main     bool // Main runs the tests
	started  bool // a start was tried, by the test named in first
	first    string
	c        *Cluster
	dir      string
	cleanups []func()
	stopping bool // Main runs the cleanups: every test has ended
	failed   bool // some test of the package failed
}

// Main runs the package's tests, then stops the control plane Shared
// started, if any: use it as the package's TestMain.
func Main(m *testing.M) {
	shared.mu.Lock()
	shared.main = true
	shared.mu.Unlock()
	code := m.Run()
	shared.mu.Lock()
	shared.stopping, shared.failed = true, code != 0
	cleanups := shared.cleanups
	shared.mu.Unlock()
	for _, f := range slices.Backward(cleanups) {
		f()
	}
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

// Shared returns the control plane shared by the package's tests (Start's,
// started by the first caller and stopped by Main, which must be the
// package's TestMain). Tests that share it must not get in each other's
// way: each its own namespaces and node names, and nothing cluster-wide
// changed.
func Shared(tb testing.TB) *Cluster {
	tb.Helper()
	Gate(tb)
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if !shared.main {
		tb.Fatal("kubetest.Shared needs kubetest.Main as the package's TestMain, which stops the control plane")
	}
	if shared.started {
		if shared.c == nil {
			tb.Fatalf("kubetest: the shared control plane failed to start in %s", shared.first)
		}
		return shared.c
	}
	shared.started, shared.first = true, tb.Name()
	dir, err := os.MkdirTemp("", "kubetest-shared-")
	if err != nil {
		tb.Fatalf("kubetest: %v", err)
	}
	shared.dir = dir
	// Fails tb (Goexit) if the control plane does not start: shared.c
	// stays nil, and later callers fail too.
	shared.c = StartWith(packageTB{tb}, Options{})
	return shared.c
}

// packageTB is the test that starts the shared control plane for what
// fails or logs while it starts; what StartWith ties to the test's end
// (cleanups, the state directory) lasts until Main instead.
type packageTB struct{ testing.TB }

// Callers hold shared.mu while StartWith runs, so the fields need no
// locking of their own here; Main runs cleanups after every test.
func (packageTB) Cleanup(f func()) { shared.cleanups = append(shared.cleanups, f) }
func (packageTB) TempDir() string  { return shared.dir }
func (p packageTB) Failed() bool   { return shared.failed || p.TB.Failed() }

// Logf goes to the test while it runs, and to stderr from Main's cleanups
// (a finished test's log cannot take more).
func (p packageTB) Logf(format string, args ...any) {
	p.TB.Helper()
	if shared.stopping {
		fmt.Fprintf(os.Stderr, format+"\n", args...)
		return
	}
	p.TB.Logf(format, args...)
}
