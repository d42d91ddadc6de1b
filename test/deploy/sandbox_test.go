package deploy

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// A sandbox is a testenv.Sandbox: lb is attached to its cgroup, which only
// its client process joins, and its namespace has no route out.
type sandbox struct{ *testenv.Sandbox }

func newSandbox(t *testing.T) *sandbox {
	t.Helper()
	s := testenv.NewSandbox(t, fmt.Sprintf("ktel-deploytest-%d", os.Getpid()))
	return &sandbox{s}
}

// listen opens a TCP listener on addr in the sandbox.
func (sb *sandbox) listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := testenv.InNetns(sb.NS, func() (net.Listener, error) { return net.Listen("tcp", addr) })
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// clientMaxTime and clientMaxConnects bound the client's loop.
const (
	clientMaxTime     = 5 * time.Minute
	clientMaxConnects = 50000
)

// startClient runs a client process in the sandbox and its cgroup (a
// re-exec of the test binary, TestHelperLBClient) that connects to each
// of vips in turn every 20 ms until the test ends.
func (sb *sandbox) startClient(t *testing.T, vips ...string) {
	t.Helper()
	cmd := sb.HelperCommand(t, "TestHelperLBClient", true)
	cmd.Env = append(cmd.Env, "DEPLOYTEST_LB_VIPS="+strings.Join(vips, ","))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	// The client stops at end of input.
	startUntilCleanup(t, cmd, func() { stdin.Close() }, 5*time.Second)
}

// startUntilCleanup starts cmd and stops it when the test ends: stop
// asks it to, and it is killed if it has not exited within grace. The
// returned channel is closed when it has exited.
func startUntilCleanup(t *testing.T, cmd *exec.Cmd, stop func(), grace time.Duration) <-chan struct{} {
	t.Helper()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		stop()
		select {
		case <-done:
		case <-time.After(grace):
			cmd.Process.Kill()
			<-done
		}
	})
	return done
}

// TestHelperLBClient is the sandbox's client process; it does nothing in
// a normal test run.
func TestHelperLBClient(t *testing.T) {
	vips := os.Getenv("DEPLOYTEST_LB_VIPS")
	if vips == "" {
		return
	}
	// Before any socket exists.
	if err := testenv.JoinSandboxCgroup(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	stop := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(stop)
	}()
	deadline := time.Now().Add(clientMaxTime)
	for n := 0; n < clientMaxConnects && time.Now().Before(deadline); {
		for _, vip := range strings.Split(vips, ",") {
			if c, err := net.DialTimeout("tcp", vip, 200*time.Millisecond); err == nil {
				c.Close()
			}
			n++
		}
		select {
		case <-stop:
			os.Exit(0)
		case <-time.After(20 * time.Millisecond):
		}
	}
	os.Exit(0)
}
