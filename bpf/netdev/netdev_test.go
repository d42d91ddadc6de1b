package netdev

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/internal/testenv"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// testLog shows the probe's log in the test output (-v), for diagnosis.
func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// The Go struct bpf2go generated must match the kernel-side layout, and
// its dimensions the Go enumerations.
func TestStructSizes(t *testing.T) {
	spec, err := loadNetdev()
	if err != nil {
		t.Fatal(err)
	}
	var v netdevNetdevValue
	if got, want := uint32(unsafe.Sizeof(v)), spec.Maps[netdevMapNetdevCounters].ValueSize; got != want {
		t.Errorf("struct netdev_value: Go %d bytes, map value %d", got, want)
	}
	if len(v.C) != int(NumDirections) || len(v.C[0]) != NumProtocols || len(v.Sizes[0]) != NumSizes {
		t.Errorf("struct netdev_value: c[%d][%d], sizes[%d][%d]; Go has %d directions, %d protocols, %d sizes",
			len(v.C), len(v.C[0]), len(v.Sizes), len(v.Sizes[0]), NumDirections, NumProtocols, NumSizes)
	}
	if got := unsafe.Sizeof(v.C[0][0]); got != 16 {
		t.Errorf("struct netdev_counter: %d bytes, want 16", got)
	}
}

func TestParseInterfaces(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
		err  bool
	}{
		{"", nil, false},
		{"eth0", []string{"eth0"}, false},
		{" eth0, veth* ,lxc*,eth0,", []string{"eth0", "veth*", "lxc*"}, false},
		{"eth[0-3]", []string{"eth[0-3]"}, false},
		{"eth[", nil, true},
		{"averyveryverylongname", nil, true},
	} {
		got, err := ParseInterfaces(tc.in)
		if (err != nil) != tc.err || !slices.Equal(got, tc.want) {
			t.Errorf("ParseInterfaces(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestMatch(t *testing.T) {
	patterns := []string{"eth0", "veth*", "lxc*", "en?1", "wg[0-2]"}
	for name, want := range map[string]bool{
		"eth0": true, "eth1": false, "eth00": false,
		"veth": true, "veth12ab": true, "xveth": false,
		"lxc_health": true, "lxc1234": true,
		"ens1": true, "ens11": false,
		"wg1": true, "wg3": false, "lo": false, "": false,
	} {
		if got := Match(patterns, name); got != want {
			t.Errorf("Match(%q) = %v, want %v", name, got, want)
		}
	}
	if Match(nil, "eth0") {
		t.Error("no pattern matched eth0")
	}
}

func TestNames(t *testing.T) {
	want := []string{"ipv4_tcp", "ipv4_udp", "ipv4_icmp", "ipv4_other", "ipv6_tcp", "ipv6_udp",
		"ipv6_icmp", "ipv6_other", "arp", "other"}
	for i, n := range want {
		if got := Protocol(i).String(); got != n {
			t.Errorf("Protocol(%d) = %q, want %q", i, got, n)
		}
		if p, ok := ProtocolByName(n); !ok || int(p) != i {
			t.Errorf("ProtocolByName(%q) = %d, %v", n, p, ok)
		}
	}
	if _, ok := ProtocolByName("icmp"); ok {
		t.Error("ProtocolByName(icmp) found")
	}
	if Ingress.String() != "ingress" || Egress.String() != "egress" {
		t.Errorf("directions %s, %s", Ingress, Egress)
	}
	if SizeBound(0) != 64 || SizeBound(NumSizes-2) != 65536 {
		t.Errorf("size bounds %d .. %d", SizeBound(0), SizeBound(NumSizes-2))
	}
}

func TestLoadRefuses(t *testing.T) {
	for _, o := range []Options{
		{},
		{Interfaces: []string{"eth["}},
		{Interfaces: []string{"eth0"}, Hook: "kprobe"},
		{Interfaces: []string{"eth0"}, TC: "ingress"},
		{Interfaces: []string{"eth0"}, MaxInterfaces: -1},
	} {
		if p, err := Load(o, discard()); err == nil {
			p.Close()
			t.Errorf("Load(%+v) succeeded", o)
		}
	}
	if _, err := Load(Options{}, discard()); !errors.Is(err, ErrNoInterfaces) {
		t.Errorf("Load without interfaces: %v", err)
	}
}

// --- privileged ---

// sum adds up one direction and class over CPUs, from PerCPU directly.
func sum(i *Interface, d Direction, p Protocol) Counter {
	var c Counter
	for _, cpu := range i.PerCPU {
		c.Packets += cpu[d][p].Packets
		c.Bytes += cpu[d][p].Bytes
	}
	return c
}

func find(t *testing.T, s *Snapshot, name string) *Interface {
	t.Helper()
	for i := range s.Interfaces {
		if s.Interfaces[i].Name == name {
			return &s.Interfaces[i]
		}
	}
	t.Fatalf("interface %s not in snapshot (%d interfaces)", name, len(s.Interfaces))
	return nil
}

func snapshot(t *testing.T, p *Probe) *Snapshot {
	t.Helper()
	s, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// expect checks that, on i in direction d, class want counted exactly n
// frames of frame bytes, that only the classes in noise also counted
// anything, and that CPU cpu (if >= 0) counted all n.
func expect(t *testing.T, i *Interface, d Direction, want Protocol, n int, frame uint64, cpu int, noise ...Protocol) {
	t.Helper()
	got := sum(i, d, want)
	if got.Packets != uint64(n) || got.Bytes != uint64(n)*frame {
		t.Errorf("%s %s %s: %d packets, %d bytes; want %d, %d", i.Name, d, want, got.Packets, got.Bytes, n, uint64(n)*frame)
	}
	if tot := i.Total()[d][want]; tot != got {
		t.Errorf("%s %s %s: Total %+v, per-CPU sum %+v", i.Name, d, want, tot, got)
	}
	if cpu >= 0 && i.PerCPU[cpu][d][want].Packets != uint64(n) {
		t.Errorf("%s %s %s: CPU %d counted %d of %d", i.Name, d, want, cpu, i.PerCPU[cpu][d][want].Packets, n)
	}
	for p := range Protocol(NumProtocols) {
		if c := sum(i, d, p); p != want && !slices.Contains(noise, p) && c.Packets != 0 {
			t.Errorf("%s %s %s: %d unexpected packets", i.Name, d, p, c.Packets)
		}
	}
}

// tcxPrograms lists the programs attached with tcx to dev in ns.
func tcxPrograms(t *testing.T, ns, dev string, at ebpf.AttachType) []ebpf.ProgramID {
	t.Helper()
	idx := ifindex(t, ns, dev)
	var ids []ebpf.ProgramID
	inNetns(t, ns, func() error {
		r, err := link.QueryPrograms(link.QueryOptions{Target: idx, Attach: at})
		if err != nil {
			return err
		}
		for _, p := range r.Programs {
			ids = append(ids, p.ID)
		}
		return nil
	})
	return ids
}

// programIDs are the IDs of p's programs.
func programIDs(t *testing.T, p *Probe) []ebpf.ProgramID {
	var ids []ebpf.ProgramID
	for _, prog := range p.Programs() {
		info, err := prog.Info()
		if err != nil {
			t.Fatal(err)
		}
		id, _ := info.ID()
		ids = append(ids, id)
	}
	return ids
}

// linksTo counts the BPF links in the system that hold one of ids.
func linksTo(t *testing.T, ids []ebpf.ProgramID) int {
	t.Helper()
	var it link.Iterator
	defer it.Close()
	n := 0
	for it.Next() {
		if info, err := it.Link.Info(); err == nil && slices.Contains(ids, info.Program) {
			n++
		}
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}

func tcShow(t *testing.T, ns, dev string, what ...string) string {
	return testenv.Sh(t, append([]string{"tc", "-n", ns, what[0], "show", "dev", dev}, what[1:]...)...)
}

type mode struct {
	name string
	opts Options
}

// modes are the ways of attaching under test. Forced tcx on a kernel
// without it (before 6.6) must fail Load (see load); xdp counts egress at
// the TC hook TCAuto picks.
var modes = []mode{
	{"tcx", Options{TC: TCX}},
	{"clsact", Options{TC: TCClsact}},
	{"xdp", Options{Hook: HookXDP}},
}

func TestCounts(t *testing.T) {
	testenv.Privileged(t)
	const (
		n, nSize = 1000, 300 // a -> b
		m, mSize = 700, 1000 // b -> a
	)
	for i, md := range modes {
		t.Run(md.name, func(t *testing.T) {
			pid := os.Getpid() % 100000
			nsA, nsB := newNetns(t, "ca"+itoa(i), false), newNetns(t, "cb"+itoa(i), false)
			a, b := fmt.Sprintf("kca%d", pid), fmt.Sprintf("kcb%d", pid)
			ea, eb := vethPair(t, nsA, a, nsB, b, 10+i, true, false)

			probes := map[string]*Probe{}
			for _, e := range []end{ea, eb} {
				o := md.opts
				o.Interfaces, o.NetNS, o.PacketSizes = []string{"kc?" + itoa(pid)}, nsPath(e.ns), true
				p := load(t, o, e.ns, e.dev)
				if p == nil {
					return
				}
				defer p.Close()
				probes[e.dev] = p
			}
			sendUDP(t, ea, eb, n, nSize, 1)
			sendUDP(t, eb, ea, m, mSize, 0)

			sa, sb := snapshot(t, probes[a]), snapshot(t, probes[b])
			if len(sa.Interfaces) != 1 || len(sb.Interfaces) != 1 {
				t.Fatalf("attached %d and %d interfaces, want 1 each", len(sa.Interfaces), len(sb.Interfaces))
			}
			ia, ib := find(t, sa, a), find(t, sb, b)
			wantIn := map[string]string{"tcx": "tcx", "clsact": "clsact", "xdp": "xdp"}[md.name]
			wantOut := map[string]string{"tcx": "tcx", "clsact": "clsact", "xdp": autoHook(t)}[md.name]
			for _, i := range []*Interface{ia, ib} {
				if i.IngressHook != wantIn || i.EgressHook != wantOut {
					t.Errorf("%s: hooks %s/%s, want %s/%s", i.Name, i.IngressHook, i.EgressHook, wantIn, wantOut)
				}
			}
			udp4, _ := ProtocolByName("ipv4_udp")
			expect(t, ia, Egress, udp4, n, frameLen(false, nSize), 1)
			expect(t, ib, Ingress, udp4, n, frameLen(false, nSize), -1)
			expect(t, ib, Egress, udp4, m, frameLen(false, mSize), 0)
			expect(t, ia, Ingress, udp4, m, frameLen(false, mSize), -1)

			// Frame sizes: 342 bytes in (256, 512], 1042 in (1024, 2048].
			sizes := func(i *Interface, d Direction, k int) (s uint64) {
				for _, c := range i.SizesPerCPU {
					s += c[d][k]
				}
				return s
			}
			if got := sizes(ia, Egress, 3); got != n {
				t.Errorf("%s egress: %d frames in (256, 512], want %d", a, got, n)
			}
			if got := sizes(ia, Ingress, 5); got != m {
				t.Errorf("%s ingress: %d frames in (1024, 2048], want %d", a, got, m)
			}
			if sa.Overflow != 0 || sa.Missed != 0 {
				t.Errorf("overflow %d, missed %d", sa.Overflow, sa.Missed)
			}

			ids := programIDs(t, probes[a])
			for _, p := range probes {
				if err := p.Close(); err != nil {
					t.Errorf("close: %v", err)
				}
			}
			if n := linksTo(t, ids); n != 0 {
				t.Errorf("%d links left after Close", n)
			}
			for _, e := range []end{ea, eb} {
				if out := tcShow(t, e.ns, e.dev, "qdisc"); strings.Contains(out, "clsact") {
					t.Errorf("%s: qdisc left after Close:\n%s", e.dev, out)
				}
				if !haveTCX(t) {
					continue // nothing to query
				}
				if ids := tcxPrograms(t, e.ns, e.dev, ebpf.AttachTCXIngress); len(ids) != 0 {
					t.Errorf("%s: tcx programs left: %v", e.dev, ids)
				}
			}
		})
	}
}

func TestIPv6(t *testing.T) {
	testenv.Privileged(t)
	const n, size = 200, 100
	pid := os.Getpid() % 100000
	nsA, nsB := newNetns(t, "6a", true), newNetns(t, "6b", true)
	a, b := fmt.Sprintf("k6a%d", pid), fmt.Sprintf("k6b%d", pid)
	ea, eb := vethPair(t, nsA, a, nsB, b, 20, false, true)
	p, err := Load(Options{Interfaces: []string{a}, NetNS: nsPath(nsA)}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	sendUDP(t, ea, eb, n, size, 1)
	i := find(t, snapshot(t, p), a)
	udp6, _ := ProtocolByName("ipv6_udp")
	icmp6, _ := ProtocolByName("ipv6_icmp")
	// Neighbour discovery and MLD are ICMPv6. Datagrams that waited for
	// neighbour discovery leave from the softirq that received the answer,
	// on any CPU: no CPU is expected here (TestCounts checks the sender's).
	expect(t, i, Egress, udp6, n, frameLen(true, size), -1, icmp6)
	if c := sum(i, Egress, icmp6); c.Packets == 0 {
		t.Error("no ICMPv6 (neighbour solicitation) counted")
	}
}

func TestHotplug(t *testing.T) {
	testenv.Privileged(t)
	const n, size = 100, 64
	pid := os.Getpid() % 100000
	nsA, nsB := newNetns(t, "ha", false), newNetns(t, "hb", false)
	p, err := Load(Options{Interfaces: []string{fmt.Sprintf("kh%d*", pid)}, NetNS: nsPath(nsA)}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got := p.Interfaces(); len(got) != 0 {
		t.Fatalf("attached to %q before any interface existed", got)
	}
	ids := programIDs(t, p)
	// Changes tells of each attachment and removal (podnet relabels then).
	drain := func() {
		select {
		case <-p.Changes():
		default:
		}
	}
	changed := func(what string) {
		t.Helper()
		select {
		case <-p.Changes():
		case <-time.After(5 * time.Second): // signalled just after the change
			t.Errorf("%s: no change signalled", what)
		}
	}
	drain()

	a, b := fmt.Sprintf("kh%dx", pid), fmt.Sprintf("kp%dx", pid)
	start := time.Now()
	ea, eb := vethPair(t, nsA, a, nsB, b, 30, false, false) // ARP this time
	// Milliseconds, usually (logged below); a loaded CI machine gets
	// seconds before this fails.
	if !waitFor(5*time.Second, func() bool { return slices.Contains(p.Interfaces(), a) }) {
		t.Fatalf("%s not attached within 5 s of its creation", a)
	}
	t.Logf("attached %v after creation began", time.Since(start))
	changed("attached")
	sendUDP(t, ea, eb, n, size, 1)
	i := find(t, snapshot(t, p), a)
	udp4, _ := ProtocolByName("ipv4_udp")
	arp, _ := ProtocolByName("arp")
	expect(t, i, Egress, udp4, n, frameLen(false, size), 1, arp)
	// The first datagram needed ARP: a request out, a reply in, each at
	// least 42 bytes.
	if out, in := sum(i, Egress, arp), sum(i, Ingress, arp); out.Packets == 0 || in.Packets == 0 || in.Bytes < 42*in.Packets {
		t.Errorf("ARP: %+v out, %+v in", out, in)
	}
	if i.IngressHook != autoHook(t) || i.EgressHook != autoHook(t) {
		t.Errorf("hooks %s/%s, want %s in both directions", i.IngressHook, i.EgressHook, autoHook(t))
	}
	wantLinks := 0 // clsact filters are no links
	if haveTCX(t) {
		wantLinks = 2 // tcx ingress and egress
	}
	if n := linksTo(t, ids); n != wantLinks {
		t.Errorf("%d links, want %d", n, wantLinks)
	}

	drain()
	testenv.Sh(t, "ip", "-n", nsA, "link", "del", a)
	if !waitFor(5*time.Second, func() bool { return len(p.Interfaces()) == 0 }) {
		t.Fatalf("%s still attached 5 s after its removal", a)
	}
	changed("removed")
	if s := snapshot(t, p); len(s.Interfaces) != 0 {
		t.Errorf("%d interfaces in snapshot after removal", len(s.Interfaces))
	}
	if n, _ := countKeys(p.ifaces); n != 0 {
		t.Errorf("%d slots in use after removal", n)
	}
	var slot uint32
	if err := p.slotMap.Lookup(uint32(i.Index), &slot); err != nil || slot != 0 {
		t.Errorf("netdev_slots[%d] = %d, %v after removal; want 0", i.Index, slot, err)
	}
	if n := linksTo(t, ids); n != 0 {
		t.Errorf("%d links left after removal", n)
	}
}

func TestOverflow(t *testing.T) {
	testenv.Privileged(t)
	pid := os.Getpid() % 100000
	nsA, nsB := newNetns(t, "oa", false), newNetns(t, "ob", false)
	a1, a2 := fmt.Sprintf("ko%da", pid), fmt.Sprintf("ko%db", pid)
	vethPair(t, nsA, a1, nsB, "kp"+a1[2:], 40, true, false)
	p, err := Load(Options{Interfaces: []string{fmt.Sprintf("ko%d*", pid)}, NetNS: nsPath(nsA), MaxInterfaces: 1}, discard())
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	vethPair(t, nsA, a2, nsB, "kp"+a2[2:], 41, true, false)
	if !waitFor(5*time.Second, func() bool { return snapshot(t, p).Overflow == 1 }) {
		t.Fatalf("overflow %d, want 1", snapshot(t, p).Overflow)
	}
	if got := p.Interfaces(); !slices.Equal(got, []string{a1}) {
		t.Fatalf("attached %q, want only %s", got, a1)
	}
	// A freed slot goes to the waiting interface.
	testenv.Sh(t, "ip", "-n", nsA, "link", "del", a1)
	if !waitFor(5*time.Second, func() bool { return slices.Equal(p.Interfaces(), []string{a2}) }) {
		t.Fatalf("attached %q, want %s once %s left", p.Interfaces(), a2, a1)
	}
	if s := snapshot(t, p); s.Overflow != 1 {
		t.Errorf("overflow %d, want 1", s.Overflow)
	}
}

// TestMissed: packets on an interface without a slot count in slot 0, as
// missed, and in no interface.
func TestMissed(t *testing.T) {
	testenv.Privileged(t)
	p := loadBare(t, true)
	if err := p.clearSlot(1); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{netdevProgNetdevTcIngress, netdevProgNetdevTcEgress, netdevProgNetdevXdpIngress} {
		if _, _, err := p.progs[name].Benchmark(udpFrame(), 1, nil); err != nil {
			t.Fatal(err)
		}
	}
	s := snapshot(t, p)
	if s.Missed != 3 || len(s.Interfaces) != 0 {
		t.Errorf("missed %d, %d interfaces; want 3, 0", s.Missed, len(s.Interfaces))
	}
	// With a slot again, lo counts in it.
	if err := p.setSlot(1, 2); err != nil {
		t.Fatal(err)
	}
	p.names = map[int]ifaceInfo{1: {name: "lo", slot: 2}}
	if _, _, err := p.progs[netdevProgNetdevTcEgress].Benchmark(udpFrame(), 5, nil); err != nil {
		t.Fatal(err)
	}
	s = snapshot(t, p)
	udp4, _ := ProtocolByName("ipv4_udp")
	if s.Missed != 3 || len(s.Interfaces) != 1 {
		t.Fatalf("missed %d, %d interfaces; want 3, 1", s.Missed, len(s.Interfaces))
	}
	expect(t, &s.Interfaces[0], Egress, udp4, 5, uint64(len(udpFrame())), -1)
}

// TestSizeSlots: the kernel puts frames in the slots SizeBound describes,
// at every bound a test run can reach (frames of up to a page).
func TestSizeSlots(t *testing.T) {
	testenv.Privileged(t)
	p := loadBare(t, true)
	p.names = map[int]ifaceInfo{1: {name: "lo", slot: 1}}
	lens := []int{60, 63}
	for k := 0; SizeBound(k) < 3500; k++ {
		lens = append(lens, int(SizeBound(k)), int(SizeBound(k))+1)
	}
	var want [NumSizes]uint64
	for _, n := range lens {
		frame := make([]byte, n)
		copy(frame, udpFrame()[:14])
		for _, prog := range []string{netdevProgNetdevTcEgress, netdevProgNetdevXdpIngress} {
			if _, _, err := p.progs[prog].Benchmark(frame, 1, nil); err != nil {
				t.Fatalf("%d bytes: %v", n, err)
			}
		}
		k := 0
		for k < NumSizes-1 && uint64(n) > SizeBound(k) {
			k++
		}
		want[k]++
	}
	s := snapshot(t, p)
	for _, d := range []Direction{Ingress, Egress} {
		var got [NumSizes]uint64
		for _, c := range s.Interfaces[0].SizesPerCPU {
			for k, v := range c[d] {
				got[k] += v
			}
		}
		if got != want {
			t.Errorf("%s: size slots %v, want %v (frames of %v bytes)", d, got, want, lens)
		}
	}
}

// TestHighIfindex: an interface whose ifindex is beyond netdev_slots is
// counted all the same (through netdev_ifaces).
func TestHighIfindex(t *testing.T) {
	testenv.Privileged(t)
	const n, size = 100, 100
	pid := os.Getpid() % 100000
	nsA, nsB := newNetns(t, "ia", false), newNetns(t, "ib", false)
	a, b := fmt.Sprintf("kia%d", pid), fmt.Sprintf("kib%d", pid)
	for i, md := range modes {
		t.Run(md.name, func(t *testing.T) {
			if i > 0 {
				testenv.Sh(t, "ip", "-n", nsA, "link", "del", a)
			}
			ea, eb := vethPairIndex(t, nsA, a, nsB, b, 70+i, true, false, directIfindex+1000+i)
			o := md.opts
			o.Interfaces, o.NetNS = []string{a}, nsPath(nsA)
			p := load(t, o, nsA, a)
			if p == nil {
				return
			}
			defer p.Close()
			sendUDP(t, ea, eb, n, size, 1)
			sendUDP(t, eb, ea, n, size, 0)
			s := snapshot(t, p)
			i := find(t, s, a)
			if i.Index < directIfindex {
				t.Fatalf("%s has ifindex %d", a, i.Index)
			}
			udp4, _ := ProtocolByName("ipv4_udp")
			expect(t, i, Egress, udp4, n, frameLen(false, size), 1)
			expect(t, i, Ingress, udp4, n, frameLen(false, size), -1)
			if s.Missed != 0 {
				t.Errorf("missed %d", s.Missed)
			}
		})
	}
}

// counterProg is another tool's program: it counts packets in its own map
// and passes them on.
func counterProg(t *testing.T) (*ebpf.Program, *ebpf.Map) {
	t.Helper()
	m := testenv.NewMap(t, &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.LoadMapPtr(asm.R1, m.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, -1).WithSymbol("out"), // TC_ACT_UNSPEC
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { prog.Close() })
	return prog, m
}

func counted(t *testing.T, m *ebpf.Map) uint64 {
	var v uint64
	if err := m.Lookup(uint32(0), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// TestCoexistence: another tool's program on the same hook keeps running
// and stays attached while the probe starts and stops.
func TestCoexistence(t *testing.T) {
	testenv.Privileged(t)
	const n, size = 100, 200
	pid := os.Getpid() % 100000
	for i, md := range tcModes(t) {
		t.Run(md.name, func(t *testing.T) {
			nsA, nsB := newNetns(t, "xa"+itoa(i), false), newNetns(t, "xb"+itoa(i), false)
			a, b := fmt.Sprintf("kxa%d", pid), fmt.Sprintf("kxb%d", pid)
			ea, eb := vethPair(t, nsA, a, nsB, b, 50+i, true, false)
			idx := ifindex(t, nsA, a)
			other, otherMap := counterProg(t)
			otherInfo, _ := other.Info()
			otherID, _ := otherInfo.ID()

			// The other tool attaches first.
			var h *netlink.Handle
			inNetns(t, nsA, func() error {
				if md.name == "tcx" {
					l, err := link.AttachTCX(link.TCXOptions{Interface: idx, Program: other, Attach: ebpf.AttachTCXEgress})
					if err == nil {
						t.Cleanup(func() { l.Close() })
					}
					return err
				}
				var err error
				if h, err = netlink.NewHandle(unix.NETLINK_ROUTE); err != nil {
					return err
				}
				if err := h.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
					LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}); err != nil {
					return err
				}
				return h.FilterAdd(&netlink.BpfFilter{
					FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: netlink.HANDLE_MIN_EGRESS, Handle: 1,
						Priority: 1, Protocol: 0x0003}, // ETH_P_ALL
					Fd: other.FD(), Name: "other", DirectAction: true})
			})
			if h != nil {
				defer h.Close()
			}
			otherAttached := func() bool {
				if md.name == "tcx" {
					return slices.Contains(tcxPrograms(t, nsA, a, ebpf.AttachTCXEgress), otherID)
				}
				fs, err := h.FilterList(byIndex(idx), netlink.HANDLE_MIN_EGRESS)
				if err != nil {
					t.Fatal(err)
				}
				return slices.ContainsFunc(fs, func(f netlink.Filter) bool {
					bf, ok := f.(*netlink.BpfFilter)
					return ok && bf.Name == "other" && bf.Priority == 1
				})
			}

			o := md.opts
			o.Interfaces, o.NetNS = []string{a}, nsPath(nsA)
			p, err := Load(o, testLog(t))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			if md.name == "tcx" {
				if got := tcxPrograms(t, nsA, a, ebpf.AttachTCXEgress); len(got) != 2 {
					t.Errorf("tcx egress programs %v, want the probe's and the other's", got)
				}
			} else if out := tcShow(t, nsA, a, "filter", "egress"); !strings.Contains(out, "other") || !strings.Contains(out, filterName) {
				t.Errorf("egress filters:\n%s", out)
			}
			sendUDP(t, ea, eb, n, size, 1)
			if got := counted(t, otherMap); got != n {
				t.Errorf("other program counted %d, want %d", got, n)
			}
			udp4, _ := ProtocolByName("ipv4_udp")
			expect(t, find(t, snapshot(t, p), a), Egress, udp4, n, frameLen(false, size), 1)

			if err := p.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			if !otherAttached() {
				t.Fatal("the other program was detached")
			}
			if md.name == "clsact" {
				out := tcShow(t, nsA, a, "filter", "egress") + tcShow(t, nsA, a, "filter", "ingress")
				if strings.Contains(out, filterName) {
					t.Errorf("probe's filters left:\n%s", out)
				}
				if !strings.Contains(tcShow(t, nsA, a, "qdisc"), "clsact") {
					t.Error("the other tool's clsact qdisc was deleted")
				}
			} else if got := tcxPrograms(t, nsA, a, ebpf.AttachTCXEgress); !slices.Equal(got, []ebpf.ProgramID{otherID}) {
				t.Errorf("tcx egress programs %v after Close, want only %v", got, otherID)
			}
			sendUDP(t, ea, eb, n, size, 1)
			if got := counted(t, otherMap); got != 2*n {
				t.Errorf("other program counted %d after the probe left, want %d", got, 2*n)
			}
		})
	}
}

// TestNothingAttached: a probe whose every matching interface fails to
// attach fails to load, naming the reason; one that attached some runs.
// Here the failure is another filter at the probe's tc priority.
func TestNothingAttached(t *testing.T) {
	testenv.Privileged(t)
	pid := os.Getpid() % 100000
	nsA, nsB := newNetns(t, "na", false), newNetns(t, "nb", false)
	a1, a2 := fmt.Sprintf("kna%d", pid), fmt.Sprintf("knb%d", pid)
	vethPair(t, nsA, a1, nsB, fmt.Sprintf("kpa%d", pid), 80, true, false)
	other, _ := counterProg(t)
	idx := ifindex(t, nsA, a1)
	inNetns(t, nsA, func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer h.Close()
		if err := h.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}); err != nil {
			return err
		}
		return h.FilterAdd(&netlink.BpfFilter{
			FilterAttrs: netlink.FilterAttrs{LinkIndex: idx, Parent: netlink.HANDLE_MIN_INGRESS, Handle: 1,
				Priority: clsactPriority, Protocol: 0x0003}, // ETH_P_ALL
			Fd: other.FD(), Name: "other", DirectAction: true})
	})
	o := Options{Interfaces: []string{fmt.Sprintf("kn?%d", pid)}, NetNS: nsPath(nsA), TC: TCClsact}
	p, err := Load(o, testLog(t))
	if err == nil {
		p.Close()
		t.Fatalf("Load attached %q, want none", p.Interfaces())
	}
	if !errors.Is(err, ErrNothingAttached) || errors.Is(err, ebpf.ErrNotSupported) || !strings.Contains(err.Error(), a1) {
		t.Fatalf("Load: %v; want ErrNothingAttached naming %s, not ErrNotSupported", err, a1)
	}
	if out := tcShow(t, nsA, a1, "filter", "egress"); strings.Contains(out, filterName) {
		t.Errorf("the probe's egress filter left after a failed Load:\n%s", out)
	}

	vethPair(t, nsA, a2, nsB, fmt.Sprintf("kpb%d", pid), 81, true, false)
	p, err = Load(o, testLog(t))
	if err != nil {
		t.Fatalf("Load with one of two interfaces attachable: %v", err)
	}
	defer p.Close()
	if got := p.Interfaces(); !slices.Equal(got, []string{a2}) {
		t.Errorf("attached %q, want only %s", got, a2)
	}
}

// TestStaleFilter: a filter left by a killed process in clsact mode is
// replaced at start and removed at Close; the qdisc it created stays, empty.
func TestStaleFilter(t *testing.T) {
	testenv.Privileged(t)
	pid := os.Getpid() % 100000
	nsA, nsB := newNetns(t, "sa", false), newNetns(t, "sb", false)
	a := fmt.Sprintf("ksa%d", pid)
	vethPair(t, nsA, a, nsB, fmt.Sprintf("ksb%d", pid), 60, true, false)
	// A "killed" run: its filters stay when its maps and programs are
	// released by Go but the netlink objects are not removed.
	stale, _ := counterProg(t)
	idx := ifindex(t, nsA, a)
	inNetns(t, nsA, func() error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return err
		}
		defer h.Close()
		if err := h.QdiscAdd(&netlink.Clsact{QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: idx, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}}); err != nil {
			return err
		}
		return h.FilterAdd(ourFilter(idx, netlink.HANDLE_MIN_INGRESS, stale.FD()))
	})
	staleInfo, err := stale.Info()
	if err != nil {
		t.Fatal(err)
	}
	staleID, ok := staleInfo.ID()
	if !ok {
		t.Fatal("the stale program has no id")
	}
	if out := tcShow(t, nsA, a, "filter", "ingress"); !strings.Contains(out, fmt.Sprintf("id %d ", staleID)) {
		t.Fatalf("the stale filter is not shown as id %d:\n%s", staleID, out)
	}
	for _, tc := range []TCMode{TCX, TCClsact} {
		// Even a start that attaches nothing (tcx forced before 6.6)
		// removes it.
		p := load(t, Options{Interfaces: []string{a}, NetNS: nsPath(nsA), TC: tc}, nsA, a)
		out := tcShow(t, nsA, a, "filter", "ingress")
		if strings.Contains(out, fmt.Sprintf("id %d ", staleID)) {
			t.Errorf("%s: stale filter still there:\n%s", tc, out)
		}
		if p != nil {
			if err := p.Close(); err != nil {
				t.Errorf("%s: close: %v", tc, err)
			}
		}
		if out := tcShow(t, nsA, a, "filter", "ingress"); strings.Contains(out, filterName) {
			t.Errorf("%s: filter left after Close:\n%s", tc, out)
		}
		// Re-create the stale filter for the next mode.
		inNetns(t, nsA, func() error {
			h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
			if err != nil {
				return err
			}
			defer h.Close()
			return h.FilterAdd(ourFilter(idx, netlink.HANDLE_MIN_INGRESS, stale.FD()))
		})
	}
}

func waitFor(d time.Duration, ok func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if ok() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func itoa(i int) string { return fmt.Sprint(i) }

// countKeys counts the entries of a hash map.
func countKeys(m *ebpf.Map) (int, error) {
	var (
		k   uint32
		n   int
		cur any
	)
	for n < int(m.MaxEntries()) {
		if err := m.NextKey(cur, &k); err != nil {
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return n, nil
			}
			return n, err
		}
		n++
		kk := k
		cur = &kk
	}
	return n, nil
}
