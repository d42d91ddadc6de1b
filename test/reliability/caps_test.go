package reliability

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/cgroups"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// Workload-derived labels past their caps, and bounded maps filled by
// configuration: the excess is counted, nothing crashes, and the keys that
// made it in keep counting.

const (
	peerCap = 2
	// peerMapKeys is the kernel peer map's size at peerCap: max(4096,
	// 16*cap) (bpf/tcpretrans). synPeers is more, so that it fills.
	peerMapKeys = 4096
	synPeers    = peerMapKeys + 200
)

// TestTCPRetransPeerCap opens synPeers connections from a test namespace
// to distinct peers on a veth whose other end drops the SYNs: each
// is retransmitted after 1 s and again 2 s later. With
// KTEL_TCPRETRANS_MAX_PEERS=2 the peer label must take exactly 2 values
// plus "other", ktel_label_overflow_total must rise, the kernel's peer map
// must fill (ktel_tcp_retransmits_peer_map_full_total rising), and the
// admitted peers must keep counting.
func TestTCPRetransPeerCap(t *testing.T) {
	testenv.Privileged(t)
	binary(t)
	ns := newNetns(t)
	// SYNs to 10.204.1.1 leave kt0a for a MAC address nobody has, and kt0b
	// drops them: no answer, so each SYN is retransmitted.
	testenv.Sh(t, "ip", "-n", ns, "link", "add", "kt0a", "type", "veth", "peer", "name", "kt0b")
	testenv.Sh(t, "ip", "-n", ns, "addr", "add", "10.204.0.1/16", "dev", "kt0a")
	testenv.Sh(t, "ip", "-n", ns, "neigh", "replace", "10.204.1.1", "lladdr", "02:00:00:00:00:99", "dev", "kt0a", "nud", "permanent")
	testenv.Sh(t, "ip", "-n", ns, "link", "set", "kt0a", "up")
	testenv.Sh(t, "ip", "-n", ns, "link", "set", "kt0b", "up")

	d := startDaemon(t, nil, "KTEL_PROBES=tcpretrans", "KTEL_TCPRETRANS_PEERS=true",
		fmt.Sprintf("KTEL_TCPRETRANS_MAX_PEERS=%d", peerCap))

	// Peers 10.204.1.1:1000, :1001, ...: distinct address:port pairs.
	peer := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 204, 1, 1}), uint16(1000+i))
	}
	fds, err := inNetns(ns, func() ([]int, error) {
		var fds []int
		for i := range synPeers {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return fds, err
			}
			fds = append(fds, fd)
			p := peer(i)
			err = unix.Connect(fd, &unix.SockaddrInet4{Addr: p.Addr().As4(), Port: int(p.Port())})
			if !errors.Is(err, unix.EINPROGRESS) {
				return fds, fmt.Errorf("connect %v: %v, want EINPROGRESS", p, err)
			}
		}
		return fds, nil
	})
	t.Cleanup(func() {
		// A socket closed in SYN_SENT sends nothing.
		for _, fd := range fds {
			unix.Close(fd)
		}
	})
	if err != nil {
		t.Fatalf("open %d connections: %v", synPeers, err)
	}
	start := time.Now()

	type state struct {
		peers             map[string]float64 // ktel_tcp_retransmits_total by peer
		overflow, mapFull float64
	}
	read := func() state {
		m := d.metrics(t)
		s := state{peers: m.series("ktel_tcp_retransmits_total", "peer")}
		s.overflow, _ = m.value("ktel_label_overflow_total", "probe", "tcpretrans", "label", "peer")
		s.mapFull, _ = m.value("ktel_tcp_retransmits_peer_map_full_total")
		return s
	}
	admitted := func(s state) []string {
		var out []string
		for p := range s.peers {
			if p != "other" {
				out = append(out, p)
			}
		}
		slices.Sort(out)
		return out
	}
	mine := func(label string) bool { return strings.HasPrefix(label, "10.204.1.1:") }

	// First retransmits, about 1 s after the connects.
	var first state
	err = eventually(6*time.Second, func() error {
		first = read()
		if first.mapFull == 0 || first.overflow < float64(peerMapKeys/2) {
			return fmt.Errorf("overflow %v, map full %v", first.overflow, first.mapFull)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("first SYN retransmits not seen as overflow and a full peer map: %v\nstderr:\n%s", err, d.Stderr)
	}
	t.Logf("after %v: peers %v, ktel_label_overflow_total %v, ktel_tcp_retransmits_peer_map_full_total %v",
		time.Since(start).Round(time.Millisecond), first.peers, first.overflow, first.mapFull)
	if got := admitted(first); len(got) != peerCap {
		t.Errorf("peer label values %v besides other, want exactly %d", got, peerCap)
	}
	if _, ok := first.peers["other"]; !ok {
		t.Errorf("no peer=\"other\" series: %v", first.peers)
	}
	var ours []string
	for _, p := range admitted(first) {
		if mine(p) {
			ours = append(ours, p)
		}
	}
	if len(ours) == 0 {
		// Only if other retransmits on the host were read first.
		t.Logf("none of the admitted peers %v is the test's: cannot check that they keep counting", admitted(first))
	}

	// Second retransmits, 2 s after the first.
	var second state
	err = eventually(8*time.Second, func() error {
		second = read()
		var errs []error
		if second.overflow < first.overflow+float64(peerMapKeys/2) {
			errs = append(errs, fmt.Errorf("overflow %v, was %v", second.overflow, first.overflow))
		}
		if second.mapFull <= first.mapFull {
			errs = append(errs, fmt.Errorf("map full %v, was %v", second.mapFull, first.mapFull))
		}
		for _, p := range ours {
			if second.peers[p] <= first.peers[p] {
				errs = append(errs, fmt.Errorf("peer %s: %v, was %v", p, second.peers[p], first.peers[p]))
			}
		}
		return errors.Join(errs...)
	})
	t.Logf("after %v: peers %v, ktel_label_overflow_total %v, ktel_tcp_retransmits_peer_map_full_total %v",
		time.Since(start).Round(time.Millisecond), second.peers, second.overflow, second.mapFull)
	if err != nil {
		t.Errorf("second SYN retransmits: %v", err)
	}
	if got := admitted(second); !slices.Equal(got, admitted(first)) {
		t.Errorf("admitted peers changed from %v to %v; admission must be sticky", admitted(first), got)
	}
	if up, _ := d.metrics(t).value("ktel_probe_up", "probe", "tcpretrans"); up != 1 {
		t.Errorf("ktel_probe_up{probe=\"tcpretrans\"} = %v", up)
	}
	d.stopClean(t)
}

// TestNetdevInterfaceSlots fills netdev's interface slots: with
// KTEL_NETDEV_MAX_INTERFACES=1 and a veth pair in a test namespace (two
// matching interfaces), one is attached and the other counted in
// ktel_net_interfaces_overflow_total; a second veth pair raises the count;
// the attached interface keeps counting packets. The TC hook is tcx where
// the kernel has it, clsact where not.
func TestNetdevInterfaceSlots(t *testing.T) {
	testenv.Privileged(t)
	binary(t)
	ns := newNetns(t)
	testenv.Sh(t, "ip", "-n", ns, "link", "add", "kr0a", "type", "veth", "peer", "name", "kr0b")
	testenv.Sh(t, "ip", "-n", ns, "addr", "add", "10.205.0.1/24", "dev", "kr0a")
	// Datagrams to 10.205.0.3 leave kr0a (egress) and arrive on kr0b
	// (ingress), where they are dropped: nobody has that address.
	testenv.Sh(t, "ip", "-n", ns, "neigh", "replace", "10.205.0.3", "lladdr", "02:00:00:00:00:03", "dev", "kr0a", "nud", "permanent")
	testenv.Sh(t, "ip", "-n", ns, "link", "set", "kr0a", "up")
	testenv.Sh(t, "ip", "-n", ns, "link", "set", "kr0b", "up")

	d := startDaemon(t, nil, "KTEL_PROBES=netdev", "KTEL_INTERFACES=kr*", "KTEL_NETDEV_NETNS="+netnsPath(ns),
		"KTEL_NETDEV_MAX_INTERFACES=1", "KTEL_NETDEV_TC_MODE="+tcMode(t))

	const datagrams = 100
	send := func() {
		t.Helper()
		_, err := inNetns(ns, func() (struct{}, error) {
			fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return struct{}{}, err
			}
			defer unix.Close(fd)
			to := &unix.SockaddrInet4{Addr: [4]byte{10, 205, 0, 3}, Port: 9}
			for range datagrams {
				if err := unix.Sendto(fd, []byte("ktel reliability"), 0, to); err != nil {
					return struct{}{}, err
				}
			}
			return struct{}{}, nil
		})
		if err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	udp := func() (map[string]float64, float64) {
		m := d.metrics(t)
		overflow, _ := m.value("ktel_net_interfaces_overflow_total")
		return m.series("ktel_net_packets_total", "interface", "protocol", "ipv4_udp"), overflow
	}

	send()
	var before map[string]float64
	var overflow float64
	err := eventually(5*time.Second, func() error {
		before, overflow = udp()
		if len(before) != 1 || overflow != 1 {
			return fmt.Errorf("ipv4_udp packets by interface %v, overflow %v", before, overflow)
		}
		for _, n := range before {
			if n < datagrams {
				return fmt.Errorf("ipv4_udp packets by interface %v, want %d", before, datagrams)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("want one interface counting and one overflowed: %v\nstderr:\n%s", err, d.Stderr)
	}
	attached := slices.Collect(maps.Keys(before))[0]
	t.Logf("attached %s: %v; ktel_net_interfaces_overflow_total %v", attached, before, overflow)

	testenv.Sh(t, "ip", "-n", ns, "link", "add", "kr1a", "type", "veth", "peer", "name", "kr1b")
	send()
	err = eventually(5*time.Second, func() error {
		after, overflow := udp()
		if overflow != 3 {
			return fmt.Errorf("overflow %v, want 3 after two more matching interfaces", overflow)
		}
		if len(after) != 1 || after[attached] < before[attached]+datagrams {
			return fmt.Errorf("ipv4_udp packets by interface %v, was %v: want only %s, up by %d", after, before, attached, datagrams)
		}
		return nil
	})
	if err != nil {
		t.Errorf("%v\nstderr:\n%s", err, d.Stderr)
	}
	if !strings.Contains(d.Stderr.String(), "every interface slot is in use") {
		t.Errorf("no warning about full interface slots in the log:\n%s", d.Stderr)
	}
	d.stopClean(t)
}

// TestLBServicesCap gives lb a services file with more services than
// KTEL_LB_MAX_SERVICES: at start, and as a reload. It runs in a child
// cgroup the test creates (never the root cgroup); nothing sends traffic
// to the services.
func TestLBServicesCap(t *testing.T) {
	testenv.Privileged(t)
	bin := binary(t)
	root, err := cgroups.V2Root()
	if err != nil {
		t.Fatalf("cgroup v2 root: %v", err)
	}
	cg := filepath.Join(root, fmt.Sprintf("ktel-rel-%d", os.Getpid()))
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatalf("create cgroup: %v", err)
	}
	// Registered before any daemon starts, so that it runs after their
	// cleanups have stopped them.
	t.Cleanup(func() {
		if err := os.Remove(cg); err != nil {
			t.Errorf("remove cgroup: %v", err)
		}
	})
	dir := t.TempDir()
	file := filepath.Join(dir, "services.yaml")
	writeFile(t, file, servicesYAML(2))
	env := []string{"KTEL_PROBES=lb", "KTEL_LB_CGROUP=" + cg, "KTEL_LB_SERVICES_FILE=" + file, "KTEL_LB_MAX_SERVICES=1"}

	t.Run("start", func(t *testing.T) {
		testenv.Privileged(t)
		code, stdout, stderr := runBinary(t, bin, []string{"check"}, env)
		t.Logf("ktel check: exit %d, stdout: %s", code, strings.TrimSpace(stdout))
		switch code {
		case exitUsage:
			if !strings.Contains(stderr, "KTEL_LB_SERVICES_FILE") {
				t.Errorf("exit 2 without naming KTEL_LB_SERVICES_FILE:\n%s", stderr)
			}
			return
		case 1:
			if !strings.Contains(stdout, "lb: failed: ") || !strings.Contains(stdout, "2 services") {
				t.Errorf("verdict does not say lb failed for 2 services:\n%s", stdout)
			}
		default:
			t.Fatalf("ktel check: exit %d, want 1 (lb failed) or 2 (invalid configuration)\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
		}
		// The daemon keeps serving without lb.
		d := startDaemon(t, nil, env...)
		if up, ok := d.metrics(t).value("ktel_probe_up", "probe", "lb"); !ok || up != 0 {
			t.Errorf("ktel_probe_up{probe=\"lb\"} = %v (present %v), want 0", up, ok)
		}
		if o := held(t, d.pid()); len(o.links) > 0 {
			t.Errorf("ktel holds links although lb did not load: %v", o)
		}
		t.Logf("log: %s", strings.TrimSpace(d.Stderr.String()))
		d.stopClean(t)
	})

	t.Run("reload", func(t *testing.T) {
		testenv.Privileged(t)
		writeFile(t, file, servicesYAML(1))
		d := startDaemon(t, nil, env...)
		m := d.metrics(t)
		if up, _ := m.value("ktel_probe_up", "probe", "lb"); up != 1 {
			t.Fatalf("ktel_probe_up{probe=\"lb\"} = %v with one service\nstderr:\n%s", up, d.Stderr)
		}
		ok0, _ := m.value("ktel_lb_config_reloads_total", "result", "success")

		// Replace the file atomically with one of two services.
		tmp := filepath.Join(dir, ".services.yaml.tmp")
		writeFile(t, tmp, servicesYAML(2))
		if err := os.Rename(tmp, file); err != nil {
			t.Fatal(err)
		}
		err := eventually(5*time.Second, func() error {
			m := d.metrics(t)
			bad, _ := m.value("ktel_lb_config_reloads_total", "result", "error")
			ok, _ := m.value("ktel_lb_config_reloads_total", "result", "success")
			svcs, _ := m.value("ktel_lb_services")
			if bad < 1 || ok != ok0 || svcs != 1 {
				return fmt.Errorf("reloads error %v, success %v (was %v), services %v: want a rejected reload and 1 service kept", bad, ok, ok0, svcs)
			}
			return nil
		})
		if err != nil {
			t.Errorf("%v\nstderr:\n%s", err, d.Stderr)
		}
		t.Logf("log: %s", strings.TrimSpace(d.Stderr.String()))
		d.stopClean(t)
	})
}
