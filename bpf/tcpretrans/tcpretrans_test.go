package tcpretrans_test

import (
	"errors"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
	"github.com/ktel-dev/ktel/metrics"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func TestStateName(t *testing.T) {
	for s, want := range map[uint8]string{
		0: "0", 1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
		6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
		12: "NEW_SYN_RECV", 13: "BOUND_INACTIVE", 14: "14", 255: "255",
	} {
		if got := tcpretrans.StateName(s); got != want {
			t.Errorf("StateName(%d) = %q, want %q", s, got, want)
		}
	}
	if tcpretrans.StateName(tcpretrans.StateSynSent) != "SYN_SENT" ||
		tcpretrans.StateName(tcpretrans.StateSynRecv) != "SYN_RECV" ||
		tcpretrans.StateName(tcpretrans.StateEstablished) != "ESTABLISHED" {
		t.Error("state constants do not match their names")
	}
}

// Retransmit RTOs start at 1 s for SYNs and SYN-ACKs: waiting this long
// sees exactly one retransmit each.
const synWait = 1500 * time.Millisecond

var (
	synSent = tcpretrans.Key{Family: tcpretrans.IPv4, State: tcpretrans.StateSynSent, Kind: tcpretrans.KindSyn}
	synRecv = tcpretrans.Key{Family: tcpretrans.IPv4, State: tcpretrans.StateSynRecv, Kind: tcpretrans.KindSynAck}
	estab   = tcpretrans.Key{Family: tcpretrans.IPv4, State: tcpretrans.StateEstablished, Kind: tcpretrans.KindData}
)

// probes are two probes of one variant, loaded side by side: one counting
// by peer, which lets a test filter out whatever else the host
// retransmits, and one without.
type probes struct {
	peers, plain *tcpretrans.Probe
}

// reading is one read of both probes and of a namespace's TCP counters.
type reading struct {
	peers, plain *tcpretrans.Snapshot
	mib          map[string]uint64
	// misses are the peer probe's runs the kernel skipped because another
	// tracing program was running on the CPU (classic tracepoints share
	// one per-CPU guard); ktel exports them as
	// ktel_bpf_program_recursion_misses_total.
	misses uint64
}

// read reads both probes and the counters of namespace ns. The plain
// probe is read first before and last after, so that its delta covers at
// least the peer probe's.
func (p probes) read(t *testing.T, ns string, after bool) reading {
	t.Helper()
	snap := func(p *tcpretrans.Probe) *tcpretrans.Snapshot {
		s, err := p.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	var r reading
	if after {
		// A retransmit counts in the namespace's counters before its
		// tracepoint runs the probe: one that comes during the read can
		// be in the counters and not yet in the probe's maps. The read is
		// taken again until the counters did not move across it.
		for range 10 {
			r.mib = mib(t, ns)
			r.peers = snap(p.peers)
			r.misses = testenv.RecursionMisses(t, p.peers.Programs())
			r.plain = snap(p.plain)
			if maps.Equal(r.mib, mib(t, ns)) {
				break
			}
		}
	} else {
		r.plain = snap(p.plain)
		r.misses = testenv.RecursionMisses(t, p.peers.Programs())
		r.peers = snap(p.peers)
		r.mib = mib(t, ns)
	}
	checkTotals(t, r.peers)
	if r.plain.Peers != nil {
		t.Error("probe without peers returned peers")
	}
	return r
}

// checkTotals: with peers, Retransmits are the sums of Peers.
func checkTotals(t *testing.T, s *tcpretrans.Snapshot) {
	t.Helper()
	sums := map[tcpretrans.Key]uint64{}
	var zero uint64
	for k, n := range s.Peers {
		sums[k.Key] += n
		if !k.Peer.IsValid() {
			zero += n
		}
	}
	if len(sums) != len(s.Retransmits) {
		t.Errorf("%d keys in Peers, %d in Retransmits", len(sums), len(s.Retransmits))
	}
	for k, n := range s.Retransmits {
		if sums[k] != n {
			t.Errorf("%+v: %d retransmits, peers sum to %d", k, n, sums[k])
		}
	}
	if zero != s.PeerMapFull {
		t.Errorf("zero peer holds %d, PeerMapFull %d", zero, s.PeerMapFull)
	}
}

// toward sums the peer probe's deltas by key, counting only peers at addrs.
func toward(before, after reading, addrs []netip.Addr) map[tcpretrans.Key]uint64 {
	d := map[tcpretrans.Key]uint64{}
	for k, n := range after.peers.Peers {
		if slices.Contains(addrs, k.Peer.Addr()) {
			d[k.Key] += n - before.peers.Peers[k]
		}
	}
	return d
}

func total(d map[tcpretrans.Key]uint64) (n uint64) {
	for _, v := range d {
		n += v
	}
	return n
}

// check asserts that the retransmits toward addrs rose by at least min in
// key, that they equal the namespace's TcpRetransSegs minus TCPRetransFail
// delta (the kernel counts failed transmissions in both), and that the
// probe without peers saw at least as many.
func check(t *testing.T, before, after reading, addrs []netip.Addr, key tcpretrans.Key, min uint64) {
	t.Helper()
	d := toward(before, after, addrs)
	segs := after.mib["Tcp.RetransSegs"] - before.mib["Tcp.RetransSegs"]
	fail := after.mib["TcpExt.TCPRetransFail"] - before.mib["TcpExt.TCPRetransFail"]
	t.Logf("probe toward %v: %v; namespace: TcpRetransSegs +%d, TCPRetransFail +%d", addrs, d, segs, fail)
	// Runs the kernel skipped (recursion misses) are the one accounted
	// reason for the probe to see fewer; they are rare and show in
	// ktel_bpf_program_recursion_misses_total.
	misses := after.misses - before.misses
	got := total(d)
	if misses > 0 {
		t.Logf("the kernel skipped %d runs of the probe (recursion misses)", misses)
	}
	if d[key] < min && d[key]+misses < min {
		t.Errorf("%+v rose by %d, want >= %d", key, d[key], min)
	}
	if got > segs-fail || got+misses < segs-fail {
		t.Errorf("probe counted %d segments (+%d skipped runs), the namespace's TcpRetransSegs-TCPRetransFail rose by %d", got, misses, segs-fail)
	}
	for k, n := range d {
		if p := after.plain.Retransmits[k] - before.plain.Retransmits[k]; p < n {
			t.Errorf("%+v: probe without peers rose by %d, with peers by %d", k, p, n)
		}
	}
}

func load(t *testing.T, opts tcpretrans.Options, v probe.Variant) *tcpretrans.Probe {
	t.Helper()
	p, err := tcpretrans.LoadVariant(opts, v)
	if err != nil {
		t.Fatalf("load %s: %+v", v, err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	return p
}

// dial connects from the client namespace; SYNs that get no answer make
// it fail after timeout.
func dial(p *pair, to netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	return inNetns(p.client, func() (net.Conn, error) {
		d := net.Dialer{Timeout: timeout}
		return d.Dial("tcp", to.String())
	})
}

func TestRetransmits(t *testing.T) {
	testenv.Privileged(t)
	testenv.Tracefs(t)
	for _, v := range tcpretrans.Variants {
		t.Run(v.String(), func(t *testing.T) {
			ps := probes{
				peers: load(t, tcpretrans.Options{Peers: true}, v),
				plain: load(t, tcpretrans.Options{}, v),
			}
			// Each scenario has its own namespaces and addresses, so they
			// can run side by side.
			t.Run("syn", func(t *testing.T) { t.Parallel(); testSyn(t, ps) })
			t.Run("synack", func(t *testing.T) { t.Parallel(); testSynAck(t, ps) })
			t.Run("data", func(t *testing.T) { t.Parallel(); testData(t, ps) })
			t.Run("failed", func(t *testing.T) { t.Parallel(); testFailed(t, ps) })
		})
	}
}

// SYNs the server drops are retransmitted by the client in SYN_SENT, over
// IPv4 and IPv6.
func testSyn(t *testing.T, ps probes) {
	p := newPair(t, 0)
	firewall(t, p.server, "INPUT", "-p", "tcp", "--syn", "-j", "DROP")
	before := ps.read(t, p.client, false)
	var wg sync.WaitGroup
	for _, a := range []netip.Addr{p.serverAddrs[0], p.serverAddr6} {
		wg.Go(func() {
			c, err := dial(p, netip.AddrPortFrom(a, 7), synWait)
			if err == nil {
				c.Close()
				t.Errorf("connected to %s through a firewall", a)
			} else if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
				t.Errorf("dial %s: %v, want a timeout", a, err)
			}
		})
	}
	wg.Wait()
	after := ps.read(t, p.client, true)
	check(t, before, after, p.serverAddrsAll(), synSent, 1)
	syn6 := tcpretrans.Key{Family: tcpretrans.IPv6, State: tcpretrans.StateSynSent, Kind: tcpretrans.KindSyn}
	if d := toward(before, after, []netip.Addr{p.serverAddr6}); d[syn6] < 1 {
		t.Errorf("IPv6 SYN retransmits: %v", d)
	}
}

// The server retransmits its SYN-ACK when the client's ACK does not
// arrive.
func testSynAck(t *testing.T, ps probes) {
	p := newPair(t, 0)
	srv := listen(t, p.server, p.serverAddrs[0])
	firewall(t, p.server, "INPUT", "-p", "tcp", "--dport", itoa(srv.port), "!", "--syn", "-j", "DROP")
	before := ps.read(t, p.server, false)
	c, err := dial(p, netip.AddrPortFrom(p.serverAddrs[0], srv.port), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { abort(c) })
	// The peer of a SYN-ACK is the client's address and port. Wait until
	// the probe counted the first retransmit (RTO 1 s), then check.
	local := netip.MustParseAddrPort(c.LocalAddr().String())
	peer := tcpretrans.PeerKey{Key: synRecv, Peer: local}
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		s, err := ps.peers.Snapshot()
		if err != nil {
			t.Fatal(err)
		}
		if s.Peers[peer] > before.peers.Peers[peer] {
			break
		}
	}
	after := ps.read(t, p.server, true)
	check(t, before, after, p.clientAddrsAll(), synRecv, 1)
	if n := after.peers.Peers[tcpretrans.PeerKey{Key: synRecv, Peer: local}]; n < 1 {
		t.Errorf("no SYN-ACK retransmit toward %s: %v", local, toward(before, after, p.clientAddrsAll()))
	}
}

// Data the server does not receive for a while is retransmitted in
// ESTABLISHED, first one segment per timeout, then, once the path is back,
// in GSO packets of several segments each: on Linux 6.18 typically 13
// segments in 7 tracepoint hits, which is why the probe counts segments.
func testData(t *testing.T, ps probes) {
	p := newPair(t, 0)
	srv := listen(t, p.server, p.serverAddrs[0])
	c, err := dial(p, netip.AddrPortFrom(p.serverAddrs[0], srv.port), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { abort(c) })
	before := ps.read(t, p.client, false)

	// With RTOs of 0.2, 0.4, 0.8 s the third retransmit, 1.4 s in, goes
	// through.
	unblock := firewall(t, p.server, "INPUT", "-p", "tcp", "--dport", itoa(srv.port), "-j", "DROP")
	buf := make([]byte, 64<<10)
	var sent int64
	stop := time.Now().Add(time.Second)
	c.SetWriteDeadline(stop)
	for time.Now().Before(stop) {
		n, err := c.Write(buf)
		sent += int64(n)
		if err != nil {
			break // the send buffer is full until the deadline
		}
	}
	unblock()
	c.SetWriteDeadline(time.Time{})
	deadline := time.Now().Add(10 * time.Second)
	for {
		n, err := outq(c)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 && srv.read.Load() == sent {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes still queued, %d of %d read", n, srv.read.Load(), sent)
		}
		time.Sleep(20 * time.Millisecond)
	}
	after := ps.read(t, p.client, true)
	t.Logf("%d bytes sent", sent)
	check(t, before, after, p.serverAddrsAll(), estab, 1)
}

// Retransmits the client's own firewall refuses (EPERM) fail: newer kernels
// report them at the tracepoint with an error and count them in
// TcpRetransSegs and TCPRetransFail; the probe does not count them.
func testFailed(t *testing.T, ps probes) {
	p := newPair(t, 0)
	firewall(t, p.client, "OUTPUT", "-p", "tcp", "--syn", "-j", "DROP")
	before := ps.read(t, p.client, false)
	if c, err := dial(p, netip.AddrPortFrom(p.serverAddrs[0], 7), synWait); err == nil {
		c.Close()
		t.Fatal("connected through a firewall")
	}
	after := ps.read(t, p.client, true)
	check(t, before, after, p.serverAddrsAll(), synSent, 0)
	if d := toward(before, after, p.serverAddrsAll()); total(d) != 0 {
		t.Errorf("counted failed retransmits: %v", d)
	}
	if fail := after.mib["TcpExt.TCPRetransFail"] - before.mib["TcpExt.TCPRetransFail"]; fail < 1 {
		t.Errorf("TCPRetransFail rose by %d: no retransmit failed", fail)
	}
}

// With a cap of 3 peers, SYN retransmits toward 5 are exported as 3 peers
// and "other", and the overflow is counted.
func TestPeerCap(t *testing.T) {
	testenv.Privileged(t)
	t.Parallel()
	const maxPeers = 3
	p, err := tcpretrans.Load(tcpretrans.Options{Peers: true, MaxPeers: maxPeers}, discard())
	if err != nil {
		t.Fatalf("%+v", err)
	}
	defer p.Close()
	if m := p.BoundedMaps()["tcp_rtx_peers"]; m == nil || m.MaxEntries() != tcpretrans.PeerMapEntries(maxPeers) {
		t.Errorf("peer map %v, want %d entries", m, tcpretrans.PeerMapEntries(maxPeers))
	}
	if progs := p.Programs(); len(progs) != 2 {
		t.Errorf("programs %v", progs)
	}
	c := metrics.NewTCPRetransCollector(p, true, maxPeers)

	pr := newPair(t, 4)
	synToEachAddr(t, pr)

	ch := make(chan prometheus.Metric, 1000)
	if err := c.Update(ch); err != nil {
		t.Fatal(err)
	}
	close(ch)
	values := map[string]float64{}
	var overflow float64
	for m := range ch {
		var d dto.Metric
		if err := m.Write(&d); err != nil {
			t.Fatal(err)
		}
		switch desc := m.Desc().String(); {
		case strings.Contains(desc, `"ktel_label_overflow_total"`):
			overflow = d.GetCounter().GetValue()
		case strings.Contains(desc, `"ktel_tcp_retransmits_total"`):
			for _, l := range d.Label {
				if l.GetName() == "peer" {
					values[l.GetValue()] += d.GetCounter().GetValue()
				}
			}
		}
	}
	t.Logf("peer values: %v, overflow %v", values, overflow)
	// Other retransmits on the host may take places too, but never more
	// than the cap: exactly 3 named peers and other.
	if len(values) != maxPeers+1 || values["other"] == 0 {
		t.Errorf("peer values %v, want %d addresses and other", values, maxPeers)
	}
	if overflow == 0 {
		t.Error("ktel_label_overflow_total is 0")
	}
}

// When the kernel's peer map is full, retransmits toward new peers are
// counted without their peer, and counted as such.
func TestPeerMapFull(t *testing.T) {
	testenv.Privileged(t)
	t.Parallel()
	const entries = 2
	p, err := tcpretrans.LoadTinyPeerMap(entries)
	if err != nil {
		t.Fatalf("%+v", err)
	}
	defer p.Close()

	pr := newPair(t, 4)
	synToEachAddr(t, pr)

	s, err := p.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	checkTotals(t, s)
	var named, ours uint64
	for k, n := range s.Peers {
		if k.Peer.IsValid() {
			named++
		}
		if slices.Contains(pr.serverAddrs, k.Peer.Addr()) {
			ours += n
		}
	}
	t.Logf("peers %v, full %d", s.Peers, s.PeerMapFull)
	// Whatever else the host retransmitted may have taken the places
	// first, so ours are in the map or in the overflow, and at least 3 of
	// the 5 are in the overflow.
	if named > entries {
		t.Errorf("%d keys with a peer in a map of %d", named, entries)
	}
	if s.PeerMapFull < uint64(len(pr.serverAddrs)-entries) {
		t.Errorf("PeerMapFull %d, want >= %d", s.PeerMapFull, len(pr.serverAddrs)-entries)
	}
	if ours+s.PeerMapFull < uint64(len(pr.serverAddrs)) {
		t.Errorf("%d retransmits toward the 5 peers and %d without peer, want >= 5 in all", ours, s.PeerMapFull)
	}
}

// Without peers the peer map is not watched; Close leaves nothing behind.
func TestLoadWithoutPeers(t *testing.T) {
	testenv.Privileged(t)
	p, err := tcpretrans.Load(tcpretrans.Options{}, discard())
	if err != nil {
		t.Fatalf("%+v", err)
	}
	if p.Variant().Hook != probe.HookBTF {
		t.Errorf("variant %s, want tp_btf first", p.Variant())
	}
	if m := p.BoundedMaps(); len(m) != 0 {
		t.Errorf("bounded maps without peers: %v", m)
	}
	progs := p.Programs()
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	for name, prog := range progs {
		if _, err := prog.Info(); err == nil {
			t.Errorf("%s still usable after Close", name)
		}
	}
	for _, n := range []int{-1, tcpretrans.PeerLimit + 1} {
		if _, err := tcpretrans.Load(tcpretrans.Options{MaxPeers: n}, discard()); err == nil {
			t.Errorf("MaxPeers %d accepted", n)
		}
	}
}

func itoa(n uint16) string { return strconv.Itoa(int(n)) }

// synToEachAddr sends SYNs that the server's firewall drops to each of
// its addresses at once, so that each peer gets SYN retransmits, and
// waits for the connects to fail.
func synToEachAddr(t *testing.T, pr *pair) {
	t.Helper()
	firewall(t, pr.server, "INPUT", "-p", "tcp", "--syn", "-j", "DROP")
	var wg sync.WaitGroup
	for _, a := range pr.serverAddrs {
		wg.Go(func() {
			if c, err := dial(pr, netip.AddrPortFrom(a, 7), synWait); err == nil {
				c.Close()
				t.Errorf("connected to %s through a firewall", a)
			}
		})
	}
	wg.Wait()
}
