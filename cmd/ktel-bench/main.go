// Command ktel-bench measures what ktel's probes add to the work they
// observe, side by side in one run: configurations are interleaved round by
// round on one pinned CPU, and medians are compared, because a shared
// machine drifts more between runs than between neighbouring rounds.
// It prints figures; it never passes or fails on them.
//
// Run as root: make bench.
package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"slices"
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

func main() {
	rounds := flag.Int("rounds", 7, "interleaved rounds per configuration")
	calls := flag.Int("calls", 300000, "syscalls per measurement")
	trips := flag.Int("trips", 50000, "pipe round trips per measurement")
	cpu := flag.Int("cpu", 0, "CPU to pin the measuring threads to")
	packets := flag.Int("packets", 200000, "UDP packets per measurement (netdev)")
	only := flag.String("only", "", "run only this benchmark: syscall, runqlat or netdev")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if err := rlimit.RemoveMemlock(); err != nil {
		log.Warn("remove memlock rlimit", "err", err)
	}
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(*cpu)
	if err := unix.SchedSetaffinity(0, &set); err != nil {
		fmt.Fprintln(os.Stderr, "pin to CPU:", err)
		os.Exit(1)
	}

	if *only == "" || *only == "syscall" {
		fmt.Printf("syscall probe: getpid, %d calls x %d rounds, pinned to CPU %d\n\n", *calls, *rounds, *cpu)
		cfgs := syscallConfigs(log)
		results := measure(cfgs, *rounds, func() float64 { return getpidLoop(*calls) })
		report(os.Stdout, cfgs, results, "ns/syscall")
	}
	if *only == "" || *only == "runqlat" {
		fmt.Printf("\nrunqlat probe: pipe ping-pong between two threads on CPU %d, %d round trips x %d rounds\n\n", *cpu, *trips, *rounds)
		cfgs := runqlatConfigs(log)
		results := measure(cfgs, *rounds, func() float64 { return pingPong(*cpu, *trips) })
		report(os.Stdout, cfgs, results, "ns/round trip")
	}
	if *only == "" || *only == "netdev" {
		runNetdevBench(log, *rounds, *packets, *cpu)
	}
}

// measure runs every config once per round, rotating the order so that no
// config always follows the same neighbour, and returns the per-config
// samples.
func measure(cfgs []config, rounds int, run func() float64) map[string][]float64 {
	samples := make(map[string][]float64, len(cfgs))
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
			samples[c.name] = append(samples[c.name], run())
			if closer != nil {
				closer.Close()
			}
		}
	}
	return samples
}

// report prints each config's median, what it adds to "none", and that
// addition as a multiple of its floor's.
func report(w io.Writer, cfgs []config, samples map[string][]float64, unit string) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "config\tmedian %s\tadded vs none\tslowdown\tadded vs floor's\t\n", unit)
	base := median(samples["none"])
	for _, c := range cfgs {
		s := samples[c.name]
		if len(s) == 0 {
			fmt.Fprintf(tw, "%s\tunavailable\t\t\t\t\n", c.name)
			continue
		}
		m := median(s)
		ratio := ""
		if c.floor != "" {
			if f := median(samples[c.floor]) - base; f > 0 {
				ratio = fmt.Sprintf("%.2fx", (m-base)/f)
			}
		}
		fmt.Fprintf(tw, "%s\t%.1f\t%+.1f\t%+.1f%%\t%s\t\n", c.name, m, m-base, 100*(m-base)/base, ratio)
	}
	tw.Flush()
}

func median(s []float64) float64 {
	if len(s) == 0 {
		return 0
	}
	s = slices.Clone(s)
	slices.Sort(s)
	return s[len(s)/2]
}

// getpidLoop returns the mean cost of one getpid in ns. RawSyscall keeps
// the Go scheduler out of the loop.
func getpidLoop(n int) float64 {
	start := time.Now()
	for range n {
		unix.RawSyscall(unix.SYS_GETPID, 0, 0, 0)
	}
	return float64(time.Since(start).Nanoseconds()) / float64(n)
}
