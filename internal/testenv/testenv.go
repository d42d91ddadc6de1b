// Package testenv gates privileged tests: they skip unless
// KTEL_PRIVILEGED_TESTS=1, and once it is set they never skip, so that CI
// cannot pass by skipping them.
package testenv

import (
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// PrivilegedEnv is the variable that enables privileged tests.
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
// classic tracepoints need, and unmounts it after the test if it mounted it.
func Tracefs(tb testing.TB) {
	tb.Helper()
	const dir = "/sys/kernel/tracing"
	if _, err := os.Stat(dir + "/events"); err == nil {
		return
	}
	if err := unix.Mount("tracefs", dir, "tracefs", 0, ""); err != nil {
		tb.Fatalf("mount tracefs on %s: %v", dir, err)
	}
	tb.Cleanup(func() { unix.Unmount(dir, 0) })
}
