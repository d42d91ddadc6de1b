package deploy

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	lbctl "github.com/ktel-dev/ktel/internal/lb"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// A sandbox is a network namespace with only loopback up and no route
// out, and a child cgroup of the cgroup v2 root that only the sandbox's
// client process joins: lb is attached to that cgroup, and a connect it
// failed to rewrite fails with ENETUNREACH instead of leaving the
// machine. Both are removed when the test ends.
type sandbox struct {
	ns string // name under /run/netns
	cg string // cgroup directory
}

func newSandbox(t *testing.T) *sandbox {
	t.Helper()
	name := fmt.Sprintf("ktel-deploytest-%d", os.Getpid())
	sb := &sandbox{ns: name}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up in %s: %v: %s", name, err, out)
	}
	root, err := lbctl.CgroupV2Root()
	if err != nil {
		t.Fatal(err)
	}
	sb.cg = filepath.Join(root, name)
	if err := os.Mkdir(sb.cg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The client is killed by its own cleanup (registered later, so
		// run earlier); the kernel empties the cgroup a moment after.
		var err error
		for range 50 {
			if err = os.Remove(sb.cg); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("remove cgroup %s: %v", sb.cg, err)
	})
	return sb
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
