package tcpretrans_test

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/ktel-dev/ktel/internal/testenv"
	"golang.org/x/sys/unix"
)

// All traffic of these tests stays inside network namespaces they create:
// a client and a server namespace joined by a veth pair, deleted when the
// test ends. Nothing is addressed outside them and the host's firewall is
// never touched.

// pair is a client and a server namespace joined by a veth pair.
type pair struct {
	client, server string // namespace names
	clientAddr     netip.Addr
	clientAddr6    netip.Addr
	serverAddrs    []netip.Addr // IPv4; the first is the main one
	serverAddr6    netip.Addr
}

var pairs atomic.Int32

// newPair creates the namespaces, with extra IPv4 addresses on the server
// side beyond its first, and deletes them when t ends.
func newPair(t *testing.T, extra int) *pair {
	t.Helper()
	n := pairs.Add(1)
	if n > 250 {
		t.Fatal("too many namespace pairs")
	}
	name := fmt.Sprintf("ktel-tr-%d-%d", os.Getpid(), n)
	p := &pair{
		client:      name + "-c",
		server:      name + "-s",
		clientAddr:  netip.AddrFrom4([4]byte{10, 200, byte(n), 1}),
		clientAddr6: netip.MustParseAddr(fmt.Sprintf("fd00:200:%x::1", n)),
		serverAddr6: netip.MustParseAddr(fmt.Sprintf("fd00:200:%x::2", n)),
	}
	for i := range 1 + extra {
		p.serverAddrs = append(p.serverAddrs, netip.AddrFrom4([4]byte{10, 200, byte(n), byte(2 + i)}))
	}
	for _, ns := range []string{p.client, p.server} {
		testenv.Sh(t, "ip", "netns", "add", ns)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("ip netns del %s: %v: %s", ns, err, out)
			}
		})
	}
	// Both ends are created inside the namespaces, never in the host's.
	// Fixed MAC addresses and permanent neighbour entries: neighbour
	// discovery would otherwise hold the first IPv6 SYN for about a
	// second (its first solicitation is lost while the link comes up), and
	// the SYN's retransmit would fail with EBUSY (skb_still_in_host_queue).
	cmac, smac := fmt.Sprintf("02:00:00:00:%02x:01", n), fmt.Sprintf("02:00:00:00:%02x:02", n)
	testenv.Sh(t, "ip", "-n", p.client, "link", "add", "vc", "address", cmac, "type", "veth",
		"peer", "name", "vs", "address", smac, "netns", p.server)
	for _, a := range p.clientAddrsAll() {
		testenv.Sh(t, append([]string{"ip", "-n", p.client, "addr", "add"}, addrArgs(a, "vc")...)...)
		testenv.Sh(t, "ip", "-n", p.server, "neigh", "replace", a.String(), "lladdr", cmac, "dev", "vs", "nud", "permanent")
	}
	for _, a := range p.serverAddrsAll() {
		testenv.Sh(t, append([]string{"ip", "-n", p.server, "addr", "add"}, addrArgs(a, "vs")...)...)
		testenv.Sh(t, "ip", "-n", p.client, "neigh", "replace", a.String(), "lladdr", smac, "dev", "vc", "nud", "permanent")
	}
	testenv.Sh(t, "ip", "-n", p.client, "link", "set", "vc", "up")
	testenv.Sh(t, "ip", "-n", p.server, "link", "set", "vs", "up")
	testenv.WaitUp(t, p.client, "vc")
	testenv.WaitUp(t, p.server, "vs")
	return p
}

// addrArgs are the arguments of ip addr add for a on dev: IPv6 addresses
// skip duplicate address detection, so that they are usable at once.
func addrArgs(a netip.Addr, dev string) []string {
	if a.Is4() {
		return []string{a.String() + "/24", "dev", dev}
	}
	return []string{a.String() + "/64", "dev", dev, "nodad"}
}

// serverAddrsAll are the server's addresses, IPv4 and IPv6.
func (p *pair) serverAddrsAll() []netip.Addr {
	return append([]netip.Addr{p.serverAddr6}, p.serverAddrs...)
}

// clientAddrsAll are the client's addresses, IPv4 and IPv6.
func (p *pair) clientAddrsAll() []netip.Addr { return []netip.Addr{p.clientAddr, p.clientAddr6} }

// firewall adds rules (iptables and ip6tables arguments after -A or -D) to
// the INPUT or OUTPUT chain of namespace ns; the returned func removes them.
func firewall(t *testing.T, ns string, rule ...string) (remove func()) {
	t.Helper()
	for _, cmd := range []string{"iptables", "ip6tables"} {
		testenv.Sh(t, append([]string{"ip", "netns", "exec", ns, cmd, "-w", "5", "-A"}, rule...)...)
	}
	var once sync.Once
	remove = func() {
		once.Do(func() {
			for _, cmd := range []string{"iptables", "ip6tables"} {
				testenv.Sh(t, append([]string{"ip", "netns", "exec", ns, cmd, "-w", "5", "-D"}, rule...)...)
			}
		})
	}
	return remove
}

// inNetns runs f in network namespace ns (testenv.InNetns).
func inNetns[T any](ns string, f func() (T, error)) (T, error) { return testenv.InNetns(ns, f) }

// mib reads the namespace's TCP counters: Tcp fields of /proc/net/snmp and
// TcpExt fields of /proc/net/netstat, as "Tcp.RetransSegs". /proc/net
// follows the process's main thread, /proc/thread-self/net this thread.
func mib(t *testing.T, ns string) map[string]uint64 {
	t.Helper()
	m, err := inNetns(ns, func() (map[string]uint64, error) {
		m := map[string]uint64{}
		for _, file := range []string{"snmp", "netstat"} {
			b, err := os.ReadFile("/proc/thread-self/net/" + file)
			if err != nil {
				return nil, err
			}
			if err := parseMIB(b, m); err != nil {
				return nil, fmt.Errorf("%s: %w", file, err)
			}
		}
		return m, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// parseMIB reads pairs of lines "Proto: name name..." / "Proto: n n...".
func parseMIB(b []byte, m map[string]uint64) error {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		names := strings.Fields(sc.Text())
		if !sc.Scan() {
			return fmt.Errorf("no values for %s", names[0])
		}
		vals := strings.Fields(sc.Text())
		if len(names) != len(vals) || len(names) == 0 || names[0] != vals[0] {
			return fmt.Errorf("malformed %q / %q", names, vals)
		}
		proto := strings.TrimSuffix(names[0], ":")
		for i := 1; i < len(names); i++ {
			// Tcp MaxConn is -1; counters are never negative.
			if v, err := strconv.ParseUint(vals[i], 10, 64); err == nil {
				m[proto+"."+names[i]] = v
			}
		}
	}
	return sc.Err()
}

// server accepts connections on addr in namespace ns and reads everything
// they send, counting the bytes, until t ends.
type server struct {
	ln   net.Listener
	port uint16
	read atomic.Int64
}

func listen(t *testing.T, ns string, addr netip.Addr) *server {
	t.Helper()
	ln, err := inNetns(ns, func() (net.Listener, error) {
		return net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	})
	if err != nil {
		t.Fatal(err)
	}
	s := &server{ln: ln, port: netip.MustParseAddrPort(ln.Addr().String()).Port()}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go func() {
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					s.read.Add(int64(n))
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			abort(c)
		}
	})
	return s
}

// abort closes c with a reset, so that no FIN is retransmitted after the
// test.
func abort(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// outq is the number of bytes c has sent but not had acknowledged, plus
// those not sent yet.
func outq(c net.Conn) (int, error) {
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		n    int
		ierr error
	)
	if err := rc.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) }); err != nil {
		return 0, err
	}
	return n, ierr
}
