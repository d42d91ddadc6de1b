package main

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// progCost is one program's kernel run time per run (kernel BPF
// statistics, run_time_ns / run_cnt) and its size.
type progCost struct {
	config, name  string
	runs          uint64
	nsPerRun      float64
	verified, jit uint32
}

// programIDs lists the IDs of every BPF program on the host.
func programIDs() map[ebpf.ProgramID]bool {
	ids := map[ebpf.ProgramID]bool{}
	var id ebpf.ProgramID
	for {
		next, err := ebpf.ProgramGetNextID(id)
		if err != nil {
			return ids
		}
		ids[next], id = true, next
	}
}

// runtimeOf sets c up with kernel BPF statistics on, runs work, and
// returns the run time per run of the programs c loaded: those that
// appeared with its setup whatever loaded them (ktel or bpftrace). A
// program another engineer loads at that moment would show up too; its
// name tells it apart.
func runtimeOf(c config, work func()) ([]progCost, error) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		return nil, fmt.Errorf("enable BPF stats: %w", err)
	}
	defer stats.Close()
	before := programIDs()
	closer, err := c.setup()
	if err != nil {
		return nil, err
	}
	defer closer.Close()
	var progs []*ebpf.Program
	for id := range programIDs() {
		if before[id] {
			continue
		}
		p, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue
		}
		defer p.Close()
		if info, err := p.Info(); err == nil && (info.Type == ebpf.Tracing || info.Type == ebpf.RawTracepoint || info.Type == ebpf.TracePoint) {
			progs = append(progs, p)
		}
	}
	if len(progs) == 0 {
		return nil, errors.New("no new tracing programs found")
	}
	start := map[*ebpf.Program]ebpf.ProgramStats{}
	for _, p := range progs {
		if st, err := p.Stats(); err == nil {
			start[p] = *st
		}
	}
	work()
	var out []progCost
	for _, p := range progs {
		st, err := p.Stats()
		if err != nil {
			continue
		}
		info, _ := p.Info()
		pc := progCost{config: c.name, name: info.Name, runs: st.RunCount - start[p].RunCount}
		if pc.runs > 0 {
			pc.nsPerRun = float64((st.Runtime - start[p].Runtime).Nanoseconds()) / float64(pc.runs)
		}
		pc.verified, _ = info.VerifiedInstructions()
		pc.jit, _ = info.JitedSize()
		out = append(out, pc)
	}
	slices.SortFunc(out, func(a, b progCost) int {
		if a.name < b.name {
			return -1
		}
		if a.name > b.name {
			return 1
		}
		return 0
	})
	return out, nil
}

// reportRuntime prints, for each config, its programs' kernel run time
// per run, and returns per config the run time of all its programs in ns
// during work: divided by work's events, what one event costs inside the
// programs, however often each program ran.
func reportRuntime(w io.Writer, cfgs []config, work func()) map[string]float64 {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "config\tprogram\truns\tns/run\tverified insns\tJITed bytes\t\n")
	sums := map[string]float64{}
	for _, c := range cfgs {
		if c.setup == nil {
			continue
		}
		costs, err := runtimeOf(c, work)
		if err != nil {
			fmt.Fprintf(tw, "%s\t%v\t\t\t\t\t\n", c.name, err)
			continue
		}
		for _, pc := range costs {
			if pc.runs == 0 {
				continue // loaded beside the config's programs, not attached
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%.1f\t%d\t%d\t\n", c.name, pc.name, pc.runs, pc.nsPerRun, pc.verified, pc.jit)
			sums[c.name] += pc.nsPerRun * float64(pc.runs)
		}
	}
	tw.Flush()
	return sums
}
