package testenv

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
)

// NetnsPath is where `ip netns add NAME` puts a namespace's file.
func NetnsPath(name string) string { return "/var/run/netns/" + name }

// InNetns runs f on an OS thread that has joined the network namespace
// name (made with `ip netns add`), then returns the thread to its own
// namespace. Sockets f creates stay in the namespace and may be used from
// any goroutine afterwards. Only if the thread cannot go back is it left
// locked, for Go to discard when the goroutine ends: a thread that ends
// takes with it the children it started with Pdeathsig (kubetest's control
// plane), so threads are kept whenever possible.
func InNetns[T any](name string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		var r result
		defer func() { ch <- r }()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			r.err = fmt.Errorf("open own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		fd, err := unix.Open(NetnsPath(name), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			r.err = fmt.Errorf("open netns %s: %w", name, err)
			return
		}
		defer unix.Close(fd)
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			r.err = fmt.Errorf("setns %s: %w", name, err)
			return
		}
		r.v, r.err = f()
		if unix.Setns(orig, unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
	}()
	r := <-ch
	return r.v, r.err
}

// WaitUp waits until dev in namespace ns is operationally up. The kernel
// attaches the device's real queueing discipline at the same time, from
// its link watch work; until then packets go to a discipline that drops
// them silently, which would cost a first packet (a SYN, an ARP request)
// its answer.
func WaitUp(tb testing.TB, ns, dev string) {
	tb.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, err := exec.Command("ip", "-n", ns, "-o", "link", "show", "dev", dev).CombinedOutput()
		if err != nil {
			tb.Fatalf("ip link show %s: %v: %s", dev, err, out)
		}
		if strings.Contains(string(out), " state UP ") {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%s in %s not up: %s", dev, ns, out)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Sandbox is where load-balancer tests send traffic: a network namespace
// with only loopback up and no route out, so that a connect the load
// balancer failed to rewrite fails with ENETUNREACH instead of leaving the
// machine, and a child cgroup of the cgroup v2 root that only the test's
// client processes join (lb is attached there, never to the root). Both
// are removed when the test ends, whatever its result.
type Sandbox struct {
	NS     string // name under /run/netns
	Cgroup string // cgroup directory
}

// NewNetns makes a network namespace named name (`ip netns add`, its
// file NetnsPath(name)) with lo up, deleted when tb ends.
func NewNetns(tb testing.TB, name string) {
	tb.Helper()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		tb.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	tb.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			tb.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		tb.Fatalf("lo up in %s: %v: %s", name, err, out)
	}
}

// NewSandbox makes a sandbox named name (namespace and cgroup).
func NewSandbox(tb testing.TB, name string) *Sandbox {
	tb.Helper()
	sb := &Sandbox{NS: name}
	NewNetns(tb, name)
	root, err := cgroups.V2Root()
	if err != nil {
		tb.Fatal(err)
	}
	sb.Cgroup = filepath.Join(root, name)
	if err := os.Mkdir(sb.Cgroup, 0o755); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		// Clients are killed by their own cleanups (registered later, so
		// run earlier); the kernel empties the cgroup a moment after.
		var err error
		for range 50 {
			if err = os.Remove(sb.Cgroup); err == nil || errors.Is(err, os.ErrNotExist) {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		tb.Errorf("remove cgroup %s: %v", sb.Cgroup, err)
	})
	return sb
}

// ServeAddr listens on addr (TCP, an address of the namespace) in the
// sandbox's namespace and answers every connection with addr and a
// newline, so that a client sees which backend it reached. It stops when
// tb ends.
func (s *Sandbox) ServeAddr(tb testing.TB, addr string) {
	tb.Helper()
	ln, err := InNetns(s.NS, func() (net.Listener, error) { return net.Listen("tcp", addr) })
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	tb.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(addr + "\n"))
			c.Close()
		}
	})
}

// AskAddr connects to addr over TCP and returns the line a ServeAddr
// server answers there (its own address), allowing timeout for the
// connect and again for the answer.
func AskAddr(addr string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// cgroupFDEnv tells a helper process that HelperCommand started that its
// file descriptor 3 is the sandbox's cgroup.procs.
const cgroupFDEnv = "TESTENV_SANDBOX_CGROUP_FD"

// HelperCommand returns a command that runs the helper test named test of
// the calling test binary inside the sandbox's namespace. With inCgroup,
// the helper joins the sandbox's cgroup when it calls JoinSandboxCgroup,
// before it opens any socket: `ip netns exec` mounts a fresh /sys, hiding
// the cgroup file system, so the helper gets cgroup.procs as file
// descriptor 3 (open until tb ends).
func (s *Sandbox) HelperCommand(tb testing.TB, test string, inCgroup bool) *exec.Cmd {
	tb.Helper()
	cmd := exec.Command("ip", "netns", "exec", s.NS, os.Args[0], "-test.run=^"+test+"$", "-test.count=1")
	cmd.Env = os.Environ()
	if inCgroup {
		procs, err := os.OpenFile(filepath.Join(s.Cgroup, "cgroup.procs"), os.O_WRONLY, 0)
		if err != nil {
			tb.Fatal(err)
		}
		tb.Cleanup(func() { procs.Close() })
		cmd.ExtraFiles = []*os.File{procs}
		cmd.Env = append(cmd.Env, cgroupFDEnv+"=3")
	}
	return cmd
}

// Helper is a running helper process (HelperCommand) whose stdin is a
// pipe, which Wait closes: a helper that reads it to its end knows when to
// stop. Its standard output is kept for Wait; its standard error is the
// test's.
type Helper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	out   strings.Builder
}

// StartHelper starts the helper test named test in the sandbox (and its
// cgroup, with inCgroup), with env added to its environment. It is killed
// when tb ends, if Wait has not reaped it.
func (s *Sandbox) StartHelper(tb testing.TB, test string, inCgroup bool, env ...string) *Helper {
	tb.Helper()
	cmd := s.HelperCommand(tb, test, inCgroup)
	cmd.Env = append(cmd.Env, env...)
	h := &Helper{cmd: cmd}
	cmd.Stdout, cmd.Stderr = &h.out, os.Stderr
	var err error
	if h.stdin, err = cmd.StdinPipe(); err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	return h
}

// Wait closes the helper's stdin, waits for it to exit, and decodes the
// first JSON value of its output (anything before it ignored) into v.
func (h *Helper) Wait(tb testing.TB, v any) {
	tb.Helper()
	h.stdin.Close()
	if err := h.cmd.Wait(); err != nil {
		tb.Fatalf("helper %v: %v; output %q", h.cmd.Args, err, h.out.String())
	}
	out := h.out.String()
	if err := json.NewDecoder(strings.NewReader(out[max(strings.Index(out, "{"), 0):])).Decode(v); err != nil {
		tb.Fatalf("helper output %q: %v", out, err)
	}
}

// JoinSandboxCgroup moves the calling helper process, all its threads,
// into its sandbox's cgroup, if HelperCommand started it with inCgroup; it
// does nothing otherwise.
func JoinSandboxCgroup() error {
	if os.Getenv(cgroupFDEnv) != "3" {
		return nil
	}
	// "0" moves the writing process.
	if _, err := os.NewFile(3, "cgroup.procs").Write([]byte("0")); err != nil {
		return fmt.Errorf("join sandbox cgroup: %w", err)
	}
	return nil
}
