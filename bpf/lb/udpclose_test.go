package lb

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/testenv"
)

const udpCloseServices = `services:
  - name: dns
    vip: 10.96.0.53
    port: 53
    protocol: udp
    backends:
%s  - name: keep
    vip: 10.96.0.54
    port: 53
    protocol: udp
    backends:
      - {address: 127.0.0.7, port: 5353}
  - name: dns6
    vip: fd00::53
    port: 53
    protocol: udp
    backends:
%s`

func dnsBackends(bs ...string) string {
	var b strings.Builder
	for _, a := range bs {
		fmt.Fprintf(&b, "      - {address: %s, port: 5353}\n", a)
	}
	return b.String()
}

func dns6Backends(ports ...uint16) string {
	var b strings.Builder
	for _, p := range ports {
		fmt.Fprintf(&b, "      - {address: \"::1\", port: %d}\n", p)
	}
	return b.String()
}

// udpConnReport is what TestHelperUDPConn prints, twice.
type udpConnReport struct {
	Before  []string `json:"before"`  // replies of the first exchange, by socket
	Pending []string `json:"pending"` // pending error of each socket then
	After   []string `json:"after"`   // result of a second exchange
	Fresh   string   `json:"fresh"`   // a new socket to the VIP
}

// A backend leaves a UDP service: the connected sockets the load balancer
// sent to it are aborted (ECONNABORTED), by bpf_sock_destroy or, as on
// kernels before 6.5, by sock_diag; a new socket reaches the remaining
// backend. Sockets of other services and sockets connected to the backend
// directly, not through the VIP, are left alone.
func TestUDPClose(t *testing.T) {
	testenv.Privileged(t)
	for _, c := range []struct {
		mode   string
		noIter bool
	}{{"bpf_sock_destroy", false}, {"sock_diag", true}} {
		t.Run(c.mode, func(t *testing.T) {
			sb := newSandbox(t)
			for _, a := range []string{"127.0.0.5:5353", "127.0.0.6:5353", "127.0.0.7:5353", "[::1]:5354", "[::1]:5355"} {
				sb.serveUDP(t, a)
			}
			file := filepath.Join(t.TempDir(), "services.yaml")
			writeFile(t, file, fmt.Sprintf(udpCloseServices, dnsBackends("127.0.0.5", "127.0.0.6"), dns6Backends(5354, 5355)))
			p := load(t, Options{Cgroup: sb.Cgroup, ServicesFile: file, noSockDestroy: c.noIter})
			wantMode := c.mode
			if !haveSockDestroy(t) {
				wantMode = "sock_diag" // the fallback before 6.5
			}
			if got := p.UDPCloseMode(); got != wantMode {
				t.Fatalf("mode %s, want %s", got, wantMode)
			}

			cmd := sb.HelperCommand(t, "TestHelperUDPConn", true)
			cmd.Env = append(cmd.Env, "LBTEST_UDPCONN=1")
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			stdout, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
			lines := bufio.NewScanner(stdout)
			read := func() udpConnReport {
				t.Helper()
				if !lines.Scan() {
					t.Fatalf("helper ended: %v", lines.Err())
				}
				var r udpConnReport
				if err := json.Unmarshal(lines.Bytes(), &r); err != nil {
					t.Fatalf("helper said %q: %v", lines.Text(), err)
				}
				return r
			}

			r := read()
			gone := r.Before[0] // the backend of the VIP socket
			stay := "127.0.0.5:5353"
			if gone == stay {
				stay = "127.0.0.6:5353"
			}
			gone6, stay6 := r.Before[4], uint16(5355)
			if gone6 == "[::1]:5355" {
				stay6 = 5354
			}
			want := []string{gone, "127.0.0.7:5353", "127.0.0.5:5353", "127.0.0.6:5353", gone6}
			if !strings.HasPrefix(gone6, "[::1]:535") || fmt.Sprint(r.Before) != fmt.Sprint(want) {
				t.Fatalf("first exchange %v, want %v", r.Before, want)
			}
			before := snapshot(t, p).UDPSocketsClosed

			writeFile(t, file, fmt.Sprintf(udpCloseServices, dnsBackends(strings.TrimSuffix(stay, ":5353")), dns6Backends(stay6)))
			if err := p.Reload(); err != nil {
				t.Fatal(err)
			}
			if got := snapshot(t, p).UDPSocketsClosed - before; got != 2 {
				t.Errorf("%d sockets closed, want 2", got)
			}
			fmt.Fprintln(stdin, "next")
			r = read()
			t.Logf("after removing %s: %+v", gone, r)
			for _, i := range []int{0, 4} {
				if r.Pending[i] != "ECONNABORTED" {
					t.Errorf("VIP socket %d: pending error %q, want ECONNABORTED", i, r.Pending[i])
				}
				if strings.HasPrefix(r.After[i], "ok") {
					t.Errorf("VIP socket %d still exchanges after its backend left: %s", i, r.After[i])
				}
			}
			for i := 1; i < 4; i++ {
				if r.Pending[i] != "EAGAIN" || r.After[i] != "ok:"+want[i] {
					t.Errorf("socket %d (to %s): pending %s, exchange %s; want it untouched", i, want[i], r.Pending[i], r.After[i])
				}
			}
			if r.Fresh != stay {
				t.Errorf("a new socket reached %q, want %s", r.Fresh, stay)
			}

			// A reload that removes nothing closes nothing.
			n := snapshot(t, p).UDPSocketsClosed
			writeFile(t, file, fmt.Sprintf(udpCloseServices, dnsBackends(strings.TrimSuffix(stay, ":5353"), "127.0.0.8"), dns6Backends(stay6, 5356)))
			if err := p.Reload(); err != nil {
				t.Fatal(err)
			}
			if got := snapshot(t, p).UDPSocketsClosed; got != n {
				t.Errorf("a reload adding a backend closed %d sockets", got-n)
			}
		})
	}
}

// TestHelperUDPConn holds connected UDP sockets across a reload: one to
// the VIP of dns, one to the VIP of keep, one to each dns backend
// directly, and one to the VIP of dns6. It does nothing in a normal test run.
func TestHelperUDPConn(t *testing.T) {
	if os.Getenv("LBTEST_UDPCONN") == "" {
		return
	}
	fail := func(err error) {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	if err := testenv.JoinSandboxCgroup(); err != nil {
		fail(err)
	}
	// Bounded: the test answers within seconds.
	time.AfterFunc(30*time.Second, func() { os.Exit(4) })
	dials := []string{"10.96.0.53:53", "10.96.0.54:53", "127.0.0.5:5353", "127.0.0.6:5353", "[fd00::53]:53"}
	var fds []int
	var r udpConnReport
	for _, d := range dials {
		fd, err := connectUDP(netip.MustParseAddrPort(d))
		if err != nil {
			fail(fmt.Errorf("connect %s: %w", d, err))
		}
		fds = append(fds, fd)
		got, err := exchangeConnected(fd)
		if err != nil {
			fail(fmt.Errorf("exchange with %s: %w", d, err))
		}
		r.Before = append(r.Before, got)
	}
	out := json.NewEncoder(os.Stdout)
	out.Encode(r)

	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		fail(err)
	}
	r = udpConnReport{}
	buf := make([]byte, 64)
	for _, fd := range fds {
		_, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		r.Pending = append(r.Pending, errnoOf(err))
		got, err := exchangeConnected(fd)
		if err != nil {
			r.After = append(r.After, errnoOf(err))
		} else {
			r.After = append(r.After, "ok:"+got)
		}
	}
	fd, err := connectUDP(netip.MustParseAddrPort(dials[0]))
	if err != nil {
		fail(err)
	}
	if r.Fresh, err = exchangeConnected(fd); err != nil {
		r.Fresh = errnoOf(err)
	}
	out.Encode(r)
	os.Exit(0)
}

func connectUDP(a netip.AddrPort) (int, error) {
	family, sa := sockaddr(a)
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	tv := unix.Timeval{Sec: 2}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	return fd, unix.Connect(fd, sa)
}

// exchangeConnected sends a datagram on a connected socket and returns the
// reply: the address of the backend that answered.
func exchangeConnected(fd int) (string, error) {
	if _, err := unix.Write(fd, []byte("ping")); err != nil {
		return "", err
	}
	buf := make([]byte, 64)
	n, err := unix.Read(fd, buf)
	for err == unix.EINTR {
		n, err = unix.Read(fd, buf)
	}
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// haveSockDestroy reports whether the kernel has the bpf_sock_destroy kfunc
// (6.5+), which its BTF then names.
func haveSockDestroy(t *testing.T) bool {
	t.Helper()
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		t.Fatal(err)
	}
	var fn *btf.Func
	switch err := spec.TypeByName("bpf_sock_destroy", &fn); {
	case errors.Is(err, btf.ErrNotFound):
		return false
	case err != nil:
		t.Fatal(err)
	}
	return true
}

// A process of the cgroup outside ktel's PID namespace (ktel without
// hostPID), which cgroup.procs lists as PID 0, is counted as unseen, not
// silently skipped; one that exited since the list was read is neither
// unseen nor an error.
func TestCgroupNetnsUnseen(t *testing.T) {
	dir := t.TempDir()
	procs := fmt.Sprintf("%d\n0\n0\n%d\n", os.Getpid(), 4194399) // above any pid_max: exited
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(procs), 0o644); err != nil {
		t.Fatal(err)
	}
	nss, unseen, err := cgroupNetns(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(nss) != 1 || nss[0] != ownNetns || unseen != 2 {
		t.Errorf("namespaces %q, unseen %d; want only ktel's own, 2 unseen", nss, unseen)
	}
}
