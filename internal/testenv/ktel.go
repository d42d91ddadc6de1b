package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Timeouts of a ktel run by a test.
const (
	StartTimeout = 10 * time.Second // until /healthz answers
	StopTimeout  = 10 * time.Second // until the process is reaped after a signal
)

// Ktel is a ktel binary run by a test, serving on a free loopback port.
type Ktel struct {
	Cmd    *exec.Cmd
	Addr   string
	Stderr *SyncBuffer
	done   chan struct{} // closed once the process is reaped
	err    error         // from Wait; valid after done
}

// StartKtel runs argv (the binary KtelBinary builds if empty) with env
// added to an environment without KTEL_* variables, on a free loopback
// port, and waits until /healthz answers. The process is killed at cleanup
// if the test did not stop it.
func StartKtel(tb testing.TB, argv []string, env ...string) *Ktel {
	tb.Helper()
	if len(argv) == 0 {
		argv = []string{KtelBinary(tb)}
	}
	k := &Ktel{Addr: FreeLoopbackAddr(tb), Stderr: &SyncBuffer{}, done: make(chan struct{})}
	k.Cmd = exec.Command(argv[0], argv[1:]...)
	k.Cmd.Env = ChildEnv(append([]string{"KTEL_LISTEN_ADDRESS=" + k.Addr, "KTEL_LOG_FORMAT=json"}, env...)...)
	k.Cmd.Stderr = k.Stderr
	if err := k.Cmd.Start(); err != nil {
		tb.Fatalf("start ktel: %v", err)
	}
	go func() {
		k.err = k.Cmd.Wait()
		close(k.done)
	}()
	tb.Cleanup(func() {
		if k.Exited() {
			return
		}
		k.Cmd.Process.Kill()
		select {
		case <-k.done:
		case <-time.After(StopTimeout):
			tb.Errorf("ktel (pid %d) not reaped %v after SIGKILL", k.Cmd.Process.Pid, StopTimeout)
		}
	})

	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(StartTimeout)
	for {
		resp, err := client.Get("http://" + k.Addr + "/healthz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return k
			}
			err = fmt.Errorf("status %s: %q", resp.Status, body)
		}
		if k.Exited() {
			tb.Fatalf("ktel exited before serving: %v\nstderr:\n%s", k.err, k.Stderr)
		}
		if time.Now().After(deadline) {
			tb.Fatalf("ktel /healthz not ready after %v: %v\nstderr:\n%s", StartTimeout, err, k.Stderr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Pid is the process id.
func (k *Ktel) Pid() int { return k.Cmd.Process.Pid }

// Exited reports whether the process has been reaped.
func (k *Ktel) Exited() bool {
	select {
	case <-k.done:
		return true
	default:
		return false
	}
}

// Stop sends sig and waits for the process to be reaped.
func (k *Ktel) Stop(tb testing.TB, sig syscall.Signal) *os.ProcessState {
	tb.Helper()
	if err := k.Cmd.Process.Signal(sig); err != nil {
		tb.Fatalf("send %v: %v\nstderr:\n%s", sig, err, k.Stderr)
	}
	select {
	case <-k.done:
	case <-time.After(StopTimeout):
		tb.Fatalf("ktel still running %v after %v\nstderr:\n%s", StopTimeout, sig, k.Stderr)
	}
	return k.Cmd.ProcessState
}

// FreeLoopbackAddr returns a loopback address with a port that was free a
// moment ago.
func FreeLoopbackAddr(tb testing.TB) string {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// SyncBuffer is a buffer safe for a process to write while a test reads.
type SyncBuffer struct {
	mu  sync.Mutex
	buf []byte
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.buf = append(s.buf, p...)
	return len(p), nil
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return string(s.buf)
}

// Run runs argv with env added to an environment without KTEL_*
// variables, killing it after StopTimeout, and returns its exit status and
// output.
func Run(tb testing.TB, argv []string, env ...string) (code int, stdout, stderr string) {
	tb.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = ChildEnv(env...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = time.Second
	timer := time.AfterFunc(StopTimeout, func() { cmd.Process.Kill() })
	err := cmd.Run()
	timer.Stop()
	if _, ok := errors.AsType[*exec.ExitError](err); err != nil && !ok {
		tb.Fatalf("run %s: %v", argv[0], err)
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

// Sh runs argv[0] with the rest of argv as arguments and returns its
// output (stdout and stderr); it fails tb, showing the output, if the
// command fails.
func Sh(tb testing.TB, argv ...string) string {
	tb.Helper()
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}
