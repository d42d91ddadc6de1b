package tcpretrans

import "github.com/ktel-dev/ktel/internal/probe"

// LoadVariant loads exactly one variant, for tests that cover each.
func LoadVariant(opts Options, v probe.Variant) (*Probe, error) {
	if err := opts.check(); err != nil {
		return nil, err
	}
	return load(opts, v, PeerMapEntries(opts.MaxPeers))
}

// LoadTinyPeerMap loads the preferred variant with a peer map of only
// entries keys, so that a test can fill it.
func LoadTinyPeerMap(entries uint32) (*Probe, error) {
	return load(Options{Peers: true, MaxPeers: DefaultMaxPeers}, Variants[0], entries)
}
