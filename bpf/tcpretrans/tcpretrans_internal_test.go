package tcpretrans

import (
	"testing"
	"unsafe"
)

// The Go struct bpf2go generated must match the kernel-side layout.
func TestStructSizes(t *testing.T) {
	spec, err := loadTcpretrans()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := uint32(peerKeySize), spec.Maps["tcp_rtx_peers"].KeySize; got != want {
		t.Errorf("struct peer_key: Go %d bytes, map key %d", got, want)
	}
	if got, want := uint32(numFamilies*numStates*numKinds), spec.Maps["tcp_retransmits"].MaxEntries; got != want {
		t.Errorf("tcp_retransmits: Go expects %d entries, C declares %d", got, want)
	}
	if got := unsafe.Sizeof(tcpretransTcpretransEvent{}); got != 64 || EventSize != 64 {
		t.Errorf("struct tcpretrans_event: Go %d bytes, C 64", got)
	}
	if got, want := uint32(unsafe.Sizeof(tcpretransCgroupKey{})), spec.Maps["tcp_rtx_cgroups"].KeySize; got != want {
		t.Errorf("struct cgroup_key: Go %d bytes, map key %d", got, want)
	}
	for want := range uint32(numFamilies * numStates * numKinds) {
		if got := indexOfKey(keyOfIndex(want)); got != want {
			t.Errorf("indexOfKey(keyOfIndex(%d)) = %d", want, got)
		}
	}
}

func TestKeyOfIndex(t *testing.T) {
	seen := map[Key]bool{}
	for f := range Family(numFamilies) {
		for s := range uint8(numStates) {
			for k := range Kind(numKinds) {
				idx := (uint32(f)*numStates+uint32(s))*uint32(numKinds) + uint32(k)
				want := Key{Family: f, State: s, Kind: k}
				if got := keyOfIndex(idx); got != want {
					t.Errorf("keyOfIndex(%d) = %+v, want %+v", idx, got, want)
				}
				seen[want] = true
			}
		}
	}
	if len(seen) != numFamilies*numStates*numKinds {
		t.Errorf("%d distinct keys", len(seen))
	}
}

func TestDecodePeerKey(t *testing.T) {
	v4 := tcpretransPeerKey{Family: uint8(IPv4), State: StateSynSent, Kind: uint8(KindSyn), Port: 443}
	copy(v4.Addr[:], []byte{10, 200, 1, 2})
	if got := decodePeerKey(v4); got.Peer.String() != "10.200.1.2:443" || got.Key != (Key{IPv4, StateSynSent, KindSyn}) {
		t.Errorf("IPv4: %+v %s", got.Key, got.Peer)
	}
	v6 := tcpretransPeerKey{Family: uint8(IPv6), State: StateEstablished, Kind: uint8(KindData), Port: 8080}
	v6.Addr = [16]byte{0xfd, 0, 0x02, 0, 15: 2}
	if got := decodePeerKey(v6); got.Peer.String() != "[fd00:200::2]:8080" || got.Key != (Key{IPv6, StateEstablished, KindData}) {
		t.Errorf("IPv6: %+v %s", got.Key, got.Peer)
	}
}

func TestOptions(t *testing.T) {
	for _, tc := range []struct {
		max, want int
		ok        bool
	}{
		{0, DefaultMaxPeers, true},
		{3, 3, true},
		{PeerLimit, PeerLimit, true},
		{-1, 0, false},
		{PeerLimit + 1, 0, false},
	} {
		o := Options{Peers: true, MaxPeers: tc.max}
		err := o.check()
		if (err == nil) != tc.ok || (tc.ok && o.MaxPeers != tc.want) {
			t.Errorf("MaxPeers %d: got %d, %v", tc.max, o.MaxPeers, err)
		}
	}
	if n := PeerMapEntries(DefaultMaxPeers); n != 4096 {
		t.Errorf("PeerMapEntries(%d) = %d", DefaultMaxPeers, n)
	}
	if n := PeerMapEntries(PeerLimit); n != 65536 {
		t.Errorf("PeerMapEntries(%d) = %d", PeerLimit, n)
	}
}
