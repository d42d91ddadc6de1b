package metrics

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/bpf/netdev"
)

// NetdevSource is what the network-device collector reads: the loaded
// probe, or a fake in tests.
type NetdevSource interface {
	Snapshot() (*netdev.Snapshot, error)
}

// NetdevPods names the pod whose host-side interface an ifindex is
// (podnet.Mapper), from caches only: empty for no pod's.
type NetdevPods interface {
	PodOf(ifindex int) (namespace, pod string)
}

type netdevCollector struct {
	snap     *Cached[*netdev.Snapshot]
	pods     NetdevPods // nil: no pod labels
	packets  *prometheus.Desc
	bytes    *prometheus.Desc
	size     *prometheus.Desc
	overflow *prometheus.Desc
	missed   *prometheus.Desc
}

// NewNetdevCollector exports the netdev probe's counters as
// ktel_net_packets_total and ktel_net_bytes_total{interface,direction,
// protocol,cpu}, and, when the probe counts frame sizes,
// ktel_net_packet_size_bytes{interface,direction}. Only attached
// interfaces are exported, so the interface label has at most as many
// values as the probe has slots (KTEL_NETDEV_MAX_INTERFACES); series that
// are still zero are left out. With pods (nil: none), every
// per-interface series also has namespace and pod: the pod whose veth
// the interface is, empty for other interfaces. The interface label
// stays, so that a series remains one interface's counter when its pod
// labels change (found late, or lapsed).
func NewNetdevCollector(src NetdevSource, pods NetdevPods) Collector {
	labels := []string{"interface", "direction", "protocol", "cpu"}
	sizeLabels := []string{"interface", "direction"}
	if pods != nil {
		labels = append(labels, "namespace", "pod")
		sizeLabels = append(sizeLabels, "namespace", "pod")
	}
	return &netdevCollector{
		snap: NewCached(src.Snapshot, DefaultMaxAge),
		pods: pods,
		packets: prometheus.NewDesc("ktel_net_packets_total",
			"Packets seen on an interface, by direction, protocol class and CPU (a GSO packet counts once).", labels, nil),
		bytes: prometheus.NewDesc("ktel_net_bytes_total",
			"Bytes seen on an interface from the link-layer header on, by direction, protocol class and CPU.", labels, nil),
		size: prometheus.NewDesc("ktel_net_packet_size_bytes",
			"Frame sizes seen on an interface, link-layer header included (KTEL_NETDEV_PACKET_SIZES).",
			sizeLabels, nil),
		overflow: prometheus.NewDesc("ktel_net_interfaces_overflow_total",
			"Matching interfaces not attached because every interface slot was in use.", nil, nil),
		missed: prometheus.NewDesc("ktel_net_packets_missed_total",
			"Packets seen on an interface that held no slot: while it was being detached, or through a clsact filter left by a killed ktel.", nil, nil),
	}
}

func (c *netdevCollector) Update(ch chan<- prometheus.Metric) error {
	s, err := c.snap.Get()
	if err != nil {
		return err
	}
	for i := range s.Interfaces {
		iface := &s.Interfaces[i]
		var pod []string
		if c.pods != nil {
			ns, name := c.pods.PodOf(iface.Index)
			pod = []string{ns, name}
		}
		for cpu, counters := range iface.PerCPU {
			cpuLabel := strconv.Itoa(cpu)
			for d := range netdev.NumDirections {
				for p := range netdev.Protocol(netdev.NumProtocols) {
					v := counters[d][p]
					if v.Packets == 0 {
						continue
					}
					lv := append([]string{iface.Name, d.String(), p.String(), cpuLabel}, pod...)
					ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(v.Packets), lv...)
					ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(v.Bytes), lv...)
				}
			}
		}
		if iface.SizesPerCPU != nil {
			c.sizes(ch, iface, pod)
		}
	}
	ch <- prometheus.MustNewConstMetric(c.overflow, prometheus.CounterValue, float64(s.Overflow))
	ch <- prometheus.MustNewConstMetric(c.missed, prometheus.CounterValue, float64(s.Missed))
	return nil
}

// sizes sends one classic histogram per direction, summed over CPUs and
// protocols: buckets 64 B to 64 KiB in powers of two. The sum is the
// byte count.
func (c *netdevCollector) sizes(ch chan<- prometheus.Metric, iface *netdev.Interface, pod []string) {
	total := iface.Total()
	for d := range netdev.NumDirections {
		var slots [netdev.NumSizes]uint64
		for _, s := range iface.SizesPerCPU {
			for k, n := range s[d] {
				slots[k] += n
			}
		}
		var (
			count   uint64
			buckets = make(map[float64]uint64, netdev.NumSizes-1)
		)
		for k, n := range slots {
			count += n
			if k < netdev.NumSizes-1 {
				buckets[float64(netdev.SizeBound(k))] = count
			}
		}
		if count == 0 {
			continue
		}
		var bytes uint64
		for _, v := range total[d] {
			bytes += v.Bytes
		}
		ch <- prometheus.MustNewConstHistogram(c.size, count, float64(bytes), buckets, append([]string{iface.Name, d.String()}, pod...)...)
	}
}
