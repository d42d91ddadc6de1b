package metrics

import (
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ktel-dev/ktel/bpf/tcpretrans"
)

// fakeTCPRetrans returns its snapshots in turn, the last one for good.
type fakeTCPRetrans struct {
	mu    sync.Mutex
	snaps []*tcpretrans.Snapshot
	next  int
}

func (f *fakeTCPRetrans) Snapshot() (*tcpretrans.Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.snaps[min(f.next, len(f.snaps)-1)]
	f.next++
	return s, nil
}

var (
	synSent     = tcpretrans.Key{Family: tcpretrans.IPv4, State: tcpretrans.StateSynSent, Kind: tcpretrans.KindSyn}
	established = tcpretrans.Key{Family: tcpretrans.IPv6, State: tcpretrans.StateEstablished, Kind: tcpretrans.KindData}
	synRecv     = tcpretrans.Key{Family: tcpretrans.IPv4, State: tcpretrans.StateSynRecv, Kind: tcpretrans.KindSynAck}
)

func peer(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestTCPRetransCollector(t *testing.T) {
	f := &fakeTCPRetrans{snaps: []*tcpretrans.Snapshot{{
		Retransmits: map[tcpretrans.Key]uint64{synSent: 2, established: 7, synRecv: 1,
			{Family: tcpretrans.IPv4, State: 4, Kind: tcpretrans.KindData}: 3},
	}}}
	c := &collectorAdapter{NewTCPRetransCollector(f, false, 0)}
	want := `
# HELP ktel_tcp_retransmits_total TCP segments retransmitted, by address family, TCP state at retransmit and kind (syn, synack, data).
# TYPE ktel_tcp_retransmits_total counter
ktel_tcp_retransmits_total{family="ipv4",kind="data",state="FIN_WAIT1"} 3
ktel_tcp_retransmits_total{family="ipv4",kind="syn",state="SYN_SENT"} 2
ktel_tcp_retransmits_total{family="ipv4",kind="synack",state="SYN_RECV"} 1
ktel_tcp_retransmits_total{family="ipv6",kind="data",state="ESTABLISHED"} 7
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), tcpRetransMetrics...); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

func TestTCPRetransCollectorPeers(t *testing.T) {
	f := &fakeTCPRetrans{snaps: []*tcpretrans.Snapshot{{
		Peers: map[tcpretrans.PeerKey]uint64{
			{Key: synSent, Peer: peer("10.0.0.1:443")}:     5, // busiest: admitted
			{Key: established, Peer: peer("[fd00::2]:80")}: 4, // admitted
			{Key: synSent, Peer: peer("10.0.0.3:443")}:     2, // beyond the cap of 2
			{Key: established, Peer: peer("[fd00::9]:80")}: 1, // beyond the cap
			{Key: synSent}: 6, // kernel map full
			{Key: synRecv, Peer: peer("10.0.0.1:443")}:      1, // admitted peer, other key
			{Key: established, Peer: netip.AddrPort{}}:      0, // seen, but nothing counted
			{Key: synRecv, Peer: peer("192.168.1.1:55555")}: 1, // beyond the cap
		},
		PeerMapFull: 6,
	}}}
	c := &collectorAdapter{NewTCPRetransCollector(f, true, 2)}
	want := `
# HELP ktel_label_overflow_total Observations exported under the label value "other" because the label had reached its cap on distinct values.
# TYPE ktel_label_overflow_total counter
ktel_label_overflow_total{label="peer",probe="tcpretrans"} 4
# HELP ktel_tcp_retransmits_peer_map_full_total TCP segments retransmitted that are exported with peer="other" because the kernel's peer map was full.
# TYPE ktel_tcp_retransmits_peer_map_full_total counter
ktel_tcp_retransmits_peer_map_full_total 6
# HELP ktel_tcp_retransmits_total TCP segments retransmitted, by address family, TCP state at retransmit and kind (syn, synack, data).
# TYPE ktel_tcp_retransmits_total counter
ktel_tcp_retransmits_total{family="ipv4",kind="syn",peer="10.0.0.1:443",state="SYN_SENT"} 5
ktel_tcp_retransmits_total{family="ipv4",kind="syn",peer="other",state="SYN_SENT"} 8
ktel_tcp_retransmits_total{family="ipv4",kind="synack",peer="10.0.0.1:443",state="SYN_RECV"} 1
ktel_tcp_retransmits_total{family="ipv4",kind="synack",peer="other",state="SYN_RECV"} 1
ktel_tcp_retransmits_total{family="ipv6",kind="data",peer="[fd00::2]:80",state="ESTABLISHED"} 4
ktel_tcp_retransmits_total{family="ipv6",kind="data",peer="other",state="ESTABLISHED"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), tcpRetransMetrics...); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

// With peers on and nothing seen yet, the overflow counters are there at 0.
func TestTCPRetransCollectorPeersEmpty(t *testing.T) {
	f := &fakeTCPRetrans{snaps: []*tcpretrans.Snapshot{{Peers: map[tcpretrans.PeerKey]uint64{}}}}
	c := &collectorAdapter{NewTCPRetransCollector(f, true, 0)}
	want := `
# HELP ktel_label_overflow_total Observations exported under the label value "other" because the label had reached its cap on distinct values.
# TYPE ktel_label_overflow_total counter
ktel_label_overflow_total{label="peer",probe="tcpretrans"} 0
# HELP ktel_tcp_retransmits_peer_map_full_total TCP segments retransmitted that are exported with peer="other" because the kernel's peer map was full.
# TYPE ktel_tcp_retransmits_peer_map_full_total counter
ktel_tcp_retransmits_peer_map_full_total 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), tcpRetransMetrics...); err != nil {
		t.Error(err)
	}
}

// series reads one Update into "labels" -> value; the overflow counter is
// under "overflow".
func series(t *testing.T, c Collector) map[string]float64 {
	t.Helper()
	fams := updateSeries(t, c)
	out := maps.Clone(fams["ktel_tcp_retransmits_total"])
	if out == nil {
		out = map[string]float64{}
	}
	for _, v := range fams["ktel_label_overflow_total"] {
		out["overflow"] = v
	}
	return out
}

func peerValues(s map[string]float64) map[string]bool {
	vals := map[string]bool{}
	for k := range s {
		for _, l := range strings.Split(k, ",") {
			if v, ok := strings.CutPrefix(l, "peer="); ok {
				vals[v] = true
			}
		}
	}
	return vals
}

// Admission is sticky and first come first served, and every series and
// the overflow counter only grow from one read to the next.
func TestPeerCapSticky(t *testing.T) {
	a, b, c, d := peer("10.0.0.1:1"), peer("10.0.0.2:2"), peer("[fd00::3]:3"), peer("10.0.0.4:4")
	snap := func(counts map[netip.AddrPort]uint64) *tcpretrans.Snapshot {
		s := &tcpretrans.Snapshot{Peers: map[tcpretrans.PeerKey]uint64{}}
		for p, n := range counts {
			s.Peers[tcpretrans.PeerKey{Key: synSent, Peer: p}] = n
		}
		return s
	}
	reads := []struct {
		snap     *tcpretrans.Snapshot
		peers    []string // label values expected
		overflow float64
	}{
		{snap(map[netip.AddrPort]uint64{a: 1}), []string{"10.0.0.1:1"}, 0},
		// b is busier than c: b gets the last place.
		{snap(map[netip.AddrPort]uint64{a: 1, b: 5, c: 2}), []string{"10.0.0.1:1", "10.0.0.2:2", "other"}, 2},
		// c, now the busiest, stays in other; so does d.
		{snap(map[netip.AddrPort]uint64{a: 2, b: 5, c: 50, d: 1}), []string{"10.0.0.1:1", "10.0.0.2:2", "other"}, 51},
		// a is not seen this time (it cannot vanish from the kernel, but
		// the cap must hold anyway); its place is not given away.
		{snap(map[netip.AddrPort]uint64{b: 6, c: 50, d: 3}), []string{"10.0.0.2:2", "other"}, 53},
	}
	f := &fakeTCPRetrans{}
	for _, r := range reads {
		f.snaps = append(f.snaps, r.snap)
	}
	coll := newTCPRetransCollector(f, true, 2, 0)
	var prev map[string]float64
	for i, r := range reads {
		s := series(t, coll)
		got := peerValues(s)
		if len(got) != len(r.peers) {
			t.Errorf("read %d: peer values %v, want %v", i, got, r.peers)
		}
		for _, p := range r.peers {
			if !got[p] {
				t.Errorf("read %d: no peer %q in %v", i, p, got)
			}
		}
		if s["overflow"] != r.overflow {
			t.Errorf("read %d: overflow %v, want %v", i, s["overflow"], r.overflow)
		}
		for k, v := range prev {
			if k == "family=ipv4,kind=syn,peer=10.0.0.1:1,state=SYN_SENT" && i == 3 {
				continue // a was left out of the fake's last read
			}
			if s[k] < v {
				t.Errorf("read %d: %s fell from %v to %v", i, k, v, s[k])
			}
		}
		prev = s
	}
}

// Concurrent scrapes share the sticky set safely (run with -race) and never
// name more than the cap.
func TestPeerCapConcurrent(t *testing.T) {
	counts := map[tcpretrans.PeerKey]uint64{}
	for i := range 50 {
		counts[tcpretrans.PeerKey{Key: synSent, Peer: peer(fmt.Sprintf("10.0.0.%d:80", i+1))}] = uint64(i + 1)
	}
	f := &fakeTCPRetrans{snaps: []*tcpretrans.Snapshot{{Peers: counts}}}
	coll := newTCPRetransCollector(f, true, 10, 0)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 20 {
				s := series(t, coll)
				if n := len(peerValues(s)); n != 11 {
					t.Errorf("%d peer values, want 11", n)
				}
				// The 10 busiest (41..50) are named; 1..40 sum to 820.
				if s["overflow"] != 820 {
					t.Errorf("overflow %v, want 820", s["overflow"])
				}
			}
		})
	}
	wg.Wait()
}

// tcpRetransMetrics are the collector's own metrics (it also reports the
// kernel's span drops, tested with the other probes').
var tcpRetransMetrics = []string{"ktel_tcp_retransmits_total", "ktel_label_overflow_total", "ktel_tcp_retransmits_peer_map_full_total"}
