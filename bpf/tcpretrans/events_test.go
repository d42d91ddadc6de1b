package tcpretrans_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/ktel-dev/ktel/bpf/tcpretrans"
	"github.com/ktel-dev/ktel/internal/probe"
	"github.com/ktel-dev/ktel/internal/testenv"
)

// With spans on, a SYN retransmit yields an event with both ends of the
// connection, its state and kind.
func TestRetransmitEvents(t *testing.T) {
	testenv.Privileged(t)
	p := load(t, tcpretrans.Options{Spans: probe.SpanOptions{Always: true}}, tcpretrans.Variants[0])
	rd := testenv.EventReader(t, p.Events())

	pair := newPair(t, 0)
	firewall(t, pair.server, "INPUT", "-p", "tcp", "--syn", "-j", "DROP")
	server := netip.AddrPortFrom(pair.serverAddrs[0], 7)
	if c, err := dial(pair, server, synWait); err == nil {
		c.Close()
		t.Fatal("connected through the firewall")
	}

	var got []tcpretrans.Event
	for _, e := range testenv.Records(t, rd, 300*time.Millisecond, tcpretrans.DecodeEvent) {
		if e.Remote == server {
			got = append(got, e)
		}
	}
	if len(got) == 0 {
		t.Fatal("no retransmit event toward the server")
	}
	e := got[0]
	if e.Kind != tcpretrans.KindSyn || e.State != tcpretrans.StateSynSent || e.Family != tcpretrans.IPv4 ||
		e.Local.Addr() != pair.clientAddr || e.Local.Port() == 0 || e.Segments != 1 || e.TsNs == 0 {
		t.Errorf("event %+v, want a SYN retransmit from %s", e, pair.clientAddr)
	}
}

func FuzzDecodeEvent(f *testing.F) {
	f.Add(make([]byte, tcpretrans.EventSize))
	f.Add([]byte{0})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := tcpretrans.DecodeEvent(b)
		if err == nil && (len(b) != tcpretrans.EventSize || !e.Remote.IsValid() || !e.Local.IsValid()) {
			t.Fatalf("accepted %d bytes as %+v", len(b), e)
		}
	})
}
