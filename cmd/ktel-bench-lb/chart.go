package main

import (
	"fmt"
	"html"
	"math"
	"os"
	"strings"
)

// The chart is plain SVG written here rather than with gonum/plot: three
// log-log panels need little code, and the module gains no dependency.

type point struct{ x, y float64 }

type series struct {
	name   string
	color  string
	dashed bool
	pts    []point
}

var colors = map[string]string{
	cfgDirect:    "#555555",
	cfgKtel:      "#1f77b4",
	cfgNft:       "#d62728",
	cfgLegacy:    "#ff7f0e",
	"ktel load":  "#1f77b4",
	"ktel maps":  "#17becf",
	"ktel parse": "#9467bd",
}

func writeChart(path string, results []*nResult, cfgs []string, machine string) error {
	latency := func(p float64) []series {
		var out []series
		for _, cfg := range cfgs {
			if cfg == cfgKtel1 { // a reference for the tables, clutter here
				continue
			}
			s := series{name: cfg, color: colors[cfg]}
			for _, r := range results {
				if l := r.lat[cfg]; len(l) > 0 {
					s.pts = append(s.pts, point{float64(r.n), percentile(l, p) / 1e3})
				}
			}
			out = append(out, s)
		}
		return out
	}
	var apply []series
	for _, cfg := range cfgs {
		if cfg == cfgDirect || cfg == cfgKtel || cfg == cfgKtel1 {
			continue
		}
		apply = append(apply, series{name: cfg + "-restore", color: colors[cfg]})
	}
	apply = append(apply, series{name: "ktel lb.Load", color: colors["ktel load"]},
		series{name: "ktel parsing the file", color: colors["ktel parse"], dashed: true},
		series{name: "ktel map writes", color: colors["ktel maps"], dashed: true})
	for i := range apply {
		key := strings.TrimSuffix(apply[i].name, "-restore")
		switch apply[i].name {
		case "ktel lb.Load":
			key = "ktel load"
		case "ktel parsing the file":
			key = "ktel parse"
		case "ktel map writes":
			key = "ktel maps"
		}
		for _, r := range results {
			if d, ok := r.apply[key]; ok {
				apply[i].pts = append(apply[i].pts, point{float64(r.n), d.Seconds() * 1e3})
			}
		}
	}

	const pw, ph, gap = 420, 320, 30
	var b strings.Builder
	width, height := 3*pw+4*gap, ph+175
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="12">`+"\n", width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="15" font-weight="bold">TCP connect to the last of N services: direct vs ktel lb vs kube-proxy-style iptables</text>`+"\n", gap)
	fmt.Fprintf(&b, `<text x="%d" y="40" fill="#555">%s</text>`+"\n", gap, html.EscapeString(machine))
	panel(&b, gap, 60, pw, ph, "connect+close p50 (µs)", latency(50))
	panel(&b, 2*gap+pw, 60, pw, ph, "connect+close p99 (µs)", latency(99))
	panel(&b, 3*gap+2*pw, 60, pw, ph, "time to apply N services (ms)", apply)
	b.WriteString("</svg>\n")
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// panel draws one log-log plot with its legend below.
func panel(b *strings.Builder, x0, y0, w, h int, title string, ss []series) {
	const ml, mb, mt = 55, 35, 20 // margins: left, bottom, top
	xmin, xmax, ymin, ymax := math.Inf(1), math.Inf(-1), math.Inf(1), math.Inf(-1)
	for _, s := range ss {
		for _, p := range s.pts {
			if p.y <= 0 {
				continue
			}
			xmin, xmax = math.Min(xmin, p.x), math.Max(xmax, p.x)
			ymin, ymax = math.Min(ymin, p.y), math.Max(ymax, p.y)
		}
	}
	if math.IsInf(xmin, 0) {
		return
	}
	lx0, lx1 := math.Floor(math.Log10(xmin)), math.Ceil(math.Log10(xmax))
	ly0, ly1 := math.Floor(math.Log10(ymin)), math.Ceil(math.Log10(ymax))
	if lx1 == lx0 {
		lx1++
	}
	if ly1 == ly0 {
		ly1++
	}
	px := func(x float64) float64 { return float64(x0+ml) + (math.Log10(x)-lx0)/(lx1-lx0)*float64(w-ml) }
	py := func(y float64) float64 { return float64(y0+mt+h-mb) - (math.Log10(y)-ly0)/(ly1-ly0)*float64(h-mb-mt) }

	fmt.Fprintf(b, `<text x="%d" y="%d" font-weight="bold">%s</text>`+"\n", x0+ml, y0+12, html.EscapeString(title))
	fmt.Fprintf(b, `<g stroke="#ddd">`)
	for d := lx0; d <= lx1; d++ {
		fmt.Fprintf(b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d"/>`, px(math.Pow(10, d)), y0+mt, px(math.Pow(10, d)), y0+mt+h-mb)
	}
	for d := ly0; d <= ly1; d++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, d)
			if v > math.Pow(10, ly1) {
				break
			}
			stroke := ""
			if m != 1 {
				stroke = ` stroke="#f0f0f0"`
			}
			fmt.Fprintf(b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f"%s/>`, x0+ml, py(v), x0+w, py(v), stroke)
		}
	}
	fmt.Fprintf(b, "</g>\n")
	for d := lx0; d <= lx1; d++ {
		fmt.Fprintf(b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`, px(math.Pow(10, d)), y0+mt+h-mb+15, num(math.Pow(10, d)))
	}
	fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="middle">services</text>`+"\n", x0+ml+(w-ml)/2, y0+mt+h-mb+30)
	for d := ly0; d <= ly1; d++ {
		for _, m := range []float64{1, 2, 5} {
			v := m * math.Pow(10, d)
			if v > math.Pow(10, ly1) || (m != 1 && ly1-ly0 > 3) {
				continue
			}
			fmt.Fprintf(b, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`, x0+ml-4, py(v)+4, num(v))
		}
	}
	fmt.Fprintln(b)
	for i, s := range ss {
		if len(s.pts) == 0 {
			continue
		}
		var pts []string
		for _, p := range s.pts {
			if p.y > 0 {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(p.x), py(p.y)))
			}
		}
		dash := ""
		if s.dashed {
			dash = ` stroke-dasharray="6,4"`
		}
		fmt.Fprintf(b, `<polyline fill="none" stroke="%s" stroke-width="2"%s points="%s"/>`, s.color, dash, strings.Join(pts, " "))
		for _, p := range pts {
			xy := strings.Split(p, ",")
			fmt.Fprintf(b, `<circle cx="%s" cy="%s" r="3" fill="%s"/>`, xy[0], xy[1], s.color)
		}
		ly := y0 + h + 25 + 16*i
		fmt.Fprintf(b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"%s/>`, x0+ml, ly-4, x0+ml+24, ly-4, s.color, dash)
		fmt.Fprintf(b, `<text x="%d" y="%d">%s</text>`+"\n", x0+ml+30, ly, html.EscapeString(s.name))
	}
}

func num(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%gM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%gk", v/1e3)
	}
	return fmt.Sprintf("%g", v)
}
