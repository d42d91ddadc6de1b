package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/ktel-dev/ktel/bpf/floor"
	"github.com/ktel-dev/ktel/bpf/syscall"
	ktelconfig "github.com/ktel-dev/ktel/internal/config"
	"github.com/ktel-dev/ktel/internal/probe"
)

// ktelSyscall names the variant ktel picks by default here (the first of
// syscall.Variants that loads), timing every syscall: the one the goals
// are about.
func ktelSyscall() string { return "syscall " + syscall.Variants[0].String() }

// ktelSyscallSampled is that variant with ktel's default timing.
func ktelSyscallSampled() string {
	return fmt.Sprintf("syscall %s sample 1/%d", syscall.Variants[0].String(), defaultSampleRate())
}

// defaultSampleRate is KTEL_SYSCALL_SAMPLE_RATE's default.
func defaultSampleRate() uint32 {
	for _, f := range ktelconfig.Fields() {
		if f.Var == "KTEL_SYSCALL_SAMPLE_RATE" {
			if n, err := strconv.ParseUint(f.Default, 10, 32); err == nil {
				return uint32(n)
			}
		}
	}
	panic("no default for KTEL_SYSCALL_SAMPLE_RATE")
}

// perContainer names a configuration with KTEL_SYSCALL_PER_CONTAINER.
func perContainer(name string) string { return name + " per-container" }

// sampledSyscallOptions are ktel's default syscall probe options.
func sampledSyscallOptions() syscall.Options {
	return syscall.Options{Schema: 3, Timing: syscall.TimeSample, SampleRate: defaultSampleRate()}
}

// runSyscallBench measures a pinned getpid loop under each configuration,
// then the kernel run time of the programs themselves.
func runSyscallBench(w io.Writer, log *slog.Logger, sum *summary, o options, bt string) {
	fmt.Fprintf(w, "syscall probe: getpid, %d calls x %d rounds, pinned to CPU %d; each round reports its fastest %d-call part\n\n", o.calls, o.rounds, o.cpu, max(o.calls/blocks, 1))
	cfgs := syscallConfigs(log)
	if bt != "" {
		cfgs = append(cfgs,
			config{name: "bpftrace empty", setup: bpftraceSetup(bt, bpftraceSyscallEmpty, o.cpu)},
			config{name: "bpftrace", floor: "bpftrace empty", setup: bpftraceSetup(bt, bpftraceSyscall, o.cpu)})
	}
	loop := func() float64 { return getpidLoop(o.calls) }
	s := measure(cfgs, o.rounds, loop)
	report(w, cfgs, s, "ns/syscall")

	k := ktelSyscall()
	sum.add("syscall", "added ns/syscall, ktel ("+syscall.Variants[0].String()+")", roundAdded(s[k], s["none"]), "ns", "", nil, "")
	sum.add("syscall", "added ns/syscall, empty enter+exit (floor)", roundAdded(s["floor tp_btf"], s["none"]), "ns", "", nil, "")
	sum.add("syscall", "ktel / floor (added)", roundRatios(s[k], s["floor tp_btf"], s["none"]), "x", "<= 1.5x", atMost(1.5), "")
	sum.add("syscall", "ktel / floor that reads the clock twice (added)", roundRatios(s[k], s["floor tp_btf+clock"], s["none"]), "x", "", nil,
		"the least any latency probe does")
	sum.add("syscall", "ktel's own work beyond the two clock reads, timing all", roundAdded(s[k], s["floor tp_btf+clock"]), "ns", "<= 20 ns", atMost(20),
		"ktel minus the floor that reads the clock twice, round by round")
	ks := ktelSyscallSampled()
	sum.add("syscall", "added ns/syscall, ktel default ("+strings.TrimPrefix(ks, "syscall ")+")", roundAdded(s[ks], s["none"]), "ns", "", nil, "exact counts, 1 in N timed")
	sum.add("syscall", "ktel default beyond the empty floor", roundAdded(s[ks], s["floor tp_btf"]), "ns", "", nil, "")
	sum.add("syscall", "per-container histograms, default timing, beyond the default", roundAdded(s[perContainer(ks)], s[ks]), "ns", "", nil,
		"KTEL_SYSCALL_PER_CONTAINER: a cgroup-keyed hash per timed syscall")
	sum.add("syscall", "per-container histograms, timing all, beyond timing all", roundAdded(s[perContainer(k)], s[k]), "ns", "", nil,
		"what keying every syscall by cgroup costs (an exact per-container count would pay about this)")
	if bt != "" {
		sum.add("syscall", "added ns/syscall, bpftrace", roundAdded(s["bpftrace"], s["none"]), "ns", "", nil, "")
		sum.add("syscall", "ktel / bpftrace (added)", roundRatios(s[k], s["bpftrace"], s["none"]), "x", "<= 0.35", atMost(0.35), "")
	}

	fmt.Fprintf(w, "\nkernel run time of the programs (BPF statistics, %d getpid per config; includes the statistics' own two clock reads per run):\n\n", o.calls)
	var rt []config // the floors, ktel's preferred variant, bpftrace
	for _, c := range cfgs {
		if strings.HasPrefix(c.name, "floor ") || strings.HasPrefix(c.name, k) || strings.HasPrefix(c.name, ktelSyscallSampled()) || c.name == "bpftrace" {
			rt = append(rt, c)
		}
	}
	totals := reportRuntime(w, rt, func() { loop() })
	perCall := func(name string) float64 { return totals[name] / float64(o.calls) }
	if f := perCall("floor tp_btf"); f > 0 && perCall(k) > 0 {
		fmt.Fprintf(w, "\nin-program time per syscall: ktel %.1f ns (all its programs), ktel default timing %.1f ns, floor %.1f ns, floor reading the clock twice %.1f ns",
			perCall(k), perCall(ktelSyscallSampled()), f, perCall("floor tp_btf+clock"))
		fmt.Fprintf(w, ", per-container: default timing %.1f ns, timing all %.1f ns",
			perCall(perContainer(ktelSyscallSampled())), perCall(perContainer(k)))
		if b := perCall("bpftrace"); b > 0 {
			fmt.Fprintf(w, ", bpftrace %.1f ns", b)
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "clock read (Go time.Now, same clocksource as bpf_ktime_get_ns): %.1f ns\n", clockCost())
}

// clockCost is the mean cost of time.Now, for scale: the probe reads the
// clock twice per syscall.
func clockCost() float64 {
	const n = 1000000
	start := time.Now()
	for range n {
		_ = time.Now()
	}
	return float64(time.Since(start).Nanoseconds()) / n
}

// syscallConfigs: no probe, the empty-program floors, and every variant of
// the syscall probe, each compared with the floor of its hook.
func syscallConfigs(log *slog.Logger) []config {
	cfgs := []config{
		{name: "none"},
		{name: "floor tp_btf", setup: floorSetup(floorBTF)},
		{name: "floor raw_tp", setup: floorSetup(floorRaw)},
		{name: "floor tp_btf+clock", setup: floorSetup(floorClock)},
	}
	for _, v := range syscall.Variants {
		if v.Hook == probe.HookTracepoint {
			continue // needs tracefs; a fallback, not a candidate
		}
		f := "floor raw_tp"
		if v.Hook == probe.HookBTF {
			f = "floor tp_btf"
		}
		cfgs = append(cfgs, config{
			name:  "syscall " + v.String(),
			floor: f,
			setup: func() (io.Closer, error) {
				return syscall.Load(syscall.Options{Schema: 3, Variant: &v}, log)
			},
		})
	}
	v := syscall.Variants[0]
	return append(cfgs, config{
		name:  ktelSyscallSampled(),
		floor: "floor tp_btf",
		setup: func() (io.Closer, error) {
			o := sampledSyscallOptions()
			o.Variant = &v
			return syscall.Load(o, log)
		},
	}, config{
		name:  perContainer(ktelSyscallSampled()),
		floor: "floor tp_btf",
		setup: func() (io.Closer, error) {
			o := sampledSyscallOptions()
			o.Variant, o.PerCgroup = &v, true
			return syscall.Load(o, log)
		},
	}, config{
		name:  perContainer(ktelSyscall()),
		floor: "floor tp_btf",
		setup: func() (io.Closer, error) {
			return syscall.Load(syscall.Options{Schema: 3, Variant: &v, PerCgroup: true}, log)
		},
	})
}

type closers []io.Closer

func (cs closers) Close() error {
	var errs []error
	for _, c := range cs {
		errs = append(errs, c.Close())
	}
	return errors.Join(errs...)
}

// Floors of the syscall probe.
type floorKind int

const (
	floorRaw   floorKind = iota // empty raw_tp programs
	floorBTF                    // empty tp_btf programs
	floorClock                  // tp_btf programs that only read the clock
)

func floorSetup(kind floorKind) setup {
	return func() (io.Closer, error) {
		var objs floor.FloorObjects
		if err := floor.LoadFloorObjects(&objs, nil); err != nil {
			return nil, fmt.Errorf("load floor: %w", err)
		}
		v := probe.Variant{Hook: probe.HookBTF, Programs: []probe.Program{
			{Name: "enter", Tracepoint: "sys_enter"}, {Name: "exit", Tracepoint: "sys_exit"}}}
		var progs map[string]*ebpf.Program
		switch kind {
		case floorRaw:
			v.Hook = probe.HookRaw
			progs = map[string]*ebpf.Program{"enter": objs.FloorEnterRaw, "exit": objs.FloorExitRaw}
		case floorBTF:
			progs = map[string]*ebpf.Program{"enter": objs.FloorEnterBtf, "exit": objs.FloorExitBtf}
		case floorClock:
			progs = map[string]*ebpf.Program{"enter": objs.FloorEnterClock, "exit": objs.FloorExitClock}
		}
		return attachFloor(&objs, v, progs)
	}
}

// schedFloorSetup attaches empty tp_btf programs to the scheduler
// tracepoints runqlat uses.
func schedFloorSetup() (io.Closer, error) {
	var objs floor.FloorObjects
	if err := floor.LoadFloorObjects(&objs, nil); err != nil {
		return nil, fmt.Errorf("load floor: %w", err)
	}
	v := probe.Variant{Hook: probe.HookBTF, Programs: []probe.Program{
		{Name: "wakeup"}, {Name: "wakeup_new"}, {Name: "switch"}}}
	return attachFloor(&objs, v, map[string]*ebpf.Program{
		"wakeup": objs.FloorWakeupBtf, "wakeup_new": objs.FloorWakeupNewBtf, "switch": objs.FloorSwitchBtf})
}

func attachFloor(objs *floor.FloorObjects, v probe.Variant, progs map[string]*ebpf.Program) (io.Closer, error) {
	links, err := v.Attach(progs)
	if err != nil {
		objs.Close()
		return nil, err
	}
	cs := closers{}
	for _, l := range links {
		cs = append(cs, l)
	}
	return append(cs, objs), nil
}
