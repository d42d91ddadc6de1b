package metrics

import (
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ktel-dev/ktel/bpf/netdev"
)

type fakeNetdev struct{ snap *netdev.Snapshot }

func (f *fakeNetdev) Snapshot() (*netdev.Snapshot, error) { return f.snap, nil }

func newFakeNetdev(sizes bool) *fakeNetdev {
	udp4, _ := netdev.ProtocolByName("ipv4_udp")
	icmp6, _ := netdev.ProtocolByName("ipv6_icmp")
	arp, _ := netdev.ProtocolByName("arp")
	cpu0, cpu1 := netdev.Counters{}, netdev.Counters{}
	cpu0[netdev.Egress][udp4] = netdev.Counter{Packets: 3, Bytes: 3 * 342}
	cpu1[netdev.Egress][udp4] = netdev.Counter{Packets: 1, Bytes: 342}
	cpu1[netdev.Ingress][icmp6] = netdev.Counter{Packets: 2, Bytes: 2 * 86}
	cpu0[netdev.Ingress][arp] = netdev.Counter{Packets: 1, Bytes: 42}
	eth0 := netdev.Interface{Name: "eth0", Index: 2, PerCPU: []netdev.Counters{cpu0, cpu1}}
	if sizes {
		s0, s1 := netdev.Sizes{}, netdev.Sizes{}
		s0[netdev.Egress][3] = 3 // 342 bytes: (256, 512]
		s1[netdev.Egress][3] = 1
		s1[netdev.Ingress][1] = 2 // 86 bytes: (64, 128]
		s0[netdev.Ingress][0] = 1 // 42 bytes
		eth0.SizesPerCPU = []netdev.Sizes{s0, s1}
	}
	idle := netdev.Interface{Name: "veth1", Index: 7, PerCPU: make([]netdev.Counters, 2)}
	return &fakeNetdev{snap: &netdev.Snapshot{Interfaces: []netdev.Interface{eth0, idle}, Overflow: 3, Missed: 1}}
}

func TestNetdevCollector(t *testing.T) {
	c := &collectorAdapter{NewNetdevCollector(newFakeNetdev(false), nil)}
	want := `
# HELP ktel_net_packets_total Packets seen on an interface, by direction, protocol class and CPU (a GSO packet counts once).
# TYPE ktel_net_packets_total counter
ktel_net_packets_total{cpu="0",direction="egress",interface="eth0",protocol="ipv4_udp"} 3
ktel_net_packets_total{cpu="0",direction="ingress",interface="eth0",protocol="arp"} 1
ktel_net_packets_total{cpu="1",direction="egress",interface="eth0",protocol="ipv4_udp"} 1
ktel_net_packets_total{cpu="1",direction="ingress",interface="eth0",protocol="ipv6_icmp"} 2
# HELP ktel_net_bytes_total Bytes seen on an interface from the link-layer header on, by direction, protocol class and CPU.
# TYPE ktel_net_bytes_total counter
ktel_net_bytes_total{cpu="0",direction="egress",interface="eth0",protocol="ipv4_udp"} 1026
ktel_net_bytes_total{cpu="0",direction="ingress",interface="eth0",protocol="arp"} 42
ktel_net_bytes_total{cpu="1",direction="egress",interface="eth0",protocol="ipv4_udp"} 342
ktel_net_bytes_total{cpu="1",direction="ingress",interface="eth0",protocol="ipv6_icmp"} 172
# HELP ktel_net_interfaces_overflow_total Matching interfaces not attached because every interface slot was in use.
# TYPE ktel_net_interfaces_overflow_total counter
ktel_net_interfaces_overflow_total 3
# HELP ktel_net_packets_missed_total Packets seen on an interface that held no slot: while it was being detached, or through a clsact filter left by a killed ktel.
# TYPE ktel_net_packets_missed_total counter
ktel_net_packets_missed_total 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(c, "ktel_net_packet_size_bytes"); n != 0 {
		t.Errorf("%d size histograms without sizes", n)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

func TestNetdevCollectorSizes(t *testing.T) {
	c := &collectorAdapter{NewNetdevCollector(newFakeNetdev(true), nil)}
	bucket := func(dir, le, n string) string {
		return `ktel_net_packet_size_bytes_bucket{direction="` + dir + `",interface="eth0",le="` + le + `"} ` + n + "\n"
	}
	want := `
# HELP ktel_net_packet_size_bytes Frame sizes seen on an interface, link-layer header included (KTEL_NETDEV_PACKET_SIZES).
# TYPE ktel_net_packet_size_bytes histogram
` + bucket("egress", "64", "0") + bucket("egress", "128", "0") + bucket("egress", "256", "0") + bucket("egress", "512", "4") +
		bucket("egress", "1024", "4") + bucket("egress", "2048", "4") + bucket("egress", "4096", "4") + bucket("egress", "8192", "4") +
		bucket("egress", "16384", "4") + bucket("egress", "32768", "4") + bucket("egress", "65536", "4") + bucket("egress", "+Inf", "4") +
		`ktel_net_packet_size_bytes_sum{direction="egress",interface="eth0"} 1368
ktel_net_packet_size_bytes_count{direction="egress",interface="eth0"} 4
` + bucket("ingress", "64", "1") + bucket("ingress", "128", "3") + bucket("ingress", "256", "3") + bucket("ingress", "512", "3") +
		bucket("ingress", "1024", "3") + bucket("ingress", "2048", "3") + bucket("ingress", "4096", "3") + bucket("ingress", "8192", "3") +
		bucket("ingress", "16384", "3") + bucket("ingress", "32768", "3") + bucket("ingress", "65536", "3") + bucket("ingress", "+Inf", "3") +
		`ktel_net_packet_size_bytes_sum{direction="ingress",interface="eth0"} 214
ktel_net_packet_size_bytes_count{direction="ingress",interface="eth0"} 3
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "ktel_net_packet_size_bytes"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

type fakeNetdevPods map[int][2]string

func (f fakeNetdevPods) PodOf(ifindex int) (string, string) { return f[ifindex][0], f[ifindex][1] }

// With pods, every per-interface series carries namespace and pod: the
// pod's for its veth, empty for other interfaces.
func TestNetdevCollectorPods(t *testing.T) {
	src := newFakeNetdev(true)
	veth := src.snap.Interfaces[0]
	veth.Name, veth.Index = "cali1a2b3c", 9
	src.snap.Interfaces = append(src.snap.Interfaces, veth)
	c := &collectorAdapter{NewNetdevCollector(src, fakeNetdevPods{9: {"team-a", "web"}})}
	want := `
# HELP ktel_net_packets_total Packets seen on an interface, by direction, protocol class and CPU (a GSO packet counts once).
# TYPE ktel_net_packets_total counter
ktel_net_packets_total{cpu="0",direction="egress",interface="cali1a2b3c",namespace="team-a",pod="web",protocol="ipv4_udp"} 3
ktel_net_packets_total{cpu="0",direction="egress",interface="eth0",namespace="",pod="",protocol="ipv4_udp"} 3
ktel_net_packets_total{cpu="0",direction="ingress",interface="cali1a2b3c",namespace="team-a",pod="web",protocol="arp"} 1
ktel_net_packets_total{cpu="0",direction="ingress",interface="eth0",namespace="",pod="",protocol="arp"} 1
ktel_net_packets_total{cpu="1",direction="egress",interface="cali1a2b3c",namespace="team-a",pod="web",protocol="ipv4_udp"} 1
ktel_net_packets_total{cpu="1",direction="egress",interface="eth0",namespace="",pod="",protocol="ipv4_udp"} 1
ktel_net_packets_total{cpu="1",direction="ingress",interface="cali1a2b3c",namespace="team-a",pod="web",protocol="ipv6_icmp"} 2
ktel_net_packets_total{cpu="1",direction="ingress",interface="eth0",namespace="",pod="",protocol="ipv6_icmp"} 2
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want), "ktel_net_packets_total"); err != nil {
		t.Error(err)
	}
	// Two interfaces' two directions; idle veth1's are left out.
	if n := testutil.CollectAndCount(c, "ktel_net_packet_size_bytes"); n != 4 {
		t.Errorf("%d size histograms, want 4", n)
	}
	sizes := `
# HELP ktel_net_packet_size_bytes Frame sizes seen on an interface, link-layer header included (KTEL_NETDEV_PACKET_SIZES).
# TYPE ktel_net_packet_size_bytes histogram
`
	for _, b := range []string{"64", "128", "256", "512", "1024", "2048", "4096", "8192", "16384", "32768", "65536", "+Inf"} {
		n := "3"
		if b == "64" {
			n = "1"
		}
		sizes += `ktel_net_packet_size_bytes_bucket{direction="ingress",interface="cali1a2b3c",namespace="team-a",pod="web",le="` + b + `"} ` + n + "\n"
	}
	sizes += `ktel_net_packet_size_bytes_sum{direction="ingress",interface="cali1a2b3c",namespace="team-a",pod="web"} 214
ktel_net_packet_size_bytes_count{direction="ingress",interface="cali1a2b3c",namespace="team-a",pod="web"} 3
`
	only := &collectorAdapter{NewNetdevCollector(&fakeNetdev{snap: &netdev.Snapshot{Interfaces: []netdev.Interface{ingressOnly(veth)}}}, fakeNetdevPods{9: {"team-a", "web"}})}
	if err := testutil.CollectAndCompare(only, strings.NewReader(sizes), "ktel_net_packet_size_bytes"); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

// ingressOnly is i without its egress counts.
func ingressOnly(i netdev.Interface) netdev.Interface {
	i.PerCPU = slices.Clone(i.PerCPU)
	i.SizesPerCPU = slices.Clone(i.SizesPerCPU)
	for cpu := range i.PerCPU {
		i.PerCPU[cpu][netdev.Egress] = [netdev.NumProtocols]netdev.Counter{}
		i.SizesPerCPU[cpu][netdev.Egress] = [netdev.NumSizes]uint64{}
	}
	return i
}
