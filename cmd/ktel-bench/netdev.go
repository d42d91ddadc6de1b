package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/bpf/netdev"
)

// The netdev benchmark floods UDP through a veth pair between two network
// namespaces it creates (and deletes): sender in ktel-bench-<pid>-a,
// receiver in ktel-bench-<pid>-b, addresses 10.99.0.1 -> 10.99.0.2. On
// veth, the receiving side runs in the sender's softirq, on the sender's
// CPU, so the time per packet covers the egress hook on a and the ingress
// hook on b.
const (
	netdevDevA = "ktbench-a"
	netdevDevB = "ktbench-b"
)

func netdevNS(side string) string { return fmt.Sprintf("ktel-bench-%d-%s", os.Getpid(), side) }

// netdevConfigs: no probe; the probe at tc (tcx) on both ends; with frame
// sizes; through clsact; and with XDP ingress (egress at tc). Each probe
// config attaches one probe per namespace, so a packet passes two hooks.
func netdevConfigs(log *slog.Logger) []config {
	probes := func(o netdev.Options) setup {
		return func() (io.Closer, error) {
			var cs closers
			for _, side := range []string{"a", "b"} {
				o := o
				o.Interfaces, o.NetNS = []string{"ktbench-*"}, "/var/run/netns/"+netdevNS(side)
				p, err := netdev.Load(o, log)
				if err != nil {
					cs.Close()
					return nil, err
				}
				cs = append(cs, p)
			}
			return cs, nil
		}
	}
	return []config{
		{name: "none"},
		{name: "netdev tc (tcx)", setup: probes(netdev.Options{TC: netdev.TCX})},
		{name: "netdev tc+sizes", setup: probes(netdev.Options{TC: netdev.TCX, PacketSizes: true})},
		{name: "netdev tc (clsact)", setup: probes(netdev.Options{TC: netdev.TCClsact})},
		{name: "netdev xdp", setup: probes(netdev.Options{Hook: netdev.HookXDP, TC: netdev.TCX})},
	}
}

// netdevEnv creates the namespaces and the veth pair, and returns a
// connected UDP socket in namespace a and what removes it all.
func netdevEnv() (fd int, cleanup func(), err error) {
	nsA, nsB := netdevNS("a"), netdevNS("b")
	cleanup = func() {
		exec.Command("ip", "netns", "del", nsA).Run()
		exec.Command("ip", "netns", "del", nsB).Run()
	}
	run := func(args ...string) error {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	steps := [][]string{
		{"ip", "netns", "add", nsA},
		{"ip", "netns", "add", nsB},
		{"ip", "-n", nsA, "link", "add", netdevDevA, "type", "veth", "peer", "name", netdevDevB, "netns", nsB},
		{"ip", "-n", nsA, "addr", "add", "10.99.0.1/24", "dev", netdevDevA},
		{"ip", "-n", nsB, "addr", "add", "10.99.0.2/24", "dev", netdevDevB},
		{"ip", "-n", nsA, "link", "set", netdevDevA, "up"},
		{"ip", "-n", nsB, "link", "set", netdevDevB, "up"},
		{"ip", "netns", "exec", nsA, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"},
		{"ip", "netns", "exec", nsB, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"},
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			cleanup()
			return -1, nil, err
		}
	}
	// A receiving socket that is never read: datagrams pass both hooks
	// and the UDP lookup, then are dropped when its buffer is full, as
	// they would be with no socket but without ICMP replies.
	var rx int
	err = inNetns(nsB, func() error {
		var err error
		if rx, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
			return err
		}
		return unix.Bind(rx, &unix.SockaddrInet4{Addr: [4]byte{10, 99, 0, 2}, Port: 9})
	})
	if err == nil {
		err = inNetns(nsA, func() error {
			var err error
			if fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0); err != nil {
				return err
			}
			return unix.Connect(fd, &unix.SockaddrInet4{Addr: [4]byte{10, 99, 0, 2}, Port: 9})
		})
	}
	if err != nil {
		cleanup()
		return -1, nil, err
	}
	all := cleanup
	cleanup = func() {
		unix.Close(fd)
		unix.Close(rx)
		all()
	}
	// The first datagram resolves the neighbour (ARP).
	unix.Write(fd, []byte{0})
	time.Sleep(50 * time.Millisecond)
	return fd, cleanup, nil
}

// inNetns runs f on a thread in namespace ns; the thread stays locked and
// is discarded afterwards.
func inNetns(ns string, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		nsfd, err := unix.Open("/var/run/netns/"+ns, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(nsfd)
		if err := unix.Setns(nsfd, unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	return <-errc
}

// udpFlood sends n datagrams of size bytes on the connected socket fd with
// sendmmsg, in batches of 64, from the calling (pinned) thread, and
// returns the mean ns per datagram.
func udpFlood(fd, n, size int) float64 {
	const batch = 64
	payload := make([]byte, size)
	iov := unix.Iovec{Base: &payload[0]}
	iov.SetLen(size)
	msgs := make([]unix.Mmsghdr, batch)
	for i := range msgs {
		msgs[i].Hdr.Iov = &iov
		msgs[i].Hdr.SetIovlen(1)
	}
	start := time.Now()
	for sent := 0; sent < n; {
		k := min(batch, n-sent)
		r, _, errno := unix.RawSyscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&msgs[0])), uintptr(k), 0, 0, 0)
		if errno != 0 && !errors.Is(errno, unix.EAGAIN) && !errors.Is(errno, unix.ENOBUFS) {
			panic(fmt.Sprintf("sendmmsg: %v", errno))
		}
		sent += max(int(r), 1) // bounded even if a batch fails
	}
	return float64(time.Since(start).Nanoseconds()) / float64(n)
}

// runNetdevBench prints the netdev probe's cost per packet: in the kernel
// alone (BPF_PROG_TEST_RUN, beside an empty program), then on the whole
// path of a UDP flood through a veth pair.
func runNetdevBench(w io.Writer, log *slog.Logger, sum *summary, o options) {
	fmt.Fprintf(w, "\nnetdev probe, in the kernel alone: BPF_PROG_TEST_RUN on a 106-byte UDP frame, beside an empty program of the same type (go test -bench BenchmarkPrograms ./bpf/netdev, %d rounds)\n\n", o.rounds)
	if pk, err := progTestRun(o.rounds); err != nil {
		fmt.Fprintln(w, "unavailable:", err)
	} else {
		tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintf(tw, "program	median ns/packet	min..max	added vs empty	\n")
		for _, name := range []string{"empty_tc", "tc_ingress", "tc_ingress+sizes", "empty_xdp", "xdp_ingress", "xdp_ingress+sizes"} {
			v := pk[name]
			empty := pk["empty_tc"]
			if strings.HasPrefix(name, "xdp") || name == "empty_xdp" {
				empty = pk["empty_xdp"]
			}
			fmt.Fprintf(tw, "%s\t%.1f\t%.0f..%.0f\t%+.1f\t\n", name, median(v), minOf(v), maxOf(v), median(roundAdded(v, empty)))
		}
		tw.Flush()
		sum.add("netdev", "added ns/packet in kernel, tc", roundAdded(pk["tc_ingress"], pk["empty_tc"]), "ns", "<= 20 ns", atMost(20), "BPF_PROG_TEST_RUN")
		sum.add("netdev", "added ns/packet in kernel, tc+sizes", roundAdded(pk["tc_ingress+sizes"], pk["empty_tc"]), "ns", "<= 20 ns", atMost(20), "BPF_PROG_TEST_RUN")
		sum.add("netdev", "added ns/packet in kernel, xdp", roundAdded(pk["xdp_ingress"], pk["empty_xdp"]), "ns", "<= 20 ns", atMost(20), "BPF_PROG_TEST_RUN")
	}

	fmt.Fprintf(w, "\nnetdev probe, whole path: UDP flood (64-byte payload) through a veth pair between two namespaces, %d packets x %d rounds, sender pinned to CPU %d; each packet passes two hooks (egress a, ingress b)\n\n", o.packets, o.rounds, o.cpu)
	fd, cleanup, err := netdevEnv()
	if err != nil {
		fmt.Fprintln(w, "netdev:", err)
		return
	}
	defer cleanup()
	cfgs := netdevConfigs(log)
	results := measure(cfgs, o.rounds, func() float64 { return udpFlood(fd, o.packets, 64) })
	report(w, cfgs, results, "ns/packet")
	sum.add("netdev", "added ns/packet, whole path, tc (tcx), 2 hooks", roundAdded(results["netdev tc (tcx)"], results["none"]), "ns", "", nil, "noisy: a few % of the path")
	sum.add("netdev", "added ns/packet, whole path, xdp+tc, 2 hooks", roundAdded(results["netdev xdp"], results["none"]), "ns", "", nil, "")

	fmt.Fprintf(w, "\nrun time of the programs themselves (kernel BPF statistics):\n")
	netdevProgramCost(w, log, fd, o.packets, "tc (tcx)", netdev.Options{TC: netdev.TCX})
	netdevProgramCost(w, log, fd, o.packets, "tc+sizes", netdev.Options{TC: netdev.TCX, PacketSizes: true})
	netdevProgramCost(w, log, fd, o.packets, "xdp", netdev.Options{Hook: netdev.HookXDP, TC: netdev.TCX})
}

// progTestRun runs bpf/netdev's BenchmarkPrograms rounds times (go test
// -count: every sub-benchmark once per round, in order) and returns
// ns/packet per program, one value per round.
func progTestRun(rounds int) (map[string][]float64, error) {
	cmd := exec.Command("go", "test", "-run", "^$", "-bench", "^BenchmarkPrograms$", "-benchtime", "2000000x",
		"-count", strconv.Itoa(rounds), "./bpf/netdev")
	cmd.Env = append(os.Environ(), "KTEL_PRIVILEGED_TESTS=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, lastLines(string(out), 5))
	}
	res := map[string][]float64{}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 4 || !strings.HasPrefix(f[0], "BenchmarkPrograms/") {
			continue
		}
		name := strings.TrimPrefix(f[0], "BenchmarkPrograms/")
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			name = name[:i] // the GOMAXPROCS suffix
		}
		for i := 2; i+1 < len(f); i += 2 {
			if f[i+1] == "ns/packet" {
				if v, err := strconv.ParseFloat(f[i], 64); err == nil {
					res[name] = append(res[name], v)
				}
			}
		}
	}
	if len(res) == 0 {
		return nil, fmt.Errorf("no ns/packet in the output of %s", strings.Join(cmd.Args, " "))
	}
	return res, nil
}

// netdevProgramCost loads the probe in both namespaces with o, floods n
// packets with kernel BPF statistics on, and prints each program's mean
// run time: the in-program part of the added cost, free of the noise of
// the whole path.
func netdevProgramCost(w io.Writer, log *slog.Logger, fd, n int, name string, o netdev.Options) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		fmt.Fprintln(os.Stderr, "enable BPF stats:", err)
		return
	}
	defer stats.Close()
	var probes []*netdev.Probe
	for _, side := range []string{"a", "b"} {
		o := o
		o.Interfaces, o.NetNS = []string{"ktbench-*"}, "/var/run/netns/"+netdevNS(side)
		p, err := netdev.Load(o, log)
		if err != nil {
			fmt.Fprintln(os.Stderr, name, err)
			return
		}
		defer p.Close()
		probes = append(probes, p)
	}
	udpFlood(fd, n, 64)
	for _, p := range probes {
		for prog, pr := range p.Programs() {
			st, err := pr.Stats()
			if err != nil || st.RunCount == 0 {
				continue
			}
			fmt.Fprintf(w, "  %-20s %-22s %9d runs  %6.1f ns/run\n", name, prog, st.RunCount,
				float64(st.Runtime.Nanoseconds())/float64(st.RunCount))
		}
	}
}
