package tracing

import (
	"go.opentelemetry.io/otel/attribute"
	semconv "go.opentelemetry.io/otel/semconv/v1.37.0"

	"github.com/ktel-dev/ktel/bpf/tcpretrans"
)

// TCPRetransDecoder makes a span of a TCP retransmit: a point in time (the
// kernel gives no duration), with the connection's ends and state.
func TCPRetransDecoder(b []byte) (Span, error) {
	e, err := tcpretrans.DecodeEvent(b)
	if err != nil {
		return Span{}, err
	}
	return Span{
		Name:    "tcp retransmit",
		StartNs: e.TsNs,
		EndNs:   e.TsNs,
		Attrs: []attribute.KeyValue{
			semconv.NetworkTransportTCP,
			semconv.NetworkTypeKey.String(e.Family.String()),
			semconv.NetworkPeerAddress(e.Remote.Addr().Unmap().String()),
			semconv.NetworkPeerPort(int(e.Remote.Port())),
			semconv.NetworkLocalAddress(e.Local.Addr().Unmap().String()),
			semconv.NetworkLocalPort(int(e.Local.Port())),
			attribute.String("ktel.tcp.state", tcpretrans.StateName(e.State)),
			attribute.String("ktel.tcp.retransmit.kind", e.Kind.String()),
			attribute.Int("ktel.tcp.segments", int(e.Segments)),
		},
		Cgroup: e.Cgroup,
	}, nil
}
