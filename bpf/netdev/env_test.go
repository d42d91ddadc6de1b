package netdev

// Test environment: network namespaces and veth pairs created by the test,
// named after the pid, removed in t.Cleanup whatever happens; sockets
// opened inside them. Nothing here touches the host's interfaces.

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ktel-dev/ktel/internal/testenv"
	"golang.org/x/sys/unix"
)

// newNetns creates a network namespace without IPv6 (no neighbour
// discovery or MLD noise) unless ipv6, with lo up, and deletes it after
// the test.
func newNetns(t *testing.T, suffix string, ipv6 bool) string {
	t.Helper()
	name := fmt.Sprintf("ktel-nd-%d-%s", os.Getpid(), suffix)
	testenv.Sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	v := "1"
	if ipv6 {
		v = "0"
	}
	inNetns(t, name, func() error {
		for _, k := range []string{"all", "default"} {
			if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+k+"/disable_ipv6", []byte(v), 0); err != nil {
				return err
			}
		}
		return nil
	})
	testenv.Sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return name
}

func nsPath(ns string) string { return testenv.NetnsPath(ns) }

// inNetns runs f in network namespace ns (testenv.InNetns).
func inNetns(t *testing.T, ns string, f func() error) {
	t.Helper()
	if _, err := testenv.InNetns(ns, func() (struct{}, error) { return struct{}{}, f() }); err != nil {
		t.Fatalf("in netns %s: %v", ns, err)
	}
}

// end is one end of a veth pair.
type end struct {
	ns, dev string
	addr    netip.Addr
	mac     string
}

// vethPair joins two namespaces with a veth pair named a and b, addressed
// 10.<net>.0.1 and .2 (and fd00:<net>::1, ::2 when ipv6), up, with static
// neighbour entries so that no ARP is needed unless arp. It is deleted
// with the namespaces, or by the test.
func vethPair(t *testing.T, nsA, a, nsB, b string, net int, static bool, ipv6 bool) (end, end) {
	t.Helper()
	return vethPairIndex(t, nsA, a, nsB, b, net, static, ipv6, 0)
}

// vethPairIndex is vethPair with a chosen ifindex for a (0: the kernel's
// choice).
func vethPairIndex(t *testing.T, nsA, a, nsB, b string, net int, static bool, ipv6 bool, index int) (end, end) {
	t.Helper()
	args := []string{"ip", "-n", nsA, "link", "add", a}
	if index != 0 {
		args = append(args, "index", fmt.Sprint(index))
	}
	testenv.Sh(t, append(args, "type", "veth", "peer", "name", b, "netns", nsB)...)
	ea := end{ns: nsA, dev: a, addr: netip.AddrFrom4([4]byte{10, byte(net), 0, 1})}
	eb := end{ns: nsB, dev: b, addr: netip.AddrFrom4([4]byte{10, byte(net), 0, 2})}
	if ipv6 {
		ea.addr = netip.MustParseAddr(fmt.Sprintf("fd00:%d::1", net))
		eb.addr = netip.MustParseAddr(fmt.Sprintf("fd00:%d::2", net))
	}
	for _, e := range []*end{&ea, &eb} {
		prefix := "/24"
		extra := []string{}
		if ipv6 {
			prefix, extra = "/64", []string{"nodad"}
		}
		testenv.Sh(t, append([]string{"ip", "-n", e.ns, "addr", "add", e.addr.String() + prefix, "dev", e.dev}, extra...)...)
		testenv.Sh(t, "ip", "-n", e.ns, "link", "set", e.dev, "up")
		e.mac = strings.TrimSpace(testenv.Sh(t, "ip", "netns", "exec", e.ns, "cat", "/sys/class/net/"+e.dev+"/address"))
	}
	if static {
		testenv.Sh(t, "ip", "-n", nsA, "neigh", "replace", eb.addr.String(), "lladdr", eb.mac, "dev", a, "nud", "permanent")
		testenv.Sh(t, "ip", "-n", nsB, "neigh", "replace", ea.addr.String(), "lladdr", ea.mac, "dev", b, "nud", "permanent")
	}
	testenv.WaitUp(t, nsA, a)
	testenv.WaitUp(t, nsB, b)
	return ea, eb
}

// udpSocket opens a UDP socket bound to e's address and port, in e's
// namespace.
func udpSocket(t *testing.T, e end, port int) int {
	t.Helper()
	var fd int
	inNetns(t, e.ns, func() error {
		var err error
		if e.addr.Is4() {
			if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
				return err
			}
			return unix.Bind(fd, &unix.SockaddrInet4{Addr: e.addr.As4(), Port: port})
		}
		if fd, err = unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrInet6{Addr: e.addr.As16(), Port: port})
	})
	t.Cleanup(func() { unix.Close(fd) })
	tv := unix.NsecToTimeval(int64(2 * time.Second))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	// Room for every datagram of a test, should the receiver fall behind.
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20); err != nil {
		t.Fatal(err)
	}
	return fd
}

func port(t *testing.T, fd int) int {
	t.Helper()
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return sa.Port
	case *unix.SockaddrInet6:
		return sa.Port
	}
	t.Fatalf("socket address %T", sa)
	return 0
}

func sockaddr(e end, port int) unix.Sockaddr {
	if e.addr.Is4() {
		return &unix.SockaddrInet4{Addr: e.addr.As4(), Port: port}
	}
	return &unix.SockaddrInet6{Addr: e.addr.As16(), Port: port}
}

// sendUDP sends n datagrams of size bytes from from to to, from a thread
// pinned to cpu, and receives them all at to, so that when it returns
// every packet has passed both ends' hooks.
func sendUDP(t *testing.T, from, to end, n, size, cpu int) {
	t.Helper()
	rx := udpSocket(t, to, 0)
	tx := udpSocket(t, from, 0)
	dst := sockaddr(to, port(t, rx))
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // pinned: never unlocked, discarded afterwards
		var set unix.CPUSet
		set.Set(cpu)
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			errc <- err
			return
		}
		buf := make([]byte, size)
		for i := range n {
			// The Go runtime's signals interrupt socket calls (EINTR).
			err := unix.Sendto(tx, buf, 0, dst)
			for err == unix.EINTR {
				err = unix.Sendto(tx, buf, 0, dst)
			}
			if err != nil {
				errc <- fmt.Errorf("send %d: %w", i, err)
				return
			}
		}
		errc <- nil
	}()
	buf := make([]byte, size+1)
	for i := range n {
		m, _, err := unix.Recvfrom(rx, buf, 0)
		for err == unix.EINTR { // a receive timeout makes it unrestartable
			m, _, err = unix.Recvfrom(rx, buf, 0)
		}
		if err != nil {
			t.Fatalf("received %d of %d datagrams: %v", i, n, err)
		}
		if m != size {
			t.Fatalf("datagram of %d bytes, want %d", m, size)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// frameLen is the length TC and XDP see for a UDP datagram of size bytes.
func frameLen(ipv6 bool, size int) uint64 {
	if ipv6 {
		return uint64(14 + 40 + 8 + size)
	}
	return uint64(14 + 20 + 8 + size)
}

func ifindex(t *testing.T, ns, dev string) int {
	t.Helper()
	var idx int
	inNetns(t, ns, func() error {
		i, err := net.InterfaceByName(dev)
		if err == nil {
			idx = i.Index
		}
		return err
	})
	return idx
}

// haveTCX reports whether the kernel has tcx links (6.6+).
func haveTCX(t *testing.T) bool { return testenv.HaveTCX(t) }

// autoHook is the TC hook TCAuto must pick on this kernel.
func autoHook(t *testing.T) string {
	if haveTCX(t) {
		return "tcx"
	}
	return "clsact"
}

// load loads o in ns, where dev matches o.Interfaces. Where o forces tcx
// on a kernel without it, it checks instead that Load fails, saying the
// kernel lacks it, and leaves dev's qdiscs as they were and no filter of
// the probe's; then it returns nil.
func load(t *testing.T, o Options, ns, dev string) *Probe {
	t.Helper()
	refused := o.TC == TCX && !haveTCX(t)
	var qdiscs string
	if refused {
		qdiscs = tcShow(t, ns, dev, "qdisc")
	}
	p, err := Load(o, testLog(t))
	if !refused {
		if err != nil {
			t.Fatalf("load in %s: %v", ns, err)
		}
		return p
	}
	if err == nil {
		p.Close()
		t.Fatal("tcx forced on a kernel without tcx: Load succeeded")
	}
	if !errors.Is(err, ErrNothingAttached) || !errors.Is(err, ebpf.ErrNotSupported) {
		t.Fatalf("tcx forced on a kernel without tcx: %v; want ErrNothingAttached wrapping ebpf.ErrNotSupported", err)
	}
	t.Logf("tcx forced on a kernel without tcx: %v", err)
	if out := tcShow(t, ns, dev, "qdisc"); out != qdiscs {
		t.Errorf("%s: qdiscs changed by a refused Load:\n%s\nwas:\n%s", dev, out, qdiscs)
	} else if strings.Contains(out, "clsact") {
		if f := tcShow(t, ns, dev, "filter", "ingress") + tcShow(t, ns, dev, "filter", "egress"); strings.Contains(f, filterName) {
			t.Errorf("%s: a filter of the probe's after a refused Load:\n%s", dev, f)
		}
	}
	return nil
}

// tcModes are the modes that force a TC hook this kernel has.
func tcModes(t *testing.T) []mode {
	if haveTCX(t) {
		return modes[:2]
	}
	return modes[1:2]
}
