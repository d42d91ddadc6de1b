// Command ktel-bench measures what ktel costs, against doing nothing, an
// empty program on the same hook, and bpftrace running the same logic,
// side by side in one run: configurations are interleaved round by round on
// one pinned CPU, and medians (with the spread of the rounds) are compared,
// because a shared machine drifts more between runs than between
// neighbouring rounds. It also measures what an application feels
// (redis-benchmark's requests per second under each probe), scrapes of the
// built daemon, its footprint, and the accuracy of its histograms.
// It prints figures and the goals they are set against; it never passes or
// fails on them.
//
// Run as root: make bench (all), or go run ./cmd/ktel-bench -only NAME.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// setup attaches a configuration and returns what detaches it; nil means
// "nothing attached" (the baseline).
type setup func() (io.Closer, error)

type config struct {
	name  string
	floor string // name of the config this one is compared against
	setup setup
}

// benchmarks in the order they run; -only picks some.
var benchmarks = []string{"syscall", "runqlat", "redis", "netdev", "scrape", "attribution", "accuracy"}

type options struct {
	rounds, calls, trips, cpu, packets int
	busy, idle                         time.Duration
	sleeps                             int
	redisRounds, redisRequests         int
	redisClients                       int
	daemon                             string
	bpftrace                           bool
}

func main() {
	var o options
	flag.IntVar(&o.rounds, "rounds", 11, "interleaved rounds per configuration")
	flag.IntVar(&o.calls, "calls", 300000, "syscalls per measurement")
	flag.IntVar(&o.trips, "trips", 50000, "pipe round trips per measurement")
	flag.IntVar(&o.cpu, "cpu", 0, "CPU to pin the measuring threads to")
	flag.IntVar(&o.packets, "packets", 200000, "UDP packets per measurement (netdev)")
	flag.DurationVar(&o.busy, "busy", time.Minute, "busy period before the scrape measurements (scrape)")
	flag.DurationVar(&o.idle, "idle", 10*time.Second, "idle period over which the daemon's idle CPU is measured (scrape)")
	flag.IntVar(&o.redisRounds, "redis-rounds", 7, "interleaved rounds per configuration (redis)")
	flag.IntVar(&o.redisRequests, "redis-requests", 100000, "requests per redis-benchmark test, SET and GET each (redis)")
	flag.IntVar(&o.redisClients, "redis-clients", 50, "redis-benchmark clients (redis)")
	flag.IntVar(&o.sleeps, "sleeps", 200, "clock_nanosleep calls per duration (accuracy)")
	flag.StringVar(&o.daemon, "daemon", "bin/ktel", "the built daemon (scrape); built into a temporary directory if missing")
	flag.BoolVar(&o.bpftrace, "bpftrace", true, "compare with bpftrace (installed with apt-get when missing)")
	only := flag.String("only", "", "comma-separated benchmarks to run: "+strings.Join(benchmarks, ","))
	out := flag.String("out", "", "also write the results as Markdown to this file (machine, command, summary, full output)")
	flag.Parse()

	run := map[string]bool{}
	for _, b := range strings.Split(*only, ",") {
		if b = strings.TrimSpace(b); b != "" {
			if !slices.Contains(benchmarks, b) {
				fmt.Fprintf(os.Stderr, "-only: unknown benchmark %q (known: %s)\n", b, strings.Join(benchmarks, ","))
				os.Exit(2)
			}
			run[b] = true
		}
	}
	want := func(b string) bool { return len(run) == 0 || run[b] }

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if err := rlimit.RemoveMemlock(); err != nil {
		log.Warn("remove memlock rlimit", "err", err)
	}
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(o.cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		fmt.Fprintln(os.Stderr, "pin to CPU:", err)
		os.Exit(1)
	}

	var full bytes.Buffer
	w := io.MultiWriter(os.Stdout, &full)
	sum := &summary{}
	started := time.Now()
	fmt.Fprintf(w, "%s\n\n", machine())

	bt := ""
	if o.bpftrace && (want("syscall") || want("runqlat") || want("redis")) {
		var err error
		if bt, err = findBpftrace(); err != nil {
			fmt.Fprintln(w, "bpftrace unavailable, not compared:", err)
		}
	}

	if want("syscall") {
		runSyscallBench(w, log, sum, o, bt)
	}
	if want("runqlat") {
		runRunqlatBench(w, log, sum, o, bt)
	}
	if want("redis") {
		runRedisBench(w, log, sum, o, bt)
	}
	if want("netdev") {
		runNetdevBench(w, log, sum, o)
	}
	if want("scrape") {
		runScrapeBench(w, log, sum, o)
	}
	if want("attribution") {
		runAttributionBench(w, log, sum)
	}
	if want("accuracy") {
		runAccuracyBench(w, log, sum, o)
	}

	fmt.Fprintf(w, "\nsummary (figures against goals; median [min..max] over rounds; %s in all):\n\n", time.Since(started).Round(time.Second))
	sum.text(w)
	if *out != "" {
		if err := writeMarkdown(*out, sum, full.String()); err != nil {
			fmt.Fprintln(os.Stderr, "write", *out+":", err)
			os.Exit(1)
		}
	}
}

// measure runs every config once per round, rotating the order so that no
// config always follows the same neighbour, and returns the per-config
// samples, one per round: NaN where the config could not be set up, so
// that samples of one round stay aligned across configs.
func measure(cfgs []config, rounds int, run func() float64) map[string][]float64 {
	samples := make(map[string][]float64, len(cfgs))
	for _, c := range cfgs {
		samples[c.name] = make([]float64, rounds)
		for r := range samples[c.name] {
			samples[c.name][r] = math.NaN()
		}
	}
	for r := range rounds {
		for i := range cfgs {
			c := cfgs[(i+r)%len(cfgs)]
			var closer io.Closer
			if c.setup != nil {
				var err error
				if closer, err = c.setup(); err != nil {
					fmt.Fprintf(os.Stderr, "%s: %v\n", c.name, err)
					continue
				}
			}
			run() // warm-up
			samples[c.name][r] = run()
			if closer != nil {
				closer.Close()
			}
		}
	}
	return samples
}

// report prints each config's median and spread, what it adds to "none",
// and that addition as a multiple of its floor's, round by round.
func report(w io.Writer, cfgs []config, samples map[string][]float64, unit string) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "config\tmedian %s\tmin..max\tadded vs none\tslowdown\tadded vs floor's\t\n", unit)
	base := median(samples["none"])
	for _, c := range cfgs {
		s := samples[c.name]
		if countValid(s) == 0 {
			fmt.Fprintf(tw, "%s\tunavailable\t\t\t\t\t\n", c.name)
			continue
		}
		m := median(s)
		ratio := ""
		if c.floor != "" {
			r := roundRatios(s, samples[c.floor], samples["none"])
			if countValid(r) > 0 {
				ratio = fmt.Sprintf("%.2fx [%.2f..%.2f]", median(r), minOf(r), maxOf(r))
			}
		}
		fmt.Fprintf(tw, "%s\t%.1f\t%.1f..%.1f\t%+.1f\t%+.1f%%\t%s\t\n", c.name, m, minOf(s), maxOf(s), m-base, 100*(m-base)/base, ratio)
	}
	tw.Flush()
}

// roundRatios is, round by round, (x-base)/(y-base): what x adds as a
// multiple of what y adds, each round's figures having been measured next
// to each other.
func roundRatios(x, y, base []float64) []float64 {
	out := make([]float64, len(x))
	for i := range x {
		out[i] = math.NaN()
		if i < len(y) && i < len(base) && y[i]-base[i] > 0 {
			out[i] = (x[i] - base[i]) / (y[i] - base[i])
		}
	}
	return out
}

// roundSlowdowns is, round by round, x/base - 1.
func roundSlowdowns(x, base []float64) []float64 {
	out := make([]float64, len(x))
	for i := range x {
		out[i] = x[i]/base[i] - 1
	}
	return out
}

// roundAdded is, round by round, x - base.
func roundAdded(x, base []float64) []float64 {
	out := make([]float64, len(x))
	for i := range x {
		out[i] = x[i] - base[i]
	}
	return out
}

func valid(s []float64) []float64 {
	out := make([]float64, 0, len(s))
	for _, v := range s {
		if !math.IsNaN(v) && !math.IsInf(v, 0) {
			out = append(out, v)
		}
	}
	return out
}

func countValid(s []float64) int { return len(valid(s)) }

// median of the valid samples (NaN if none): the upper median for an even
// count, as before.
func median(s []float64) float64 {
	s = valid(s)
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	return s[len(s)/2]
}

func minOf(s []float64) float64 {
	s = valid(s)
	if len(s) == 0 {
		return math.NaN()
	}
	return slices.Min(s)
}

func maxOf(s []float64) float64 {
	s = valid(s)
	if len(s) == 0 {
		return math.NaN()
	}
	return slices.Max(s)
}

// blocks is how many parts a timed loop is split into; the loop reports
// the mean of its fastest part. On a shared machine noise only ever adds
// time (another guest, an interrupt, a migration), so the least disturbed
// part estimates the cost itself best (Chen and Revels, "Robust
// benchmarking in noisy environments", 2016). Every configuration, the
// alternatives included, is measured the same way.
const blocks = 10

// getpidLoop returns the cost of one getpid in ns: the mean over the
// fastest of blocks parts of n calls. RawSyscall keeps the Go scheduler
// out of the loop.
func getpidLoop(n int) float64 {
	per := max(n/blocks, 1)
	best := math.Inf(1)
	for range blocks {
		start := time.Now()
		for range per {
			unix.RawSyscall(unix.SYS_GETPID, 0, 0, 0)
		}
		best = min(best, float64(time.Since(start).Nanoseconds())/float64(per))
	}
	return best
}
