package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// built is the ktel binary, built once per test process.
var built struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// BinaryEnv names a prebuilt static ktel that KtelBinary returns instead
// of building one: where there is no Go toolchain, as in the guest of
// make test-kernel.
const BinaryEnv = "KTEL_TEST_BINARY"

// KtelBinary builds cmd/ktel once per test process, as the Makefile does
// (static, so that ktel can drop the capabilities of every thread), and
// returns its path; Main removes it. With $KTEL_TEST_BINARY set, it
// returns that binary instead.
func KtelBinary(tb testing.TB) string {
	tb.Helper()
	if bin := os.Getenv(BinaryEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			tb.Fatalf("%s: %v", BinaryEnv, err)
		}
		return bin
	}
	built.once.Do(func() {
		built.dir, built.err = os.MkdirTemp("", "ktel-test-")
		if built.err != nil {
			return
		}
		built.path = filepath.Join(built.dir, "ktel")
		// -buildvcs=false: stamping runs `git status`, which may take the
		// index lock of a working tree someone else is committing in.
		cmd := exec.Command("go", "build", "-buildvcs=false", "-o", built.path, "github.com/ktel-dev/ktel/cmd/ktel")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			built.err = fmt.Errorf("go build: %w\n%s", err, out)
		}
	})
	if built.err != nil {
		tb.Fatal(built.err)
	}
	return built.path
}

// Main runs the tests and removes the binary KtelBinary built.
func Main(m *testing.M) {
	code := m.Run()
	if built.dir != "" {
		os.RemoveAll(built.dir)
	}
	os.Exit(code)
}

// ChildEnv is the test's environment without KTEL_* variables, which would
// change what a ktel started by the test does, plus kv.
func ChildEnv(kv ...string) []string {
	var env []string
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "KTEL_") {
			env = append(env, e)
		}
	}
	return append(env, kv...)
}
