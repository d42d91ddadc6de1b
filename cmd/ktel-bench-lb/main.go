// Command ktel-bench-lb compares the TCP connect latency through ktel's
// socket load balancer (bpf/lb) with a direct connect and with
// kube-proxy-style iptables NAT chains (nft and legacy backends), for a
// growing number of services, and the time each takes to apply them.
//
// Everything happens in private network namespaces that have only loopback
// and are deleted on exit, with client processes in child cgroups that are
// removed on exit; the lb programs are attached to one of those cgroups
// only. Configurations are interleaved round by round for each number of
// services, so that their ratios come from neighbouring measurements. It
// prints figures and a chart; it never passes or fails on them.
//
// Run as root: make bench-lb.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	services       []int
	endpoints      int
	connects       int
	rounds         int
	warmup         int
	clientCPU      int
	serverCPU      int
	restoreTimeout time.Duration
	maxTime        time.Duration
	backends       []string // iptables backends to try: nft, legacy
	svg            string
	verbose        bool
}

func main() {
	if os.Getenv(clientEnv) != "" {
		os.Exit(clientMain())
	}
	var o options
	services := flag.String("services", "1,100,1000,10000,30000,100000", "numbers of services, comma-separated")
	flag.IntVar(&o.endpoints, "endpoints", 2, "endpoints (backends) per service, 1..8")
	flag.IntVar(&o.connects, "connects", 2000, "measured connects per configuration and number of services")
	flag.IntVar(&o.rounds, "rounds", 20, "interleaved rounds the connects are split into")
	flag.IntVar(&o.warmup, "warmup", 10, "unmeasured connects before each round's batch")
	flag.IntVar(&o.clientCPU, "client-cpu", 1, "CPU the connecting clients are pinned to")
	flag.IntVar(&o.serverCPU, "server-cpu", 0, "CPU the benchmark itself (listeners, iptables-restore, ktel) is pinned to")
	flag.DurationVar(&o.restoreTimeout, "restore-timeout", 3*time.Minute, "longest one iptables-restore may take; a backend that exceeds it is skipped for larger numbers of services")
	flag.DurationVar(&o.maxTime, "max-time", 45*time.Minute, "bound on the whole run; numbers of services not reached are reported as not measured")
	iptBackends := flag.String("iptables", "nft,legacy", "iptables backends to compare, comma-separated (nft, legacy); empty for none")
	flag.StringVar(&o.svg, "svg", "", "write the chart (SVG) to this file")
	flag.BoolVar(&o.verbose, "v", false, "log ktel's own messages")
	flag.Parse()

	var err error
	if o.services, err = parseInts(*services); err != nil {
		fmt.Fprintln(os.Stderr, "-services:", err)
		os.Exit(2)
	}
	for _, b := range strings.Split(*iptBackends, ",") {
		if b = strings.TrimSpace(b); b != "" {
			if b != "nft" && b != "legacy" {
				fmt.Fprintf(os.Stderr, "-iptables: unknown backend %q\n", b)
				os.Exit(2)
			}
			o.backends = append(o.backends, b)
		}
	}
	switch {
	case o.endpoints < 1 || o.endpoints > 8:
		err = errors.New("-endpoints: want 1..8")
	case o.rounds < 1 || o.connects < o.rounds:
		err = errors.New("-rounds: want 1..connects")
	case o.warmup < 0:
		err = errors.New("-warmup: want >= 0")
	case os.Geteuid() != 0:
		err = errors.New("must run as root (network namespaces, cgroups, BPF)")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}

	// Ctrl-C and SIGTERM cancel ctx; run then returns through its deferred
	// cleanups (namespaces, cgroups, clients, the probe).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	level := slog.LevelWarn
	if o.verbose {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if err := run(ctx, o, log); err != nil {
		fmt.Fprintln(os.Stderr, "ktel-bench-lb:", err)
		stop()
		os.Exit(1)
	}
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 || n > 1_000_000 {
			return nil, fmt.Errorf("%q: want 1..1000000", f)
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}
