package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"strings"
	"text/tabwriter"

	"golang.org/x/sys/unix"
)

// row is one figure of the summary: a median over rounds with its spread,
// and the goal it is read against. The verdict is a reading, never an exit
// status.
type row struct {
	area, figure string
	med, lo, hi  float64
	unit         string
	goal         string
	// within reports whether the median meets the goal; nil when there is
	// no goal.
	within func(float64) bool
	note   string
}

type summary struct{ rows []row }

// add records a figure from per-round values.
func (s *summary) add(area, figure string, vals []float64, unit, goal string, within func(float64) bool, note string) {
	s.rows = append(s.rows, row{area: area, figure: figure, med: median(vals), lo: minOf(vals), hi: maxOf(vals),
		unit: unit, goal: goal, within: within, note: note})
}

func atMost(g float64) func(float64) bool { return func(v float64) bool { return v <= g } }

func (r row) value() string {
	if math.IsNaN(r.med) {
		return "unavailable"
	}
	f := func(v float64) string {
		switch a := math.Abs(v); {
		case a >= 100:
			return fmt.Sprintf("%.0f", v)
		case a >= 10:
			return fmt.Sprintf("%.1f", v)
		default:
			return fmt.Sprintf("%.2f", v)
		}
	}
	if r.lo == r.hi {
		return f(r.med) + " " + r.unit
	}
	return fmt.Sprintf("%s %s [%s..%s]", f(r.med), r.unit, f(r.lo), f(r.hi))
}

func (r row) verdict() string {
	switch {
	case r.within == nil || math.IsNaN(r.med):
		return ""
	case r.within(r.med):
		return "within"
	default:
		return "MISSED"
	}
}

func (s *summary) text(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "area\tfigure\tmedian [min..max]\tgoal\t\tnote")
	for _, r := range s.rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.area, r.figure, r.value(), r.goal, r.verdict(), r.note)
	}
	tw.Flush()
}

func (s *summary) markdown(w io.Writer) {
	fmt.Fprintln(w, "| Area | Figure | Median [min..max] | Goal | | Note |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	for _, r := range s.rows {
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", r.area, r.figure, r.value(), r.goal, r.verdict(), r.note)
	}
}

// machine describes where the figures were taken.
func machine() string {
	var u unix.Utsname
	unix.Uname(&u)
	model := "unknown CPU"
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int
		fmt.Sscanf(strings.SplitN(string(b), "\n", 2)[0], "MemTotal: %d kB", &kb)
		mem = fmt.Sprintf(", %.1f GiB RAM", float64(kb)/(1<<20))
	}
	clock, _ := os.ReadFile("/sys/devices/system/clocksource/clocksource0/current_clocksource")
	virt := ""
	if b, err := os.ReadFile("/sys/class/dmi/id/product_name"); err == nil {
		virt = ", " + strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("machine: Linux %s (%s), %d CPUs (%s)%s%s, clocksource %s, %s\ncommand: %s",
		unix.ByteSliceToString(u.Release[:]), unix.ByteSliceToString(u.Machine[:]), runtime.NumCPU(), model, mem, virt,
		strings.TrimSpace(string(clock)), runtime.Version(), strings.Join(append([]string{"ktel-bench"}, os.Args[1:]...), " "))
}

func writeMarkdown(path string, s *summary, full string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	head, _, _ := strings.Cut(full, "\n\n")
	fmt.Fprintf(f, "```\n%s\n```\n\n", head)
	s.markdown(f)
	fmt.Fprintf(f, "\n<details><summary>Full output</summary>\n\n```\n%s```\n\n</details>\n", full)
	return f.Close()
}
