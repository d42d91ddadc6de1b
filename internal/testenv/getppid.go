package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// getppidsVar makes a test binary whose TestMain calls GetppidsHelper a
// helper process that calls getppid that many times and exits.
const getppidsVar = "KTEL_TEST_GETPPIDS"

// Getppids calls getppid n times from one locked OS thread: a syscall no
// Go runtime makes, so that counts of it are the test's own.
func Getppids(n int) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	for range n {
		unix.RawSyscall(unix.SYS_GETPPID, 0, 0, 0)
	}
}

// GetppidsHelper, called first in TestMain, turns the test binary started
// by GetppidsIn into the helper: it makes its calls and exits.
func GetppidsHelper() {
	s := os.Getenv(getppidsVar)
	if s == "" {
		return
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	Getppids(n)
	os.Exit(0)
}

// GetppidsIn runs the test binary as the helper (GetppidsHelper) in cgroup
// dir, from its first instruction (CLONE_INTO_CGROUP), calling getppid n
// times, and waits for it.
func GetppidsIn(tb testing.TB, dir *os.File, n int) {
	tb.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), getppidsVar+"="+strconv.Itoa(n))
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("getppid helper: %v: %s", err, out)
	}
}
