package main

import (
	"fmt"
	"io"
	"log/slog"
	"math"
	"slices"
	"text/tabwriter"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/histogram"
)

// Durations slept in the accuracy benchmark.
var sleepDurations = []time.Duration{
	100 * time.Microsecond, 200 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond,
	10 * time.Millisecond, 20 * time.Millisecond, 50 * time.Millisecond,
}

var quantiles = []float64{0.5, 0.9, 0.99}

// runAccuracyBench loads the syscall probe once per schema (0..4, all at
// once: they see the same syscalls), sleeps each duration o.sleeps times
// with rt_sigtimedwait (see below), timing every call in user space, and compares the
// quantiles histogram_quantile would compute from each schema's buckets
// with the true ones, per duration and over the mixture of all.
//
// Interpolation: Prometheus interpolates within a native bucket
// exponentially (log-linearly: the quantile's fraction of the bucket's
// count is taken on a log scale between its bounds) since v2.51/3.x, and
// linearly before; linearly within the zero bucket and within classic
// buckets. Both are computed; "exp" is the headline.
//
// The user-space time of a call includes the syscall's entry and exit and
// the other probes' programs, which the kernel's does not: that offset is
// measured as the difference of the means (user-space mean minus the
// histogram's sum/count) and removed from the true values, so that the
// errors are those of the buckets alone.
func runAccuracyBench(w io.Writer, log *slog.Logger, sum *summary, o options) {
	fmt.Fprintf(w, "\nhistogram accuracy: sleeps (rt_sigtimedwait with a timeout) of %v, %d each, timed in user space; ktel's syscall probe loaded once per schema 0..4\n\n", sleepDurations, o.sleeps)
	var probes []*sysprobe.Probe
	for schema := histogram.MinSchema; schema <= histogram.MaxSchema; schema++ {
		p, err := sysprobe.Load(sysprobe.Options{Schema: schema}, log)
		if err != nil {
			fmt.Fprintf(w, "schema %d: %v\n", schema, err)
			for _, p := range probes {
				p.Close()
			}
			return
		}
		probes = append(probes, p)
	}
	defer func() {
		for _, p := range probes {
			p.Close()
		}
	}()
	// The probe is host-wide and clock_nanosleep is common (other
	// engineers' tests polluted every histogram), so sleep with
	// rt_sigtimedwait on a signal nobody sends: the same hrtimer sleep,
	// a syscall next to nothing else uses.
	const nr = unix.SYS_RT_SIGTIMEDWAIT
	var sigset [1]uint64
	sigset[0] = 1 << (40 - 1) // a real-time signal (SIGRTMIN+6) Go does not use

	read := func() [][]uint64 {
		out := make([][]uint64, len(probes))
		for i, p := range probes {
			s, err := p.Snapshot()
			if err != nil {
				return nil
			}
			h := s.Latency[nr]
			out[i] = append(slices.Clone(h.Slots), h.SumNs)
		}
		return out
	}

	type obs struct {
		d    time.Duration
		true []float64      // user-space ns, sorted
		hist [][]uint64     // per schema: slots..., sum
		off  []float64      // per schema: user mean - kernel mean, ns
		est  [][][2]float64 // per schema, per quantile: exp, linear
	}
	var all []obs
	polluted := 0
	for _, d := range sleepDurations {
		before := read()
		if before == nil {
			fmt.Fprintln(w, "cannot read the probes' maps")
			return
		}
		ts := unix.NsecToTimespec(d.Nanoseconds())
		vals := make([]float64, 0, o.sleeps)
		for range o.sleeps {
			t0 := time.Now()
			// Syscall, not RawSyscall: the runtime must know the thread
			// is in a syscall, or it interrupts long sleeps (EINTR) to
			// preempt it.
			unix.Syscall6(nr, uintptr(unsafe.Pointer(&sigset[0])), 0, uintptrOf(&ts), 8, 0, 0)
			vals = append(vals, float64(time.Since(t0).Nanoseconds()))
		}
		after := read()
		slices.Sort(vals)
		ob := obs{d: d, true: vals}
		for i := range probes {
			diff := make([]uint64, len(after[i]))
			for k := range diff {
				diff[k] = after[i][k]
				if len(before[i]) == len(after[i]) { // else: no clock_nanosleep before
					diff[k] -= before[i][k]
				}
			}
			ob.hist = append(ob.hist, diff)
			slots := diff[:len(diff)-1]
			var n uint64
			for _, c := range slots {
				n += c
			}
			if n != uint64(o.sleeps) {
				polluted++
			}
			ob.off = append(ob.off, mean(vals)-float64(diff[len(diff)-1])/float64(max(n, 1)))
		}
		all = append(all, ob)
	}
	if polluted > 0 {
		fmt.Fprintf(w, "note: %d of %d histograms counted other processes' rt_sigtimedwait too (the probe is host-wide)\n\n", polluted, len(all)*len(probes))
	}

	// Relative error per schema and quantile: the worst over durations,
	// and that of the mixture of all durations.
	worst := make([][]float64, len(probes))
	mixErr := make([][]float64, len(probes))
	classicMix := make([]float64, len(quantiles))
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "duration\tschema\toffset ns\t")
	for _, q := range quantiles {
		fmt.Fprintf(tw, "p%g true µs\tp%g est µs\terr exp\terr lin\t", 100*q, 100*q)
	}
	fmt.Fprintln(tw)
	for s, p := range probes {
		worst[s] = make([]float64, len(quantiles))
		mixErr[s] = make([]float64, len(quantiles))
		layout := p.Layout()
		var mixSlots []uint64
		var mixTrue []float64
		for _, ob := range all {
			slots := ob.hist[s][:len(ob.hist[s])-1]
			corrected := shift(ob.true, -ob.off[s])
			mixTrue = append(mixTrue, corrected...)
			if mixSlots == nil {
				mixSlots = make([]uint64, len(slots))
			}
			for k, c := range slots {
				mixSlots[k] += c
			}
			fmt.Fprintf(tw, "%s\t%d\t%.0f\t", ob.d, layout.Schema, ob.off[s])
			for qi, q := range quantiles {
				tq := trueQuantile(corrected, q)
				e := nativeQuantile(layout, slots, q, true) * 1e9
				l := nativeQuantile(layout, slots, q, false) * 1e9
				re, rl := e/tq-1, l/tq-1
				worst[s][qi] = max(worst[s][qi], math.Abs(re))
				fmt.Fprintf(tw, "%.1f\t%.1f\t%+.2f%%\t%+.2f%%\t", tq/1e3, e/1e3, 100*re, 100*rl)
			}
			fmt.Fprintln(tw)
		}
		slices.Sort(mixTrue)
		for qi, q := range quantiles {
			tq := trueQuantile(mixTrue, q)
			mixErr[s][qi] = nativeQuantile(layout, mixSlots, q, true)*1e9/tq - 1
			if s == 0 {
				classicMix[qi] = classicQuantile(layout, mixSlots, q)*1e9/tq - 1
			}
		}
	}
	tw.Flush()

	fmt.Fprintf(w, "\nrelative error of histogram_quantile (native, exponential interpolation): worst over the durations | over the mixture of all durations\n\n")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "schema\tbucket width\t")
	for _, q := range quantiles {
		fmt.Fprintf(tw, "p%g worst\tp%g mixture\t", 100*q, 100*q)
	}
	fmt.Fprintln(tw)
	for s, p := range probes {
		sc := p.Layout().Schema
		fmt.Fprintf(tw, "%d\t%.1f%%\t", sc, 100*(math.Exp2(1/math.Exp2(float64(sc)))-1))
		for qi := range quantiles {
			fmt.Fprintf(tw, "%.2f%%\t%+.2f%%\t", 100*worst[s][qi], 100*mixErr[s][qi])
		}
		fmt.Fprintln(tw)
	}
	fmt.Fprintf(tw, "classic (text scrapes, linear)\t100%%\t")
	for qi := range quantiles {
		fmt.Fprintf(tw, "\t%+.2f%%\t", 100*classicMix[qi])
	}
	fmt.Fprintln(tw)
	tw.Flush()

	// The goal is judged on the workload, sleeps of a fixed set of
	// durations (the mixture). Each duration alone is a point distribution,
	// the worst case of a histogram: its error reaches the bucket width
	// wherever the point falls in its bucket; reported without a goal.
	for s, p := range probes {
		sc := p.Layout().Schema
		var mix, point []float64
		for qi := range quantiles {
			mix = append(mix, 100*math.Abs(mixErr[s][qi]))
			point = append(point, 100*worst[s][qi])
		}
		goal, within := "", (func(float64) bool)(nil)
		if sc == 3 {
			goal, within = "<= 5%", atMost(5)
		}
		sum.add("accuracy", fmt.Sprintf("|rel. error| p50/p90/p99, fixed set of durations, schema %d", sc), []float64{slices.Max(mix)}, "%", goal, within,
			fmt.Sprintf("p50 %.2f%%, p90 %.2f%%, p99 %.2f%%", mix[0], mix[1], mix[2]))
		sum.add("accuracy", fmt.Sprintf("worst |rel. error|, each duration alone, schema %d", sc), []float64{slices.Max(point)}, "%", "", nil,
			fmt.Sprintf("p50 %.2f%%, p90 %.2f%%, p99 %.2f%%; point distributions", point[0], point[1], point[2]))
	}
}

func uintptrOf(ts *unix.Timespec) uintptr { return uintptr(unsafe.Pointer(ts)) }

func mean(v []float64) float64 {
	var s float64
	for _, x := range v {
		s += x
	}
	return s / float64(len(v))
}

func shift(v []float64, by float64) []float64 {
	out := make([]float64, len(v))
	for i, x := range v {
		out[i] = x + by
	}
	return out
}

// trueQuantile is the value of rank ceil(q*n) in sorted v: the smallest
// value with at least a fraction q of the values at or below it.
func trueQuantile(sorted []float64, q float64) float64 {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

// nativeQuantile is what Prometheus' histogram_quantile returns, in
// seconds, for the native histogram of these kernel slots: the bucket
// where the cumulative count reaches q*count, interpolated exponentially
// (exp) or linearly within it; linearly from 0 in the zero bucket.
func nativeQuantile(l *histogram.Layout, slots []uint64, q float64, exp bool) float64 {
	var total uint64
	for _, c := range slots {
		total += c
	}
	if total == 0 {
		return math.NaN()
	}
	rank := q * float64(total)
	var cum float64
	per := math.Exp2(float64(l.Schema))
	for k, c := range slots {
		if c == 0 {
			continue
		}
		cum += float64(c)
		if cum < rank {
			continue
		}
		fraction := (rank - (cum - float64(c))) / float64(c)
		if k == 0 { // the zero bucket: [0, threshold]
			return l.ZeroThreshold() * fraction
		}
		i := float64(l.FirstIndex() + k)
		lower, upper := math.Exp2((i-1)/per), math.Exp2(i/per)
		if exp {
			return math.Exp2(math.Log2(lower) + (math.Log2(upper)-math.Log2(lower))*fraction)
		}
		return lower + (upper-lower)*fraction
	}
	return math.NaN()
}

// classicQuantile is histogram_quantile over the classic power-of-two
// buckets ktel derives for text scrapes (linear interpolation, lower
// bound 0 for the first bucket, the highest finite bound for +Inf).
func classicQuantile(l *histogram.Layout, slots []uint64, q float64) float64 {
	cb := l.Classic(slots)
	bounds := histogram.ClassicBounds()
	var total uint64
	for _, c := range slots {
		total += c
	}
	rank := q * float64(total)
	prevB, prevC := 0.0, 0.0
	for i, b := range bounds {
		c := float64(cb[i])
		if c >= rank {
			if c == prevC {
				return b
			}
			return prevB + (b-prevB)*(rank-prevC)/(c-prevC)
		}
		prevB, prevC = b, c
	}
	return bounds[len(bounds)-1]
}
