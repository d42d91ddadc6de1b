// Package tcpretrans loads the TCP retransmit probe: programs on the
// tcp_retransmit_skb and tcp_retransmit_synack tracepoints that count
// retransmitted segments per CPU by family, TCP state and kind, and
// optionally by peer, and typed readers for those counts. It knows nothing
// of Prometheus.
package tcpretrans

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"unsafe"

	"github.com/cilium/ebpf"

	"github.com/ktel-dev/ktel/internal/probe"
)

// Family is the address family of a retransmitting socket. A dual-stack
// IPv6 socket talking IPv4 is IPv6, its peer an IPv4-mapped address.
type Family uint8

// The values are those of enum rt_family in C.
const (
	IPv4 Family = iota
	IPv6
)

// numFamilies is RT_FAMILIES in C.
const numFamilies = 2

func (f Family) String() string {
	switch f {
	case IPv4:
		return "ipv4"
	case IPv6:
		return "ipv6"
	}
	return strconv.Itoa(int(f))
}

// Kind is what was retransmitted.
type Kind uint8

// The values are those of enum rt_kind in C.
const (
	KindSyn    Kind = iota // a SYN, from tcp_retransmit_skb in state SYN_SENT
	KindSynAck             // a SYN-ACK, from tcp_retransmit_synack
	KindData               // anything else from tcp_retransmit_skb
)

// numKinds is RT_KINDS in C.
const numKinds = 3

func (k Kind) String() string {
	switch k {
	case KindSyn:
		return "syn"
	case KindSynAck:
		return "synack"
	case KindData:
		return "data"
	}
	return strconv.Itoa(int(k))
}

// numStates is RT_STATES in C: states at or above it are counted as 0.
const numStates = 16

// TCP states as the kernel numbers them (include/net/tcp_states.h).
const (
	StateEstablished uint8 = 1
	StateSynSent     uint8 = 2
	StateSynRecv     uint8 = 3
)

// stateNames are the kernel's TCP state names without the TCP_ prefix.
var stateNames = [...]string{
	1:  "ESTABLISHED",
	2:  "SYN_SENT",
	3:  "SYN_RECV",
	4:  "FIN_WAIT1",
	5:  "FIN_WAIT2",
	6:  "TIME_WAIT",
	7:  "CLOSE",
	8:  "CLOSE_WAIT",
	9:  "LAST_ACK",
	10: "LISTEN",
	11: "CLOSING",
	12: "NEW_SYN_RECV",
	13: "BOUND_INACTIVE",
}

// StateName is the kernel's name of a TCP state without the TCP_ prefix
// (SYN_SENT), or its number for values that are not TCP states.
func StateName(s uint8) string {
	if int(s) < len(stateNames) && stateNames[s] != "" {
		return stateNames[s]
	}
	return strconv.Itoa(int(s))
}

func programs(skb, synack string) []probe.Program {
	return []probe.Program{
		{Name: skb, Group: "tcp", Tracepoint: "tcp_retransmit_skb"},
		{Name: synack, Group: "tcp", Tracepoint: "tcp_retransmit_synack"},
	}
}

// Variants: tp_btf only, which every supported kernel (5.8+ with BTF)
// attaches, with neither tracefs nor a trace record to build.
var Variants = []probe.Variant{
	{Hook: probe.HookBTF, Programs: programs("rtx_skb_btf", "rtx_synack_btf")},
}

const (
	// DefaultMaxPeers is the cap on distinct peers when Options.MaxPeers
	// is 0.
	DefaultMaxPeers = 100
	// PeerLimit is the largest Options.MaxPeers accepted: more distinct
	// label values than this make neither a usable metric nor a small
	// kernel map.
	PeerLimit = 4096
)

// Options configure Load.
type Options struct {
	// Peers counts retransmits by peer (remote address and port) too.
	Peers bool
	// MaxPeers is the number of distinct peers the exporter will name,
	// 0..PeerLimit (0: DefaultMaxPeers). It sizes the kernel's peer map:
	// see PeerMapEntries.
	MaxPeers int
	// Spans configures events for spans; only Always (every retransmit)
	// and Rate apply.
	Spans probe.SpanOptions
	// PerCgroup counts by the socket's cgroup v2 id too
	// (Snapshot.Cgroups); not with Peers.
	PerCgroup bool
}

// PeerMapEntries is the capacity of the kernel's peer map for a cap of
// maxPeers peers: room for each peer in 16 (state, kind) combinations, and
// at least 4096 keys so that peers beyond the cap, which the kernel cannot
// tell apart from the others, do not fill it soon. When it is full, new
// keys are counted without their peer (PeerMapFull). The map is
// preallocated: about 100 bytes plus 8 per possible CPU for each entry,
// 0.7 MiB for 4096 entries on 8 CPUs, 11 MiB for the 65536 of PeerLimit.
func PeerMapEntries(maxPeers int) uint32 {
	return uint32(max(4096, 16*maxPeers))
}

// maps are the maps a scrape or the span reader uses.
type maps struct {
	Counts    *ebpf.Map `ebpf:"tcp_retransmits"`
	Peers     *ebpf.Map `ebpf:"tcp_rtx_peers"`
	Cgroups   *ebpf.Map `ebpf:"tcp_rtx_cgroups"`
	Events    *ebpf.Map `ebpf:"ktel_events"`
	SpanDrops *ebpf.Map `ebpf:"ktel_span_drops"`
}

// Probe is the loaded and attached TCP retransmit probe.
type Probe struct {
	variant probe.Variant
	peers   bool
	cgroups bool
	objs    *probe.Loaded
	maps    maps
}

// Load loads and attaches the probe, trying variants in order of preference
// and returning the first that loads. When none does, the errors of all are
// returned, wrapping probe.ErrUnsupported if the kernel lacks what every
// variant needs.
func Load(opts Options, log *slog.Logger) (*Probe, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	p, _, err := probe.FirstLoading(Variants, log, func(v probe.Variant) (*Probe, error) {
		return load(opts, v, PeerMapEntries(opts.MaxPeers))
	})
	return p, err
}

func (o *Options) check() error {
	if o.MaxPeers < 0 || o.MaxPeers > PeerLimit {
		return fmt.Errorf("max peers %d: want 0..%d", o.MaxPeers, PeerLimit)
	}
	if o.MaxPeers == 0 {
		o.MaxPeers = DefaultMaxPeers
	}
	if o.Peers && o.PerCgroup {
		return errors.New("counting by peer and by cgroup at once is not supported")
	}
	return nil
}

// load loads variant v with a peer map of peerEntries keys when
// opts.Peers is set.
func load(opts Options, v probe.Variant, peerEntries uint32) (*Probe, error) {
	spec, err := loadTcpretrans()
	if err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	var specs tcpretransSpecs
	if err := spec.Assign(&specs); err != nil {
		return nil, fmt.Errorf("load spec: %w", err)
	}
	var track uint32
	if opts.Peers {
		track = 1
		// Without peers the map keeps the single key it is declared with,
		// so that it costs nothing.
		specs.TcpRtxPeers.MaxEntries = peerEntries
	}
	if err := specs.TrackPeers.Set(track); err != nil {
		return nil, fmt.Errorf("set track_peers: %w", err)
	}
	if opts.PerCgroup {
		if err := specs.PerCgroup.Set(uint32(1)); err != nil {
			return nil, fmt.Errorf("set per_cgroup: %w", err)
		}
	}
	if err := opts.Spans.Apply(spec); err != nil {
		return nil, err
	}
	p := &Probe{variant: v, peers: opts.Peers, cgroups: opts.PerCgroup}
	if p.objs, err = probe.LoadVariant(spec, v, &p.maps); err != nil {
		return nil, err
	}
	return p, nil
}

// Variant is the variant in use.
func (p *Probe) Variant() probe.Variant { return p.variant }

// Programs are the loaded programs by name, for run-time statistics.
func (p *Probe) Programs() map[string]*ebpf.Program { return p.objs.Programs }

// BoundedMaps are the hash maps whose fill is worth watching: the peer map,
// when peers are counted.
func (p *Probe) BoundedMaps() map[string]*ebpf.Map {
	switch {
	case p.peers:
		return map[string]*ebpf.Map{"tcp_rtx_peers": p.maps.Peers}
	case p.cgroups:
		return map[string]*ebpf.Map{"tcp_rtx_cgroups": p.maps.Cgroups}
	}
	return map[string]*ebpf.Map{}
}

// CgroupKey is a Key with the cgroup v2 id of the socket (its creator's
// when it was created; the listener's for a SYN-ACK).
type CgroupKey struct {
	Key
	Cgroup uint64
}

// ForgetCgroup deletes the count of k (a cgroup idle long enough that its
// series may go); retransmits counted between the last read and the
// deletion are lost. A key not in the map is no error.
func (p *Probe) ForgetCgroup(k CgroupKey) error {
	ck := tcpretransCgroupKey{Cgroup: k.Cgroup, Idx: indexOfKey(k.Key)}
	if err := p.maps.Cgroups.Delete(&ck); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from tcp_rtx_cgroups: %w", err)
	}
	return nil
}

// Detach detaches the programs; the maps stay readable until Close.
func (p *Probe) Detach() error { return p.objs.Detach() }

// Close detaches the programs and releases every map.
func (p *Probe) Close() error { return p.objs.Close() }

// Key identifies retransmits of one kind by sockets of one family in one
// TCP state.
type Key struct {
	Family Family
	State  uint8 // TCP state at retransmit, see StateName; SYN_RECV for SYN-ACKs
	Kind   Kind
}

// PeerKey is a Key with the remote end of the connection. The zero Peer
// (!Peer.IsValid()) stands for retransmits the kernel could not attribute
// to a peer because its peer map was full.
type PeerKey struct {
	Key
	Peer netip.AddrPort
}

// Snapshot is one read of the probe's maps, in segments (a GSO packet
// retransmitted at once counts for each segment), as the kernel's
// TcpRetransSegs counts them. Only keys that occurred are present.
type Snapshot struct {
	// Retransmits counts every retransmit.
	Retransmits map[Key]uint64
	// Peers counts retransmits by peer too; nil without Options.Peers.
	Peers map[PeerKey]uint64
	// PeerMapFull is the sum of Peers under the zero peer: retransmits
	// not attributed to their peer because the kernel's map was full.
	PeerMapFull uint64
	// Cgroups counts retransmits by socket cgroup too (Options.PerCgroup);
	// CgroupMapFull are those the kernel's map had no room for, which
	// are in Retransmits only.
	Cgroups       map[CgroupKey]uint64
	CgroupMapFull uint64
	// SpanDrops are retransmits the kernel did not deliver as events.
	SpanDrops probe.SpanDrops
}

// Snapshot reads and sums the per-CPU maps. Counters only grow, but the
// read is not atomic across keys.
func (p *Probe) Snapshot() (*Snapshot, error) {
	s := &Snapshot{Retransmits: make(map[Key]uint64)}
	drops, err := probe.ReadSpanDrops(p.maps.SpanDrops)
	if err != nil {
		return nil, err
	}
	s.SpanDrops = drops
	if p.peers {
		s.Peers = make(map[PeerKey]uint64)
	}

	counts, err := probe.SumPerCPUArray(p.maps.Counts, numFamilies*numStates*numKinds)
	if err != nil {
		return nil, fmt.Errorf("read tcp_retransmits: %w", err)
	}
	for idx, n := range counts {
		if n == 0 {
			continue
		}
		k := keyOfIndex(uint32(idx))
		s.Retransmits[k] += n
		s.CgroupMapFull += n
		if p.peers {
			// With peers, only what the peer map had no room for.
			s.Peers[PeerKey{Key: k}] += n
			s.PeerMapFull += n
		}
	}
	if p.cgroups {
		return s, p.readCgroups(s)
	}
	s.CgroupMapFull = 0
	if !p.peers {
		return s, nil
	}

	peers, err := probe.SumPerCPUHash[tcpretransPeerKey](p.maps.Peers, int(p.maps.Peers.MaxEntries()))
	if err != nil {
		return nil, fmt.Errorf("read tcp_rtx_peers: %w", err)
	}
	for pk, n := range peers {
		if n == 0 {
			continue
		}
		k := decodePeerKey(pk)
		s.Retransmits[k.Key] += n
		s.Peers[k] += n
	}
	return s, nil
}

// readCgroups reads the per-cgroup counts into s.
func (p *Probe) readCgroups(s *Snapshot) error {
	s.Cgroups = map[CgroupKey]uint64{}
	var (
		ck tcpretransCgroupKey
		n  uint64
	)
	it := p.maps.Cgroups.Iterate()
	for it.Next(&ck, &n) {
		k := CgroupKey{Key: keyOfIndex(ck.Idx), Cgroup: ck.Cgroup}
		s.Cgroups[k] = n
		s.Retransmits[k.Key] += n
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read tcp_rtx_cgroups: %w", err)
	}
	return nil
}

// indexOfKey is the index of k in tcp_retransmits.
func indexOfKey(k Key) uint32 {
	return (uint32(k.Family)*numStates+uint32(k.State))*numKinds + uint32(k.Kind)
}

// keyOfIndex inverts the index of tcp_retransmits,
// (family * RT_STATES + state) * RT_KINDS + kind.
func keyOfIndex(idx uint32) Key {
	return Key{
		Family: Family(idx / (numKinds * numStates)),
		State:  uint8(idx / numKinds % numStates),
		Kind:   Kind(idx % numKinds),
	}
}

func decodePeerKey(k tcpretransPeerKey) PeerKey {
	var addr netip.Addr
	if Family(k.Family) == IPv4 {
		addr = netip.AddrFrom4([4]byte(k.Addr[:4]))
	} else {
		// A dual-stack socket's IPv4 peer (::ffff:a.b.c.d) is shown, as in
		// spans, as a.b.c.d: one host, one peer value.
		addr = netip.AddrFrom16(k.Addr).Unmap()
	}
	return PeerKey{
		Key:  Key{Family: Family(k.Family), State: k.State, Kind: Kind(k.Kind)},
		Peer: netip.AddrPortFrom(addr, k.Port),
	}
}

// Sizes of the generated structs, for the layout check in tests.
const peerKeySize = unsafe.Sizeof(tcpretransPeerKey{})

// Events is the ring buffer of retransmits for spans (see DecodeEvent).
func (p *Probe) Events() *ebpf.Map { return p.maps.Events }

// Event is one retransmit, for a span.
type Event struct {
	TsNs          uint64 // CLOCK_MONOTONIC
	Key                  // family, state, kind
	Local, Remote netip.AddrPort
	Segments      uint32
	Cgroup        uint64 // the socket's cgroup v2 id (the listener's for a SYN-ACK); 0 if unknown
}

// EventSize is the size of a record in the ring buffer.
const EventSize = int(unsafe.Sizeof(tcpretransTcpretransEvent{}))

// DecodeEvent decodes one ring-buffer record.
func DecodeEvent(b []byte) (Event, error) {
	var r tcpretransTcpretransEvent
	if len(b) != EventSize {
		return Event{}, fmt.Errorf("tcpretrans event: %d bytes, want %d", len(b), EventSize)
	}
	if _, err := binary.Decode(b, binary.NativeEndian, &r); err != nil {
		return Event{}, fmt.Errorf("tcpretrans event: %w", err)
	}
	if Family(r.Family) != IPv4 && Family(r.Family) != IPv6 || Kind(r.Kind) >= numKinds {
		return Event{}, fmt.Errorf("tcpretrans event: family %d, kind %d", r.Family, r.Kind)
	}
	addr := func(a [16]uint8) netip.Addr {
		if Family(r.Family) == IPv4 {
			return netip.AddrFrom4([4]byte(a[:4]))
		}
		return netip.AddrFrom16(a)
	}
	return Event{
		TsNs:     r.TsNs,
		Key:      Key{Family: Family(r.Family), State: r.State, Kind: Kind(r.Kind)},
		Local:    netip.AddrPortFrom(addr(r.Saddr), r.Sport),
		Remote:   netip.AddrPortFrom(addr(r.Daddr), r.Dport),
		Segments: r.Segs,
		Cgroup:   r.Cgroup,
	}, nil
}
