package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"time"
)

// percentile is the nearest-rank p-th percentile of s.
func percentile(s []int64, p float64) float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	s = slices.Clone(s)
	slices.Sort(s)
	i := int(math.Ceil(p/100*float64(len(s)))) - 1
	return float64(s[max(0, min(i, len(s)-1))])
}

func median(s []float64) float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	s = slices.Clone(s)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// pairedRatio is the median over rounds of cfg's round median divided by
// direct's in the same round: the ratio least disturbed by drift.
func (r *nResult) pairedRatio(cfg string) float64 { return r.pairedRatioTo(cfg, cfgDirect) }

func (r *nResult) pairedRatioTo(cfg, base string) float64 {
	a, b := r.rounds[cfg], r.rounds[base]
	var q []float64
	for i := range min(len(a), len(b)) {
		q = append(q, a[i]/b[i])
	}
	return median(q)
}

func us(ns float64) string {
	if math.IsNaN(ns) {
		return "–"
	}
	return fmt.Sprintf("%.1f", ns/1e3)
}

func dur(d time.Duration, ok bool) string {
	switch {
	case !ok:
		return "–"
	case d < time.Millisecond:
		return fmt.Sprintf("%.0f µs", float64(d)/1e3)
	case d < time.Second:
		return fmt.Sprintf("%.1f ms", float64(d)/1e6)
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

// printN prints one number of services as soon as it is measured, so
// that a long run shows progress.
func printN(r *nResult, cfgs []string) {
	fmt.Fprintf(os.Stderr, "N=%d:", r.n)
	for _, cfg := range cfgs {
		if s := r.lat[cfg]; len(s) > 0 {
			fmt.Fprintf(os.Stderr, "  %s p50 %s µs p99 %s µs;", cfg, us(percentile(s, 50)), us(percentile(s, 99)))
		}
	}
	fmt.Fprintln(os.Stderr)
}

// report prints the results as Markdown tables, ready for
// BENCHMARKS-lb.md.
func report(w io.Writer, results []*nResult, cfgs []string, notes []string, took time.Duration) {
	fmt.Fprintf(w, "### TCP connect+close latency to the last service (µs)\n\n")
	fmt.Fprintf(w, "| services | config | p50 | p99 | p50 / direct (pooled) | p50 / direct (paired rounds) | p99 / direct | errors |\n")
	fmt.Fprintf(w, "|---:|---|---:|---:|---:|---:|---:|---|\n")
	for _, r := range results {
		d50, d99 := percentile(r.lat[cfgDirect], 50), percentile(r.lat[cfgDirect], 99)
		for _, cfg := range cfgs {
			s := r.lat[cfg]
			if len(s) == 0 {
				why := r.skipped[cfg]
				if why == "" {
					why = "no samples"
				}
				fmt.Fprintf(w, "| %d | %s | – | – | | | | not measured: %s |\n", r.n, cfg, why)
				continue
			}
			p50, p99 := percentile(s, 50), percentile(s, 99)
			ratio50, paired, ratio99 := "", "", ""
			if cfg != cfgDirect {
				ratio50 = fmt.Sprintf("%.2f", p50/d50)
				paired = fmt.Sprintf("%.2f", r.pairedRatio(cfg))
				ratio99 = fmt.Sprintf("%.2f", p99/d99)
			}
			fmt.Fprintf(w, "| %d | %s | %s | %s | %s | %s | %s | %s |\n", r.n, cfg, us(p50), us(p99), ratio50, paired, ratio99, errString(r.errors[cfg], len(s)))
		}
	}

	fmt.Fprintf(w, "\n### Time to apply N services\n\n")
	fmt.Fprintf(w, "| services |")
	var applyCols []string
	for _, cfg := range cfgs {
		if cfg != cfgDirect && cfg != cfgKtel && cfg != cfgKtel1 {
			applyCols = append(applyCols, cfg)
			fmt.Fprintf(w, " %s-restore |", cfg)
		}
	}
	fmt.Fprintf(w, " ktel lb.Load (all) | of which parsing the file | of which map writes (LastApply) |\n|---:|")
	for range len(applyCols) + 3 {
		fmt.Fprintf(w, "---:|")
	}
	fmt.Fprintln(w)
	for _, r := range results {
		fmt.Fprintf(w, "| %d |", r.n)
		for _, cfg := range applyCols {
			d, ok := r.apply[cfg]
			cell := dur(d, ok)
			if !ok && r.skipped[cfg] != "" {
				cell = "not done (see notes)"
			}
			fmt.Fprintf(w, " %s |", cell)
		}
		l, okl := r.apply["ktel load"]
		pa, okp := r.apply["ktel parse"]
		m, okm := r.apply["ktel maps"]
		fmt.Fprintf(w, " %s | %s | %s |\n", dur(l, okl), dur(pa, okp), dur(m, okm))
	}

	fmt.Fprintf(w, "\n### Summary\n\n")
	byN := map[int]*nResult{}
	for _, r := range results {
		byN[r.n] = r
	}
	if r := byN[10000]; r != nil && len(r.lat[cfgKtel]) > 0 {
		fmt.Fprintf(w, "- ktel / direct at 10,000 services: p50 %.3f (paired rounds %.3f), p99 %.3f\n",
			percentile(r.lat[cfgKtel], 50)/percentile(r.lat[cfgDirect], 50), r.pairedRatio(cfgKtel),
			percentile(r.lat[cfgKtel], 99)/percentile(r.lat[cfgDirect], 99))
	}
	for _, r := range results {
		if len(r.lat[cfgKtel]) > 0 && len(r.lat[cfgKtel1]) > 0 {
			fmt.Fprintf(w, "- ktel lb at N=%d / ktel lb with 1 service, side by side: p50 %.3f (paired rounds %.3f), p99 %.3f\n", r.n,
				percentile(r.lat[cfgKtel], 50)/percentile(r.lat[cfgKtel1], 50), r.pairedRatioTo(cfgKtel, cfgKtel1),
				percentile(r.lat[cfgKtel], 99)/percentile(r.lat[cfgKtel1], 99))
		}
	}
	if len(results) > 1 {
		lo, hi := results[0], results[len(results)-1]
		if len(lo.lat[cfgKtel]) > 0 && len(hi.lat[cfgKtel]) > 0 {
			raw := percentile(hi.lat[cfgKtel], 50) / percentile(lo.lat[cfgKtel], 50)
			norm := hi.pairedRatio(cfgKtel) / lo.pairedRatio(cfgKtel)
			fmt.Fprintf(w, "- ktel p50 at %d services / at %d: %.3f raw (measured minutes apart), %.3f as ratios to direct measured alongside each\n",
				hi.n, lo.n, raw, norm)
			for _, cfg := range cfgs {
				if cfg == cfgDirect || cfg == cfgKtel || cfg == cfgKtel1 || len(lo.lat[cfg]) == 0 {
					continue
				}
				top := hi
				for i := len(results) - 1; i >= 0 && len(top.lat[cfg]) == 0; i-- {
					top = results[i]
				}
				fmt.Fprintf(w, "- %s p50 at %d services / at %d: %.2f raw, %.2f as ratios to direct\n", cfg, top.n, lo.n,
					percentile(top.lat[cfg], 50)/percentile(lo.lat[cfg], 50), top.pairedRatio(cfg)/lo.pairedRatio(cfg))
			}
		}
	}
	fmt.Fprintf(w, "- run took %v\n", took.Round(time.Second))
	for _, n := range notes {
		fmt.Fprintf(w, "- note: %s\n", n)
	}
}

func errString(m map[string]int, ok int) string {
	if len(m) == 0 {
		return "0"
	}
	var parts []string
	for k, v := range m {
		parts = append(parts, fmt.Sprintf("%s×%d", k, v))
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ") + fmt.Sprintf(" (of %d)", ok)
}

// describeMachine is one paragraph on where the figures come from.
func describeMachine(backends []string) string {
	kernel := ""
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	cpu := ""
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			if k, v, ok := strings.Cut(s.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	mem := ""
	if f, err := os.Open("/proc/meminfo"); err == nil {
		s := bufio.NewScanner(f)
		for s.Scan() {
			if strings.HasPrefix(s.Text(), "MemTotal:") {
				var kb int
				fmt.Sscan(strings.TrimPrefix(s.Text(), "MemTotal:"), &kb)
				mem = fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
			}
		}
		f.Close()
	}
	distro := ""
	if b, err := exec.Command("sh", "-c", ". /etc/os-release && echo $PRETTY_NAME").Output(); err == nil {
		distro = strings.TrimSpace(string(b))
	}
	var ipt []string
	for _, b := range backends {
		if v := iptablesVersion(b); v != "" {
			ipt = append(ipt, v)
		}
	}
	return fmt.Sprintf("machine: %s, Linux %s, %d CPUs (%s), %s RAM; %s; %s",
		distro, kernel, runtime.NumCPU(), cpu, mem, runtime.Version(), strings.Join(ipt, ", "))
}
