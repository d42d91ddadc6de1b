package deploy

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
)

// A sandbox is a testenv.Sandbox: lb is attached to its cgroup, which only
// its client process joins, and its namespace has no route out.
type sandbox struct {
	ns string // name under /run/netns
	cg string // cgroup directory
}

func newSandbox(t *testing.T) *sandbox {
	t.Helper()
	s := testenv.NewSandbox(t, fmt.Sprintf("ktel-deploytest-%d", os.Getpid()))
	return &sandbox{ns: s.NS, cg: s.Cgroup}
}

// listen opens a TCP listener on addr in the sandbox.
func (sb *sandbox) listen(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := testenv.InNetns(sb.ns, func() (net.Listener, error) { return net.Listen("tcp", addr) })
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
	cmd := exec.Command("ip", "netns", "exec", sb.ns, os.Args[0], "-test.run=^TestHelperLBClient$", "-test.count=1")
	cmd.Env = append(os.Environ(), "DEPLOYTEST_LB_VIPS="+strings.Join(vips, ","))
	// `ip netns exec` mounts a fresh /sys, hiding the cgroup file system:
	// the client gets cgroup.procs as file descriptor 3.
	procs, err := os.OpenFile(filepath.Join(sb.cg, "cgroup.procs"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer procs.Close()
	cmd.ExtraFiles = []*os.File{procs}
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		stdin.Close() // the client stops at end of input
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
}

// TestHelperLBClient is the sandbox's client process; it does nothing in
// a normal test run.
func TestHelperLBClient(t *testing.T) {
	vips := os.Getenv("DEPLOYTEST_LB_VIPS")
	if vips == "" {
		return
	}
	// "0" moves this process, all its threads, before any socket exists.
	if _, err := os.NewFile(3, "cgroup.procs").Write([]byte("0")); err != nil {
		fmt.Fprintln(os.Stderr, "join cgroup:", err)
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
