package metrics

import (
	"cmp"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/bpf/tcpretrans"
)

// TCPRetransSource is what the TCP retransmit collector reads: the loaded
// probe, or a fake in tests.
type TCPRetransSource interface {
	Snapshot() (*tcpretrans.Snapshot, error)
}

// otherPeer is the peer label value of peers beyond the cap, and of
// retransmits the kernel could not attribute to a peer.
const otherPeer = "other"

type tcpRetransCollector struct {
	snap        *Cached[*tcpretrans.Snapshot]
	peers       bool
	retransmits *prometheus.Desc
	overflow    *prometheus.Desc
	mapFull     *prometheus.Desc

	// mu serialises map reads with folding, so that the sticky peer set
	// sees snapshots in the order they were read.
	mu  sync.Mutex
	cap peerCap

	// With workload attribution (NewTCPRetransWorkloadCollector).
	workloads *workloadSums[tcpretrans.Key]
	forget    TCPRetransCgroups
}

// TCPRetransCgroups is what the collector also needs with workload
// attribution: deleting idle cgroups' counts.
type TCPRetransCgroups interface {
	ForgetCgroup(k tcpretrans.CgroupKey) error
}

// NewTCPRetransWorkloadCollector exports ktel_tcp_retransmits_total by
// family, state, kind and the socket's pod (labels namespace, pod, and
// unit for sockets outside pods) from a probe loaded with per-cgroup
// counts; res names the cgroups, and a cgroup whose counts have not
// changed for ttl is deleted from the kernel. Retransmits the kernel
// could not key by cgroup (its map full) are exported as unit="other" and
// counted in ktel_label_overflow_total{probe="tcpretrans",label="cgroup"}.
func NewTCPRetransWorkloadCollector(src TCPRetransSource, forget TCPRetransCgroups, res Workloads, ttl time.Duration) Collector {
	c := newTCPRetransCollector(src, false, 0, DefaultMaxAge)
	c.workloads = newWorkloadSums[tcpretrans.Key](res, ttl)
	c.workloads.fold = toPod
	c.forget = forget
	c.retransmits = prometheus.NewDesc("ktel_tcp_retransmits_total",
		"TCP segments retransmitted, by address family, TCP state at retransmit and kind (syn, synack, data).",
		append([]string{"family", "state", "kind"}, podLabels...), nil)
	c.overflow = prometheus.NewDesc("ktel_label_overflow_total",
		"Observations exported under the label value \"other\" because the label had reached its cap on distinct values.",
		nil, prometheus.Labels{"probe": "tcpretrans", "label": "cgroup"})
	return c
}

func (c *tcpRetransCollector) updateWorkloads(ch chan<- prometheus.Metric) error {
	// As with peers: snapshots reach the sums in the order they were read.
	c.mu.Lock()
	defer c.mu.Unlock()
	s, err := c.snap.Get()
	if err != nil {
		return err
	}
	cur := make(map[cgroupKey[tcpretrans.Key]][]uint64, len(s.Cgroups))
	for k, n := range s.Cgroups {
		cur[cgroupKey[tcpretrans.Key]{id: k.Cgroup, key: k.Key}] = []uint64{n}
	}
	series, err := c.workloads.updateAndForget(cur, func(ck cgroupKey[tcpretrans.Key]) error {
		return c.forget.ForgetCgroup(tcpretrans.CgroupKey{Key: ck.key, Cgroup: ck.id})
	}, c.snap.Invalidate)
	if s.CgroupMapFull > 0 {
		// The kernel's map was full: those are the rest of Retransmits.
		full := map[tcpretrans.Key]uint64{}
		for k, n := range s.Retransmits {
			full[k] += n
		}
		for k, n := range s.Cgroups {
			full[k.Key] -= n
		}
		for k, n := range full {
			if n == 0 {
				continue
			}
			addOverflow(series, k, []uint64{n})
		}
	}
	for wk, v := range series {
		ch <- prometheus.MustNewConstMetric(c.retransmits, prometheus.CounterValue, float64(v[0]),
			append([]string{wk.key.Family.String(), tcpretrans.StateName(wk.key.State), wk.key.Kind.String()}, podValues(wk.labels)...)...)
	}
	ch <- prometheus.MustNewConstMetric(c.overflow, prometheus.CounterValue, float64(s.CgroupMapFull))
	sendKernelSpanDrops(ch, "tcpretrans", s.SpanDrops)
	return err
}

// NewTCPRetransCollector exports the TCP retransmit probe's counts as
// ktel_tcp_retransmits_total{family,state,kind}. With peers, the counts are
// by peer too: the first maxPeers distinct peers (0:
// tcpretrans.DefaultMaxPeers) each get their own value of the peer label,
// for good; retransmits to later peers are exported as peer="other" and
// counted in ktel_label_overflow_total{probe="tcpretrans",label="peer"}.
func NewTCPRetransCollector(src TCPRetransSource, peers bool, maxPeers int) Collector {
	return newTCPRetransCollector(src, peers, maxPeers, DefaultMaxAge)
}

func newTCPRetransCollector(src TCPRetransSource, peers bool, maxPeers int, maxAge time.Duration) *tcpRetransCollector {
	if maxPeers <= 0 {
		maxPeers = tcpretrans.DefaultMaxPeers
	}
	labels := []string{"family", "state", "kind"}
	if peers {
		labels = append(labels, "peer")
	}
	return &tcpRetransCollector{
		snap:  NewCached(src.Snapshot, maxAge),
		peers: peers,
		cap:   peerCap{max: maxPeers, admitted: make(map[netip.AddrPort]string)},
		retransmits: prometheus.NewDesc("ktel_tcp_retransmits_total",
			"TCP segments retransmitted, by address family, TCP state at retransmit and kind (syn, synack, data).",
			labels, nil),
		overflow: prometheus.NewDesc("ktel_label_overflow_total",
			"Observations exported under the label value \"other\" because the label had reached its cap on distinct values.",
			nil, prometheus.Labels{"probe": "tcpretrans", "label": "peer"}),
		mapFull: prometheus.NewDesc("ktel_tcp_retransmits_peer_map_full_total",
			"TCP segments retransmitted that are exported with peer=\"other\" because the kernel's peer map was full.",
			nil, nil),
	}
}

func (c *tcpRetransCollector) Update(ch chan<- prometheus.Metric) error {
	if c.workloads != nil {
		return c.updateWorkloads(ch)
	}
	if !c.peers {
		s, err := c.snap.Get()
		if err != nil {
			return err
		}
		for k, n := range s.Retransmits {
			ch <- prometheus.MustNewConstMetric(c.retransmits, prometheus.CounterValue, float64(n),
				k.Family.String(), tcpretrans.StateName(k.State), k.Kind.String())
		}
		sendKernelSpanDrops(ch, "tcpretrans", s.SpanDrops)
		return nil
	}

	c.mu.Lock()
	s, err := c.snap.Get()
	if err != nil {
		c.mu.Unlock()
		return err
	}
	series, overflow := c.cap.fold(s.Peers)
	c.mu.Unlock()

	for k, n := range series {
		ch <- prometheus.MustNewConstMetric(c.retransmits, prometheus.CounterValue, float64(n),
			k.Family.String(), tcpretrans.StateName(k.State), k.Kind.String(), k.peer)
	}
	ch <- prometheus.MustNewConstMetric(c.overflow, prometheus.CounterValue, float64(overflow))
	ch <- prometheus.MustNewConstMetric(c.mapFull, prometheus.CounterValue, float64(s.PeerMapFull))
	sendKernelSpanDrops(ch, "tcpretrans", s.SpanDrops)
	return nil
}

// peerSeries is one exported series: a key and a peer label value.
type peerSeries struct {
	tcpretrans.Key
	peer string
}

// peerCap names at most max distinct peers. Admission is sticky, first
// come first served: a peer admitted keeps its own series for good, and
// one that came when the cap was reached stays in "other" for good, so
// that with counts that only grow every exported series only grows too.
// Peers that appear in the same read are admitted busiest first.
type peerCap struct {
	max      int
	admitted map[netip.AddrPort]string // peer -> label value
}

// fold admits new peers while there is room and sums counts by exported
// series. overflow is what went to "other" because of the cap; counts
// under the zero peer (the kernel's map was full) go to "other" too but
// are not overflow.
func (c *peerCap) fold(counts map[tcpretrans.PeerKey]uint64) (series map[peerSeries]uint64, overflow uint64) {
	if len(c.admitted) < c.max {
		c.admit(counts)
	}
	series = make(map[peerSeries]uint64)
	for k, n := range counts {
		label, ok := c.admitted[k.Peer]
		if !ok {
			label = otherPeer
			if k.Peer.IsValid() {
				overflow += n
			}
		}
		series[peerSeries{k.Key, label}] += n
	}
	return series, overflow
}

func (c *peerCap) admit(counts map[tcpretrans.PeerKey]uint64) {
	totals := make(map[netip.AddrPort]uint64)
	for k, n := range counts {
		if _, ok := c.admitted[k.Peer]; !ok && k.Peer.IsValid() {
			totals[k.Peer] += n
		}
	}
	candidates := make([]netip.AddrPort, 0, len(totals))
	for p := range totals {
		candidates = append(candidates, p)
	}
	slices.SortFunc(candidates, func(a, b netip.AddrPort) int {
		return cmp.Or(cmp.Compare(totals[b], totals[a]), a.Compare(b))
	})
	for _, p := range candidates[:min(len(candidates), c.max-len(c.admitted))] {
		c.admitted[p] = p.String()
	}
}
