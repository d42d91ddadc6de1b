package main

import (
	"fmt"
	"io"
	"log/slog"
	"math"
	"runtime"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	"github.com/ktel-dev/ktel/internal/probe"
)

// runRunqlatBench measures pipe ping-pong on one CPU under each
// configuration, then the kernel run time of the programs.
func runRunqlatBench(w io.Writer, log *slog.Logger, sum *summary, o options, bt string) {
	fmt.Fprintf(w, "\nrunqlat probe: pipe ping-pong between two threads on CPU %d, %d round trips x %d rounds; each round reports its fastest %d-trip part\n\n", o.cpu, o.trips, o.rounds, max(o.trips/blocks, 1))
	cfgs := runqlatConfigs(log)
	if bt != "" {
		cfgs = append(cfgs, config{name: "bpftrace runqlat", setup: bpftraceSetup(bt, bpftraceRunqlat, o.cpu)})
	}
	pp := func() float64 { return pingPong(o.cpu, o.trips) }
	s := measure(cfgs, o.rounds, pp)
	report(w, cfgs, s, "ns/round trip")

	k := "runqlat " + runqlat.Variants[0].String()
	sum.add("runqlat", "slowdown per ping-pong, ktel ("+runqlat.Variants[0].String()+")", pct(roundSlowdowns(s[k], s["none"])), "%", "<= 10%", atMost(10), "")
	sum.add("runqlat", "slowdown per ping-pong, empty programs (floor)", pct(roundSlowdowns(s["floor tp_btf"], s["none"])), "%", "", nil, "")
	if bt != "" {
		sum.add("runqlat", "slowdown per ping-pong, bpftrace runqlat", pct(roundSlowdowns(s["bpftrace runqlat"], s["none"])), "%", "", nil, "")
		sum.add("runqlat", "ktel / bpftrace (added)", roundRatios(s[k], s["bpftrace runqlat"], s["none"]), "x", "", nil, "")
	}

	fmt.Fprintf(w, "\nkernel run time of the programs (BPF statistics, %d round trips per config):\n\n", o.trips)
	var rt []config
	for _, c := range cfgs {
		if c.name == "floor tp_btf" || c.name == k || c.name == "bpftrace runqlat" {
			rt = append(rt, c)
		}
	}
	reportRuntime(w, rt, func() { pp() })
}

func pct(s []float64) []float64 {
	out := make([]float64, len(s))
	for i, v := range s {
		out[i] = 100 * v
	}
	return out
}

// runqlatConfigs: no probe, and every BTF/raw variant of runqlat.
func runqlatConfigs(log *slog.Logger) []config {
	cfgs := []config{{name: "none"}, {name: "floor tp_btf", setup: schedFloorSetup}}
	for _, v := range runqlat.Variants {
		if v.Hook == probe.HookTracepoint {
			continue // needs tracefs; a fallback, not a candidate
		}
		cfgs = append(cfgs, config{
			name:  "runqlat " + v.String(),
			floor: "floor tp_btf",
			setup: func() (io.Closer, error) {
				return runqlat.Load(runqlat.Options{Schema: 3, Variant: &v}, log)
			},
		})
	}
	return cfgs
}

// pingPong passes one byte back and forth n times between two threads
// pinned to cpu through two pipes, so that every hop is a wakeup and a
// context switch on that CPU, and returns the ns per round trip: the mean
// over the fastest of blocks parts of the run.
func pingPong(cpu, n int) float64 {
	var ab, ba [2]int
	if err := unix.Pipe(ab[:]); err != nil {
		panic(err)
	}
	if err := unix.Pipe(ba[:]); err != nil {
		panic(err)
	}
	defer func() {
		for _, fd := range []int{ab[0], ab[1], ba[0], ba[1]} {
			unix.Close(fd)
		}
	}()
	pinThread := func() {
		// Never unlocked: Go discards the pinned thread afterwards.
		runtime.LockOSThread()
		var set unix.CPUSet
		set.Set(cpu)
		unix.SchedSetaffinity(0, &set)
	}
	per := max(n/blocks, 1)
	var wg sync.WaitGroup
	ready := make(chan struct{})
	wg.Go(func() {
		pinThread()
		close(ready)
		b := make([]byte, 1)
		for range per * blocks {
			unix.Read(ab[0], b)
			unix.Write(ba[1], b)
		}
	})
	best := math.Inf(1)
	wg.Go(func() {
		pinThread()
		<-ready
		b := make([]byte, 1)
		for range blocks {
			start := time.Now()
			for range per {
				unix.Write(ab[1], b)
				unix.Read(ba[0], b)
			}
			best = min(best, float64(time.Since(start).Nanoseconds())/float64(per))
		}
	})
	wg.Wait()
	return best
}
