package podnet

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/ktel-dev/ktel/internal/testenv"
)

func newNetns(t *testing.T, suffix string) string {
	t.Helper()
	name := fmt.Sprintf("ktel-pn-%d-%s", os.Getpid(), suffix)
	testenv.NewNetns(t, name)
	return name
}

func ifindex(t *testing.T, ns, dev string) int {
	t.Helper()
	var n int
	fmt.Sscan(testenv.Sh(t, "ip", "netns", "exec", ns, "cat", "/sys/class/net/"+dev+"/ifindex"), &n)
	return n
}

// A namespace that cannot be opened is named in the error.
func TestOpenNetlinkNamesNamespace(t *testing.T) {
	const path = "/nonexistent/ktel-netns"
	if _, err := OpenNetlink(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("OpenNetlink(%s) = %v, want an error naming it", path, err)
	}
}

// A "host" namespace of the test's own with one pod wired as Calico or
// the ptp plugin do (a /32 route to the pod's address through its veth)
// and one as the bridge plugin does (the veth a port of a bridge that
// holds the pods' subnet), and a veth to a namespace that is no pod's.
func TestNetlinkResolve(t *testing.T) {
	testenv.Privileged(t)
	host, ptp, bridged, other := newNetns(t, "host"), newNetns(t, "ptp"), newNetns(t, "br"), newNetns(t, "other")
	// ptp: 10.200.0.2/32 in the pod, a route to it in the host.
	testenv.Sh(t, "ip", "-n", host, "link", "add", "vethptp", "type", "veth", "peer", "name", "eth0", "netns", ptp)
	testenv.Sh(t, "ip", "-n", ptp, "addr", "add", "10.200.0.2/32", "dev", "eth0")
	testenv.Sh(t, "ip", "-n", ptp, "addr", "add", "fd00:200::2/128", "dev", "eth0", "nodad")
	testenv.Sh(t, "ip", "-n", ptp, "link", "set", "eth0", "up")
	testenv.Sh(t, "ip", "-n", host, "link", "set", "vethptp", "up")
	testenv.Sh(t, "ip", "-n", host, "route", "add", "10.200.0.2/32", "dev", "vethptp", "scope", "link")
	// bridge: 10.201.0.0/24 on br0 in the host, 10.201.0.2/24 in the pod.
	testenv.Sh(t, "ip", "-n", host, "link", "add", "br0", "type", "bridge")
	testenv.Sh(t, "ip", "-n", host, "addr", "add", "10.201.0.1/24", "dev", "br0")
	testenv.Sh(t, "ip", "-n", host, "link", "set", "br0", "up")
	testenv.Sh(t, "ip", "-n", host, "link", "add", "vethbr", "type", "veth", "peer", "name", "eth0", "netns", bridged)
	testenv.Sh(t, "ip", "-n", host, "link", "set", "vethbr", "master", "br0", "up")
	testenv.Sh(t, "ip", "-n", bridged, "addr", "add", "10.201.0.2/24", "dev", "eth0")
	testenv.Sh(t, "ip", "-n", bridged, "link", "set", "eth0", "up")
	// Not a pod: its peer's address is no pod's.
	testenv.Sh(t, "ip", "-n", host, "link", "add", "vethother", "type", "veth", "peer", "name", "eth0", "netns", other)
	testenv.Sh(t, "ip", "-n", other, "addr", "add", "10.202.0.2/32", "dev", "eth0")

	n, err := OpenNetlink(testenv.NetnsPath(host))
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	vethPtp, vethBr, br0 := ifindex(t, host, "vethptp"), ifindex(t, host, "vethbr"), ifindex(t, host, "br0")

	links, err := n.Links()
	if err != nil {
		t.Fatal(err)
	}
	if l := links[vethPtp]; !l.podSide() || l.Peer != ifindex(t, ptp, "eth0") {
		t.Errorf("vethptp: %+v, want a veth with its peer in another namespace", l)
	}
	if links[br0].podSide() {
		t.Errorf("br0 %+v taken for a pod's interface", links[br0])
	}
	ip := netip.MustParseAddr
	for addr, want := range map[string]int{"10.200.0.2": vethPtp, "10.201.0.2": br0} {
		if got, err := n.RouteDev(ip(addr)); err != nil || got != want {
			t.Errorf("RouteDev(%s) = %d, %v; want %d", addr, got, err, want)
		}
	}
	l := links[vethPtp]
	got, err := n.PeerAddrs(l.NetNsID, l.Peer)
	if want := []netip.Addr{ip("10.200.0.2"), ip("fd00:200::2")}; err != nil || !slices.Equal(got, want) {
		t.Errorf("PeerAddrs(vethptp) = %v, %v; want %v", got, err, want)
	}

	pods := []netip.Addr{ip("10.200.0.2"), ip("10.201.0.2"), ip("10.1.2.3")}
	byIndex, _, errs, err := resolve(n, pods)
	if err != nil || errs.peer != nil {
		t.Fatalf("resolve: %v %+v", err, errs)
	}
	want := map[int][]netip.Addr{vethPtp: {ip("10.200.0.2")}, vethBr: {ip("10.201.0.2")}}
	if fmt.Sprint(byIndex) != fmt.Sprint(want) {
		t.Errorf("resolve = %v, want %v", byIndex, want)
	}
}

// A 110-pod node: 55 pods routed through their veths, 55 on a bridge,
// their peers (for speed) all in one namespace. Reports the time of one
// resolution.
func BenchmarkResolve(b *testing.B) {
	testenv.Privileged(b)
	const pods = 110
	name := fmt.Sprintf("ktel-pn-%d-", os.Getpid())
	host, peers := name+"bh", name+"bp"
	testenv.NewNetns(b, host)
	testenv.NewNetns(b, peers)
	var hostCmds, peerCmds strings.Builder
	hostCmds.WriteString("link add br0 type bridge\naddr add 10.244.2.1/24 dev br0\nlink set br0 up\n")
	var ips []netip.Addr
	for i := range pods {
		addr := netip.AddrFrom4([4]byte{10, 244, byte(1 + i%2), byte(2 + i)})
		ips = append(ips, addr)
		fmt.Fprintf(&hostCmds, "link add v%d type veth peer name p%d netns %s\nlink set v%d up\n", i, i, peers, i)
		fmt.Fprintf(&peerCmds, "addr add %s/32 dev p%d\n", addr, i)
		if i%2 == 0 {
			fmt.Fprintf(&hostCmds, "route add %s/32 dev v%d\n", addr, i)
		} else {
			fmt.Fprintf(&hostCmds, "link set v%d master br0\n", i)
		}
	}
	for _, batch := range [][2]string{{host, hostCmds.String()}, {peers, peerCmds.String()}} {
		cmd := exec.Command("ip", "-n", batch[0], "-batch", "-")
		cmd.Stdin = strings.NewReader(batch[1])
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("%v: %s", err, out)
		}
	}
	n, err := OpenNetlink(testenv.NetnsPath(host))
	if err != nil {
		b.Fatal(err)
	}
	defer n.Close()
	b.ResetTimer()
	for b.Loop() {
		byIndex, _, _, err := resolve(n, ips)
		if err != nil || len(byIndex) != pods {
			b.Fatalf("resolve: %d interfaces mapped, %v", len(byIndex), err)
		}
	}
}
