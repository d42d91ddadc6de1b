package lb

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/internal/testenv"
	"golang.org/x/sys/unix"
)

// A sandbox is a testenv.Sandbox with the helpers of these tests.
type sandbox struct{ *testenv.Sandbox }

var sandboxes atomic.Int32

func newSandbox(t *testing.T) *sandbox {
	t.Helper()
	s := testenv.NewSandbox(t, fmt.Sprintf("ktel-lbtest-%d-%d", os.Getpid(), sandboxes.Add(1)))
	return &sandbox{s}
}

// inNS runs f on an OS thread that has joined the sandbox's namespace.
// Sockets f creates belong to the namespace, whichever thread uses them
// later. The thread goes back to its namespace afterwards, or is discarded.
func (sb *sandbox) inNS(t *testing.T, f func() error) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		target, err := os.Open(testenv.NetnsPath(sb.NS))
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := f()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		} // else the locked thread exits with this goroutine
		errc <- ferr
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// serveTCP listens on addr in the namespace and answers every connection
// with its own address and a newline (testenv.Sandbox.ServeAddr).
func (sb *sandbox) serveTCP(t *testing.T, addr string) {
	t.Helper()
	sb.ServeAddr(t, addr)
}

// serveUDP answers every datagram on addr with its own address.
func (sb *sandbox) serveUDP(t *testing.T, addr string) {
	t.Helper()
	var pc net.PacketConn
	sb.inNS(t, func() (err error) {
		pc, err = net.ListenPacket("udp", addr)
		return err
	})
	var wg sync.WaitGroup
	t.Cleanup(func() { pc.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 64)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte(addr), from)
		}
	})
}

// clientResult is what a client process reports.
type clientResult struct {
	OK       int            `json:"ok"`       // exchanges completed
	Backends map[string]int `json:"backends"` // answers by backend
	Errors   map[string]int `json:"errors"`   // failures by errno
	BadPeer  []string       `json:"bad_peer"` // getpeername/recvfrom addresses other than the VIP (first few)
}

type clientSpec struct {
	mode     string // tcp or udp
	addr     string // the VIP
	n        int    // exchanges, at most
	inCgroup bool   // join the sandbox cgroup first
	untilEOF bool   // also stop when stdin closes
}

// client is a running client process in the sandbox: a re-exec of the
// test binary (TestHelperProcess) under `ip netns exec`, which joins the
// cgroup itself before opening any socket.
type client struct{ *testenv.Helper }

func (sb *sandbox) start(t *testing.T, spec clientSpec) *client {
	t.Helper()
	env := []string{
		"LBTEST_MODE=" + spec.mode,
		"LBTEST_ADDR=" + spec.addr,
		"LBTEST_N=" + strconv.Itoa(spec.n),
		"LBTEST_MAX_SECONDS=20",
		// No preemption signals: each connect(2) must run once, not be
		// interrupted and retried.
		"GODEBUG=asyncpreemptoff=1",
	}
	if spec.untilEOF {
		env = append(env, "LBTEST_UNTIL_EOF=1")
	}
	return &client{sb.StartHelper(t, "TestHelperProcess", spec.inCgroup, env...)}
}

// wait closes the client's stdin and returns its result.
func (c *client) wait(t *testing.T) clientResult {
	t.Helper()
	var r clientResult
	c.Wait(t, &r)
	return r
}

func (sb *sandbox) run(t *testing.T, spec clientSpec) clientResult {
	t.Helper()
	return sb.start(t, spec).wait(t)
}

// TestHelperProcess is the client process; it does nothing in a normal
// test run.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv("LBTEST_MODE")
	if mode == "" {
		return
	}
	// Before any socket exists.
	if err := testenv.JoinSandboxCgroup(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	vip, err := netip.ParseAddrPort(os.Getenv("LBTEST_ADDR"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	n, _ := strconv.Atoi(os.Getenv("LBTEST_N"))
	maxSec, _ := strconv.Atoi(os.Getenv("LBTEST_MAX_SECONDS"))
	deadline := time.Now().Add(time.Duration(maxSec) * time.Second)
	var stop atomic.Bool
	if os.Getenv("LBTEST_UNTIL_EOF") == "1" {
		go func() {
			io.Copy(io.Discard, os.Stdin)
			stop.Store(true)
		}()
	}
	r := clientResult{Backends: map[string]int{}, Errors: map[string]int{}}
	for i := 0; i < n && !stop.Load() && time.Now().Before(deadline); i++ {
		var backend string
		var peer netip.AddrPort
		if mode == "udp" {
			backend, peer, err = exchangeUDP(vip)
		} else {
			backend, peer, err = exchangeTCP(vip)
		}
		if err != nil {
			r.Errors[errnoOf(err)]++
			continue
		}
		if peer != vip && len(r.BadPeer) < 5 {
			r.BadPeer = append(r.BadPeer, peer.String())
		}
		r.OK++
		r.Backends[backend]++
	}
	out, _ := json.Marshal(r)
	fmt.Printf("%s\n", out)
	os.Exit(0)
}

func errnoOf(err error) string {
	var e unix.Errno
	if errors.As(err, &e) {
		if name := unix.ErrnoName(e); name != "" {
			return name
		}
		return strconv.Itoa(int(e))
	}
	return err.Error()
}

func sockaddr(a netip.AddrPort) (int, unix.Sockaddr) {
	if a.Addr().Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Addr: a.Addr().As4(), Port: int(a.Port())}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Addr: a.Addr().As16(), Port: int(a.Port())}
}

func addrOf(sa unix.Sockaddr) netip.AddrPort {
	switch s := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(s.Addr), uint16(s.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(s.Addr), uint16(s.Port))
	}
	return netip.AddrPort{}
}

// exchangeTCP connects with plain blocking syscalls, so that each call is
// exactly one connect(2), and returns what the server answered and what
// getpeername(2) said.
func exchangeTCP(vip netip.AddrPort) (string, netip.AddrPort, error) {
	family, sa := sockaddr(vip)
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 2}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if err := unix.Connect(fd, sa); err != nil {
		return "", netip.AddrPort{}, err
	}
	psa, err := unix.Getpeername(fd)
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	line, err := bufio.NewReader(readerFunc(func(p []byte) (int, error) { return unix.Read(fd, p) })).ReadString('\n')
	if err != nil {
		return "", netip.AddrPort{}, fmt.Errorf("read: %w", err)
	}
	return strings.TrimSpace(line), addrOf(psa), nil
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) {
	n, err := f(p)
	for err == unix.EINTR {
		n, err = f(p)
	}
	if n == 0 && err == nil {
		return 0, io.EOF
	}
	return n, err
}

// exchangeUDP sends one datagram to vip from an unconnected socket and
// returns the reply and the address recvfrom(2) gave for it.
func exchangeUDP(vip netip.AddrPort) (string, netip.AddrPort, error) {
	family, sa := sockaddr(vip)
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 2}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Sendto(fd, []byte("ping"), 0, sa); err != nil {
		return "", netip.AddrPort{}, err
	}
	buf := make([]byte, 64)
	n, from, err := unix.Recvfrom(fd, buf, 0)
	for err == unix.EINTR {
		n, from, err = unix.Recvfrom(fd, buf, 0)
	}
	if err != nil {
		return "", netip.AddrPort{}, err
	}
	return string(buf[:n]), addrOf(from), nil
}
